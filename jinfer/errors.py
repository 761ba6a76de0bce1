"""Helpers for error messages at jinfer's boundaries."""

from __future__ import annotations


def shorten(value, limit: int = 80) -> str:
    """repr(value), cut to about `limit` characters with the full length noted: error messages
    quote bad values this way, so a 2 MB value cannot overflow a gRPC status header."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} chars)"
