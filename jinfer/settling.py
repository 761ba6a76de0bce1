"""Settling a step: what happens once the device returns (drafts verified, tokens appended,
prefill done, finish and pause rules, stop and intercept strings, pages freed), in one method
the engine, the simulators and the tests all call with the step's sampled rows, as vLLM v1's
update_from_output does."""

from __future__ import annotations

from typing import Sequence

from jinfer.request import Request, Status
from jinfer.speculation import verify
from jinfer.step_plan import ScheduledSeq, Settled, StepPlan

_INTERCEPT = "intercept"  # a request's text found an intercept string: it pauses


class Settling:
    """The scheduler's settling of steps (jinfer.scheduling.Scheduler mixes it in): it uses the
    scheduler's queues, pages, drafter and draft budget, its spec stats, its EOS ids and its
    length rule."""

    def append_token(self, req: Request, token: int) -> None:
        """The host has read one of the request's pending tokens (oldest first)."""
        assert req.num_pending > 0, f"{req.request_id} has no pending token"
        req.num_pending -= 1
        req.output_ids.append(token)

    def update(self, plan: StepPlan, reqs: Sequence[Request], sampled: Sequence, *,
               repeats: int = 1) -> list[Settled]:
        """Settles a step once its samples are read (vLLM v1's update_from_output).

        reqs and sampled are parallel to plan.seqs; a sequence's samples are its sampled rows:
        one token, or with a draft of k tokens k + 1 (after the last known token, then after
        each draft token). For every sequence that sampled, of a request not finished or
        aborted since the step was planned: verifies the draft (jinfer.speculation.verify:
        the accepted tokens, the draft budget told; the step moved a tree's path into place),
        appends the tokens, shares the prompt's pages once its prefill is done, applies the
        finish rules (EOS / stop token ids, stop strings in the request's text, then length)
        and the pause rules (intercept token ids and strings); rejected draft positions are
        rolled back; a finished request gets its status and reason and releases its pages.
        The engine, the simulators and the tests all settle steps here.

        repeats > 1: the plan, all decodes without drafts, ran that many times in a row (the
        simulator's fast-forward over a stretch nothing else joins); each sequence's samples
        are its `repeats` tokens, one per step, the later ones' K/V pages taken from the free
        pool (AssertionError if they are not there: the caller checks). Tokens after one that
        finishes or pauses a request are dropped.
        """
        settled = []
        if repeats > 1:
            self._check_repeated(plan, reqs, sampled, repeats)
        if any(self.read_first(seq) for seq in plan.seqs):
            self._unsettled_draft = False  # (the plan that set it: a step planned after it never is)
        for i, (seq, req, rows) in enumerate(zip(plan.seqs, reqs, sampled)):
            if seq.num_draft:  # its draft is read now: no longer the request's tentatively
                req.num_tentative -= len(req.tentative.pop(0))
            if req.status is Status.PAUSED:  # paused by the step before: this sample is past its tool call
                req.num_pending -= seq.sample
                continue
            if not seq.sample or req.status is Status.FINISHED:
                continue
            rows = (rows,) if isinstance(rows, int) else tuple(rows)
            if repeats > 1:
                new, rows = rows, tuple(range(repeats))
                appended, reason, pause = self._take_run(req, new)
                req.num_computed_tokens += len(appended) - 1  # each later step wrote the K/V of the one before
                extended = self.kv.extend(req, req.num_computed_tokens)
                assert extended, f"{req.request_id}: no free pages for the K/V of its repeated steps"
            else:
                new, rows = self._verify(seq, req, rows)
                appended, reason, pause = self._take_tokens(req, new)
            if seq.num_draft:
                self._settle_draft(seq, req, len(new), len(appended))
            if len(seq.token_ids) - seq.num_draft > 1:
                self.on_prefill_done(req)
            if req.request_id in self._drafting:
                self._call_drafter("observe", req.request_id, appended)
            if reason:
                req.status, req.finish_reason = Status.FINISHED, reason
                self.finish(req)
            elif pause:
                self._pause(req)
            settled.append(Settled(i, req, tuple(appended), reason, rows[:len(appended)], pause))
        return settled

    def _take_tokens(self, req: Request, new: Sequence[int]) -> tuple[list[int], str | None, bool]:
        """Appends the tokens a step gives req, oldest first, up to one that finishes or pauses
        it: (the tokens appended, the finish reason or None, whether it pauses)."""
        appended, reason, pause = [], None, False
        for token in new:
            appended.append(token)
            if len(appended) > 1:
                req.num_pending += 1  # accepted draft tokens arrive beyond the one planned
            self.append_token(req, token)
            reason = self.finish_reason(req, token)
            if req.text is not None:
                reason = _text_rules(req.text, token, reason)
            pause = reason == _INTERCEPT or not reason and (token in req.params.intercept_token_ids or (
                req.intercept_after is not None and len(req.output_ids) >= req.intercept_after))
            reason = None if pause else reason
            if reason or pause:
                break
        return appended, reason, pause

    def _check_repeated(self, plan: StepPlan, reqs: Sequence[Request], sampled: Sequence, repeats: int) -> None:
        """ValueError (nothing settled) unless the plan can be settled as run `repeats` times:
        decodes without drafts, each with `repeats` samples, of requests running with only
        that plan's token unread (no step in flight after it)."""
        for seq, req, rows in zip(plan.seqs, reqs, sampled):
            n = 1 if isinstance(rows, int) else len(rows)
            if seq.num_draft or len(seq.token_ids) != 1 or n != repeats:
                raise ValueError(f"{req.request_id}: a plan run {repeats} times takes one decode token per sequence, "
                                 f"no draft and {repeats} samples, not {len(seq.token_ids)} tokens, "
                                 f"{seq.num_draft} drafted and {n} samples")
            if req.status is not Status.RUNNING or req.num_pending != 1:
                raise ValueError(f"{req.request_id} is {req.status.value} with {req.num_pending} tokens unread: "
                                 "a plan run several times needs its one token unread, nothing after it in flight")

    def _take_run(self, req: Request, new: Sequence[int]) -> tuple[list[int], str | None, bool]:
        """_take_tokens for a decode's repeated steps: in bulk when no token of them can finish
        or pause the request but the length rule (the simulator's stretches: no text, no EOS)."""
        p = req.params
        fires = set(p.stop_token_ids) | set(p.intercept_token_ids) | (set() if p.ignore_eos else self.eos_ids)
        if req.text is not None or req.intercept_after is not None or not fires.isdisjoint(new):
            return self._take_tokens(req, new)
        room = min(p.max_tokens, self.cfg.max_model_len - len(req.prompt_ids)) - len(req.output_ids)
        appended = list(new[:max(room, 1)])
        req.num_pending -= 1  # the one token planned; the others' steps were never planned
        req.output_ids.extend(appended)
        return appended, self.finish_reason(req), False

    def _settle_draft(self, seq: ScheduledSeq, req: Request, num_new: int, num_appended: int) -> None:
        """Rolls back what the step's draft got wrong and counts how it went: num_new tokens
        came of it (`_verify`), num_appended of them were appended."""
        # Appended: the accepted draft tokens + the model's own (or fewer, if one of them
        # finished the request). The K/V of the step's token and of the accepted draft tokens
        # stay; the rejected rest is rolled back (its slots are rewritten by later steps; its
        # pages are kept for them). A step planned after this one (drafts in flight) counted the
        # whole draft: the runner moved its tokens back on the device, and so does this count.
        # (A request preempted since holds nothing computed.)
        if req.status is Status.RUNNING:
            req.num_computed_tokens -= len(seq.token_ids) - num_appended
        accepted = min(num_new - 1, num_appended)  # emitted draft tokens
        self.spec.draft_tokens += seq.num_draft
        self.spec.accepted_tokens += accepted
        self.spec.spec_steps += 1
        req.num_draft_tokens += seq.num_draft
        req.num_accepted_tokens += accepted
        req.num_spec_steps += 1

    def _verify(self, seq: ScheduledSeq, req: Request, sampled: tuple[int, ...]):
        """(tokens the step gives the sequence, their sampled rows): its one sample,
        or its draft verified against the samples (the draft budget hears how it went)."""
        k = seq.num_draft
        if not k:
            return sampled[:1], (0,)
        verdict = verify(seq.token_ids[-k:], seq.draft_parents or tuple(range(-1, k - 1)), sampled)
        if self.budget is not None:
            self.budget.observe_verify(req.request_id, len(verdict.path), verdict.stopped)
        return verdict.emitted, verdict.rows

    def finish_reason(self, req: Request, token: int | None = None) -> str | None:
        """"stop" if `token` ends the request (EOS unless ignored, or a stop token id), "length"
        if its read tokens reached max_tokens or max_model_len, else None."""
        p = req.params
        if token is not None and ((token in self.eos_ids and not p.ignore_eos) or token in p.stop_token_ids):
            return "stop"
        return "length" if self.reached_length(req, pending=False) else None


def _text_rules(text, token: int, reason: str | None) -> str | None:
    """The finish reason once `token` joins the request's text (an IncrementalDetokenizer):
    "stop" at a stop string (the text is cut before it), _INTERCEPT at an intercept string,
    else `reason`, the token rules' (at any finish the held-back text is flushed first)."""
    text.append(token)
    if text.find_stop():
        return "stop"
    if reason is None:
        return _INTERCEPT if text.find_intercept() else None
    text.flush()
    return "stop" if text.find_stop() else reason
