"""The adaptive draft budget (scheduler/speculation/budget.py): its cost model and its decisions."""

import pytest

from scheduler.speculation.budget import BudgetConfig, CostAwareBudget


def _calibrated(c_base=0.010, c_tok=0.0005):
    b = CostAwareBudget(BudgetConfig(min_steps=4))
    for tokens in (1, 9, 33, 64, 17, 120, 8, 40):
        b.observe_step(tokens, c_base + c_tok * tokens)
    return b


def test_the_cost_model_is_fitted_from_step_sizes_and_times():
    b = _calibrated()
    c_base, c_tok = b.cost_model()
    assert c_base == pytest.approx(0.010) and c_tok == pytest.approx(0.0005)
    same = CostAwareBudget(BudgetConfig(min_steps=4))
    for _ in range(10):
        same.observe_step(8, 0.01)
    assert same.cost_model() is None  # one token count: no slope to fit
    assert same.limit("r", 8, 6) == 6  # and until there is one, drafts run


def test_drafts_run_long_where_steps_are_fixed_cost_and_shrink_where_tokens_cost():
    b = _calibrated()
    for _ in range(20):  # a request whose drafts are mostly accepted: alpha ~ 0.9
        b.observe_verify("good", 8, False)
        b.observe_verify("good", 5, True)
    # batch 1: tau = 0.0005 / 0.0105 ~ 0.05: alpha^k >= tau for long drafts
    assert b.limit("good", 1, 8) == 8
    # batch 64: tau = 0.032 / 0.042 ~ 0.76: only the first couple of tokens pay
    assert 1 <= b.limit("good", 64, 8) <= 3
    # a compute-bound machine (no fixed cost): nothing pays
    compute = _calibrated(c_base=0.0, c_tok=0.001)
    compute._requests, compute._pool = b._requests, b._pool
    assert compute.limit("good", 1, 8) == 0


def test_a_request_the_drafter_cannot_predict_stops_drafting_but_probes():
    b = _calibrated()
    for _ in range(30):
        b.observe_verify("bad", 0, True)
    assert b.alpha("bad") < 0.1
    got = [b.limit("bad", 16, 8) for _ in range(32)]
    assert got.count(0) == 30 and got.count(1) == 2  # one probe every probe_every (16) steps
    b.finish("bad")
    assert b.alpha("bad") == pytest.approx(b.alpha("new"))  # forgotten: back to the pooled prior


def test_bad_knobs_are_named():
    with pytest.raises(ValueError, match="window >= 2"):
        BudgetConfig(window=1)


def test_a_slow_outlier_step_does_not_stop_drafts():
    b = _calibrated()
    b.observe_step(64, 2.0)  # a step that compiled, or a busy spell
    c_base, c_tok = b.cost_model()
    assert c_tok == pytest.approx(0.0005, rel=0.2)
    assert b.limit("new", 1, 8) > 0


def test_tree_walks_that_reach_a_leaf_count_as_accepted():
    b = _calibrated()
    for _ in range(20):
        b.observe_verify("tree", 2, False)  # a depth-2 path fully accepted, though the tree had 4 tokens
    assert b.alpha("tree") > 0.9


def test_drafts_stop_where_steps_without_them_deliver_more_tokens_per_second():
    b = CostAwareBudget(BudgetConfig(arm_samples=3, explore_every=10, explore_len=2))
    chosen = []
    for _ in range(60):
        drafts = b.wants_drafts(32)
        chosen.append(drafts)
        # at this batch a drafted step emits 2x the tokens but takes 3x as long
        b.observe_step(96 if drafts else 32, 0.030 if drafts else 0.010, 64 if drafts else 32, drafts)
    assert chosen[:6].count(True) == 3  # both ways tried first
    assert chosen[6:].count(True) == 54 // 12 * 2 + min(2, max(0, 54 % 12 - 10))  # only exploring
    # at batch 1 the same budget keeps its own measurements: drafts pay there
    for _ in range(12):
        drafts = b.wants_drafts(1)
        b.observe_step(5 if drafts else 1, 0.011 if drafts else 0.010, 3 if drafts else 1, drafts)
    assert b.wants_drafts(1)
