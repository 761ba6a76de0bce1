"""The adaptive draft budget (scheduler/speculation/budget.py): its cost model and its decisions."""

import contextlib
import dataclasses
import random
import time

import pytest

from jinfer.config import CacheConfig, EngineOptions, SchedulerConfig
from jinfer.engine import Engine
from scheduler.speculation.budget import BudgetConfig, CostAwareBudget
from tests.test_speculation import GREEDY, PROGRAMS, PROMPTS, OracleDrafter, _engine, _reference, _run


@pytest.fixture(scope="module")
def engine_model():
    from jinfer import TEST_MODEL_DIR
    from jinfer.loader.hf import load_hf_model
    from jinfer.tokenizer import Tokenizer
    return load_hf_model(TEST_MODEL_DIR), Tokenizer.from_dir(TEST_MODEL_DIR)


@pytest.fixture(scope="module")
def greedy_ref(engine_model):
    """Plain decoding's greedy tokens of PROMPTS by request id (tests.test_speculation._run)."""
    return _reference(engine_model, GREEDY)[2]


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
    fresh = CostAwareBudget()
    ramp = []
    for _ in range(5):  # the first drafted steps, of unknown cost, are small: 1, 2, 4, ... per request
        ramp.append(fresh.limit("r", 8, 6))
        fresh.observe_step(8 * (1 + ramp[-1]), 0.01, 8, True, num_decoding=8, decode_only=True)
    # only until the steps' token counts spread enough for a line (16, 24 and 40 tokens: three
    # counts, at least 72 // 18 apart in batch 8's range); then 1 each until the line has its steps
    assert ramp == [1, 2, 4, 1, 1] and fresh.cost_model() is None
    wide = CostAwareBudget()
    for _ in range(5):  # plain steps of one batch: one token count, no spread
        wide.observe_step(8, 0.05, 8, False, num_decoding=8, decode_only=True, drafting=False, pipelined=True)
    assert [wide.unfitted_limit(8, 8) for _ in range(2)] == [1, 1]
    wide.observe_step(16, 0.08, 8, True, num_decoding=8, decode_only=True, drafting=True, pipelined=True)
    assert wide.unfitted_limit(8, 8) == 2  # two token counts (8, 16) give no line: doubling goes on
    wide.observe_step(12, 0.065, 8, True, num_decoding=8, decode_only=True, drafting=True, pipelined=True)
    assert wide.unfitted_limit(8, 8) == 1  # three counts, 8 apart, but too few steps for a line: 1, not 4
    wide.observe_step(7, 0.045, 7, False, num_decoding=7, decode_only=True, drafting=False, pipelined=True)
    wide.observe_step(9, 0.05, 8, True, num_decoding=8, decode_only=True, drafting=True, pipelined=True)
    assert wide.unfitted_limit(8, 1) == 1  # batch 1's range (9 tokens): 7, 8 and 9, one apart is enough
    assert wide.unfitted_limit(8, 32) == 8  # batch 32's (288): 7 to 16 is too little; 3 drafted steps seen


def test_unfitted_drafts_stay_within_twice_the_bucket_of_the_decodes():
    """Once the scheduler fits steps to token buckets, the first 2 * min_steps drafted steps
    without a line stay within max(4, twice the decodes' bucket) rows: batch 32 and 8 keep 1
    token each (64 and 16 rows; the ramp's 2 each took a batch-32 step to 128 rows), batch 1
    up to 3 (4 rows); after them the ramp resumes from 2. Capped steps of varied sizes still
    give a line."""
    b = CostAwareBudget()
    assert b.fit_to_buckets([("r", 4)], 32, BUCKETS, 32) == [4]  # no line: as drafted (the buckets now known)
    ramp = {1: [], 8: [], 32: []}
    for _ in range(2 * b.config.min_steps):
        for batch, limits in ramp.items():
            limits.append(b.unfitted_limit(8, batch))
        b.observe_step(60, 0.26, 32, True, num_decoding=32, decode_only=True, pipelined=True)  # one count: no line
    assert ramp == {1: [1, 2] + [3] * 14, 8: [1] * 16, 32: [1] * 16}
    assert b.unfitted_limit(8, 32) == 2
    b.observe_step(60, 0.26, 32, True, num_decoding=32, decode_only=True, pipelined=True)
    assert b.unfitted_limit(8, 32) == 4
    fresh = CostAwareBudget()
    fresh.fit_to_buckets([("r", 1)], 32, BUCKETS, 32)
    noise = (0.012, -0.01, 0.015, -0.006, 0.009, -0.012)  # the drafted steps' (a few ms, as measured)
    steps = [(32, 0.138)] * 4 + [(t, 0.0043 * t + e) for t, e in zip((60, 58, 62, 64, 56, 63), noise)]
    for tokens, seconds in steps:  # plain decodes, then capped drafted steps
        assert fresh.cost_model(fresh.decision_range(32)) is not None or fresh.unfitted_limit(8, 32) == 1
        fresh.observe_step(tokens, seconds, 32, tokens > 32, num_decoding=32, decode_only=True, pipelined=True)
    c_base, c_tok = fresh.cost_model(fresh.decision_range(32))
    assert c_tok == pytest.approx(0.0043, rel=0.25)


def test_a_line_through_a_cluster_of_close_token_counts_uses_only_pairs_far_enough_apart():
    """A step log at batch 32 on this CPU: plain steps of 32 tokens (129-155 ms) and drafted ones
    of 57-60 (236-275 ms). The slopes between 57, 58 and 60 are noise (12 ms a token) and were
    half the pairs, so the median slope gave a base far below zero and no line; pairs closer
    than the range's least span (16 tokens at batch 32) are left out: 4.3 ms a token."""
    b = CostAwareBudget()
    for tokens, seconds in [(32, .155), (32, .139), (32, .138), (32, .129), (60, .275), (58, .251), (57, .236),
                            (57, .241)]:
        b.observe_step(tokens, seconds, 32, tokens > 32, num_decoding=32, decode_only=True, pipelined=True)
    c_base, c_tok = b.cost_model(b.decision_range(32))
    assert c_tok == pytest.approx(0.0043, abs=0.0002) and c_base < 0.005


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
    with pytest.raises(ValueError, match="max_lead >= 0"):
        BudgetConfig(max_lead=-1)
    from jinfer.config import SpeculationConfig
    with pytest.raises(ValueError, match="max_lead=-1"):
        SpeculationConfig(method="suffix", max_lead=-1)
    with pytest.raises(ValueError, match="max_lead=2 .* 0 without adaptive"):
        SpeculationConfig(method="suffix", max_lead=2, adaptive=False)
    from entrypoints.build import build_draft_budget, build_drafter
    assert build_draft_budget(SpeculationConfig(method="suffix", max_lead=3)).lead_limit() == 3
    assert build_draft_budget(SpeculationConfig(method="suffix")).lead_limit() is None
    das = SpeculationConfig(method="das", max_lead=3)
    assert build_draft_budget(das, build_drafter(das)).lead_limit() is None  # DAS: its length classes


def test_a_slow_outlier_step_does_not_stop_drafts():
    b = _calibrated()
    b.observe_step(64, 2.0)  # a step that compiled, or a busy spell
    c_base, c_tok = b.cost_model()
    assert c_tok == pytest.approx(0.0005, rel=0.2)
    assert b.limit("new", 1, 8) > 0


BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def _cpu_line():
    """A budget whose cost line is this CPU's, roughly: 33.6 ms + 3.6 ms a token."""
    b = CostAwareBudget(BudgetConfig(min_steps=4))
    for tokens in (1, 3, 5, 9, 16, 24) * 2:
        b.observe_step(tokens, 0.0336 + 0.0036 * tokens)
    return b


def test_drafts_are_fitted_to_the_token_buckets_a_step_is_padded_to():
    """A CPU-like line (33.6 ms + 3.6 ms a token: tau 0.1 at batch 1, 0.46 at batch 8). At batch 1
    an 8-token draft makes 9 tokens, padded to 16: a likely request's ninth token (0.9^8) is not
    worth 7 padded rows, so 7 are kept, a near-certain one's is; a coin-flip request keeps what
    fits 4 rows. At batch 8 the one token that would take 16 tokens to 32 is dropped, the others
    kept. Without a line, or where the drafts fit their bucket, nothing changes."""
    buckets = BUCKETS
    unfitted = CostAwareBudget()
    assert unfitted.fit_to_buckets([("a", 8)], 1, buckets, 1) == [8]
    b = _cpu_line()
    for _ in range(50):
        b.observe_verify("sure", 9, False)
        b.observe_verify("likely", 9, True)
        b.observe_verify("coin", 1, True)
    assert b.alpha("sure") > 0.99 and 0.88 < b.alpha("likely") < 0.92 and 0.45 < b.alpha("coin") < 0.55
    assert b.fit_to_buckets([("likely", 8)], 1, buckets, 1) == [7]
    assert b.fit_to_buckets([("sure", 8)], 1, buckets, 1) == [8]
    assert b.fit_to_buckets([("coin", 8)], 1, buckets, 1) == [3]
    assert b.fit_to_buckets([("likely", 7)], 1, buckets, 1) == [7]  # 8 tokens: no padding
    batch = [(f"r{i}", 1) for i in range(7)]
    assert b.fit_to_buckets(batch + [("likely", 1)], 8, buckets, 8) == [1] * 8  # 16 tokens: fits
    assert b.fit_to_buckets(batch + [("likely", 2)], 8, buckets, 8) == [1] * 8  # 17 would pad to 32
    assert b.fit_to_buckets([("likely", 8)], 20, buckets, 1) == [8]  # 28 tokens (a prompt chunk): fits 32
    # 16 rows keep 10 of 12: every first token, then among the second ones (equal values) those
    # of requests earlier in the plan (the policy's order)
    assert b.fit_to_buckets([(f"n{i}", 2) for i in range(6)], 6, buckets, 6) == [2, 2, 2, 2, 1, 1]


def test_a_probe_survives_the_fit_to_the_buckets():
    """A request denied drafts gets a one-token probe now and then (limit); the probe is kept
    whatever it costs where it rides rows the step takes anyway (its acceptance is how the
    budget learns whether the text turned predictable); where it would take the step to a
    bucket of its own (batch 8: 9 tokens, 16 rows) it is worth its acceptance like any token."""
    buckets = BUCKETS
    b = _cpu_line()
    for _ in range(20):
        b.observe_verify("bad", 0, True)
        b.observe_verify("likely", 9, True)
    limits = [b.limit("bad", 8, 8) for _ in range(16)]
    assert limits == [0] * 15 + [1]
    assert b.fit_to_buckets([("bad", 1)], 5, buckets, 5) == [1]  # 6 tokens in 8 rows: a free row
    assert b.fit_to_buckets([("bad", 1)], 8, buckets, 8) == [0]  # 9 would take 16 rows for its ~0.05
    assert b.fit_to_buckets([("likely", 7), ("bad", 1)], 8, buckets, 8) == [7, 1]  # in the 16 rows likely's take
    assert b.limit("bad", 8, 8) == 0 and b.fit_to_buckets([("bad", 1)], 8, buckets, 8) == [0]  # not a probe now
    # at batch 5 a step has 3 free rows (8-row bucket): the fit alone would keep a token of any
    # value there, but a request tau denies is not raised to it (the step's fit could cut it
    # every step, and its probe would never come)
    assert [b.limit("bad", 5, 8) for _ in range(15)] == [0] * 14 + [1]
    assert b.fit_to_buckets([("bad", 3)], 5, buckets, 5) == [3]


def test_the_fit_prices_each_step_shape_at_its_measured_cost():
    """This CPU's batch-1 steps (pipelined): plain 34.8 ms; with drafts of 1 / 2 / 4 / 8 tokens
    (padded to 2 / 4 / 8 / 16 rows) 51.8 / 41.9 / 49.2 / 61.8 ms. The line through them prices a
    2-row step about 1.1x a plain one; measured it is 1.5x, so a request accepting a third of
    its drafts drops a 1-token draft (worth 0.33 of a token, costing half a step), keeps one of
    3 tokens (4 rows: 7 ms more for 0.48 of a token), and one accepting 0.6 keeps its 1 token;
    the limits it grants grow to match. A shape seen fewer than three times is priced by the
    line."""
    b = CostAwareBudget(BudgetConfig(min_steps=4))
    shapes = {(1, False): 0.0348, (2, True): 0.0518, (3, True): 0.0419, (5, True): 0.0492, (9, True): 0.0618}
    for (tokens, drafted), seconds in list(shapes.items()) * 3:
        b.observe_step(tokens, seconds, tokens, drafted, num_decoding=1, decode_only=True, pipelined=True)
    costs = b.step_costs(BUCKETS)
    assert costs == {(1, "decode"): 0.0348, (2, "drafts"): 0.0518, (4, "drafts"): 0.0419, (8, "drafts"): 0.0492,
                     (16, "drafts"): 0.0618}
    c_base, c_tok = b.cost_model(up_to=b.decision_range(1))
    assert c_base + 2 * c_tok < 1.25 * 0.0348  # the line's 2-row step
    for _ in range(30):
        b.observe_verify("third", 1, True)
        b.observe_verify("third", 0, True)
        b.observe_verify("most", 3, True)
        b.observe_verify("most", 0, True)
    assert 0.3 < b.alpha("third") < 0.36 and 0.55 < b.alpha("most") < 0.65
    assert b.limit("third", 1, 8) == 2 and b.limit("most", 1, 8) == 4  # the line's tau (about 0.1)
    assert b.fit_to_buckets([("third", 1)], 1, BUCKETS, 1) == [0]
    # once steps are fitted to buckets, a limit is at least what the fit keeps of a full draft for
    # the request alone: 3 tokens filling 4 rows, 7 filling 8
    assert b.limit("third", 1, 8) == 3 and b.limit("most", 1, 8) == 7
    assert b.fit_to_buckets([("third", 3)], 1, BUCKETS, 1) == [3]
    assert b.fit_to_buckets([("most", 1)], 1, BUCKETS, 1) == [1]
    line = CostAwareBudget(BudgetConfig(min_steps=4))  # the same steps, twice each: the line alone
    for (tokens, drafted), seconds in list(shapes.items()) * 2:
        line.observe_step(tokens, seconds, tokens, drafted, num_decoding=1, decode_only=True, pipelined=True)
    for _ in range(30):
        line.observe_verify("third", 1, True)
        line.observe_verify("third", 0, True)
    assert line.step_costs(BUCKETS) == {} and line.fit_to_buckets([("third", 1)], 1, BUCKETS, 1) == [1]


def test_a_draft_in_a_buckets_padding_can_still_be_dropped():
    """Batch 3 pads to 4 rows, so a 1-token draft rides in the padding; where steps carrying
    drafts measure dearer than plain decodes of that bucket (40 vs 48 ms here: the drafts
    program), a token worth less than those 8 ms is dropped (a plain step is a candidate too),
    a near-certain one kept."""
    b = CostAwareBudget(BudgetConfig(min_steps=4))
    for tokens, drafted, seconds in [(3, False, 0.040), (4, True, 0.048), (6, True, 0.060), (8, True, 0.062)] * 3:
        b.observe_step(tokens, seconds, 3, drafted, num_decoding=3, decode_only=True, pipelined=True)
    for _ in range(50):
        b.observe_verify("sure", 9, False)
        b.observe_verify("third", 1, True)
        b.observe_verify("third", 0, True)
    assert b.step_costs(BUCKETS)[4, "decode"] == 0.040 and b.step_costs(BUCKETS)[4, "drafts"] == 0.048
    assert b.fit_to_buckets([("third", 1)], 3, BUCKETS, 3) == [0]
    assert b.fit_to_buckets([("sure", 1)], 3, BUCKETS, 3) == [1]
    assert b.fit_to_buckets([("sure", 1), ("third", 1)], 3, BUCKETS, 3) == [1, 0]  # 5 tokens: 8 rows, 61 ms


def test_tree_walks_that_reach_a_leaf_count_as_accepted():
    b = _calibrated()
    for _ in range(20):
        b.observe_verify("tree", 2, False)  # a depth-2 path fully accepted, though the tree had 4 tokens
    assert b.alpha("tree") > 0.9


def _step(b, batch, drafts, tokens, seconds, emitted, decode_only=True):
    b.observe_step(tokens, seconds, emitted, drafts, num_decoding=batch, decode_only=decode_only)


def test_drafts_stop_where_steps_without_them_deliver_more_tokens_per_second():
    b = CostAwareBudget(BudgetConfig(arm_samples=3, explore_len=2))
    chosen = []
    for _ in range(300):
        drafts = b.wants_drafts(32)
        chosen.append(drafts)
        # at this batch a drafted step emits 2x the tokens but takes 3x as long
        _step(b, 32, drafts, 96 if drafts else 32, 0.030 if drafts else 0.010, 64 if drafts else 32)
    # plain steps' run first (switching to drafts empties the pipeline), then the drafts', which
    # ends at its first step: 2/3 of the plain rate is below give_up (0.9)
    assert chosen[:4] == [False] * 3 + [True]
    # then explorations of one drafted step each (each ends at its first step too), costing
    # 1/3 of a step's tokens each: within explore_cost
    later = chosen[4:]
    assert 0 < later.count(True) and not any(a and b for a, b in zip(later, later[1:]))
    assert later.count(True) / len(later) * (1 - 2 / 3) <= b.config.explore_cost
    # at batch 1 (far from 32: no prior) the budget measures again: drafts pay there
    for _ in range(12):
        drafts = b.wants_drafts(1)
        _step(b, 1, drafts, 5 if drafts else 1, 0.011 if drafts else 0.010, 3 if drafts else 1)
    assert b.wants_drafts(1)


def test_a_way_that_loses_narrowly_is_retried_soon_and_taken_once_it_pays():
    """A drafter whose history grows (DAS, suffix trees): drafts first lose a little, then pay;
    the budget follows within a few dozen steps."""
    b = CostAwareBudget()
    for _ in range(200):  # drafted steps deliver 0.95x plain's rate
        drafts = b.wants_drafts(8)
        _step(b, 8, drafts, 16 if drafts else 8, 0.0105 if drafts else 0.010, 7.98 if drafts else 8)
    assert not b.wants_drafts(8)
    chosen = []
    for _ in range(60):  # now 1.5x
        drafts = b.wants_drafts(8)
        chosen.append(drafts)
        _step(b, 8, drafts, 16 if drafts else 8, 0.0105 if drafts else 0.010, 12.6 if drafts else 8)
    assert chosen[-30:].count(False) <= 2  # (plain steps explored now and then)


def test_steps_of_decodes_only_decide_and_prompt_chunks_count_only_without_them():
    b = CostAwareBudget(BudgetConfig(arm_samples=2))
    for _ in range(4):  # prefill-only steps (no decoding sequence): no drafts, no way's sample
        assert not b.wants_drafts(0)
        _step(b, 0, False, 512, 1.0, 0)
    assert b.ways.ways == {}
    # steps with prompt chunks: drafted ones look better...
    for _ in range(4):
        drafts = b.wants_drafts(8)
        _step(b, 8, drafts, 512, 1.0 if drafts else 2.0, 8, decode_only=False)
    assert b.wants_drafts(8)
    # ...but once both ways have steps of decodes only, those decide: plain steps win
    for drafts in (False, True, False, True):
        _step(b, 8, drafts, 24 if drafts else 8, 0.030 if drafts else 0.010, 12 if drafts else 8)
    assert not b.wants_drafts(8)


@pytest.mark.parametrize("mode_cost", [1.0, 1.1])
def test_steps_in_drafting_mode_count_for_it_even_without_a_draft(mode_cost):
    """Drafts wanted and none made (the drafter had nothing yet): those steps are drafting
    mode's, at what they cost (as much as plain steps in a simulator; more in an engine, where
    they wait for the step before). Plain steps win (a tie goes to them) and drafting mode is
    re-tried often, since it loses little; once the drafter has something that pays, it wins."""
    b = CostAwareBudget(BudgetConfig(arm_samples=2))
    chosen = []
    for _ in range(200):
        mode = b.wants_drafts(8)
        chosen.append(mode)
        b.observe_step(8, 0.01 * (mode_cost if mode else 1), 8, False, num_decoding=8, decode_only=True,
                       drafting=mode)
    assert chosen[:4] == [False, False, True, True]
    later = chosen[4:]
    assert 0.2 <= later.count(True) / len(later) <= 0.5  # re-tried, at a cost within explore_cost
    assert later.count(True) / len(later) * (1 - 1 / mode_cost) <= b.config.explore_cost
    for _ in range(60):  # the drafter now has something: drafted steps deliver 1.5x
        mode = b.wants_drafts(8)
        chosen.append(mode)
        b.observe_step(16 if mode else 8, 0.0105 if mode else 0.01, 12.6 if mode else 8, mode, num_decoding=8,
                       decode_only=True, drafting=mode)
    assert chosen[-30:].count(False) <= 2


@pytest.mark.parametrize("drafted_rate", [0.5, 0.8])
def test_by_default_exploring_the_losing_way_costs_at_most_5_percent(drafted_rate):
    """Whether the losing way gives up at its first step (0.5 of the other's rate) or not (0.8)."""
    b = CostAwareBudget()
    chosen = []
    for _ in range(1200):
        drafts = b.wants_drafts(32)
        chosen.append(drafts)
        _step(b, 32, drafts, 96 if drafts else 32, 0.030 if drafts else 0.010, 96 * drafted_rate if drafts else 32)
    n = b.config.arm_samples
    run = n if drafted_rate > b.config.give_up else 1
    assert chosen[:n + run] == [False] * n + [True] * run
    later = chosen[n + run:]
    assert 0 < later.count(True) / len(later) * (1 - drafted_rate) <= 0.05


def test_a_batch_size_class_not_seen_yet_runs_the_way_a_measured_class_near_it_prefers():
    b = CostAwareBudget(BudgetConfig(arm_samples=3))

    def run(batch, steps, drafts_pay):
        chosen = []
        for _ in range(steps):
            drafts = b.wants_drafts(batch)
            chosen.append(drafts)
            emitted = batch * (4 if drafts_pay else 1.5) if drafts else batch
            _step(b, batch, drafts, batch * 3 if drafts else batch, 0.030 if drafts else 0.010, emitted)
        return chosen

    assert run(32, 6, drafts_pay=False)[:4] == [False] * 3 + [True]  # measured both ways
    # the batch shrinks as requests finish: classes 16 and 8 run plain steps without trying drafts
    assert not any(run(16, 10, drafts_pay=False)) and not any(run(8, 10, drafts_pay=False))
    # class 4 is 8x from 32 (and 8 and 16 only took 32's word): it measures both ways itself
    assert run(4, 6, drafts_pay=True) == [False] * 3 + [True] * 3 and b.wants_drafts(4)
    assert b.wants_drafts(2) and b.wants_drafts(1)  # nearest measured: 4, where drafts pay


def test_the_budget_hears_each_step_with_its_own_tokens_and_time(engine_model, greedy_ref):
    """Plain steps pipelined between drafted ones (the budget switching every other step): each
    step is reported once with the tokens it settled, not with those of the step read back in
    the same call; a step says how many of its sequences decode and whether a prompt chunk
    was there too; the steps' times add up to no more than the run's."""
    model, ref = engine_model, greedy_ref

    class Switching:
        def __init__(self):
            self.asks, self.steps, self.pipelined = 0, [], []

        def wants_drafts(self, num_decoding, *, prefilling=False):
            self.asks += 1
            return self.asks % 2 == 0

        def limit(self, request_id, num_decoding, max_draft_tokens):
            return max_draft_tokens

        def lead_limit(self):
            return None

        def observe_verify(self, request_id, accepted, rejected):
            pass

        def observe_step(self, num_tokens, seconds, emitted, drafted, *, num_decoding, decode_only, drafting,
                         pipelined):
            assert num_decoding <= emitted and (drafting or not drafted)  # a draft only in drafting mode
            self.steps.append((num_tokens, seconds, emitted, drafted, num_decoding if decode_only else 0))
            self.pipelined.append((drafted, pipelined))

        def finish(self, request_id):
            pass

    budget, drafter = Switching(), OracleDrafter(ref, wrong=0.5)
    engine = _engine(model, drafter)
    engine.scheduler.budget = budget
    _run(engine, PROMPTS, GREEDY)  # warm: most buckets these steps use have run
    budget.steps.clear()
    budget.asks = 0  # the same modes as the warm run: its buckets
    drafter.started, drafter.observed, drafter.finished = {}, {}, {}  # the same request ids again
    t0 = time.perf_counter()
    got, _ = _run(engine, PROMPTS, GREEDY)
    wall = time.perf_counter() - t0
    # (a step whose bucket ran for the first time is not reported: its time may be a compile)
    assert sum(e for _, _, e, _, _ in budget.steps) <= sum(len(o.token_ids) for o in got.values())
    plain = [st for st in budget.steps if st[4] and not st[3]]
    drafted = [st for st in budget.steps if st[4] and st[3]]
    assert plain and drafted and any(not st[4] for st in budget.steps)
    assert all(e == n for _, _, e, _, n in plain)  # one token per decoding sequence
    assert all(n <= e <= t for t, _, e, _, n in drafted)
    assert 0 < sum(sec for _, sec, _, _, _ in budget.steps) <= wall
    # drafts in flight: drafted steps and plain ones alike are read while the next step runs
    assert any(d and p for d, p in budget.pipelined) and any(not d and p for d, p in budget.pipelined)


def _plain(b, tokens, seconds, pipelined=True, n=8, decode_only=True):
    for _ in range(n):
        b.observe_step(tokens, seconds, tokens, False, num_decoding=tokens, decode_only=decode_only,
                       drafting=False, pipelined=pipelined)


def test_unfitted_drafts_reach_a_line_where_plain_and_drafted_steps_are_timed_differently():
    """Plain steps pipelined (one token count: the batch's), drafted ones read whole (a tree
    draft's): neither kind has a spread at first, so drafts double until the drafted kind has
    one (three token counts), are then held at 1 until its line exists, and it does exist. Steps too noisy for a
    line (no fit after 2 * min_steps held drafted steps) double again."""
    cost = lambda t: 0.04 + 0.001 * t  # noqa: E731
    b, limits = CostAwareBudget(), []
    while b.cost_model(up_to=b.decision_range(8)) is None and len(limits) < 30:
        _plain(b, 8, cost(8), n=1)
        limits.append(b.limit("r", 8, 8))
        b.observe_step(8 * (1 + limits[-1]), cost(8 * (1 + limits[-1])), 8, True, num_decoding=8,
                       decode_only=True, drafting=True, pipelined=False)
    assert limits == [1, 2, 4, 1, 1, 1, 1, 1] and b.cost_model(up_to=72) == pytest.approx((0.04, 0.001))
    stuck = CostAwareBudget()
    _plain(stuck, 8, 0.05, n=1)
    _plain(stuck, 12, 0.055, n=1)
    _plain(stuck, 16, 0.06, n=1)  # a spread, and never the steps for a line of that kind
    got = []
    for _ in range(20):
        got.append(stuck.limit("r", 8, 8))
        stuck.observe_step(16, 0.06, 8, True, num_decoding=8, decode_only=True)  # of a kind not stated
    assert got == [1] * 16 + [2, 4, 8, 8] and stuck.cost_model(up_to=72) is None


def test_plain_steps_fit_the_cost_model_before_any_draft_within_the_decisions_range():
    """Plain steps are cost samples too, fitted only up to the tokens of a step whose every
    request drafts in full (batch 8: 72; prompt chunks past it would set the line on a GPU): the
    first draft of a run is sized by the line (on a machine where a token costs much, none at
    batch 8 with the prior's acceptance, some at batch 1) instead of the unfitted 1, 2, 4, ..."""
    b = CostAwareBudget()
    assert b.limit("r", 8, 8) == 1 and b.cost_model() is None  # unfitted
    _plain(b, 512, 0.001, decode_only=False)  # out of range, and off any line
    _plain(b, 300, 0.9, decode_only=False)
    _plain(b, 8, 0.026 + 0.0036 * 8)
    _plain(b, 32, 0.026 + 0.0036 * 32, decode_only=False)  # short prompt chunks are in range
    _plain(b, 64, 0.026 + 0.0036 * 64, decode_only=False)
    assert b.decision_range(8) == 72 and b.cost_model(up_to=72) == pytest.approx((0.026, 0.0036))
    assert b.limit("r", 8, 8) == 0  # tau = 0.0288 / 0.0548 = 0.53 > alpha 0.5
    assert b.limit("r", 1, 8) == 3  # one count (8) in batch 1's range: widened to 72; tau = 0.12


def test_a_flat_decode_range_is_not_tilted_by_prompt_chunks_past_it():
    """A GPU-like cost: flat up to 256 tokens, rising past it. Chunks of 300-2048 tokens are out
    of batch 8's range; the line through the decodes and drafted steps is flat, so drafts run
    full length."""
    cost = lambda t: 0.007 + max(0, t - 256) * 27e-6  # noqa: E731
    b = CostAwareBudget()
    for tokens in (300, 700, 1200, 2048):
        _plain(b, tokens, cost(tokens), n=4, decode_only=False)
    _plain(b, 8, cost(8))
    for tokens in (16, 24, 40) * 3:
        b.observe_step(tokens, cost(tokens), 8, True, num_decoding=8, decode_only=True, drafting=True, pipelined=True)
    assert b.cost_model()[1] > 5e-6  # through all of them: tilted
    assert b.cost_model(up_to=72) == pytest.approx((0.007, 0.0)) and b.limit("r", 8, 8) == 8


def test_a_line_through_token_counts_a_step_apart_is_not_trusted():
    """A flat 10 ms step with 2 % noise: 20 plain steps of 32 tokens and drafted ones of 33 and
    34 give a slope that is only noise (it could price drafts out at any acceptance); the budget widens its
    range and, finding no spread, keeps the unfitted limits. And the line does not depend on the
    order in which batch sizes ask."""
    rng = random.Random(0)
    for _ in range(20):
        b = CostAwareBudget()
        _plain(b, 32, 0.010 * (1 + rng.uniform(-0.02, 0.02)), n=20)
        for tokens in (33, 34):  # three counts, spanning 2
            b.observe_step(tokens, 0.010 * (1 + rng.uniform(-0.02, 0.02)), 33, True, num_decoding=32,
                           decode_only=True, drafting=True, pipelined=True)
        assert b.cost_model(up_to=b.decision_range(32)) is None and b.limit("r", 32, 8) == 4
    limits = []
    for order in ((8, 1), (1, 8)):
        b = CostAwareBudget()
        _plain(b, 300, 0.9, decode_only=False)
        _plain(b, 8, 0.026 + 0.0036 * 8)
        _plain(b, 32, 0.026 + 0.0036 * 32, decode_only=False)
        _plain(b, 64, 0.026 + 0.0036 * 64, decode_only=False)
        limits.append({batch: b.limit("r", batch, 8) for batch in order})
    assert limits[0] == limits[1] == {8: 0, 1: 3}


def test_the_cost_model_keeps_to_the_drafted_steps_timing_kind():
    """Steps read whole (a tree draft's, drafts not in flight) and pipelined ones are different
    lines: the fit is of the kind most drafted steps had, another kind's only until that one
    has a fit; a caller that does not say (pipelined None) has its drafted steps alone counted."""
    b = CostAwareBudget()
    _plain(b, 8, 0.010)
    _plain(b, 32, 0.022)
    _plain(b, 64, 0.038)
    assert b.cost_model() == pytest.approx((0.006, 0.0005))
    for tokens in (16, 24, 40) * 3:  # whole steps: a larger base
        b.observe_step(tokens, 0.020 + 0.0005 * tokens, 8, True, drafting=True, pipelined=False)
    assert b.cost_model() == pytest.approx((0.020, 0.0005))
    legacy = CostAwareBudget()
    _plain(legacy, 8, 0.010, pipelined=None)
    _plain(legacy, 32, 0.022, pipelined=None)
    _plain(legacy, 64, 0.038, pipelined=None)
    assert legacy.cost_model() is None


def test_steps_with_prompt_chunks_neither_run_nor_explore_a_way():
    b = CostAwareBudget(BudgetConfig(arm_samples=2))
    assert [b.wants_drafts(8, prefilling=True) for _ in range(5)] == [False] * 5  # undecided: plain
    assert b.ways.ways[8][False].chosen == 0  # the runs have not begun
    for _ in range(4):  # decided: drafts pay at this batch
        drafts = b.wants_drafts(8)
        _step(b, 8, drafts, 16 if drafts else 8, 0.0105 if drafts else 0.010, 14 if drafts else 8)
    assert b.wants_drafts(8)
    # a long stretch of steps with prompt chunks takes the better way throughout: no exploration
    assert all(b.wants_drafts(8, prefilling=True) for _ in range(500))


class _Always:
    """Drafts in every step, as long as allowed, with a lead limit (the subject here)."""

    def __init__(self, lead):
        self.lead = lead

    def wants_drafts(self, num_decoding, *, prefilling=False):
        return True

    def limit(self, request_id, num_decoding, max_draft_tokens):
        return max_draft_tokens

    def lead_limit(self):
        return self.lead

    def observe_verify(self, request_id, accepted, rejected):
        pass

    def observe_step(self, num_tokens, seconds, emitted, drafted, **kw):
        pass

    def finish(self, request_id):
        pass


def _slots(model, slots):
    m, tok = model
    return Engine(m, tok, CacheConfig(page_size=16, num_pages=128),
                  SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=slots, max_model_len=256),
                  options=EngineOptions(async_scheduling=True), max_spec_tokens=6, drafter=OracleDrafter({}),
                  programs=PROGRAMS)


LEAD_TOKENS = 24  # (of GREEDY's 40: enough for a lead of 10 without a limit, in fewer steps)


def _leads(engine, ref, lead, n, *, drafted=("r0",), closed=True):
    """Runs PROMPTS[:n] for LEAD_TOKENS tokens on the engine, drafts (all right) for the
    `drafted` requests only; per step while every sequence slot is busy: (the spread of the
    running requests' output token counts, whether a request waited); the outputs."""
    engine.set_drafter(OracleDrafter({r: ref[r] for r in drafted}, wrong=0), _Always(lead))
    slots = engine.scheduler.cfg.max_num_seqs
    params = dataclasses.replace(GREEDY, max_tokens=LEAD_TOKENS)
    for i, p in enumerate(PROMPTS[:n]):
        engine.add_request(p, params, request_id=f"r{i}")
    outs, spreads, live = {}, [], {}
    with engine.closed_batch() if closed else contextlib.nullcontext():
        while engine.has_unfinished():
            waited = bool(engine.scheduler.waiting)
            for out in engine.step():
                live[out.request_id] = len(out.token_ids)
                if out.finished:
                    outs[out.request_id] = list(out.token_ids)
            running = [k for r, k in live.items() if r not in outs]
            if len(running) == slots:
                spreads.append((max(running) - min(running), waited))
    return spreads, outs


def test_in_a_closed_batch_a_request_drafts_only_as_far_ahead_as_the_lead_limit(engine_model, greedy_ref):
    """A closed batch (no request will arrive: Engine.generate) with a lead limit of 2: r0's
    drafts are all right, r1 gets none, and r0 stays at most 2 tokens ahead while no request
    waits; so with three requests of which two draft; while a request waits, outside a
    closed batch (serving) or without the limit, drafts race ahead. The tokens are plain
    decoding's every time."""
    ref = greedy_ref
    want = lambda n: {f"r{i}": ref[f"r{i}"][:LEAD_TOKENS] for i in range(n)}  # noqa: E731
    two, three = _slots(engine_model, 2), _slots(engine_model, 3)
    spreads, outs = _leads(two, ref, 2, 2)
    assert outs == want(2) and max(g for g, _ in spreads) == 2 and all(g <= 2 for g, _ in spreads)
    spreads, outs = _leads(three, ref, 2, 3, drafted=("r0", "r2"))
    assert outs == want(3) and max(g for g, _ in spreads) == 2 and all(g <= 2 for g, _ in spreads)
    for lead, closed in ((None, True), (2, False)):
        spreads, outs = _leads(two, ref, lead, 2, closed=closed)
        assert outs == want(2) and max(g for g, _ in spreads) > 10, (lead, closed)
    spreads, outs = _leads(two, ref, 2, 3)
    assert outs == want(3) and max(g for g, w in spreads if w) > 2  # r2 waits for a slot: no limit


def test_generate_runs_a_closed_batch(engine_model, greedy_ref):
    """Engine.generate is a closed batch: with a lead limit of 0 a request the drafter predicts
    never drafts past the other (which gets no drafts); without a limit it does; the engine
    serves open again afterwards, also after a closed batch that raised."""
    ref = greedy_ref
    accepted = {}
    for lead in (0, None):
        engine = _engine(engine_model, OracleDrafter({"r0": ref["r0"]}, wrong=0))
        engine.scheduler.budget = _Always(lead)
        ids = iter(("r0", "r1"))
        engine.add_request = lambda p, sp, add=engine.add_request: add(p, sp, request_id=next(ids))
        outs = engine.generate(PROMPTS[:2], GREEDY)
        assert [o.token_ids for o in outs] == [ref["r0"], ref["r1"]] and not engine.scheduler.closed_batch
        accepted[lead] = outs[0].usage.accepted_draft_tokens
    assert accepted[0] == 0 < accepted[None]
    with pytest.raises(RuntimeError), engine.closed_batch():
        raise RuntimeError("a step failed")
    assert not engine.scheduler.closed_batch


def test_the_engine_carries_the_draft_lengths_the_budget_fits_to_its_buckets(engine_model, greedy_ref):
    """The scheduler asks the budget to fit each drafted step to the runner's token buckets
    (with the tokens planned without drafts and the requests decoding) and runs the drafts cut
    to what it answers; the tokens are plain decoding's."""
    ref = greedy_ref

    class Fitting(_Always):
        calls = []

        def fit_to_buckets(self, drafts, base_tokens, buckets, num_decoding):
            self.calls.append((list(drafts), base_tokens, tuple(buckets), num_decoding))
            return [min(k, 2) for _, k in drafts]

    engine = _engine(engine_model, OracleDrafter({"r0": ref["r0"]}, wrong=0))
    engine.scheduler.budget = budget = Fitting(None)
    plans = []
    dispatch = engine.runner.dispatch
    engine.runner.dispatch = lambda plan: (plans.append(plan), dispatch(plan))[1]
    ids = iter(("r0", "r1"))
    engine.add_request = lambda p, sp, add=engine.add_request: add(p, sp, request_id=next(ids))
    outs = engine.generate(PROMPTS[:2], GREEDY)
    assert [o.token_ids for o in outs] == [ref["r0"], ref["r1"]]
    assert budget.calls and all(b == engine.runner.token_buckets for _, _, b, _ in budget.calls)
    assert any(k > 2 for d, _, _, _ in budget.calls for _, k in d)  # longer drafts were asked for
    drafted = [p for p in plans if any(s.num_draft for s in p.seqs)]
    assert len(drafted) == len(budget.calls)  # (every draft r0 was offered fits its pages)
    for plan, (asked, base, _, num_decoding) in zip(drafted, budget.calls):
        assert base == plan.num_tokens - sum(s.num_draft for s in plan.seqs) and num_decoding == 2
        assert [s.num_draft for s in plan.seqs if s.num_draft] == [min(k, 2) for _, k in asked]
    assert outs[0].usage.accepted_draft_tokens > 0
