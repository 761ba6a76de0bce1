"""Model-free drafters for speculative decoding (jinfer.speculation.Drafter): prompt lookup
(n-gram) and SuffixDecoding (Oliaro et al., NeurIPS'25).

Both run on the engine's host thread between steps, in pure Python, so both keep incremental
indexes: their work per token does not grow with the context (tools/bench_drafters.py measures
it).

A request's tokens reach a drafter twice, through observe(new_tokens) and through propose's
output_ids; each drafter takes whichever shows a token first and ignores the second sighting, so
an engine may call either or both (`_Progress`).
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Sequence

from jinfer.config import SpeculationConfig
from jinfer.speculation import NO_DRAFT, Draft
from scheduler.speculation.suffix_draft import speculate
from scheduler.speculation.suffix_tree import SuffixTree
from scheduler.speculation.tail_matcher import TailMatcher


class _Progress:
    """How many output tokens a drafter has taken in, whether from observe or from propose."""

    __slots__ = ("taken", "reported")

    def __init__(self):
        self.taken = 0     # output tokens ingested
        self.reported = 0  # output tokens announced through observe

    def from_observe(self, new_tokens: Sequence[int]) -> list[int]:
        new = [int(t) for t in new_tokens]
        self.reported += len(new)
        fresh = self.reported - self.taken  # <= len(new): taken >= reported before this call
        if fresh <= 0:
            return []
        self.taken = self.reported
        return new[len(new) - fresh:]

    def from_output(self, request_id: str, output_ids: Sequence[int]) -> list[int]:
        if len(output_ids) < self.taken:
            raise ValueError(f"request {request_id!r}: output of {len(output_ids)} tokens, but "
                             f"{self.taken} were already observed")
        fresh = [int(t) for t in output_ids[self.taken:]]
        self.taken = len(output_ids)
        return fresh


def _unknown(request_id: str) -> ValueError:
    return ValueError(f"request {request_id!r} was not started (or already finished)")


# -- n-gram (prompt lookup) -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NgramConfig:
    """Prompt lookup: propose what followed the latest earlier occurrence of the context's last
    n tokens (prompt + output), trying n from max_ngram down to min_ngram."""

    max_ngram: int = 4
    """Longest tail looked up first (tokens)."""
    min_ngram: int = 1
    """Shortest tail looked up (tokens)."""

    def __post_init__(self):
        if self.min_ngram < 1:
            raise ValueError(f"min_ngram={self.min_ngram} must be >= 1")
        if self.max_ngram < self.min_ngram:
            raise ValueError(f"max_ngram={self.max_ngram} must be >= min_ngram={self.min_ngram}")


class _NgramRequest:
    __slots__ = ("tokens", "index", "indexed", "progress")

    def __init__(self, tokens: list[int], sizes: int):
        self.tokens = tokens
        self.index: list[dict[tuple[int, ...], int]] = [{} for _ in range(sizes)]
        self.indexed = 0  # the n-grams followed by tokens[end] for every end <= indexed are indexed
        self.progress = _Progress()


class NgramDrafter:
    """Prompt lookup decoding: a chain copied from the context after the latest earlier
    occurrence of its longest matching tail. Per n, a dict maps each n-gram to where its latest
    occurrence ends; it is brought up to date lazily at propose (O(new tokens x n-gram sizes)),
    so a proposal is O(max_ngram) dict look-ups plus the copy. The draft's score is 0 (no
    estimate)."""

    def __init__(self, config: NgramConfig = NgramConfig()):
        self.config = config
        self._requests: dict[str, _NgramRequest] = {}

    @classmethod
    def from_config(cls, spec: SpeculationConfig) -> "NgramDrafter":
        """From the launch config's speculation section (entrypoints.build.build_drafter)."""
        return cls(NgramConfig(max_ngram=spec.ngram_max, min_ngram=spec.ngram_min))

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._requests

    def start(self, request_id: str, prompt_ids: Sequence[int]) -> None:
        if request_id in self._requests:
            raise ValueError(f"request {request_id!r} already started")
        sizes = self.config.max_ngram - self.config.min_ngram + 1
        self._requests[request_id] = _NgramRequest([int(t) for t in prompt_ids], sizes)

    def observe(self, request_id: str, new_tokens: Sequence[int]) -> None:
        st = self._state(request_id)
        st.tokens.extend(st.progress.from_observe(new_tokens))

    def propose(self, request_id: str, output_ids: Sequence[int], max_draft_tokens: int) -> Draft:
        st = self._state(request_id)
        st.tokens.extend(st.progress.from_output(request_id, output_ids))
        if max_draft_tokens <= 0:
            return NO_DRAFT
        tokens, lo, hi = st.tokens, self.config.min_ngram, self.config.max_ngram
        n_ctx = len(tokens)
        # Index the n-grams that something follows (all but those ending at the tail).
        for end in range(st.indexed + 1, n_ctx):
            for n in range(lo, min(hi, end) + 1):
                st.index[n - lo][tuple(tokens[end - n:end])] = end
        st.indexed = max(st.indexed, n_ctx - 1)
        for n in range(min(hi, n_ctx - 1), lo - 1, -1):
            end = st.index[n - lo].get(tuple(tokens[n_ctx - n:]))
            if end is not None:
                return Draft.chain(tokens[end:end + max_draft_tokens])
        return NO_DRAFT

    def finish(self, request_id: str, output_ids: Sequence[int], aborted: bool) -> None:
        if self._requests.pop(request_id, None) is None:
            raise _unknown(request_id)

    def _state(self, request_id: str) -> _NgramRequest:
        st = self._requests.get(request_id)
        if st is None:
            raise _unknown(request_id)
        return st


# -- SuffixDecoding -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SuffixConfig:
    """SuffixDecoding's knobs. Defaults are the paper's reference implementation's
    (ArcticInference's SuffixDecodingCache.speculate), except max_cached_requests, which it leaves
    unbounded (vLLM: 10000; here the global tree costs ~0.3-0.6 KB per cached token)."""

    max_depth: int = 64
    """Depth cap of both suffix trees: a match plus its draft spans at most this many tokens."""
    max_cached_requests: int = 1000
    """Finished requests whose outputs the global tree keeps, oldest out first; 0: no global tree."""
    max_spec_factor: float = 1.0
    """A match of m tokens may draft floor(max_spec_factor * m + max_spec_offset) tokens."""
    max_spec_offset: float = 0.0
    """Added to max_spec_factor * m (may be negative: demand longer matches)."""
    min_token_prob: float = 0.1
    """Never draft a token whose path probability (its path's count / the match's) is lower."""
    tree: bool = False
    """Draft a tree grown best-first by path probability instead of the most likely chain."""

    def __post_init__(self):
        if self.max_depth < 2:
            raise ValueError(f"max_depth={self.max_depth} must be >= 2 (a match and a draft token)")
        if self.max_cached_requests < 0:
            raise ValueError(f"max_cached_requests={self.max_cached_requests} must be >= 0")
        if not (math.isfinite(self.max_spec_factor) and self.max_spec_factor >= 0):
            raise ValueError(f"max_spec_factor={self.max_spec_factor} must be finite and >= 0")
        if not math.isfinite(self.max_spec_offset):
            raise ValueError(f"max_spec_offset={self.max_spec_offset} must be finite")
        if not 0 <= self.min_token_prob <= 1:
            raise ValueError(f"min_token_prob={self.min_token_prob} must be in [0, 1]")


class _SuffixRequest:
    __slots__ = ("tree", "matcher", "progress")

    def __init__(self, tree: SuffixTree, matcher: TailMatcher | None):
        self.tree = tree  # sequence 0: prompt + output so far
        self.matcher = matcher  # where that sequence's tail matches in the global tree
        self.progress = _Progress()


class SuffixDrafter:
    """SuffixDecoding: drafts from a per-request suffix tree over the request's prompt and output
    and a global suffix tree over the outputs of finished requests (prompts are not in it, as in
    the paper), whichever scores higher (`scheduler.speculation.suffix_draft.speculate`).

    Costs per token: the request's tree takes each token in O(1) plus O(suffixes of its last
    max_depth tokens inside repeated text); the tail's matches in the global tree move in O(their
    number). A finished request's output enters the global tree at the same cost per token and
    leaves it (eviction) in O(tokens x edges per path).
    """

    def __init__(self, config: SuffixConfig = SuffixConfig()):
        self.config = config
        self.search = config
        """The knobs of the suffix-tree search (a subclass may keep its own `config` beside)."""
        self.global_tree = SuffixTree(config.max_depth)
        """Outputs of the last max_cached_requests finished requests (sequence ids in `cached`)."""
        self.cached: collections.deque[int] = collections.deque()
        self._next_seq_id = 0
        self._requests: dict[str, _SuffixRequest] = {}

    @classmethod
    def from_config(cls, spec: SpeculationConfig) -> "SuffixDrafter":
        """From the launch config's speculation section (entrypoints.build.build_drafter)."""
        return cls(SuffixConfig(max_depth=spec.suffix_max_depth,
                                max_cached_requests=spec.suffix_max_cached_requests,
                                max_spec_factor=spec.suffix_max_spec_factor,
                                max_spec_offset=spec.suffix_max_spec_offset,
                                min_token_prob=spec.suffix_min_token_prob, tree=spec.tree))

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._requests

    def start(self, request_id: str, prompt_ids: Sequence[int]) -> None:
        if request_id in self._requests:
            raise ValueError(f"request {request_id!r} already started")
        tree = SuffixTree(self.config.max_depth, removable=False)
        tree.extend(0, [int(t) for t in prompt_ids])
        matcher = None
        if self.config.max_cached_requests:
            matcher = TailMatcher(self.global_tree, tree.sequence(0))
        self._requests[request_id] = _SuffixRequest(tree, matcher)

    def observe(self, request_id: str, new_tokens: Sequence[int]) -> None:
        st = self._state(request_id)
        self._take(st, st.progress.from_observe(new_tokens))

    def propose(self, request_id: str, output_ids: Sequence[int], max_draft_tokens: int) -> Draft:
        st = self._state(request_id)
        self._take(st, st.progress.from_output(request_id, output_ids))
        if max_draft_tokens <= 0:
            return NO_DRAFT
        # The request's own tail always ends where it matches in its own tree (known_ends=1).
        sources = [(st.tree, st.tree.tail_positions(0), 1)]
        if st.matcher is not None:
            sources.append((self._shared_tree(request_id), st.matcher.positions(), 0))
        cfg = self.search
        best = speculate(sources, max_draft_tokens, max_spec_factor=cfg.max_spec_factor,
                         max_spec_offset=cfg.max_spec_offset, min_token_prob=cfg.min_token_prob,
                         tree=cfg.tree)
        if not best.tokens:
            return NO_DRAFT
        return Draft(best.tokens, best.parents, best.score)

    def _shared_tree(self, request_id: str) -> SuffixTree:
        """The tree of other requests' outputs the request's matcher follows."""
        return self.global_tree

    def finish(self, request_id: str, output_ids: Sequence[int], aborted: bool) -> None:
        """Forget the request; its output (even an aborted one's: the model wrote it) joins the
        global tree, evicting the oldest cached outputs beyond max_cached_requests."""
        if self._requests.pop(request_id, None) is None:
            raise _unknown(request_id)
        if not self.config.max_cached_requests or not output_ids:
            return
        seq_id, self._next_seq_id = self._next_seq_id, self._next_seq_id + 1
        self.global_tree.extend(seq_id, [int(t) for t in output_ids])
        self.cached.append(seq_id)
        while len(self.cached) > self.config.max_cached_requests:
            self.global_tree.remove(self.cached.popleft())

    def _take(self, st: _SuffixRequest, tokens: list[int]) -> None:
        if not tokens:
            return
        st.tree.extend(0, tokens)
        if st.matcher is not None:
            for t in tokens:
                st.matcher.advance(t)

    def _state(self, request_id: str) -> _SuffixRequest:
        st = self._requests.get(request_id)
        if st is None:
            raise _unknown(request_id)
        return st
