"""Incremental detokenization, safe for multi-byte UTF-8 split across tokens, with stop strings."""

from __future__ import annotations


class IncrementalDetokenizer:
    """Turns a growing id list into text deltas.

    Decodes only a short window (prefix_offset:) each time and holds back text that ends in an
    incomplete UTF-8 sequence (U+FFFD) until the next token completes it. With stop strings it
    also holds back the last len(longest stop) - 1 characters, so nothing past a stop is emitted.
    """

    def __init__(self, tokenizer, prompt_ids: list[int], stop: tuple[str, ...] = (), intercept: tuple[str, ...] = ()):
        self.tok = tokenizer
        self.ids = list(prompt_ids)
        self.prefix_offset = max(len(prompt_ids) - 6, 0)
        self.read_offset = len(prompt_ids)
        self.text = ""  # all output text decoded so far
        self.emitted = 0  # characters of self.text already handed out
        self.stop = stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.intercept = intercept
        self._scanned = 0  # text checked for intercept strings (each hit is new text's)

    def append(self, token_id: int) -> None:
        self.ids.append(token_id)
        prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.tok.decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)

    def find_stop(self) -> bool:
        """Cuts the text before the first stop string; True if one was found."""
        if not self.stop:
            return False
        start = max(0, self.emitted - self.holdback)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if not hits:
            return False
        self.text = self.text[:min(hits)]
        return True

    def find_intercept(self) -> bool:
        """Whether text decoded since the last call completes an intercept string (a tool call:
        the text keeps it, the request pauses after it)."""
        if not self.intercept or len(self.text) == self._scanned:
            return False
        hit = any(self.text.find(s, max(0, self._scanned - len(s) + 1)) >= 0 for s in self.intercept)
        self._scanned = len(self.text)
        return hit

    def flush(self) -> None:
        """At the end: emit whatever is pending, incomplete characters included."""
        full = self.tok.decode(self.ids[self.prefix_offset:])
        prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset])
        if len(full) > len(prefix):
            self.text += full[len(prefix):]
            self.prefix_offset = self.read_offset = len(self.ids)

    def delta(self, finished: bool) -> str:
        end = len(self.text) if finished else max(self.emitted, len(self.text) - self.holdback)
        out = self.text[self.emitted:end]
        self.emitted = end
        return out
