"""DAS (scheduler/speculation/das.py): per-problem rollout suffix trees and the length-aware draft budget,
by hand, in the engine (lossless) and in the simulator."""

import numpy as np
import pytest

from entrypoints.build import build_draft_budget, build_drafter
from jinfer.config import SpeculationConfig
from scheduler.speculation.budget import CostAwareBudget
from scheduler.speculation.das import (LONG, MEDIUM, SHORT, DasConfig, LengthAwareBudget, RolloutDrafter, expected_tokens,
                                       makespan_draft_len, throughput_draft_len)
from scheduler.speculation.drafters import SuffixConfig

A, B = (1, 2, 3, 4), (9, 8, 7, 6)  # two problems' prompts


def _rollout(d: RolloutDrafter, rid: str, prompt, output, aborted=False):
    d.start(rid, prompt)
    d.observe(rid, output)
    d.finish(rid, output, aborted)


def test_a_request_drafts_what_earlier_rollouts_of_its_problem_wrote_from_its_first_token():
    d = RolloutDrafter(DasConfig(window=4))
    _rollout(d, "a0", A, [50, 51, 52, 53, 54, 55])
    _rollout(d, "b0", B, [70, 71, 72, 73, 74, 75])
    d.start("a1", A)
    draft = d.propose("a1", [], 4)  # nothing generated yet: the prompt's end anchors the match
    assert draft.tokens == (50, 51, 52, 53) and draft.is_chain
    assert d.propose("a1", [50, 51], 3).tokens == (52, 53, 54)
    d.start("b1", B)
    assert d.propose("b1", [], 4).tokens == (70, 71, 72, 73)  # its own problem's tree only
    d.start("c1", (5, 6, 7))
    assert not d.propose("c1", [], 4).tokens  # an unseen problem has no history
    for rid in ("a1", "b1", "c1"):
        d.finish(rid, [], aborted=True)


def test_the_window_keeps_the_last_rollouts_of_each_problem():
    d = RolloutDrafter(DasConfig(window=2))
    _rollout(d, "old", A, [60, 61, 62, 63])
    for i in range(2):
        _rollout(d, f"new{i}", A, [80, 81, 82, 83])
    problem = d.problems[A]
    problem.tree.check()
    assert len(problem.window) == 2 and list(problem.lengths) == [4, 4]
    assert problem.tree.count([60, 61]) == 0 and problem.tree.count([80, 81]) == 2
    d.start("x", A)
    assert d.propose("x", [], 3).tokens == (80, 81, 82)
    d.finish("x", [], aborted=True)


def test_drafter_errors_name_the_request():
    d = RolloutDrafter()
    d.start("r", A)
    with pytest.raises(ValueError, match="'r' already started"):
        d.start("r", A)
    with pytest.raises(ValueError, match="'nope' was not started"):
        d.propose("nope", [], 3)
    with pytest.raises(ValueError, match="window=0 must be >= 1"):
        DasConfig(window=0)
    with pytest.raises(ValueError, match="short_quantile=0.9, long_quantile=0.5"):
        DasConfig(short_quantile=0.9, long_quantile=0.5)


def test_expected_tokens_and_the_two_rules_by_hand():
    assert expected_tokens(0.5, 0) == 1 and expected_tokens(0.5, 2) == pytest.approx(1.75)
    assert expected_tokens(1.0, 3) == 4
    # GPU-like: the fixed cost dominates a step (10 ms + 0.05 ms a token, batch 32).
    gpu = dict(c_base=10e-3, c_tok=5e-5, batch=32, max_draft_tokens=16)
    assert makespan_draft_len(0.8, **gpu) == 16  # a long rollout drafts all it may
    # tau = 1.6 ms / 11.6 ms = 0.138: 0.8^8 = 0.168 >= tau > 0.8^9 = 0.134; 0.5^2 >= tau > 0.5^3
    assert throughput_draft_len(0.8, **gpu) == 8
    assert throughput_draft_len(0.5, **gpu) == 2
    assert makespan_draft_len(0.5, **gpu) > throughput_draft_len(0.5, **gpu)
    # CPU-like: every token costs the same and nothing is fixed: a draft token costs what a
    # decoded one does, so neither rule drafts below certainty.
    cpu = dict(c_base=0.0, c_tok=1e-3, batch=1, max_draft_tokens=8)
    assert makespan_draft_len(0.9, **cpu) == 0 and throughput_draft_len(0.9, **cpu) == 0
    # Hand check of the makespan inequality at k = 1 (alpha 0.3, t = 1, c_tok = 0.5):
    # saved = 1 * (1 - 1/1.3) = 0.2308, added = 0.5 * (1/1.3) = 0.3846 -> no draft.
    assert makespan_draft_len(0.3, c_base=0.5, c_tok=0.5, batch=1, max_draft_tokens=4) == 0


def _history(d: RolloutDrafter):
    """Problem A's rollouts are short (10 tokens), B's long (100); C's medium (40)."""
    C = (4, 4, 4, 4)
    for i in range(6):
        _rollout(d, f"ha{i}", A, list(range(100, 110)))
        _rollout(d, f"hb{i}", B, list(range(200, 300)))
        _rollout(d, f"hc{i}", C, list(range(400, 440)))
    return C


def test_fitting_a_step_to_its_bucket_values_a_long_requests_tokens_by_the_batch():
    """A long rollout's accepted draft token saves the batch a step, a medium one's a 1/B share:
    fitting a step of 4 decodes and 3 + 1 + 1 + 1 draft tokens (10, padded to 16) to the buckets
    keeps the long request's first two tokens (worth 4 x 0.5 and 4 x 0.25) and drops medium
    tokens first; CostAwareBudget, valuing all alike, keeps the medium ones' first tokens."""
    d = RolloutDrafter(DasConfig(window=8, min_history=8, short_quantile=0.4, long_quantile=0.7))
    budget = LengthAwareBudget(d)
    C = _history(d)
    for rid, prompt in (("b", B), ("c1", C), ("c2", C), ("c3", C)):
        d.start(rid, prompt)
    for tokens in (4, 6, 10, 16, 24) * 2:  # 33.6 ms + 3.6 ms a token: tau 0.3 at batch 4
        budget.observe_step(tokens, 0.0336 + 0.0036 * tokens, tokens, True)
    for _ in range(40):  # every problem: half its draft tokens accepted
        budget.observe_verify("b", 1, True)
        budget.observe_verify("c1", 1, True)
    assert budget.length_class("b") == LONG and budget.length_class("c1") == MEDIUM
    assert 0.45 < budget.alpha("b") < 0.55 and budget.draft_values("b", 1, 4) == pytest.approx([4 * budget.alpha("b")])
    drafts = [("c1", 1), ("c2", 1), ("b", 3), ("c3", 1)]
    assert budget.fit_to_buckets(drafts, 4, (1, 2, 4, 8, 16), 4) == [1, 1, 2, 0]
    plain = CostAwareBudget()
    plain._samples, plain._pool = budget._samples, budget._pool
    assert plain.fit_to_buckets(drafts, 4, (1, 2, 4, 8, 16), 4) == [1, 1, 1, 1]


def test_length_classes_follow_the_problem_and_grow_with_the_output():
    d = RolloutDrafter(DasConfig(window=8, min_history=8, short_quantile=0.4, long_quantile=0.7))
    budget = LengthAwareBudget(d)
    d.start("early", A)
    assert budget.length_class("early") == MEDIUM  # no history yet
    d.finish("early", [], aborted=True)
    C = _history(d)
    for rid, prompt in (("a", A), ("b", B), ("c", C), ("new", (7, 7))):
        d.start(rid, prompt)
    assert [budget.length_class(r) for r in ("a", "b", "c")] == [SHORT, LONG, MEDIUM]
    assert budget.length_class("new") == MEDIUM  # unknown problem: the overall median (40)
    assert budget.limit("a", 8, 8) == 0  # short: never drafts
    d.observe("a", list(range(100, 200)))  # this rollout of a short problem runs long
    assert budget.length_class("a") == LONG
    # no cost model yet: drafts run (and teach it), 1 token first, doubling with each drafted step
    assert budget.limit("b", 8, 8) == 1
    budget.observe_step(16, 0.01, 9, True)
    assert budget.limit("b", 8, 8) == 2


def test_the_budget_applies_each_class_rule_with_the_fitted_cost_and_problem_acceptance():
    d = RolloutDrafter(DasConfig(window=8, min_history=8, short_quantile=0.4, long_quantile=0.7))
    budget = LengthAwareBudget(d)
    C = _history(d)
    d.start("b", B)
    d.start("c", C)
    for tokens in (8, 16, 24, 32, 40, 48, 56, 64):  # steps of t = 10 ms + 0.05 ms a token
        budget.observe_step(tokens, 10e-3 + 5e-5 * tokens, tokens, True)
    c_base, c_tok = budget.cost_model()
    assert c_base == pytest.approx(10e-3) and c_tok == pytest.approx(5e-5)
    for _ in range(20):  # problem B: half its draft tokens accepted; C the same
        budget.observe_verify("b", 1, True)
        budget.observe_verify("c", 1, True)
    alpha = budget.alpha("b")
    assert 0.45 < alpha < 0.55
    assert budget.limit("b", 32, 16) == makespan_draft_len(alpha, c_base, c_tok, 32, 16)
    assert budget.limit("c", 32, 16) == throughput_draft_len(budget.alpha("c"), c_base, c_tok, 32, 16)
    assert budget.limit("b", 32, 16) > budget.limit("c", 32, 16)
    assert budget.class_counts[LONG] == 2 and budget.class_counts[MEDIUM] == 2


def test_launch_config_builds_das_with_its_budget():
    cfg = SpeculationConfig(method="das", das_window=4, tree=True)
    drafter = build_drafter(cfg)
    assert isinstance(drafter, RolloutDrafter) and drafter.config.window == 4 and drafter.config.suffix.tree
    budget = build_draft_budget(cfg, drafter)
    assert isinstance(budget, LengthAwareBudget) and budget.drafter is drafter
    assert build_draft_budget(SpeculationConfig(method="das", adaptive=False), drafter) is None
    with pytest.raises(ValueError, match="das_window=0 must be >= 1"):
        SpeculationConfig(method="das", das_window=0)


def test_das_in_the_engine_is_lossless_and_drafts_repeated_rollouts(default_engine_parts):
    """Sampled rollouts of the same prompts, twice: with DAS the tokens are those plain decoding
    gives under the same seeds, and the second epoch accepts drafts from the first."""
    from jinfer.config import CacheConfig, EngineOptions, SchedulerConfig
    from jinfer.engine import Engine
    from jinfer.sampling_params import SamplingParams

    model, tok = default_engine_parts
    prompts = [tok.encode(p) for p in ("def add(a, b):\n", "class Point:\n", "import os\n")]

    def epochs(drafter, budget):
        engine = Engine(model, tok, CacheConfig(page_size=16, num_pages=96),
                        SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8, max_model_len=128),
                        options=EngineOptions(async_scheduling=True), drafter=drafter, max_spec_tokens=6,
                        draft_budget=budget)
        out = []
        for epoch in range(2):
            params = [SamplingParams(temperature=0.8, max_tokens=40, seed=100 * epoch + i % 2, ignore_eos=True)
                      for i in range(2 * len(prompts))]
            out.append([o.token_ids for o in engine.generate(prompts + prompts, params)])
        return out, engine

    class EveryStep(LengthAwareBudget):
        """DAS's draft lengths, drafting in every step: the measured drafts-or-not choice
        (tested in test_spec_budget.py) is not this test's subject (in the first epoch there
        is no history to draft from)."""

        def wants_drafts(self, num_decoding, *, prefilling=False):
            return True

    plain, _ = epochs(None, None)
    drafter = RolloutDrafter(DasConfig(window=4, min_history=2))
    spec, engine = epochs(drafter, EveryStep(drafter))
    assert spec == plain
    stats = engine.spec_stats()
    assert stats.accepted_tokens > 0, stats


@pytest.fixture(scope="module")
def default_engine_parts():
    from jinfer import TEST_MODEL_DIR
    from jinfer.loader.hf import load_hf_model
    from jinfer.tokenizer import Tokenizer
    return load_hf_model(TEST_MODEL_DIR), Tokenizer.from_dir(TEST_MODEL_DIR)


def test_the_simulator_runs_das_on_recorded_rollouts():
    """Problems whose recorded rollouts repeat across epochs: DAS in the simulated replica
    drafts from each problem's own history; every request gets exactly its recorded output in
    fewer simulated steps than without speculation."""
    from scheduler.simulation.workloads import WorkItem
    from scheduler.cost_model import analytic_7b_h100
    from scheduler.routing.policies import make_router
    from scheduler.simulation.simulator import ReplicaConfig, Simulator

    rng = np.random.default_rng(1)
    problems = [(tuple(rng.integers(0, 30000, 30).tolist()), tuple(rng.integers(0, 30000, n).tolist()))
                for n in (20, 30, 200, 40)]
    items = [WorkItem(0.5 * epoch + 0.01 * i, prompt, len(out), output=out)
             for epoch in range(4) for i, (prompt, out) in enumerate(problems)]
    rc = ReplicaConfig(page_size=16, num_pages=2000)

    def run(speculation):
        router = make_router("round-robin", 1, analytic_7b_h100(), rc.capacity_tokens)
        return Simulator(router, 1, analytic_7b_h100(), rc, speculation=speculation).run(items)

    def das():
        drafter = RolloutDrafter(DasConfig(window=4, min_history=4, suffix=SuffixConfig(max_cached_requests=0)))
        return drafter, 8, LengthAwareBudget(drafter)

    plain, spec = run(None), run(das)
    assert [r.output_ids for r in spec.records] == [it.output for it in items]
    assert spec.steps < plain.steps * 0.8
    assert spec.sim_time_s < plain.sim_time_s


@pytest.mark.slow  # ~100 s: four engines, two RL epochs, the simulator replay
def test_rollout_benchmark_smoke_reports_identical_rollouts_for_every_method():
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, os.path.join(root, "tools", "bench_rollouts.py"), "--smoke"],
                         capture_output=True, text=True, timeout=900, env={**os.environ, "XLA_FLAGS": ""})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "identical across methods in every epoch: **yes**" in res.stdout
    for method in ("none", "suffix", "per_problem", "das"):
        assert f"| {method} |" in res.stdout, res.stdout
    assert "Rollout lengths" in res.stdout and "in the simulator" in res.stdout
