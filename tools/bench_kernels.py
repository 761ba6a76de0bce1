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
(--hbm_gbps, known for H100/H200). Page tables are random permutations. A kernel that fails to
compile or disagrees with the first one is reported in the table ("error") and the run goes on.

Timing: --iters calls dispatched back to back, then one wait, divided by --iters (as a serving
loop dispatches); the median of 5 such runs. So launch latency overlaps the previous call.

  --write: the KV write of one decode step (batch tokens into their pages) by the XLA scatter
    (pallas_kernels.write_kv_ref, what the engine runs) and by the Pallas write kernel
    (pallas_kernels.write_kv), both jitted with the pools donated, fed back call to call.
  --sweep: block sizes of both attention kernels at a few decode and prefill points
    (pages_per_block, pages_per_split, block_q, num_warps, num_stages), fastest first, against
    the defaults (the blocks.TABLE row; for decode, blocks.decode_pages_per_split's split size);
    the numbers to retune them from.
  --mixed: only mixed steps: at each batch x context point, that many decodes beside one
    --mixed_chunk-token prompt chunk (--mixed_slots sequence slots, as the engine pads a step),
    through the ragged kernel and through pallas_kernels.mixed_paged_attention (the pallas_split
    backend's: the decodes through the split-K decode kernel), checked against each other.
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
flags.DEFINE_bool("write", False, "Also compare the KV-write strategies (XLA scatter, Pallas kernel).")
flags.DEFINE_bool("sweep", False, "Only sweep the kernels' block sizes at a few points.")
flags.DEFINE_bool("mixed", False, "Only time mixed steps: at each batch x context point, that many decodes and "
                  "one --mixed_chunk-token prompt chunk (sequence slots padded to --mixed_slots), through the ragged "
                  "kernel and through mixed_paged_attention (the pallas_split backend's).")
flags.DEFINE_integer("mixed_chunk", 512, "--mixed: the prompt chunk's tokens.", lower_bound=1)
flags.DEFINE_integer("mixed_slots", 128, "--mixed: sequence slots of the step (the engine pads to max_num_seqs).",
                     lower_bound=2)
flags.DEFINE_integer("sweep_top", 8, "Configurations printed per sweep point.")

_PEAK_GBPS = {"H100": 3350.0, "H200": 4800.0}  # SXM parts, vendor figures


def _peak(device) -> float | None:
    if FLAGS.hbm_gbps:
        return FLAGS.hbm_gbps
    return next((v for k, v in _PEAK_GBPS.items() if k in device.device_kind), None)


def _time(fn, args, iters: int) -> float:
    """Median over 5 runs of (iters calls dispatched back to back, one wait) / iters."""
    import jax
    jax.block_until_ready(fn(*args))  # compile and warm
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / iters)
    return statistics.median(times)


def _short(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".replace("\n", " ")
    return text[:400]


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
    reference = jax.jit(functools.partial(decode_paged_attention_ref, sm_scale=scale))(
        q, k_pages, v_pages, lens, table) if pool_bytes <= FLAGS.max_ref_gib * 2**30 else None
    reference = None if reference is None else np.asarray(reference, np.float32)
    times, errors = {}, {}
    for name, (fn, args) in kernels.items():
        try:
            out = np.asarray(fn(*args), np.float32)
            if reference is None:
                reference = out
            elif not np.allclose(out, reference, atol=5e-2, rtol=5e-2):  # bf16 tolerance
                raise AssertionError(f"{name} disagrees with the reference at batch {batch}, context {context}: "
                                     f"max abs diff {np.abs(out - reference).max():.3g}")
            times[name] = _time(fn, args, FLAGS.iters)
        except Exception as err:  # noqa: BLE001 - reported in the table, the grid goes on
            errors[name] = _short(err)
            print(f"batch {batch} context {context}: {name}: {errors[name]}", file=sys.stderr, flush=True)
    return pool_bytes, times, errors


def _write_point(batch: int, context: int, interpret: bool):
    """Seconds per KV write of one decode step (batch tokens), XLA scatter and Pallas kernel."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels import write_kv, write_kv_ref

    dtype = jnp.dtype(FLAGS.dtype)
    kvh, d, ps = FLAGS.num_kv_heads, FLAGS.head_dim, FLAGS.page_size
    pages_per_seq = context // ps
    num_pages = batch * pages_per_seq
    perm = np.random.default_rng(context).permutation(num_pages).astype(np.int32)
    table = jnp.asarray(perm.reshape(batch, pages_per_seq))
    lens = jnp.full((batch,), context, jnp.int32)
    cu = jnp.arange(batch + 1, dtype=jnp.int32)
    n = jnp.array([batch], jnp.int32)
    k = jax.random.normal(jax.random.key(1), (batch, kvh, d), dtype)
    v = jax.random.normal(jax.random.key(2), (batch, kvh, d), dtype)
    fns = {"xla scatter": jax.jit(write_kv_ref, donate_argnums=(0, 1)),
           "pallas write_kv": functools.partial(write_kv, interpret=interpret)}
    out, results, pools = {}, {}, {}
    for name, fn in fns.items():
        try:
            kp = jnp.zeros((kvh, num_pages, ps, d), dtype)
            vp = jnp.zeros((kvh, num_pages, ps, d), dtype)
            state = [kp, vp]

            def call():
                state[:] = fn(state[0], state[1], k, v, cu, lens, table, n)
                return state[0]

            pools[name] = np.asarray(call()[:, table[:, -1]], np.float32)  # the written pages
            results[name] = _time(lambda: call(), (), FLAGS.iters)
        except Exception as err:  # noqa: BLE001
            results[name] = _short(err)
    if len(pools) == 2 and not np.array_equal(*pools.values()):
        results["pallas write_kv"] = "error: wrote different pages than the XLA scatter"
    return results


def _sweep(interpret: bool):
    """Block sizes of both kernels at a few points, each against the defaults (TABLE row, split rule)."""
    import itertools

    import jax
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels import block_sizes, decode_paged_attention, ragged_paged_attention
    from pallas_kernels.blocks import decode_pages_per_split

    dtype = jnp.dtype(FLAGS.dtype)
    kvh, d, ps, h = FLAGS.num_kv_heads, FLAGS.head_dim, FLAGS.page_size, FLAGS.num_heads
    scale = 1 / math.sqrt(d)
    row = block_sizes(d, ps)
    print(f"blocks.TABLE[({d}, {ps})] = {row}")
    points = [("decode", 1, 8192), ("decode", 32, 2048), ("decode", 128, 4096),
              ("prefill", 4, 2048)]  # prefill: 4 sequences, each 512 new tokens after 1536 cached
    if FLAGS.smoke:
        points = [("decode", 2, 64), ("prefill", 2, 64)]
    for kind, batch, context in points:
        pages_per_seq = context // ps
        num_pages = batch * pages_per_seq
        kk, kv, kq = jax.random.split(jax.random.key(context + batch), 3)
        k_pages = jax.random.normal(kk, (kvh, num_pages, ps, d), dtype)
        v_pages = jax.random.normal(kv, (kvh, num_pages, ps, d), dtype)
        perm = np.random.default_rng(context).permutation(num_pages).astype(np.int32)
        table = jnp.asarray(perm.reshape(batch, pages_per_seq))
        lens = jnp.full((batch,), context, jnp.int32)
        n = jnp.array([batch], jnp.int32)
        if kind == "decode":
            q = jax.random.normal(kq, (batch, h, d), dtype)
            configs = [dict(pages_per_block=b, pages_per_split=s, num_warps=w, num_stages=st)
                       for b, s, w, st in itertools.product((4, 8, 16), (16, 32, 64, 128), (4, 8), (2,))
                       if s >= b]
            configs.insert(0, {})
            configs = configs[:3] if FLAGS.smoke else configs
            fn = lambda cfg: functools.partial(decode_paged_attention, sm_scale=scale, interpret=interpret, **cfg)
            args = (q, k_pages, v_pages, lens, table)
        else:
            new = min(512, context // 4)
            q = jax.random.normal(kq, (batch * new, h, d), dtype)
            cu = jnp.arange(batch + 1, dtype=jnp.int32) * new
            configs = [dict(block_q=bq, pages_per_block=b, num_warps=w, num_stages=st)
                       for bq, b, w, st in itertools.product((16, 32, 64), (2, 4, 8), (4, 8), (2,))]
            configs.insert(0, {})
            configs = configs[:3] if FLAGS.smoke else configs
            fn = lambda cfg: functools.partial(ragged_paged_attention, sm_scale=scale, interpret=interpret, **cfg)
            args = (q, k_pages, v_pages, cu, lens, table, n)
        timed = []
        for cfg in configs:
            try:
                timed.append((_time(fn(cfg), args, FLAGS.iters), cfg))
            except Exception as err:  # noqa: BLE001 - an illegal tile is a result, not a stop
                print(f"  {kind} {cfg}: {_short(err)[:160]}", file=sys.stderr, flush=True)
        base = next(t for t, c in timed if not c) if timed and not timed[0][1] else None
        split = (f" (split: {decode_pages_per_split(batch, kvh, pages_per_seq, ps)} pages)"
                 if kind == "decode" else "")
        print(f"\n{kind}, batch {batch}, context {context}: {len(timed)} configurations ran; "
              f"defaults{split} {base * 1e6:,.1f} µs" if base else f"\n{kind}, batch {batch}, context {context}")
        print("| µs | vs defaults | configuration |\n|---:|---:|---|")
        for t, cfg in sorted(timed, key=lambda x: x[0])[:FLAGS.sweep_top]:
            print(f"| {t * 1e6:,.1f} | {base / t if base else float('nan'):.2f}x | {cfg or 'defaults'} |",
                  flush=True)


def _mixed_point(batch: int, context: int, interpret: bool) -> str:
    """One mixed step (batch decodes at context, one prompt chunk) through both paths: a row
    of µs, checked against each other first."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels import mixed_paged_attention, ragged_paged_attention

    dtype, chunk, slots = jnp.dtype(FLAGS.dtype), FLAGS.mixed_chunk, max(FLAGS.mixed_slots, batch + 1)
    kvh, d, ps = FLAGS.num_kv_heads, FLAGS.head_dim, FLAGS.page_size
    pages_per_seq = -(-max(context, chunk) // ps)
    num_pages = (batch + 1) * pages_per_seq
    keys = jax.random.split(jax.random.key(batch * 7 + context), 3)
    k_pages, v_pages = (jax.random.normal(kk, (kvh, num_pages, ps, d), dtype) for kk in keys[:2])
    q = jax.random.normal(keys[2], (batch + chunk, FLAGS.num_heads, d), dtype)
    table = np.zeros((slots, pages_per_seq), np.int32)
    table[:batch + 1] = np.random.default_rng(context).permutation(num_pages).reshape(batch + 1, pages_per_seq)
    q_lens = [1] * batch + [chunk] + [0] * (slots - batch - 1)
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
    lens = jnp.asarray([context] * batch + [chunk] + [0] * (slots - batch - 1), jnp.int32)
    args = (q, k_pages, v_pages, cu, lens, jnp.asarray(table), jnp.array([batch + 1], jnp.int32))
    scale = 1 / math.sqrt(d)
    ragged = functools.partial(ragged_paged_attention, sm_scale=scale, interpret=interpret)
    mixed = functools.partial(mixed_paged_attention, sm_scale=scale, interpret=interpret)
    a, b = (np.asarray(fn(*args), np.float32) for fn in (ragged, mixed))
    if not np.allclose(a, b, atol=5e-2, rtol=5e-2):
        return f"| {batch} | {context} | error: the two paths disagree (max abs diff {np.abs(a - b).max():.3g}) | | |"
    t_ragged, t_mixed = _time(ragged, args, FLAGS.iters), _time(mixed, args, FLAGS.iters)
    return f"| {batch} | {context} | {t_ragged * 1e6:,.1f} | {t_mixed * 1e6:,.1f} | {t_ragged / t_mixed:.2f}x |"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax
    if FLAGS.smoke:
        FLAGS.batches, FLAGS.contexts = ["1", "3"], ["32", "64"]
        FLAGS.num_heads, FLAGS.num_kv_heads, FLAGS.head_dim, FLAGS.page_size = 4, 2, 64, 8
        FLAGS.iters, FLAGS.dtype = 2, "float32"
        if FLAGS.mixed:  # interpreted, a mixed step's ragged call walks every sequence slot: one context
            FLAGS.contexts = ["64"]
    device = jax.devices()[0]
    interpret = device.platform != "gpu"
    if interpret and not FLAGS.smoke:
        raise app.UsageError("no GPU: the kernels would run interpreted; use --smoke for a CPU check")
    if FLAGS.sweep:
        return _sweep(interpret)
    if FLAGS.mixed:
        print(f"| batch (decodes) | context | ragged µs | mixed µs | ragged / mixed |\n|---:|---:|---:|---:|---:|")
        for b in map(int, FLAGS.batches):
            for c in map(int, FLAGS.contexts):
                print(_mixed_point(b, c, interpret), flush=True)
        print(f"\nDevice: {device.device_kind}; jax {jax.__version__}; one {FLAGS.mixed_chunk}-token chunk beside "
              f"the decodes, {FLAGS.mixed_slots} sequence slots, {FLAGS.dtype}, heads {FLAGS.num_heads}/"
              f"{FLAGS.num_kv_heads}, head_dim {FLAGS.head_dim}, page size {FLAGS.page_size}.")
        return None
    peak = _peak(device)
    names = ["jinfer decode", "jinfer ragged", "jax bundled", "xla reference"]
    header = ["batch", "context", "KV MiB"] + [f"{n} µs" for n in names] + [
        "jinfer decode GB/s", "% of peak", "bundled / jinfer decode"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    all_errors, writes = [], []
    for b in map(int, FLAGS.batches):
        for c in map(int, FLAGS.contexts):
            res = _point(b, c, interpret)
            if res is None:
                print(f"skip batch {b} context {c}: pool over --max_pool_gib", file=sys.stderr)
                continue
            pool_bytes, times, errors = res
            all_errors += [f"batch {b}, context {c}, {n}: {e}" for n, e in errors.items()]
            mine = times.get("jinfer decode")
            gbps = pool_bytes / mine / 1e9 if mine else None
            cells = [str(b), str(c), f"{pool_bytes / 2**20:,.1f}"]
            cells += [f"{times[n] * 1e6:,.1f}" if n in times else ("error" if n in errors else "—")
                      for n in names]
            cells += [f"{gbps:,.1f}" if gbps else "—", f"{100 * gbps / peak:.0f}%" if peak and gbps else "—",
                      f"{times['jax bundled'] / mine:.2f}x" if mine and "jax bundled" in times else "—"]
            lines.append("| " + " | ".join(cells) + " |")
            print(lines[-1], file=sys.stderr, flush=True)
            if FLAGS.write:
                writes.append((b, c, _write_point(b, c, interpret)))
    footer = (f"\nDevice: {device.device_kind} ({device.platform}"
              f"{', interpret mode' if interpret else ''}); jax {jax.__version__}; "
              f"{FLAGS.num_heads} q heads, {FLAGS.num_kv_heads} KV heads, head_dim {FLAGS.head_dim}, "
              f"page size {FLAGS.page_size}, {FLAGS.dtype}; median of {FLAGS.iters} calls; "
              + (f"peak HBM {peak:,.0f} GB/s." if peak else "peak HBM unknown (no % column)."))
    table = "\n".join(lines) + "\n" + footer
    if all_errors:
        table += "\n\nErrors:\n" + "\n".join(f"- {e}" for e in all_errors)
    if writes:
        fmt = lambda r: f"{r * 1e6:,.1f}" if isinstance(r, float) else r
        table += ("\n\nKV write of one decode step (batch tokens into their pages; pools donated):\n\n"
                  "| batch | context | xla scatter µs | pallas write_kv µs |\n|---:|---:|---:|---:|\n"
                  + "\n".join(f"| {b} | {c} | {fmt(r.get('xla scatter'))} | {fmt(r.get('pallas write_kv'))} |"
                               for b, c, r in writes))
    print(table)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            f.write("# Kernel benchmark\n\n```sh\npython " + " ".join(["tools/bench_kernels.py", *sys.argv[1:]])
                    + "\n```\n\n" + table + "\n")


if __name__ == "__main__":
    app.run(main)
