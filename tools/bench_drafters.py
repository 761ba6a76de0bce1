"""Host cost and acceptance of the model-free drafters (scheduler/speculation/drafters.py).

  python tools/bench_drafters.py
  python tools/bench_drafters.py --workloads=repeat --max_draft_tokens=16 --repeats=5

Each workload is a list of requests (prompt, the output the model will write); a request runs as
the engine drives a drafter: propose a draft of at most --max_draft_tokens, keep the longest prefix that
greedy verification accepts plus the model's token, observe them, and finish with the output.
Workloads: `stdlib` (Python standard library files cut into words: prompt = a file's start,
output = what follows), `repeat` (agent-like: each output redoes an earlier one with
--repeat_change of its tokens changed), `random` (uniform tokens from 32k: nothing to find, the pure overhead).
Reported per drafter, medians over --repeats runs (wall time of each call, less the cost of
reading the clock; drafters alternate between runs so a busy spell hits all alike): microseconds
per propose call, per drafted token, per observed token, per prompt token at start and per output
token at finish (the global tree's insert and evictions), and tokens drafted and accepted per
step. (CPU-time clocks cost a system call, ~1.4 us, on the machines measured: too coarse here.)
"""

from __future__ import annotations

import glob
import os
import random
import re
import statistics
import sys
import sysconfig
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the source tree
from scheduler.speculation.drafters import NgramDrafter, SuffixConfig, SuffixDrafter  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("workloads", ["stdlib", "repeat", "random"], "Workloads to run.")
flags.DEFINE_list("drafters", ["ngram", "suffix", "suffix_tree"], "Drafters to compare.")
flags.DEFINE_integer("max_draft_tokens", 8, "Draft budget the engine grants per step.", lower_bound=1)
flags.DEFINE_integer("requests", 40, "Requests per workload.", lower_bound=1)
flags.DEFINE_integer("prompt_len", 800, "Prompt tokens (stdlib, random).", lower_bound=1)
flags.DEFINE_integer("output_len", 400, "Output tokens per request.", lower_bound=1)
flags.DEFINE_integer("repeats", 3, "Runs per drafter and workload (medians reported).", lower_bound=1)
flags.DEFINE_float("repeat_change", 0.05, "Share of an output's tokens changed in `repeat`.", lower_bound=0)
flags.DEFINE_integer("seed", 0, "Workload seed.")


def stdlib_requests(n, prompt_len, output_len, seed):
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    random.Random(seed).shuffle(files)
    vocab, out = {}, []
    for path in files:
        with open(path, errors="ignore") as f:
            words = re.findall(r"\w+|[^\w\s]|\n", f.read())
        ids = [vocab.setdefault(w, len(vocab)) for w in words]
        if len(ids) >= prompt_len + output_len:
            out.append((ids[:prompt_len], ids[prompt_len:prompt_len + output_len]))
        if len(out) == n:
            break
    return out


def repeat_requests(n, output_len, seed, vocab=32000, templates=4, change=0.05):
    """Requests of `templates` kinds: a kind's prompts end with the same instruction and its
    outputs redo the same text, each with `change` of its tokens replaced."""
    rng = random.Random(seed)
    bases = [[rng.randrange(vocab) for _ in range(output_len)] for _ in range(templates)]
    instructions = [[rng.randrange(vocab) for _ in range(32)] for _ in range(templates)]
    out = []
    for i in range(n):
        prompt = [rng.randrange(vocab) for _ in range(64)] + instructions[i % templates]
        output = [rng.randrange(vocab) if rng.random() < change else t for t in bases[i % templates]]
        out.append((prompt, output))
    return out


def random_requests(n, prompt_len, output_len, seed, vocab=32000):
    rng = random.Random(seed)
    return [([rng.randrange(vocab) for _ in range(prompt_len)],
             [rng.randrange(vocab) for _ in range(output_len)]) for _ in range(n)]


def make_drafter(name):
    return {"ngram": NgramDrafter, "suffix": SuffixDrafter,
            "suffix_tree": lambda: SuffixDrafter(SuffixConfig(tree=True))}[name]()


def accepted(draft, truth):
    node, k = -1, 0
    while k < len(truth):
        nxt = [i for i, p in enumerate(draft.parents) if p == node and draft.tokens[i] == truth[k]]
        if not nxt:
            break
        node, k = nxt[0], k + 1
    return k


def clock_cost_ns() -> float:
    """Median reading of an empty interval of the clock used below."""
    clock = time.perf_counter_ns
    samples = []
    for _ in range(2001):
        t0 = clock()
        samples.append(clock() - t0)
    return statistics.median(samples)


def run(drafter, requests, max_draft_tokens):
    clock = time.perf_counter_ns
    t = dict(start=0, propose=0, observe=0, finish=0)
    n = dict(prompt=0, propose=0, drafted=0, accepted=0, observed=0)
    for i, (prompt, target) in enumerate(requests):
        rid = str(i)
        t0 = clock()
        drafter.start(rid, prompt)
        t["start"] += clock() - t0
        n["prompt"] += len(prompt)
        output = []
        while len(output) < len(target):
            t0 = clock()
            draft = drafter.propose(rid, output, max_draft_tokens)
            t["propose"] += clock() - t0
            k = accepted(draft, target[len(output):])
            new = target[len(output):len(output) + k + 1]
            output += new
            t0 = clock()
            drafter.observe(rid, new)
            t["observe"] += clock() - t0
            n["propose"] += 1
            n["drafted"] += len(draft)
            n["accepted"] += k
            n["observed"] += len(new)
        t0 = clock()
        drafter.finish(rid, output, aborted=False)
        t["finish"] += clock() - t0
    calls = dict(start=len(requests), propose=n["propose"], observe=n["propose"], finish=len(requests))
    cost = clock_cost_ns()
    t = {k: max(0.0, v - cost * calls[k]) for k, v in t.items()}
    us = lambda ns, count: ns / 1e3 / max(count, 1)  # noqa: E731
    return {
        "propose us/call": us(t["propose"], n["propose"]),
        "us/drafted token": us(t["propose"], n["drafted"]),
        "observe us/token": us(t["observe"], n["observed"]),
        "start us/prompt token": us(t["start"], n["prompt"]),
        "finish us/output token": us(t["finish"], n["observed"]),
        "drafted/step": n["drafted"] / n["propose"],
        "accepted/step": n["accepted"] / n["propose"],
    }


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    makers = {
        "stdlib": lambda: stdlib_requests(FLAGS.requests, FLAGS.prompt_len, FLAGS.output_len, FLAGS.seed),
        "repeat": lambda: repeat_requests(FLAGS.requests, FLAGS.output_len, FLAGS.seed,
                                          change=FLAGS.repeat_change),
        "random": lambda: random_requests(FLAGS.requests, FLAGS.prompt_len, FLAGS.output_len, FLAGS.seed),
    }
    for workload in FLAGS.workloads:
        requests = makers[workload]()
        print(f"\n{workload}: {len(requests)} requests, max_draft_tokens={FLAGS.max_draft_tokens}, "
              f"medians of {FLAGS.repeats} runs")
        rows = {name: [] for name in FLAGS.drafters}
        for _ in range(FLAGS.repeats):  # drafters alternate, so a busy spell hits all alike
            for name in FLAGS.drafters:
                rows[name].append(run(make_drafter(name), requests, FLAGS.max_draft_tokens))
        keys = list(next(iter(rows.values()))[0])
        print("| drafter | " + " | ".join(keys) + " |")
        print("|---" * (len(keys) + 1) + "|")
        for name, runs in rows.items():
            cells = [f"{statistics.median(r[k] for r in runs):.2f}" for k in keys]
            print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    app.run(main)
