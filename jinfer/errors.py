"""Helpers for error messages at jinfer's boundaries."""

from __future__ import annotations


def shorten(value, limit: int = 80) -> str:
    """repr(value), cut to about `limit` characters with the full length noted: error messages
    quote bad values this way, so a 2 MB value cannot overflow a gRPC status header."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} chars)"


class PlanRejected(RuntimeError):
    """The runner could not build a step from a plan (its host arrays); nothing was launched,
    so the plan can be undone. The cause is chained (__cause__)."""


class StepFailed(RuntimeError):
    """A step failed on the host before it was launched, and the requests it was built from
    are named: `culprits` maps each public request id to why it cannot be stepped. The step
    was rolled back, so every other request carries on (the engine loop fails the culprits
    alone). Values are checked at the door (SamplingParams); this is the net behind it."""

    def __init__(self, culprits: dict[str, BaseException], cause: BaseException):
        names = ", ".join(shorten(i) for i in list(culprits)[:3])
        super().__init__(f"a step could not be built for request(s) {names}: {cause!r}")
        self.culprits, self.cause = culprits, cause
