# %% [markdown]
# # Sharding strategies: one model at tp 1, 2, 4 and 8
#
# The same random-weight Llama runs the engine's own jitted step (forward pass + greedy
# sampling, `jinfer.runner.ModelRunner`) on 1-D tensor-parallel meshes of 1, 2, 4 and 8
# devices, in the Megatron layout of `sharding/tp.py`: q/k/v/gate/up split by output columns,
# o/down by input rows, so each decoder layer ends its attention and its MLP with one
# all-reduce of the `[tokens, hidden]` activations. Measured per layout:
#
# - decode step latency (a batch of sequences, one new token each, after a cached context) and
#   prefill step latency (one prompt): every layout's steps are compiled and run once, then
#   timed once each per round, so that load from elsewhere on the machine falls on all
#   layouts alike; the tables give medians over the rounds;
# - decode throughput at several batch sizes;
# - parameter and KV-pool bytes held by one device;
# - bytes crossing devices per step, read from the compiled program's collectives
#   (`harness.experiments.hlo.collective_traffic`);
# - the embedding and LM head split over the vocabulary (the default) against kept whole on
#   every device.
#
# **Reading the times.** On a machine without accelerators the 8 devices are XLA CPU devices
# that share the host's cores and memory, and a collective is a copy inside one process. So
# splitting a step over more devices adds no compute here: latencies show what partitioning
# costs (smaller per-device matmuls, per-device dispatch, collectives) and not the speed-up a
# GPU mesh would give. The byte counts, by contrast, are properties of the partitioned
# program and carry over to any backend.
#
# The measurements live in `harness/experiments/tensor_parallel.py` (also behind
# `tools/bench_tp.py`); this notebook only runs and shows them.

# %% tags=["parameters"]
# Study size: "small" runs in seconds (the tests use it), "full" made the outputs saved here.
import os

SIZE = os.environ.get("JINFER_NOTEBOOK_SIZE", "full")

# %%
from harness.experiments import describe_host, notebook_size, use_fake_devices

use_fake_devices(8)  # before JAX starts: 8 CPU devices when there is no accelerator
import matplotlib.pyplot as plt  # noqa: E402
from IPython.display import Markdown, display  # noqa: E402

from harness.experiments.hlo import KINDS  # noqa: E402
from harness.experiments.report import markdown_table, mib  # noqa: E402
from harness.experiments.tensor_parallel import (SHARDING_STUDY, findings, megatron_bytes,  # noqa: E402
                                                run_sharding_study)

study = SHARDING_STUDY[notebook_size(SIZE)]
cfg = study.model_config()
shapes = study.shapes
print(f"size {SIZE}: {describe_host()}")
print(f"model: {cfg.num_params() / 1e6:.1f}M parameters float32, hidden {cfg.hidden_size}, {cfg.num_layers} layers, "
      f"{cfg.num_heads} query / {cfg.num_kv_heads} KV heads, vocab {cfg.vocab_size}")
print(f"decode: {shapes.batch} sequences at {shapes.context} cached tokens (throughput also at batches "
      f"{sorted(shapes.batches)}); prefill: one {shapes.prefill}-token prompt; medians of {study.repeats} rounds")

# %%
results = run_sharding_study(study, log=print)
split = {r.tp: r for r in results if r.vocab_parallel}
whole = {r.tp: r for r in results if not r.vocab_parallel}
tps = sorted(split)
batches = sorted(split[tps[0]].decode_ms)

# %% [markdown]
# ## Latency and throughput
#
# A decode step reads every weight once to produce one token per sequence, so on hardware
# where each device has its own memory bandwidth it is the step that tensor parallelism speeds
# up most: each device reads 1/tp of the weights, and the price is two all-reduces per layer
# whose latency does not shrink with tp. A prefill step is compute-bound and splits its
# matmuls the same way. Larger decode batches amortise the weight reads over more tokens, so
# throughput grows with the batch until the step turns compute-bound.

# %%
display(Markdown(markdown_table(
    ["tp", f"decode ms (batch {shapes.batch})", f"prefill ms ({shapes.prefill} tokens)",
     *[f"decode tok/s, batch {b}" for b in batches]],
    [[t, f"{split[t].decode_ms[shapes.batch]:.2f}", f"{split[t].prefill_ms:.2f}",
      *[f"{split[t].decode_tokens_per_s(b):,.0f}" for b in batches]] for t in tps])))

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
ax1.plot([str(t) for t in tps], [split[t].decode_ms[shapes.batch] for t in tps], "o-",
         label=f"decode, batch {shapes.batch}")
ax1.plot([str(t) for t in tps], [split[t].prefill_ms for t in tps], "s-", label=f"prefill, {shapes.prefill} tokens")
ax1.set(xlabel="tp", ylabel="step time (ms)", ylim=(0, None), title="Step latency")
ax1.legend()
for t in tps:
    ax2.plot(batches, [split[t].decode_tokens_per_s(b) for b in batches], "o-", label=f"tp {t}")
ax2.set(xscale="log", xlabel="decode batch (sequences)", ylabel="tokens / s", title="Decode throughput")
ax2.set_xticks(batches, [str(b) for b in batches], minor=False)
ax2.minorticks_off()
ax2.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Memory per device
#
# Parameters split almost exactly by tp: RMSNorm weights stay whole on every device, and so do
# the K and V projections once tp exceeds the KV heads (every device then computes all KV
# heads). The KV pool splits by KV head: while tp divides the number of KV heads each device holds
# `kv_heads / tp` heads of every page; once tp exceeds the KV heads each device keeps and
# writes all of them (query heads stay split), so the per-device pool stops shrinking and
# returns to its full size: grouped-query attention caps how far tensor parallelism can split
# the cache.

# %%
display(Markdown(markdown_table(
    ["tp", "parameters MiB/device", "KV pool MiB/device", "tp x parameters / tp 1 parameters"],
    [[t, f"{mib(split[t].param_bytes):.2f}", f"{mib(split[t].kv_bytes):.2f}",
      f"{split[t].param_bytes * t / split[tps[0]].param_bytes:.3f}"] for t in tps])))

fig, ax = plt.subplots(figsize=(6, 4))
x = range(len(tps))
ax.bar([i - 0.2 for i in x], [mib(split[t].param_bytes) for t in tps], 0.4, label="parameters")
ax.bar([i + 0.2 for i in x], [mib(split[t].kv_bytes) for t in tps], 0.4, label="KV pool")
ax.plot(list(x), [mib(split[tps[0]].param_bytes) / t for t in tps], "k--", label="parameters / tp")
ax.set(xticks=list(x), xticklabels=[f"tp {t}" for t in tps], ylabel="MiB on one device", title="Memory per device")
ax.legend()
plt.show()

# %% [markdown]
# ## Bytes crossing devices per step
#
# Every collective of the compiled step program, with its operand bytes on one device. The
# straight path runs once per step; collectives inside a while loop run once per iteration
# (here: the attention's loop over pages when KV heads are replicated), and those inside a
# conditional branch run only when it is taken (the sorted top-k/top-p sampling path, which a
# greedy batch skips). The last column is what the Megatron layout predicts for the
# all-reduces: `(2 x layers + 1 if the vocabulary is split) x tokens x hidden x 4 bytes`, with
# tokens the step's padded bucket.

# %%
rows = []
for t in tps:
    for step, traffic, tokens in (("decode", split[t].decode_traffic, split[t].decode_tokens),
                                  ("prefill", split[t].prefill_traffic, split[t].prefill_tokens)):
        kinds = traffic.by_kind()
        rows.append([t, step, tokens, *[f"{kinds[k][0]} / {kinds[k][1] / 1024:.1f}" for k in KINDS],
                     f"{traffic.bytes('loop') / 1024:.1f}", f"{traffic.bytes('branch') / 1024:.1f}",
                     f"{megatron_bytes(cfg, tokens, t) / 1024:.1f}"])
display(Markdown("Straight path, per kind: count / KiB per device.\n\n" + markdown_table(
    ["tp", "step", "tokens", *KINDS, "in loops KiB", "in branches KiB", "Megatron all-reduce KiB"], rows)))

fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
for ax, step in zip(axes, ("decode", "prefill")):
    bottom = [0.0] * len(tps)
    for kind in KINDS:
        vals = [getattr(split[t], f"{step}_traffic").by_kind()[kind][1] / 1024 for t in tps]
        if any(vals):
            ax.bar([str(t) for t in tps], vals, bottom=bottom, label=kind)
            bottom = [b + v for b, v in zip(bottom, vals)]
    ax.plot([str(t) for t in tps], [megatron_bytes(cfg, getattr(split[t], f"{step}_tokens"), t) / 1024 for t in tps],
            "k_", markersize=30, mew=2, label="Megatron all-reduce")
    ax.set(xlabel="tp", title=f"{step} step: straight path", ylabel="KiB per device")
    ax.legend(loc="upper left")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Vocabulary-parallel or replicated embedding and LM head
#
# Split over the vocabulary, each device holds `vocab / tp` rows of the embedding and of the
# LM head and computes `vocab / tp` logits; the embedding lookup then needs one more
# all-reduce of `[tokens, hidden]`, and greedy sampling a few small reductions across the
# split vocabulary (row maxima and their indices). Replicated, every device holds both
# matrices whole and computes all logits: no collective for them, but `2 x vocab x hidden`
# parameters per device and the LM head's full matmul repeated on every device. The larger
# the vocabulary relative to the model, the more the split saves. On the shared-core CPU
# devices here the repeated matmuls also compete for the same cores, so the replicated head's
# time grows with tp; on a GPU mesh each device repeats it on compute of its own.

# %%
if whole:
    display(Markdown(markdown_table(
        ["tp", "head", f"decode ms (batch {shapes.batch})", "prefill ms", "parameters MiB/device",
         "decode KiB/step/device"],
        [[t, name, f"{r.decode_ms[shapes.batch]:.2f}", f"{r.prefill_ms:.2f}", f"{mib(r.param_bytes):.2f}",
          f"{r.decode_traffic.bytes() / 1024:.1f}"]
         for t in sorted(whole) for name, r in (("split", split[t]), ("replicated", whole[t]))])))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    ht = sorted(whole)
    x = range(len(ht))
    for off, name, table in ((-0.2, "split", split), (0.2, "replicated", whole)):
        ax1.bar([i + off for i in x], [table[t].decode_ms[shapes.batch] for t in ht], 0.4, label=name)
        ax2.bar([i + off for i in x], [mib(table[t].param_bytes) for t in ht], 0.4, label=name)
    ax1.set(xticks=list(x), xticklabels=[f"tp {t}" for t in ht], ylabel="ms", title=f"Decode step, batch {shapes.batch}")
    ax2.set(xticks=list(x), xticklabels=[f"tp {t}" for t in ht], ylabel="MiB", title="Parameters per device")
    ax1.legend()
    plt.tight_layout()
    plt.show()

# %% [markdown]
# ## What the numbers say

# %%
display(Markdown(findings(results, study)))

# %% [markdown]
# ## Trade-offs
#
# - **Latency vs devices.** Tensor parallelism divides a step's weight reads and matmuls by tp
#   and adds `2 x layers` all-reduces whose per-device bytes do not shrink with tp; on a
#   GPU mesh with fast links decode latency falls with tp until those all-reduces' latency
#   dominates. On the shared-core CPU devices above there is no extra compute to gain, so the
#   times show the overheads alone.
# - **Memory.** Weights per device fall as 1/tp, leaving room for KV pages; but with fewer KV
#   heads than devices the cache is replicated, so beyond tp = KV heads extra devices add
#   weight room and no KV room.
# - **Throughput.** Batching is the cheaper lever for throughput: a decode step's cost grows
#   slowly with the batch, while each added device adds collectives. Several smaller
#   instances (data parallelism) serve more requests per device when the model fits; see
#   `instances_and_resharding`.
# - **The head.** Splitting the vocabulary costs one small all-reduce per step and saves
#   `2 x vocab x hidden x (1 - 1/tp)` parameters and the repeated LM head matmul per device;
#   it is the default (`EngineOptions(vocab_parallel=True)`).
