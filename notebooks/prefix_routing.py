# %% [markdown]
# # Prefix-aware routing: Preble's E2 against round-robin, least-load and SGLang's router
#
# A router in front of N replicas decides which one serves each request. Requests that share
# a prompt prefix (tool documentation, an environment description, a problem statement, a
# video, a long document) are cheaper where that prefix's KV is already cached, but sending
# every request to where its prefix lives can overload one replica. The policies compared,
# all from `scheduler/routing/policies.py`:
#
# - **round-robin**: replicas in turn, blind to prefixes and load;
# - **least-load**: the replica with the fewest outstanding requests;
# - **sglang**: SGLang's cache-aware router: an approximate tree of what each replica was
#   sent; the best-matching replica when its match rate exceeds a threshold, else the least
#   loaded, and the shortest queue whenever loads are imbalanced;
# - **preble-e2**: Preble's E2: exploit the replica caching the prefix when more of the
#   prompt is cached than missed, else explore by the lowest windowed load + eviction cost +
#   this request's prefill; with rebalancing and hot-prefix replication.
#
# Each runs the same requests in the discrete-event simulator (`scheduler/simulation/simulator.py`):
# every replica is jinfer's own scheduler (token budgets, paged KV pool, prefix cache,
# eviction, preemption) with its steps timed by a cost model instead of a device. The cost
# model here is the analytic 7B-class model on one H100 (`analytic_7b_h100`: roofline numbers,
# not a measurement), so the latencies are those of a simulated GPU replica. The five
# workloads (`scheduler/routing/preble_workloads.py`) follow the length statistics, shared fractions
# and requests per shared prefix of the traces in Preble's paper: ToolBench-, embodied-agent-,
# programming-, video-QA- and long-document-QA-like. Rates are multiples of a per-workload base
# rate: the replicas' throughput if every shared prefix were already cached.
#
# The runs live in `harness/experiments/routing.py` (also behind `tools/simulate_routing.py`).

# %% tags=["parameters"]
# Study size: "small" runs in seconds (the tests use it), "full" made the outputs saved here.
import os

SIZE = os.environ.get("JINFER_NOTEBOOK_SIZE", "full")

# %%
import matplotlib.pyplot as plt
from IPython.display import Markdown, display

from harness.experiments import notebook_size
from harness.experiments.report import cdf, markdown_table
from scheduler.routing import preble_workloads as pw
from harness.experiments.routing import ROUTING_STUDY, findings, run_routing_study
from scheduler.routing.policies import ROUTERS

study = ROUTING_STUDY[notebook_size(SIZE)]
setup = study.setup
print(f"size {SIZE}: {setup.replicas} replicas x {setup.num_pages} KV pages of {setup.page_size} tokens, "
      f"{setup.num_requests} requests per run, rate factors {list(study.rate_factors)}, "
      f"key portions {'even' if setup.zipf_a == 0 else f'Zipf({setup.zipf_a})'}, seed {setup.seed}")
display(Markdown(markdown_table(
    ["workload", "prompt mean", "output mean", "shared fraction", "requests per shared prefix"],
    [[s.name, f"{s.prompt_mean:,.0f}", f"{s.output_mean:,.0f}", f"{s.shared_fraction:.0%}", f"{s.requests_per_key:g}"]
     for s in (pw.SPECS[w] for w in study.workloads)])))

# %%
comparisons, runs = run_routing_study(study, log=print)
print(f"simulated {runs.requests} requests in {runs.wall_s:.1f} s of wall time")

# %% [markdown]
# ## Latency and hit rate per router
#
# Latency is a request's arrival to its last token; the hit rate is the share of prompt tokens
# found in the serving replica's prefix cache. Ratios are round-robin's latency over E2's
# (above 1: E2 is faster).

# %%
rows = []
for c in comparisons:
    st = {r: c.stats(r) for r in ROUTERS}
    e2 = st["preble-e2"]["latency"]
    rows.append([c.workload, f"{c.rate_factor:g}", f"{c.rate:.1f}",
                 *[f"{st[r]['latency']['avg']:.2f} / {st[r]['latency']['p99']:.2f}" for r in ROUTERS],
                 f"{st['round-robin']['latency']['avg'] / e2['avg']:.2f}",
                 *[f"{st[r]['cache_hit_rate']:.0%}" for r in ROUTERS]])
display(Markdown("Latency: average / p99, seconds.\n\n" + markdown_table(
    ["workload", "rate x", "req/s", *ROUTERS, "RR / E2 avg", *[f"hit {r}" for r in ROUTERS]], rows)))

# %% [markdown]
# ## Latency CDFs
#
# One panel per workload at each rate: the share of requests finished within a given latency.
# A curve further left and steeper is better; the tail (top right) is where a router that
# piles one prefix's requests onto one replica shows its queueing.

# %%
n = len(comparisons)
cols = min(n, 5)
fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(3.4 * cols, 3.2 * ((n + cols - 1) // cols)),
                         squeeze=False)
for ax, c in zip(axes.flat, comparisons):
    for r in ROUTERS:
        x, y = cdf(rec.latency_s for rec in c.results[r].records if not rec.error)
        ax.step(x, y, where="post", label=r)
    ax.set(xscale="log", title=f"{c.workload}, x{c.rate_factor:g}", xlabel="latency (s)")
    ax.xaxis.set_major_formatter("{x:g}")
    ax.xaxis.set_minor_formatter("")
for ax in axes.flat[n:]:
    ax.axis("off")
axes.flat[0].set_ylabel("share of requests")
axes.flat[0].legend(fontsize=8)
plt.tight_layout()
plt.show()

# %%
top = [c for c in comparisons if c.rate_factor == max(study.rate_factors)]
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
width = 0.8 / len(ROUTERS)
for k, r in enumerate(ROUTERS):
    xs = [i + (k - (len(ROUTERS) - 1) / 2) * width for i in range(len(top))]
    ax1.bar(xs, [c.stats(r)["cache_hit_rate"] for c in top], width, label=r)
    ax2.bar(xs, [c.stats(r)["latency"]["avg"] / c.stats("preble-e2")["latency"]["avg"] for c in top], width, label=r)
for ax in (ax1, ax2):
    ax.set_xticks(range(len(top)), [c.workload for c in top])
ax1.set(ylabel="prefix-cache hit rate", ylim=(0, 1), title=f"Hit rate at rate x{max(study.rate_factors):g}")
ax2.axhline(1, color="k", lw=0.8)
ax2.set(ylabel="average latency / E2's", title=f"Average latency relative to E2 at rate x{max(study.rate_factors):g}")
ax1.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## What the numbers say

# %%
display(Markdown(findings(comparisons)))

# %% [markdown]
# ## Trade-offs
#
# - **Hits against balance.** Round-robin and least-load ignore prefixes: each replica ends
#   up caching every popular prefix, so hit rates are what repetition alone gives and every
#   replica recomputes long shared prompts. The prefix-aware routers raise hit rates by
#   sending a prefix's requests where it is cached, which pays most where shared prefixes
#   are long and prompts dominate the work (video QA, long documents), and least where
#   outputs dominate (programming: long, heavy-tailed outputs).
# - **When exploitation hurts.** Pinning a prefix to one replica concentrates its load. E2
#   explores when no more than half of a prompt is cached and rebalances or replicates hot
#   prefixes, but its load estimate looks back over a window, so it reacts late to
#   decode-heavy skew; SGLang's router exploits any match above its threshold until loads
#   become imbalanced. The table shows which wins on which workload at these rates.
# - **Caveat.** These are simulations on an analytic cost model; `benchmarks/routing_live.md`
#   runs the same routers against live replicas on CPU.
