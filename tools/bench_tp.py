"""Vocabulary-parallel vs replicated embedding and LM head under tensor parallelism.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tools/bench_tp.py --out=benchmarks/tp.md
  python tools/bench_tp.py --smoke      # tiny model, seconds

For each tp degree the same random-weight model runs the engine's jitted step (forward +
greedy sampling) twice side by side: with the embedding and LM head split over the vocabulary
(each device computes vocab/tp logits; sampling reduces across devices) and kept whole on
every device (each computes all logits; no cross-device logits). Timed: a decode step of
--batch sequences at --context tokens and a --prefill-token prefill step, medians of
--repeats after a warm-up. Also reported: parameter bytes per device.
"""

from __future__ import annotations

import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_list("tp", ["2", "4", "8"], "Tensor-parallel degrees.")
flags.DEFINE_integer("hidden_size", 512, "Model width.")
flags.DEFINE_integer("num_layers", 4, "Decoder layers.")
flags.DEFINE_integer("vocab_size", 32768, "Vocabulary size (divisible by every tp).")
flags.DEFINE_integer("batch", 32, "Sequences in the decode step.")
flags.DEFINE_integer("context", 256, "Tokens already cached per decoding sequence.")
flags.DEFINE_integer("prefill", 512, "Tokens in the prefill step (one sequence).")
flags.DEFINE_integer("repeats", 7, "Timed calls per measurement (median reported).")
flags.DEFINE_bool("smoke", False, "A tiny model, one tp, few repeats.")
flags.DEFINE_string("out", "", "Also write the table to this markdown file.")


def _config():
    from jinfer.models.config import scaled_llama
    return scaled_llama(FLAGS.hidden_size, FLAGS.num_layers, FLAGS.vocab_size)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.smoke:
        FLAGS.hidden_size, FLAGS.num_layers, FLAGS.vocab_size = 128, 1, 1024
        FLAGS.tp, FLAGS.batch, FLAGS.context, FLAGS.prefill, FLAGS.repeats = ["2"], 4, 16, 32, 2
    import jax

    from harness.experiments.tensor_parallel import StepShapes, measure_layouts
    from jinfer.models.llama import init_model

    degrees = [int(t) for t in FLAGS.tp]
    if max(degrees) > len(jax.devices()):
        raise app.UsageError(f"tp={max(degrees)} needs {max(degrees)} devices, {len(jax.devices())} available "
                             f"(set XLA_FLAGS=--xla_force_host_platform_device_count={max(degrees)} on CPU)")
    cfg = _config()
    shapes = StepShapes(batch=FLAGS.batch, context=FLAGS.context, prefill=FLAGS.prefill)
    model = init_model(cfg, seed=0)
    print(f"model: {cfg.num_params() / 1e6:.1f}M parameters, vocab {cfg.vocab_size}; device: "
          f"{jax.devices()[0].device_kind} x{len(jax.devices())}", file=sys.stderr)
    rows = []
    for tp in degrees:
        split, whole = measure_layouts(model, shapes, [(tp, True), (tp, False)], repeats=FLAGS.repeats,
                                       traffic=False)
        rows.append((tp, split.decode_ms[FLAGS.batch], whole.decode_ms[FLAGS.batch], split.prefill_ms,
                     whole.prefill_ms, split.param_bytes, whole.param_bytes))
    lines = [
        f"Model: {cfg.num_params() / 1e6:.1f}M parameters (hidden {cfg.hidden_size}, {cfg.num_layers} layers, "
        f"vocab {cfg.vocab_size}), float32; decode step = {FLAGS.batch} sequences at {FLAGS.context} cached "
        f"tokens; prefill step = one {FLAGS.prefill}-token prompt; medians of {FLAGS.repeats}. "
        f"Device: {jax.devices()[0].device_kind} x{len(jax.devices())}.",
        "",
        "| tp | decode ms, split | decode ms, replicated | replicated / split | prefill ms, split | "
        "prefill ms, replicated | replicated / split | MiB/device, split | MiB/device, replicated |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for tp, d_s, d_r, p_s, p_r, b_s, b_r in rows:
        lines.append(f"| {tp} | {d_s:.2f} | {d_r:.2f} | {d_r / d_s:.2f} | {p_s:.2f} | {p_r:.2f} | {p_r / p_s:.2f} | "
                     f"{b_s / 2**20:.1f} | {b_r / 2**20:.1f} |")
    report = "\n".join(lines)
    print(report)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            f.write("# Vocabulary-parallel vs replicated embedding/LM head\n\nCommand: `XLA_FLAGS=--xla_force_"
                    "host_platform_device_count=8 python tools/bench_tp.py --out=" + FLAGS.out + "`\n\n"
                    + report + "\n")


if __name__ == "__main__":
    app.run(main)
