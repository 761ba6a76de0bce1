# %% [markdown]
# # Instances and resharding: partitions of 8 devices, and regrouping under load
#
# An *instance* is one engine replica on a tensor-parallel mesh of its own devices
# (`jinfer.instances.Instances`). The 8 devices of a host can be one TP8 instance, two TP4,
# four TP2, eight TP1, or a mix such as 4+2+1+1. More, smaller instances give more
# independent batches and queues (data parallelism); fewer, larger ones give each request
# more devices (tensor parallelism: faster steps on real hardware, more room per replica for
# weights and KV). This notebook serves one workload on several partitions, then regroups a
# running partition into others while requests are in flight, and checks that no request's
# output changes.
#
# The model is the embedded test model (a 5.1M-parameter Llama trained by the project), the
# workload random token-id prompts generated greedily with EOS ignored, so every run produces
# the same number of tokens. Requests go to the instance with the fewest unfinished requests
# when they arrive. One Python thread drives every instance; the engines' async scheduling
# dispatches an instance's next step before reading its last, so instances overlap as far as
# the host allows.
#
# **Reading the times.** Without accelerators the 8 devices are XLA CPU devices sharing the
# host's cores: an instance's step takes the same host CPU whatever its tp, so here partitions
# differ in how their steps interleave and in partitioning overheads, not in compute. The
# byte counts of the regroups are exact and carry over to GPUs.
#
# The logic is in `harness/experiments/partitions.py`; this notebook runs and shows it.

# %% tags=["parameters"]
# Study size: "small" runs in seconds (the tests use it), "full" made the outputs saved here.
import os

SIZE = os.environ.get("JINFER_NOTEBOOK_SIZE", "full")

# %%
from harness.experiments import describe_host, notebook_size, use_fake_devices

use_fake_devices(8)  # before JAX starts: 8 CPU devices when there is no accelerator
import matplotlib.pyplot as plt  # noqa: E402
from IPython.display import Markdown, display  # noqa: E402

from jinfer import TEST_MODEL_DIR  # noqa: E402
from harness.experiments.partitions import PARTITION_STUDY, findings, partition_name, run_partition_study  # noqa: E402
from harness.experiments.report import cdf, markdown_table, mib  # noqa: E402
from jinfer.loader.hf import load_hf_model  # noqa: E402
from jinfer.tokenizer import Tokenizer  # noqa: E402

study = PARTITION_STUDY[notebook_size(SIZE)]
model, tokenizer = load_hf_model(TEST_MODEL_DIR), Tokenizer.from_dir(TEST_MODEL_DIR)
print(f"size {SIZE}: {describe_host()}")
print(f"model: {model.config.num_params() / 1e6:.1f}M parameters, {model.config.num_heads} query / "
      f"{model.config.num_kv_heads} KV heads; workload: {study.num_requests} requests, ~{study.input_len} prompt and "
      f"~{study.output_len} output tokens (±50%), arriving {'at once' if study.rate == float('inf') else f'at {study.rate} req/s'}")
print(f"each instance: up to {study.max_num_seqs} sequences and {study.max_num_batched_tokens} tokens per step, "
      f"{study.num_pages} KV pages of {study.page_size} tokens")

# %%
result = run_partition_study(model, tokenizer, study, log=print)
runs = result.runs

# %% [markdown]
# ## The same workload on each partition
#
# Build time is the wall time to create the partition's engines, including compiling their
# step programs; an instance on devices another instance used before loads its programs from
# the persistent compilation cache instead. Throughput is output tokens per second from the
# first arrival to the last finish.

# %%
display(Markdown(markdown_table(
    ["partition", "instances", "build s", "output tok/s", "TTFT mean s", "TTFT p99 s", "latency mean s",
     "latency p99 s", "requests per instance"],
    [[partition_name(r.sizes), len(r.sizes), f"{b:.1f}", f"{r.tokens_per_s:,.0f}",
      f"{r.latency('ttft_s')['mean']:.2f}", f"{r.latency('ttft_s')['p99']:.2f}", f"{r.latency()['mean']:.2f}",
      f"{r.latency()['p99']:.2f}", " / ".join(map(str, r.per_instance()))] for r, b in zip(runs, result.build_s)])))

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
ax1.bar([partition_name(r.sizes) for r in runs], [r.tokens_per_s for r in runs])
ax1.set(ylabel="output tokens / s", title="Throughput by partition")
for r in runs:
    x, y = cdf(q.latency_s for q in r.requests)
    ax2.step(x, y, where="post", label=partition_name(r.sizes))
ax2.set(xlabel="request latency (s)", ylabel="share of requests", title="Latency CDF")
ax2.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Regrouping under load
#
# The workload runs again on one partition, and once given shares of its output tokens are
# out the devices are regrouped (`Instances.regroup`). Instances with requests keep running on
# the new group they overlap most: their weights and KV pages move, each device receiving only
# the slices it lacks. An instance left without a group hands its requests, with the K/V of
# their computed tokens, to the new instance it overlaps most. A new instance copies its
# weights from the old one that overlapped it most, again slice by slice, and builds its
# engine (loading its step programs), all inside the regroup's wall time. For each regroup:
# its wall time, the time until the next token, and the bytes moved next to the theoretical
# minimum and to what reloading every new shard in full would place.

# %%
rg = result.regrouped
rows = []
for ev in rg.regroups:
    for part in ("weights", "kv", "migrated"):
        m = ev.total(part)
        rows.append([f"{partition_name(ev.before)} → {partition_name(ev.after)}", part, f"{mib(m.moved):.2f}",
                     f"{mib(m.minimum):.2f}", f"{mib(m.full_reload):.2f}"])
display(Markdown(markdown_table(
    ["regroup", "at s", "regroup s", "to next token s", "requests in flight", "kept", "created", "dropped",
     "requests migrated"],
    [[f"{partition_name(ev.before)} → {partition_name(ev.after)}", f"{ev.at_s:.2f}", f"{ev.seconds:.2f}",
      f"{ev.resume_s:.2f}", ev.unfinished, len(ev.report.kept), len(ev.report.created), len(ev.report.dropped),
      sum(n for _, n, _ in ev.report.migrated.values())] for ev in rg.regroups])))
display(Markdown(markdown_table(["regroup", "what", "moved MiB", "minimum MiB", "full reload MiB"], rows)))

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
t, n = zip(*rg.timeline)
ax1.plot(t, n, label=f"regrouped, from {partition_name(rg.sizes)}")
t0, n0 = zip(*result.reference.timeline)
ax1.plot(t0, n0, "--", label=f"{partition_name(result.reference.sizes)} throughout")
for ev in rg.regroups:
    ax1.axvspan(ev.at_s, ev.at_s + ev.seconds + ev.resume_s, color="grey", alpha=0.3)
    ax1.annotate(f"→ {partition_name(ev.after)}", (ev.at_s, max(n) * 0.05), rotation=90, fontsize=8)
ax1.set(xlabel="s", ylabel="output tokens so far", title="Serving through regroups (grey: regroup + pause)")
ax1.legend(loc="lower right")
labels = [f"{partition_name(ev.before)}→{partition_name(ev.after)}" for ev in rg.regroups]
x = range(len(labels))
for off, what in ((-0.27, "moved"), (0, "minimum"), (0.27, "full_reload")):
    ax2.bar([i + off for i in x], [mib(getattr(ev.moved, what)) for ev in rg.regroups], 0.27,
            label=what.replace("_", " "))
ax2.set(xticks=list(x), xticklabels=labels, ylabel="MiB", title="Bytes a regroup moves (weights + K/V)")
ax2.legend()
plt.tight_layout()
plt.show()

# %%
# The regrouped run's tokens, request by request, against the run that never regrouped.
assert result.outputs_unchanged, "a request's tokens changed across the regroup"
print(f"outputs unchanged: all {len(rg.requests)} requests produced the same {rg.output_tokens} tokens "
      f"as on {partition_name(result.reference.sizes)} without regrouping")

# %% [markdown]
# ## What the numbers say

# %%
display(Markdown(findings(result, study)))

# %% [markdown]
# ## Trade-offs
#
# - **Instances vs tensor parallelism.** Splitting 8 devices into more instances multiplies
#   the independent batches and queues, which raises throughput while each replica still
#   fits its devices; merging them into fewer, larger instances shortens each step on real
#   hardware (see `sharding_strategies`) and gives one replica more memory for KV, which
#   long contexts and large batches need. A mixed partition (4+2+1+1) offers both kinds of
#   replica, and a router that knows which request wants which can use it; the simple
#   fewest-unfinished router here does not distinguish them.
# - **Regrouping cost.** Because each device keeps the slices it already holds, a regroup
#   moves the theoretical minimum, less than a full reload whenever the new groups overlap
#   the old ones. The pause measured above also holds host work that the bytes do not show:
#   building each new shard piece by piece, and loading the new meshes' step programs (from
#   the compilation cache here) before their first step.
# - **Correctness.** Requests in flight continue with the same tokens whether they stay on a
#   resharded instance or migrate to another with their K/V, so a controller may regroup
#   whenever the load shifts, paying only the pause.
