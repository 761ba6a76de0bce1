"""Decode paged-attention kernels side by side: time per call and HBM bandwidth against the floor.

  python tools/bench_kernels.py                                   # on a GPU: the full grid
  python tools/bench_kernels.py --out=benchmarks/kernels.md
  python tools/bench_kernels.py --smoke                           # CPU, interpret mode, tiny

For every batch x context point (every sequence at that context), one decode step over a
paged KV pool with Llama-3-8B head shapes (32 query heads, 8 KV heads, head_dim 128) by:
  - jinfer decode: pallas_kernels.decode_paged_attention (split-K)
  - jinfer ragged: pallas_kernels.ragged_paged_attention on the same all-decode batch
  - jax bundled:   jax.experimental.pallas.ops.gpu.paged_attention
  - xla reference: pallas_kernels.decode_paged_attention_ref (skipped where its gather would
    exceed --max_ref_gib)
The floor is the KV bytes the step must read (batch x context x 2 x kv_heads x head_dim x
itemsize); achieved bandwidth = floor / median time, and % of the device's peak HBM bandwidth
(--hbm_gbps, known for H100/H200). Page tables are random permutations.
"""

from __future__ import annotations

import functools
import math
import statistics
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_list("batches", ["1", "8", "32", "64", "128"], "Batch sizes.")
flags.DEFINE_list("contexts", ["512", "2048", "8192", "32768"], "Context lengths, tokens.")
flags.DEFINE_integer("num_heads", 32, "Query heads.")
flags.DEFINE_integer("num_kv_heads", 8, "KV heads.")
flags.DEFINE_integer("head_dim", 128, "Head dimension.")
flags.DEFINE_integer("page_size", 16, "Tokens per page.")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "q/K/V dtype.")
flags.DEFINE_integer("iters", 20, "Timed calls per kernel and point (median reported).")
flags.DEFINE_float("max_pool_gib", 24.0, "Skip points whose KV pool is larger.")
flags.DEFINE_float("max_ref_gib", 4.0, "Skip the XLA reference where its gathered K+V exceed this.")
flags.DEFINE_float("hbm_gbps", 0.0, "Peak HBM bandwidth in GB/s; 0 = by device kind (H100, H200).")
flags.DEFINE_bool("smoke", False, "Tiny sizes in interpret mode (CPU) as an end-to-end check.")
flags.DEFINE_string("out", "", "Also write the table to this markdown file.")

_PEAK_GBPS = {"H100": 3350.0, "H200": 4800.0}  # SXM parts, vendor figures


def _peak(device) -> float | None:
    if FLAGS.hbm_gbps:
        return FLAGS.hbm_gbps
    return next((v for k, v in _PEAK_GBPS.items() if k in device.device_kind), None)


def _time(fn, args, iters: int) -> float:
    import jax
    jax.block_until_ready(fn(*args))  # compile and warm
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _bundled_splits(pages_per_seq: int) -> int:
    """The bundled kernel needs pages_per_seq divisible by k_splits (its default is 16)."""
    k = 16
    while pages_per_seq % k:
        k //= 2
    return k


def _point(batch: int, context: int, interpret: bool):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention as bundled

    from pallas_kernels import decode_paged_attention, decode_paged_attention_ref, ragged_paged_attention

    dtype = jnp.dtype(FLAGS.dtype)
    kvh, d, ps = FLAGS.num_kv_heads, FLAGS.head_dim, FLAGS.page_size
    pages_per_seq = context // ps
    num_pages = batch * pages_per_seq
    pool_bytes = 2 * kvh * num_pages * ps * d * dtype.itemsize
    if pool_bytes > FLAGS.max_pool_gib * 2**30:
        return None
    key = jax.random.key(batch * 100003 + context)
    kk, kv, kq = jax.random.split(key, 3)
    k_pages = jax.random.normal(kk, (kvh, num_pages, ps, d), dtype)
    v_pages = jax.random.normal(kv, (kvh, num_pages, ps, d), dtype)
    q = jax.random.normal(kq, (batch, FLAGS.num_heads, d), dtype)
    perm = np.random.default_rng(context).permutation(num_pages).astype(np.int32)
    table = jnp.asarray(perm.reshape(batch, pages_per_seq))
    lens = jnp.full((batch,), context, jnp.int32)
    cu = jnp.arange(batch + 1, dtype=jnp.int32)
    n = jnp.array([batch], jnp.int32)
    scale = 1 / math.sqrt(d)

    kernels = {
        "jinfer decode": (functools.partial(decode_paged_attention, sm_scale=scale, interpret=interpret),
                          (q, k_pages, v_pages, lens, table)),
        "jinfer ragged": (functools.partial(ragged_paged_attention, sm_scale=scale, interpret=interpret),
                          (q, k_pages, v_pages, cu, lens, table, n)),
        "jax bundled": (jax.jit(lambda q, k, v, t, l: bundled(
            q * scale, k, v, t, l, k_splits=_bundled_splits(pages_per_seq), interpret=interpret)),
                        (q, k_pages, v_pages, table, lens)),
    }
    if pool_bytes <= FLAGS.max_ref_gib * 2**30:
        kernels["xla reference"] = (jax.jit(functools.partial(decode_paged_attention_ref, sm_scale=scale)),
                                    (q, k_pages, v_pages, lens, table))
    reference = None
    times = {}
    for name, (fn, args) in kernels.items():
        out = np.asarray(fn(*args), np.float32)
        if reference is None:
            reference = out
        elif not np.allclose(out, reference, atol=5e-2, rtol=5e-2):  # bf16 tolerance
            raise AssertionError(f"{name} disagrees with jinfer decode at batch {batch}, context {context}")
        times[name] = _time(fn, args, FLAGS.iters)
    return pool_bytes, times


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax
    if FLAGS.smoke:
        FLAGS.batches, FLAGS.contexts = ["1", "3"], ["32", "64"]
        FLAGS.num_heads, FLAGS.num_kv_heads, FLAGS.head_dim, FLAGS.page_size = 4, 2, 64, 8
        FLAGS.iters, FLAGS.dtype = 2, "float32"
    device = jax.devices()[0]
    interpret = device.platform != "gpu"
    if interpret and not FLAGS.smoke:
        raise app.UsageError("no GPU: the kernels would run interpreted; use --smoke for a CPU check")
    peak = _peak(device)
    names = ["jinfer decode", "jinfer ragged", "jax bundled", "xla reference"]
    header = ["batch", "context", "KV MiB"] + [f"{n} µs" for n in names] + [
        "jinfer decode GB/s", "% of peak", "bundled / jinfer decode"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    for b in map(int, FLAGS.batches):
        for c in map(int, FLAGS.contexts):
            res = _point(b, c, interpret)
            if res is None:
                print(f"skip batch {b} context {c}: pool over --max_pool_gib", file=sys.stderr)
                continue
            pool_bytes, times = res
            gbps = pool_bytes / times["jinfer decode"] / 1e9
            cells = [str(b), str(c), f"{pool_bytes / 2**20:,.1f}"]
            cells += [f"{times[n] * 1e6:,.1f}" if n in times else "—" for n in names]
            cells += [f"{gbps:,.1f}", f"{100 * gbps / peak:.0f}%" if peak else "—",
                      f"{times['jax bundled'] / times['jinfer decode']:.2f}x"]
            lines.append("| " + " | ".join(cells) + " |")
            print(lines[-1], file=sys.stderr, flush=True)
    footer = (f"\nDevice: {device.device_kind} ({device.platform}"
              f"{', interpret mode' if interpret else ''}); jax {jax.__version__}; "
              f"{FLAGS.num_heads} q heads, {FLAGS.num_kv_heads} KV heads, head_dim {FLAGS.head_dim}, "
              f"page size {FLAGS.page_size}, {FLAGS.dtype}; median of {FLAGS.iters} calls; "
              + (f"peak HBM {peak:,.0f} GB/s." if peak else "peak HBM unknown (no % column)."))
    table = "\n".join(lines) + "\n" + footer
    print(table)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            f.write("# Kernel benchmark\n\n```sh\npython " + " ".join(["tools/bench_kernels.py", *sys.argv[1:]])
                    + "\n```\n\n" + table + "\n")


if __name__ == "__main__":
    app.run(main)
