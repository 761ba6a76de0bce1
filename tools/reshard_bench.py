"""Resharding cost between tensor-parallel degrees vs a full reload from an orbax checkpoint.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tools/reshard_bench.py
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tools/reshard_bench.py --out=benchmarks/reshard.md
  python tools/reshard_bench.py --smoke      # tiny model, seconds

A random-weight Llama (≥100M parameters at the defaults) is placed at each source TP degree,
then moved to the target degree with sharding.reshard (each device receives only the slices
it lacks) and, side by side, restored from an orbax checkpoint straight into the target
shards. Reported per transition: median time of each, bytes moved, the theoretical minimum
and the bytes a full reload places. Weights only; the KV pool moves the same way
(Engine.reshard) and scales with the pages in use.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_list("transitions", ["1:2", "2:4", "4:8", "8:4", "4:2", "2:1", "1:8", "8:1"],
                  "source:target TP degrees.")
flags.DEFINE_integer("hidden_size", 1024, "Model width.")
flags.DEFINE_integer("num_layers", 8, "Decoder layers.")
flags.DEFINE_integer("vocab_size", 32000, "Vocabulary size.")
flags.DEFINE_integer("repeats", 3, "Timed repeats per transition (median reported).")
flags.DEFINE_bool("smoke", False, "A tiny model and two transitions.")
flags.DEFINE_string("out", "", "Also write the table to this markdown file.")


def _model_config():
    from jinfer.models.config import scaled_llama
    return scaled_llama(FLAGS.hidden_size, FLAGS.num_layers, FLAGS.vocab_size)


def _median_time(fn, repeats):
    import jax
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        jax.block_until_ready(jax.tree.leaves(result[0] if isinstance(result, tuple) else result))
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.smoke:
        FLAGS.hidden_size, FLAGS.num_layers, FLAGS.vocab_size = 128, 2, 512
        FLAGS.transitions, FLAGS.repeats = ["1:2", "2:1"], 1
    import jax
    from flax import nnx

    from jinfer.checkpoint import restore_state, save_state
    from jinfer.models.llama import abstract_model, init_model
    from sharding.reshard import reshard_tree
    from sharding.tp import TPLayout, make_mesh

    pairs = [tuple(int(x) for x in t.split(":")) for t in FLAGS.transitions]
    need = max(max(p) for p in pairs)
    if need > len(jax.devices()):
        raise app.UsageError(f"transitions need {need} devices, {len(jax.devices())} available "
                             f"(set XLA_FLAGS=--xla_force_host_platform_device_count={need} on CPU)")
    cfg = _model_config()
    model = init_model(cfg, seed=0)
    state = nnx.state(model)
    print(f"model: {cfg.num_params() / 1e6:.1f}M parameters", file=sys.stderr)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "ckpt")
        save_state(ckpt, model)
        for src, dst in pairs:
            src_layout = TPLayout.for_model(cfg, make_mesh(src))
            dst_layout = TPLayout.for_model(cfg, make_mesh(dst))
            placed = src_layout.place_state(state)
            targets = dst_layout.state_shardings(placed)
            t_reshard, (_, stats) = _median_time(lambda: reshard_tree(placed, targets), FLAGS.repeats)
            t_reload, _ = _median_time(
                lambda: nnx.state(restore_state(ckpt, abstract_model(cfg), targets)), FLAGS.repeats)
            rows.append((src, dst, t_reshard, t_reload, stats))
            print(f"tp {src} -> {dst}: reshard {t_reshard * 1e3:.1f} ms, reload {t_reload * 1e3:.1f} ms, "
                  f"moved {stats.moved / 2**20:.1f} MiB (min {stats.minimum / 2**20:.1f})",
                  file=sys.stderr, flush=True)
    lines = ["| tp | reshard ms | full reload ms | reload / reshard | moved MiB | minimum MiB | "
             "full reload MiB |", "|---|---:|---:|---:|---:|---:|---:|"]
    for src, dst, t_rs, t_rl, s in rows:
        lines.append(f"| {src} → {dst} | {t_rs * 1e3:,.1f} | {t_rl * 1e3:,.1f} | {t_rl / t_rs:.2f}x | "
                     f"{s.moved / 2**20:,.1f} | {s.minimum / 2**20:,.1f} | {s.full_reload / 2**20:,.1f} |")
    device = jax.devices()[0]
    lines += ["", f"Device: {len(jax.devices())} × {device.device_kind} ({device.platform}); "
                  f"jax {jax.__version__}; model {cfg.num_params() / 1e6:.1f}M parameters float32 "
                  f"(hidden {cfg.hidden_size}, {cfg.num_layers} layers, {cfg.num_heads} heads, "
                  f"{cfg.num_kv_heads} KV heads, vocab {cfg.vocab_size}); median of {FLAGS.repeats}. "
                  "Full reload = orbax restore from local disk straight into the target shards."]
    table = "\n".join(lines)
    print(table)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            f.write("# Reshard benchmark\n\n```sh\nXLA_FLAGS=--xla_force_host_platform_device_count=8 "
                    "python " + " ".join(["tools/reshard_bench.py", *sys.argv[1:]]) + "\n```\n\n"
                    + table + "\n")


if __name__ == "__main__":
    app.run(main)
