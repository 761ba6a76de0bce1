"""Workload generators, arrivals and the JSONL trace format."""

import collections
import json

import numpy as np
import pytest

from scheduler.simulation import workloads as w

VOCAB = (8, 4096)


def test_generators_are_deterministic_under_a_seed():
    for make in (lambda s: w.random_lengths(20, input_len=50, output_len=10, vocab=VOCAB, seed=s),
                 lambda s: w.shared_prefix(20, num_groups=3, prefix_len=40, suffix_len=8, output_len=5,
                                           vocab=VOCAB, seed=s),
                 lambda s: w.multi_turn(4, turns=3, system_len=10, user_len=6, output_len=4, vocab=VOCAB, seed=s),
                 lambda s: w.demo(VOCAB, s)):
        assert make(1) == make(1)
        assert make(1) != make(2)


def test_random_lengths_stay_in_their_range_and_vocabulary():
    items = w.random_lengths(200, input_len=100, output_len=20, spread=0.25, vocab=VOCAB,
                             tiers={"a": 3, "b": 1}, seed=0)
    assert all(75 <= it.prompt_len <= 125 and 15 <= it.max_tokens <= 25 for it in items)
    assert all(VOCAB[0] <= t < VOCAB[1] for it in items for t in it.prompt)
    tiers = collections.Counter(it.tier for it in items)
    assert set(tiers) == {"a", "b"} and tiers["a"] > 2 * tiers["b"]


def test_shared_prefix_groups_share_exactly_their_prefix_with_zipf_popularity():
    items = w.shared_prefix(2000, num_groups=5, prefix_len=32, suffix_len=8, output_len=4, zipf_a=1.2,
                            vocab=VOCAB, seed=0)
    prefixes = {}
    for it in items:
        prefixes.setdefault(it.group, set()).add(it.prompt[:32])
    assert all(len(p) == 1 for p in prefixes.values()) and len({next(iter(p)) for p in prefixes.values()}) == 5
    counts = collections.Counter(it.group for it in items)
    assert [g for g, _ in counts.most_common()] == [0, 1, 2, 3, 4]
    expected = w.zipf_weights(5, 1.2) * 2000
    assert np.allclose([counts[g] for g in range(5)], expected, rtol=0.15)
    even = collections.Counter(it.group for it in w.shared_prefix(
        2000, num_groups=5, prefix_len=4, suffix_len=1, output_len=1, zipf_a=0, vocab=VOCAB, seed=0).__iter__())
    assert max(even.values()) < 1.25 * min(even.values())


def test_multi_turn_is_turn_major_and_only_the_first_turn_carries_the_system_prompt():
    items = w.multi_turn(3, turns=2, system_len=10, user_len=5, output_len=4, spread=0, vocab=VOCAB, seed=0)
    assert [it.session for it in items] == ["s0", "s1", "s2"] * 2
    assert [it.prompt_len for it in items] == [15] * 3 + [5] * 3


def test_poisson_arrivals_have_the_asked_rate():
    items = w.poisson_arrivals(w.random_lengths(4000, input_len=4, output_len=1, vocab=VOCAB), rate=20.0, seed=3)
    times = [it.arrival_s for it in items]
    assert times[0] == 0 and times == sorted(times)
    assert (len(times) - 1) / times[-1] == pytest.approx(20.0, rel=0.05)
    assert all(it.arrival_s == 0 for it in w.poisson_arrivals(items[:5], float("inf")))
    with pytest.raises(ValueError, match="rate=0"):
        w.poisson_arrivals(items, 0)


def test_trace_round_trip_and_rescaling(tmp_path):
    items = w.merge(w.poisson_arrivals(w.multi_turn(2, turns=2, system_len=3, user_len=2, output_len=2,
                                                    vocab=VOCAB, tiers={"x": 1}), 4.0),
                    [w.WorkItem(0.1, "def f(x):", 5, "y")])
    path = str(tmp_path / "t.jsonl")
    w.save_trace(items, path)
    assert w.load_trace(path) == items
    slower = w.scale_arrivals(items, 2.0)
    assert (len(items) - 1) / slower[-1].arrival_s == pytest.approx(2.0)


@pytest.mark.parametrize("line, message", [
    ("not json", "not JSON"),
    ('{"arrival_s": 0, "max_tokens": 3}', "exactly one of prompt"),
    ('{"arrival_s": 0, "prompt": "a", "prompt_ids": [1], "max_tokens": 3}', "exactly one of prompt"),
    ('{"arrival_s": 0, "prompt_ids": [1, -2], "max_tokens": 3}', "non-negative ints"),
    ('{"arrival_s": 0, "prompt": "a"}', "missing max_tokens"),
    ('{"arrival_s": -1, "prompt": "a", "max_tokens": 3}', "arrival_s=-1.0"),
    ('{"arrival_s": 0, "prompt": "a", "max_tokens": 0}', "max_tokens=0"),
    ('{"arrival_s": 0, "prompt": "a", "max_tokens": 1, "colour": "red"}', "unknown fields \\['colour'\\]"),
])
def test_bad_trace_lines_name_the_line_and_field(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"arrival_s": 0, "prompt": "ok", "max_tokens": 1}) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=message) as e:
        w.load_trace(str(path))
    assert "bad.jsonl:2" in str(e.value)
