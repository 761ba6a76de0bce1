"""Model-free drafters (scheduler/speculation/drafters.py) through the Drafter interface: what the n-gram
drafter copies, long correct drafts on repeated generations, request bookkeeping, draft shapes."""

import random

import pytest
from hypothesis import given, settings, strategies as st

from entrypoints.build import build_drafter
from jinfer.config import SpeculationConfig
from jinfer.speculation import NO_DRAFT, Draft, Drafter
from scheduler.speculation.drafters import NgramConfig, NgramDrafter, SuffixConfig, SuffixDrafter
from scheduler.speculation.suffix_tree import SuffixTree, speculate

DRAFTERS = {
    "ngram": lambda: NgramDrafter(),
    "suffix": lambda: SuffixDrafter(),
    "suffix_tree": lambda: SuffixDrafter(SuffixConfig(tree=True)),
}


def accepted(draft: Draft, truth) -> int:
    """Draft tokens greedy verification keeps when the model's next tokens are `truth`."""
    node, k = -1, 0
    while k < len(truth):
        nxt = [i for i, p in enumerate(draft.parents) if p == node and draft.tokens[i] == truth[k]]
        if not nxt:
            break
        node, k = nxt[0], k + 1
    return k


def generate(drafter: Drafter, request_id, prompt, target, max_draft_tokens):
    """Run a request whose model output is `target` with greedy verification; the tokens accepted
    at each step."""
    drafter.start(request_id, prompt)
    output, steps = [], []
    while len(output) < len(target):
        draft = drafter.propose(request_id, output, max_draft_tokens)
        assert len(draft) <= max_draft_tokens
        k = accepted(draft, target[len(output):])
        steps.append(k)
        new = target[len(output):len(output) + k + 1]
        output += new
        drafter.observe(request_id, new)
    drafter.finish(request_id, output, aborted=False)
    return steps


def test_ngram_proposes_what_followed_the_latest_occurrence():
    drafter = NgramDrafter(NgramConfig(max_ngram=3, min_ngram=1))
    drafter.start("a", [1, 2, 3, 9, 8, 1, 2, 3, 7, 6, 5])
    # Tail "3" (then "2 3", "1 2 3") last occurred before 7.
    assert drafter.propose("a", [1, 2, 3], 3) == Draft.chain([7, 6, 5])
    # The longest tail wins over a more recent shorter one: "4 2 3" occurred once, before 0.
    drafter.start("b", [4, 2, 3, 0, 0, 7, 2, 3, 9, 5, 4])
    assert drafter.propose("b", [2, 3], 2) == Draft.chain([0, 0])
    drafter.start("c", [1, 2, 3])
    assert drafter.propose("c", [], 4) is NO_DRAFT  # "3" never occurred before the tail
    assert drafter.propose("c", [5], 0) is NO_DRAFT


def test_ngram_min_ngram_ignores_shorter_tails():
    drafter = NgramDrafter(NgramConfig(max_ngram=3, min_ngram=2))
    drafter.start("a", [1, 5, 6, 2, 1])
    assert drafter.propose("a", [], 4) is NO_DRAFT  # only "1" repeats
    assert drafter.propose("a", [5], 4) == Draft.chain([6, 2, 1, 5])


@pytest.mark.parametrize("name", DRAFTERS)
def test_repeated_generation_gets_long_correct_drafts(name):
    rng = random.Random(0)
    piece = [rng.randrange(1000) for _ in range(60)]
    prompt = [rng.randrange(1000) for _ in range(20)]
    target = piece * 3
    steps = generate(DRAFTERS[name](), "r", prompt, target, max_draft_tokens=8)
    starts = [sum(k + 1 for k in steps[:i]) for i in range(len(steps))]
    assert all(k == 0 for start, k in zip(starts, steps) if start < 60)  # nothing to copy yet
    # A few tokens into the second repetition, every draft is full and right.
    later = [k for start, k in zip(starts, steps) if start >= 75 and start + 9 <= len(target)]
    assert len(later) >= 10 and all(k == 8 for k in later)


@pytest.mark.parametrize("tree", [False, True])
def test_suffix_drafter_learns_across_requests(tree):
    rng = random.Random(1)
    output = [rng.randrange(1000) for _ in range(80)]
    drafter = SuffixDrafter(SuffixConfig(tree=tree))
    first = generate(drafter, "a", [1, 2, 3], output, max_draft_tokens=8)
    second = generate(drafter, "b", [4, 5, 6], output, max_draft_tokens=8)
    assert sum(first) == 0
    # The budget is the match length (max_spec_factor 1): no match before the first output
    # token, then 1 token matched (budget 1), 3, 7; from then on every draft is full and right.
    assert second[:4] == [0, 1, 3, 7]
    assert all(k == 8 for k in second[4:-1])


@pytest.mark.parametrize("name", DRAFTERS)
def test_observe_and_propose_each_take_a_token_once(name):
    rng = random.Random(2)
    prompt = [rng.randrange(4) for _ in range(10)]
    output = [rng.randrange(4) for _ in range(30)]
    by_observe, by_output, by_both = (DRAFTERS[name]() for _ in range(3))
    for d in (by_observe, by_output, by_both):
        d.start("r", prompt)
    for i in range(0, len(output), 3):
        new, so_far = output[i:i + 3], output[:i + 3]
        by_observe.observe("r", new)
        by_both.observe("r", new)
        expected = by_observe.propose("r", so_far, 6)
        assert by_output.propose("r", so_far, 6) == expected
        assert by_both.propose("r", so_far, 6) == expected
    with pytest.raises(ValueError, match="output of 2 tokens"):
        by_both.propose("r", output[:2], 4)


@pytest.mark.parametrize("name", DRAFTERS)
def test_finish_forgets_the_request(name):
    drafter = DRAFTERS[name]()
    drafter.start("r", [1, 2, 3])
    with pytest.raises(ValueError, match="already started"):
        drafter.start("r", [1])
    drafter.finish("r", [4, 5], aborted=True)
    assert "r" not in drafter
    for call in (lambda: drafter.propose("r", [], 4), lambda: drafter.observe("r", [1]),
                 lambda: drafter.finish("r", [], False)):
        with pytest.raises(ValueError, match="'r' was not started"):
            call()
    drafter.start("r", [1, 2, 3])  # the id may come back


def test_global_tree_learns_finished_outputs_only():
    drafter = SuffixDrafter(SuffixConfig(max_depth=8, max_cached_requests=2))
    drafter.start("a", [9, 9, 9])
    drafter.observe("a", [1, 2, 3])
    assert drafter.global_tree.num_tokens() == 0  # prompts and running outputs stay out
    drafter.finish("a", [1, 2, 3, 4], aborted=True)
    assert drafter.global_tree.count([1, 2, 3, 4]) == 1 and drafter.global_tree.count([9]) == 0
    drafter.start("b", [7, 1, 2])
    assert drafter.propose("b", [], 4).tokens == (3, 4)
    for rid in "cd":
        drafter.start(rid, [0])
        drafter.finish(rid, [5, 6], aborted=False)
    assert drafter.global_tree.count([1, 2]) == 0  # evicted, oldest first
    assert drafter.propose("b", [], 4) is NO_DRAFT
    off = SuffixDrafter(SuffixConfig(max_cached_requests=0))
    off.start("a", [1])
    off.finish("a", [1, 2, 3], aborted=False)
    assert off.global_tree.num_tokens() == 0


CONTEXTS = st.lists(st.integers(0, 3), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(sorted(DRAFTERS)), finished=st.lists(CONTEXTS, max_size=3),
       prompt=CONTEXTS, output=CONTEXTS, max_draft_tokens=st.integers(0, 10))
def test_drafts_are_valid_and_within_max_draft_tokens(name, finished, prompt, output, max_draft_tokens):
    drafter = DRAFTERS[name]()
    for i, done in enumerate(finished):
        drafter.start(f"old{i}", [0])
        drafter.finish(f"old{i}", done, aborted=False)
    drafter.start("r", prompt)
    for i, token in enumerate(output):
        drafter.observe("r", [token])
        draft = drafter.propose("r", output[:i + 1], max_draft_tokens)
        assert len(draft) <= max_draft_tokens
        children = set()
        for j, (token_j, parent) in enumerate(zip(draft.tokens, draft.parents)):
            assert -1 <= parent < j  # parents first
            assert (parent, token_j) not in children  # one child per token under a parent
            children.add((parent, token_j))
        if name != "suffix_tree":
            assert draft.is_chain


@settings(max_examples=60, deadline=None)
@given(finished=st.lists(st.tuples(st.integers(0, 40), CONTEXTS), max_size=4), prompt=CONTEXTS,
       output=CONTEXTS, max_draft_tokens=st.integers(1, 8), tree=st.booleans())
def test_suffix_drafter_equals_speculating_from_fresh_trees(finished, prompt, output, max_draft_tokens, tree):
    """Other requests finish (and get evicted) while one runs: its proposals equal speculating
    from trees built afresh from what it has seen and what the global tree keeps."""
    drafter = SuffixDrafter(SuffixConfig(max_depth=6, max_cached_requests=2, tree=tree))
    drafter.start("r", prompt)
    done = []
    for i in range(len(output) + 1):
        for j, (when, other) in enumerate(finished):
            if when == i:
                drafter.start(f"o{j}", [0])
                drafter.finish(f"o{j}", other, aborted=False)
                done.append(other)
        got = drafter.propose("r", output[:i], max_draft_tokens)
        local, cached = SuffixTree(6), SuffixTree(6)
        context = prompt + output[:i]
        local.extend(0, context)
        for k, other in enumerate(done[-2:]):
            cached.extend(k, other)
        want = speculate([(local, local.match(context), 0), (cached, cached.match(context), 0)],
                         max_draft_tokens, tree=tree)
        assert got.score == pytest.approx(want.score, abs=1e-9)
        if not tree:
            assert got.tokens == want.tokens
        if i < len(output):
            drafter.observe("r", output[i:i + 1])


def test_launch_config_builds_the_drafters_with_its_knobs():
    ngram = build_drafter(SpeculationConfig(method="ngram", ngram_max=3, ngram_min=2))
    assert isinstance(ngram, NgramDrafter) and ngram.config == NgramConfig(max_ngram=3, min_ngram=2)
    suffix = build_drafter(SpeculationConfig(
        method="suffix", tree=True, suffix_max_depth=32, suffix_max_cached_requests=5,
        suffix_max_spec_factor=2.0, suffix_max_spec_offset=-1.0, suffix_min_token_prob=0.2))
    assert isinstance(suffix, SuffixDrafter) and suffix.config == SuffixConfig(
        max_depth=32, max_cached_requests=5, max_spec_factor=2.0, max_spec_offset=-1.0,
        min_token_prob=0.2, tree=True)
    assert SuffixDrafter.from_config(SpeculationConfig()).config == SuffixConfig()


@pytest.mark.parametrize("make, message", [
    (lambda: NgramConfig(min_ngram=0), "min_ngram=0"),
    (lambda: NgramConfig(max_ngram=2, min_ngram=3), "max_ngram=2"),
    (lambda: SuffixConfig(max_depth=1), "max_depth=1"),
    (lambda: SuffixConfig(max_cached_requests=-1), "max_cached_requests=-1"),
    (lambda: SuffixConfig(max_spec_factor=-0.5), "max_spec_factor=-0.5"),
    (lambda: SuffixConfig(max_spec_offset=float("nan")), "max_spec_offset=nan"),
    (lambda: SuffixConfig(min_token_prob=1.5), "min_token_prob=1.5"),
])
def test_configs_refuse_nonsense(make, message):
    with pytest.raises(ValueError, match=message):
        make()
