"""The suffix tree (scheduler/speculation/suffix_tree.py) against brute force: counts of every substring up
to max_depth, longest matches, tail matchers, drafts and their path probabilities, eviction."""

import collections

import pytest
from hypothesis import given, settings, strategies as st

from scheduler.speculation.drafters import SuffixConfig, SuffixDrafter
from scheduler.speculation.suffix_tree import SuffixTree, TailMatcher, spec_budget, speculate

SETTINGS = settings(max_examples=100, deadline=None)


def brute_counts(seqs, max_depth):
    """Occurrences of every substring of length 1..max_depth."""
    counts = collections.Counter()
    for seq in seqs:
        for i in range(len(seq)):
            for j in range(i + 1, min(len(seq), i + max_depth) + 1):
                counts[tuple(seq[i:j])] += 1
    return dict(counts)


def brute_longest(counts, pattern, max_depth):
    m = 0
    while m < min(len(pattern), max_depth) and tuple(pattern[len(pattern) - m - 1:]) in counts:
        m += 1
    return m


def brute_draft(counts, pattern, max_depth, max_draft_tokens, factor, offset, min_prob, tree):
    """(score, match length, chain tokens) of the best candidate, by definition: per match m,
    chain = greedy most frequent child (ties: smallest token); tree = top-n path probabilities."""
    best = (0.0, 0, None)
    for m in range(1, min(len(pattern), max_depth - 1) + 1):
        tail = tuple(pattern[-m:])
        if tail not in counts:
            break
        base = counts[tail]
        n = min(spec_budget(m, max_draft_tokens, factor, offset), max_depth - m)
        tokens = None
        if tree:
            probs = sorted((c / base for path, c in counts.items()
                            if len(path) > m and path[:m] == tail and c / base >= min_prob), reverse=True)
            score = sum(probs[:n])
        else:
            path, tokens, score = tail, [], 0.0
            while len(tokens) < n:
                nxt = [(c, -path_[-1]) for path_, c in counts.items()
                       if len(path_) == len(path) + 1 and path_[:-1] == path]
                if not nxt:
                    break
                c, neg_token = max(nxt)
                if c / base < min_prob:
                    break
                path += (-neg_token,)
                tokens.append(-neg_token)
                score += c / base
        if score > 0 and (score > best[0] + 1e-9 or (score >= best[0] - 1e-9 and m > best[1])):
            best = (score, m, tokens)
    return best


# A script of tree changes: extend sequence `sid` by tokens, or remove one (by index into those present).
OPS = st.lists(st.one_of(
    st.tuples(st.just("extend"), st.integers(0, 3), st.lists(st.integers(0, 2), max_size=8)),
    st.tuples(st.just("remove"), st.integers(0, 3), st.just([]))), min_size=1, max_size=10)


def apply(tree, seqs, op):
    kind, sid, tokens = op
    if kind == "extend":
        tree.extend(sid, tokens)
        seqs.setdefault(sid, []).extend(tokens)
    elif seqs:
        victim = sorted(seqs)[sid % len(seqs)]
        tree.remove(victim)
        del seqs[victim]


@SETTINGS
@given(max_depth=st.integers(1, 6), ops=OPS)
def test_counts_equal_substring_occurrences_after_appends_and_removals(max_depth, ops):
    tree, seqs = SuffixTree(max_depth), {}
    for op in ops:
        apply(tree, seqs, op)
        tree.check()
        assert tree.paths() == brute_counts(seqs.values(), max_depth)
        assert tree.num_tokens() == sum(map(len, seqs.values()))


@SETTINGS
@given(max_depth=st.integers(1, 6), ops=OPS, query=st.lists(st.integers(0, 2), max_size=8))
def test_longest_match_is_longest_occurring_tail(max_depth, ops, query):
    tree, seqs = SuffixTree(max_depth), {}
    for op in ops:
        apply(tree, seqs, op)
    counts = brute_counts(seqs.values(), max_depth)
    assert tree.longest_match(query) == brute_longest(counts, query, max_depth)
    for m in range(1, min(len(query), max_depth) + 1):
        assert tree.count(query[-m:]) == counts.get(tuple(query[-m:]), 0)


def test_hand_worked_counts_and_draft():
    tree = SuffixTree(max_depth=3)
    tree.extend(7, [1, 2, 3, 1, 2])  # "abcab"
    assert tree.paths() == {(1,): 2, (1, 2): 2, (1, 2, 3): 1, (2,): 2, (2, 3): 1, (2, 3, 1): 1,
                            (3,): 1, (3, 1): 1, (3, 1, 2): 1}
    # After "b": "ab" ended once at the tail, continued once with "c" -> "c" has probability 1/2,
    # and "ca" (depth 3 after "b") too; a match of 1 token may draft 1 token, so the best is the
    # match "b" (m=1) drafting "c", or m=2 "ab" drafting "c" (budget 2, room 1): a tie -> longer.
    draft = tree.speculate([1, 2], max_draft_tokens=4, min_token_prob=0.1)
    assert (draft.tokens, draft.probs, draft.match_len) == ((3,), (0.5,), 2)


@SETTINGS
@given(max_depth=st.integers(2, 7), ops=OPS, pattern=st.lists(st.integers(0, 2), min_size=1, max_size=9),
       max_draft_tokens=st.integers(1, 8), factor=st.sampled_from([0.5, 1.0, 2.0]),
       offset=st.sampled_from([-1.0, 0.0, 1.0]), min_prob=st.sampled_from([0.0, 0.1, 0.3, 0.5]),
       tree_mode=st.booleans())
def test_drafts_match_brute_force(max_depth, ops, pattern, max_draft_tokens, factor, offset, min_prob, tree_mode):
    tree, seqs = SuffixTree(max_depth), {}
    for op in ops:
        apply(tree, seqs, op)
    counts = brute_counts(seqs.values(), max_depth)
    draft = tree.speculate(pattern, max_draft_tokens, max_spec_factor=factor, max_spec_offset=offset,
                           min_token_prob=min_prob, tree=tree_mode)
    score, match_len, chain = brute_draft(counts, pattern, max_depth, max_draft_tokens, factor, offset,
                                          min_prob, tree_mode)
    assert draft.score == pytest.approx(score, abs=1e-9)
    assert len(draft.tokens) <= max_draft_tokens
    if not draft.tokens:
        return
    assert draft.match_len == match_len
    if not tree_mode:
        assert list(draft.tokens) == chain and draft.parents == tuple(range(-1, len(chain) - 1))
    # Every token's probability is its path's count over the match's; parents come first and no
    # parent has two children with the same token.
    tail = tuple(pattern[-match_len:])
    paths = []
    for i, (token, parent) in enumerate(zip(draft.tokens, draft.parents)):
        assert -1 <= parent < i
        paths.append((paths[parent] if parent >= 0 else tail) + (token,))
        assert draft.probs[i] == counts[paths[i]] / counts[tail] >= min_prob
    assert len(set(paths)) == len(paths)
    assert max(map(len, paths)) <= max_depth


@SETTINGS
@given(max_depth=st.integers(1, 6), script=st.lists(st.one_of(
    st.tuples(st.just("tree"), OPS), st.tuples(st.just("ctx"), st.lists(st.integers(0, 2), min_size=1, max_size=4))),
    max_size=8))
def test_tail_matcher_equals_matching_from_scratch(max_depth, script):
    tree, seqs, context = SuffixTree(max_depth), {}, []
    matcher = TailMatcher(tree, context)
    for kind, arg in script:
        if kind == "tree":
            for op in arg:
                apply(tree, seqs, op)
        else:
            for token in arg:
                context.append(token)
                matcher.advance(token)
        assert matcher.positions() == tree.match(context)


@SETTINGS
@given(max_depth=st.integers(2, 7), tokens=st.lists(st.integers(0, 2), min_size=1, max_size=30),
       max_draft_tokens=st.integers(1, 8), tree_mode=st.booleans())
def test_tail_positions_draft_like_matching_the_tail(max_depth, tokens, max_draft_tokens, tree_mode):
    tree = SuffixTree(max_depth, removable=False)
    for token in tokens:  # one at a time, as a request grows
        tree.append(0, token)
    tree.check()
    expected = {m: node for node, m in tree.match(tokens) if node.count > 1}
    assert {m: node for node, m in tree.tail_positions(0)} == expected
    fast = speculate([(tree, tree.tail_positions(0), 1)], max_draft_tokens, tree=tree_mode)
    slow = tree.speculate(tokens, max_draft_tokens, tree=tree_mode)
    assert (fast.tokens, fast.parents, fast.match_len) == (slow.tokens, slow.parents, slow.match_len)


@SETTINGS
@given(max_cached=st.integers(1, 3), outputs=st.lists(st.lists(st.integers(0, 2), max_size=6), max_size=6))
def test_global_tree_keeps_the_latest_outputs(max_cached, outputs):
    drafter = SuffixDrafter(SuffixConfig(max_depth=4, max_cached_requests=max_cached))
    for i, output in enumerate(outputs):
        drafter.start(str(i), [0])
        drafter.finish(str(i), output, aborted=False)
        drafter.global_tree.check()
    kept = [o for o in outputs if o][-max_cached:]
    assert drafter.global_tree.paths() == brute_counts(kept, 4)
    assert [drafter.global_tree.sequence(s) for s in drafter.cached] == kept


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="max_depth=0"):
        SuffixTree(0)
    with pytest.raises(ValueError, match="removable=False"):
        SuffixTree(4, removable=False).remove(0)
    with pytest.raises(ValueError, match="seq_id=3"):
        SuffixTree(4).remove(3)
