"""Drafting from suffix-tree matches (SuffixDecoding, Oliaro et al., NeurIPS'25): which match to
grow, how far, and the draft it grows, ranked by path probability, count(P + X) / count(P).

The trees themselves (counts, compressed edges, positions) are suffix_tree.py's; this module only
reads them: a position (node, m) is the end of an m-token path inside node's edge.
"""

from __future__ import annotations

import functools
import heapq
import math
from typing import TYPE_CHECKING, NamedTuple, Sequence

if TYPE_CHECKING:  # (annotations only: suffix_tree imports this module)
    from scheduler.speculation.suffix_tree import Position, SuffixTree, _Node

_TIE = 1e-9


class SuffixDraft(NamedTuple):
    """A draft grown from one match: tokens in topological order, their parents (-1: the last
    context token), each token's path probability, and the length of the match it continues."""

    tokens: tuple[int, ...] = ()
    parents: tuple[int, ...] = ()
    probs: tuple[float, ...] = ()
    score: float = 0.0
    """Sum of probs: the expected number of accepted tokens if counts were probabilities."""
    match_len: int = 0


NO_SUFFIX_DRAFT = SuffixDraft()


def spec_budget(match_len: int, max_draft_tokens: int, max_spec_factor: float, max_spec_offset: float) -> int:
    """Tokens a match of match_len tokens may draft: min(max_draft_tokens, floor(factor * m + offset))."""
    # The epsilon keeps 0.29 * 100 at 29, as the reference implementation's does.
    return max(0, min(max_draft_tokens, math.floor(max_spec_factor * match_len + max_spec_offset + 1e-6)))


def speculate(sources: Sequence[tuple[SuffixTree, Sequence[Position], int]], max_draft_tokens: int, *,
              max_spec_factor: float = 1.0, max_spec_offset: float = 0.0,
              min_token_prob: float = 0.1, tree: bool = False) -> SuffixDraft:
    """The best-scoring draft over the matches of a pattern in one or more trees.

    sources: (tree, positions, known_ends) per tree, the preferred tree first; positions (node, m)
    of the pattern's last m tokens (`SuffixTree.match`, `tail_positions`, `TailMatcher`);
    known_ends: occurrences of each matched path known to end right there (1 for a request's own
    tail in its own tree, else 0); it only tightens the bound that skips hopeless matches.

    Every match is a candidate that may draft spec_budget(m) tokens (and max_depth - m at most,
    all the tree holds below it): the chain of most frequent children (ties: the smallest
    token), or (tree=True) the subtree grown best-first by path probability; tokens below
    min_token_prob are never drafted. Its score is the sum of its path probabilities; the best
    wins, ties going to the earlier source, then the longer match. Matches are tried in order of
    an upper bound on their score (budget x the first token's best probability) and the search
    stops when no bound can win, so a call usually grows one or two drafts.
    """
    cands = _candidates(sources, max_draft_tokens, max_spec_factor, max_spec_offset)
    if not cands:
        return NO_SUFFIX_DRAFT
    grow = _grow_tree if tree else _grow_chain
    # Candidates order by (bound, rank, m), unique per candidate, so tuples compare without
    # reaching the nodes. The top one usually scores its bound (its continuation is certain):
    # then nothing can beat it and the others are never sorted.
    top = max(cands)
    first = grow(top[4], top[2], top[3], min_token_prob, top[5])
    first_score = sum(first[2])
    if first[0] and first_score >= top[0] - _TIE * max(1.0, top[0]):
        return SuffixDraft(tuple(first[0]), tuple(first[1]), tuple(first[2]), first_score, top[2])
    cands.sort(reverse=True)
    best, best_score, best_rank = NO_SUFFIX_DRAFT, 0.0, None
    for cand in cands:
        bound, rank, m, n, node, md = cand
        if best_rank is not None:
            # Scores within _TIE of each other tie (sums of the same ratios in another order).
            # Once a bound cannot beat the best, or can only tie it from a worse (rank, m),
            # nothing after it can (and distinct bounds are never that close).
            tol = _TIE * max(1.0, best_score)
            if bound < best_score - tol or (bound <= best_score + tol and (rank, m) < best_rank):
                break
        if cand is top:
            (tokens, parents, probs), score = first, first_score
        else:
            tokens, parents, probs = grow(node, m, n, min_token_prob, md)
            score = sum(probs)
        if not tokens:
            continue
        tol = _TIE * max(1.0, best_score)
        if best_rank is None or score > best_score + tol or (
                score >= best_score - tol and (rank, m) > best_rank):
            best_score, best_rank = score, (rank, m)
            best = SuffixDraft(tuple(tokens), tuple(parents), tuple(probs), score, m)
    return best


def _candidates(sources: Sequence[tuple[SuffixTree, Sequence[Position], int]], max_draft_tokens: int,
                factor: float, offset: float) -> list[tuple]:
    """(bound on the score, -source rank, m, budget, node, max_depth) for every match that may
    draft: its budget times the share of its occurrences not known to end at it."""
    cands = []
    for rank, (st, positions, known) in enumerate(sources):
        md = st.max_depth
        budgets = _budgets(max_draft_tokens, factor, offset, md)
        if not known:  # the bound is the budget: every continuation may be certain
            cands += [(budgets[m], -rank, m, budgets[m], node, md) for node, m in positions if budgets[m] > 0]
            continue
        for node, m in positions:
            n, count = budgets[m], node.count
            if n > 0 and count > known:
                cands.append((n * (count - known) / count, -rank, m, n, node, md))
    return cands


@functools.lru_cache(maxsize=256)
def _budgets(max_draft_tokens: int, factor: float, offset: float, max_depth: int) -> tuple[int, ...]:
    """Per match length m (index), the tokens it may draft: spec_budget and the room below it."""
    return tuple(min(spec_budget(m, max_draft_tokens, factor, offset), max_depth - m)
                 for m in range(max_depth + 1))


def _grow_chain(node: _Node, m: int, n: int, min_prob: float, md: int):
    """Up to n tokens following position (node, m) along the most frequent child (ties: the
    smallest token)."""
    base = node.count
    tokens: list[int] = []
    probs: list[float] = []
    while True:
        end = node.depth
        if end < 0:
            end = min(len(node.seq) - node.start, md)
        if m < end:  # the rest of this edge: one count, so one probability
            k = min(end - m, n - len(tokens))
            tokens.extend(node.seq[node.start + m:node.start + m + k])
            probs.extend([node.count / base] * k)
            m += k
            if len(tokens) >= n:
                break
        best, best_count, best_token = None, 0, 0
        for token, child in node.children.items():
            if child.count > best_count or (child.count == best_count and token < best_token):
                best, best_count, best_token = child, child.count, token
        if best is None or best_count / base < min_prob:
            break
        node = best
    return tokens, list(range(-1, len(tokens) - 1)), probs


def _grow_tree(node: _Node, m: int, n: int, min_prob: float, md: int):
    """Up to n tokens below position (node, m), most probable paths first (parents first)."""
    base = node.count
    tokens: list[int] = []
    parents: list[int] = []
    probs: list[float] = []
    heap = [(-1.0, 0, node, m, -1)]  # (-path probability, tie-break, node, position, parent index)
    pushed = 1
    while heap and len(tokens) < n:
        neg_p, _, node, m, parent = heapq.heappop(heap)
        end = node.end(md)
        if m < end:
            k = min(end - m, n - len(tokens))
            for token in node.seq[node.start + m:node.start + m + k]:
                tokens.append(token)
                parents.append(parent)
                probs.append(-neg_p)
                parent = len(tokens) - 1
            m += k
            if m < end:
                break
        for child in node.children.values():
            p = child.count / base
            if p >= min_prob:
                heapq.heappush(heap, (-p, pushed, child, m, parent))
                pushed += 1
    return tokens, parents, probs
