"""Trains the embedded test model (jinfer/test_model): a byte-level BPE tokenizer and a small Llama on the Python
standard library's own source files (text every machine with Python has), written as an HF
checkpoint with a model card.

  python tools/train_default_model.py                      # -> jinfer/test_model/, ~25 min on 2 cores
  python tools/train_default_model.py --steps=20 --out=/tmp/m   # a quick smoke run

Deterministic: files are sorted, the held-out split is a hash of each file's path, batches
come from a seeded generator and the weights from a fixed seed.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import sysconfig
import time
import zlib

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("out", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                        "jinfer", "test_model"), "Output directory (HF format).")
flags.DEFINE_string("stdlib", "", "Directory of .py files to train on; empty: this Python's stdlib.")
flags.DEFINE_integer("vocab_size", 4096, "BPE vocabulary size, special tokens included.", lower_bound=300)
flags.DEFINE_integer("hidden_size", 256, "Residual width.")
flags.DEFINE_integer("num_layers", 4, "Decoder layers.")
flags.DEFINE_integer("num_heads", 8, "Query heads.")
flags.DEFINE_integer("num_kv_heads", 2, "KV heads (GQA).")
flags.DEFINE_integer("intermediate_size", 768, "MLP width.")
flags.DEFINE_integer("seq_len", 256, "Training block length in tokens (the trained context).")
flags.DEFINE_integer("batch_size", 16, "Blocks per step.")
flags.DEFINE_integer("steps", 600, "Optimizer steps.", lower_bound=1)
flags.DEFINE_float("lr", 3e-3, "Peak learning rate (linear warm-up, cosine decay to lr/10).")
flags.DEFINE_integer("warmup_steps", 50, "Warm-up steps.", lower_bound=0)
flags.DEFINE_float("weight_decay", 0.1, "AdamW weight decay.")
flags.DEFINE_integer("holdout_percent", 5, "Percent of files held out (chosen by a hash of the path).")
flags.DEFINE_integer("eval_every", 50, "Held-out loss every this many steps (on eval_blocks blocks).")
flags.DEFINE_integer("eval_blocks", 64, "Held-out blocks in the periodic evaluations.")
flags.DEFINE_integer("seed", 0, "Seed of the weights and of the batch order.")
flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "Dtype of the stored weights.")

BOS, EOS = "<s>", "</s>"
SAMPLE_PROMPTS = ["def fibonacci(n):", "import os\n", "class Stack:\n    def __init__(self):",
                  "    for i in range(", "# Copyright"]


def _skip(rel: str) -> bool:
    parts = rel.split(os.sep)
    return any(p in ("test", "tests", "site-packages", "idle_test", "__pycache__") for p in parts)


def source_files(root: str) -> list[tuple[str, str]]:
    """(relative path, text) of every decodable .py file under root, sorted by path."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            if _skip(rel):
                continue
            try:
                with open(path, encoding="utf-8") as f:
                    out.append((rel, f.read()))
            except (UnicodeDecodeError, OSError):
                continue
    return sorted(out)


def split(files, holdout_percent: int):
    """Deterministic held-out split by a CRC32 of the relative path."""
    held = [f for f in files if zlib.crc32(f[0].encode()) % 100 < holdout_percent]
    train = [f for f in files if zlib.crc32(f[0].encode()) % 100 >= holdout_percent]
    return train, held


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    # Encoding with special tokens prepends BOS, as Llama tokenizers do (HF's fast tokenizer then
    # gives the same ids as jinfer's Tokenizer).
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    return tok


def token_stream(tok, texts: list[str]):
    import numpy as np
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    ids = [bos]
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids += enc.ids + [eos, bos]
    return np.asarray(ids[:-1], np.int32)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx
    from tqdm import tqdm

    from jinfer.loader.export import save_hf_model
    from jinfer.models.config import ModelConfig
    from jinfer.models.llama import init_model
    from jinfer.models.training import next_token_loss

    t_start = time.perf_counter()
    root = FLAGS.stdlib or sysconfig.get_paths()["stdlib"]
    files = source_files(root)
    if not files:
        sys.exit(f"error: no decodable .py files under --stdlib={root!r}")
    train_files, held_files = split(files, FLAGS.holdout_percent)
    if not held_files or not train_files:
        sys.exit(f"error: --holdout_percent={FLAGS.holdout_percent} leaves an empty split "
                 f"({len(train_files)} train / {len(held_files)} held-out files)")
    print(f"{len(files)} files under {root}: {len(train_files)} train, {len(held_files)} held out")
    tok = train_tokenizer([t for _, t in train_files], FLAGS.vocab_size)
    train = token_stream(tok, [t for _, t in train_files])
    held = token_stream(tok, [t for _, t in held_files])
    held_bytes = sum(len(t.encode()) for _, t in held_files)
    print(f"tokenizer: {tok.get_vocab_size()} tokens; train {len(train):,} tokens, "
          f"held out {len(held):,} tokens ({held_bytes / len(held):.2f} bytes/token)")

    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), hidden_size=FLAGS.hidden_size,
                      intermediate_size=FLAGS.intermediate_size, num_layers=FLAGS.num_layers,
                      num_heads=FLAGS.num_heads, num_kv_heads=FLAGS.num_kv_heads,
                      max_position_embeddings=4 * FLAGS.seq_len, rms_norm_eps=1e-5,
                      bos_token_id=tok.token_to_id(BOS), eos_token_ids=(tok.token_to_id(EOS),))
    model = init_model(cfg, seed=FLAGS.seed)
    graphdef, params = nnx.split(model)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    schedule = optax.warmup_cosine_decay_schedule(0.0, FLAGS.lr, FLAGS.warmup_steps,
                                                  max(FLAGS.steps, FLAGS.warmup_steps + 1), FLAGS.lr / 10)
    opt = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.adamw(schedule, b2=0.95, weight_decay=FLAGS.weight_decay))
    opt_state = opt.init(params)

    @jax.jit
    def train_step(params, opt_state, ids):
        loss, grads = jax.value_and_grad(lambda p: next_token_loss(nnx.merge(graphdef, p), ids))(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def eval_loss(params, ids):
        return next_token_loss(nnx.merge(graphdef, params), ids)

    length = FLAGS.seq_len + 1
    n_blocks = (len(held) - 1) // FLAGS.seq_len
    held_blocks = np.stack([held[i * FLAGS.seq_len:i * FLAGS.seq_len + length] for i in range(n_blocks)])

    def evaluate(blocks):
        losses = [float(eval_loss(params, jnp.asarray(blocks[i:i + FLAGS.batch_size])))
                  for i in range(0, len(blocks) - FLAGS.batch_size + 1, FLAGS.batch_size)]
        return float(np.mean(losses))

    rng = np.random.default_rng(FLAGS.seed)
    curve = []  # (step, train loss (mean since last eval), held-out loss)
    recent = []
    bar = tqdm(range(1, FLAGS.steps + 1), desc="train", unit="step")
    t_train = time.perf_counter()
    for step in bar:
        starts = rng.integers(0, len(train) - length, FLAGS.batch_size)
        ids = jnp.asarray(np.stack([train[s:s + length] for s in starts]))
        params, opt_state, loss = train_step(params, opt_state, ids)
        recent.append(loss)
        if step % FLAGS.eval_every == 0 or step == FLAGS.steps:
            train_loss = float(np.mean([float(x) for x in recent]))
            recent = []
            held_loss = evaluate(held_blocks[:FLAGS.eval_blocks])
            curve.append((step, train_loss, held_loss))
            bar.set_postfix(loss=f"{train_loss:.3f}", held_out=f"{held_loss:.3f}")
    train_secs = time.perf_counter() - t_train
    final = evaluate(held_blocks)
    evaluated = (len(held_blocks) // FLAGS.batch_size) * FLAGS.batch_size * FLAGS.seq_len
    nats_per_byte = final * len(held) / held_bytes
    print(f"held-out loss {final:.4f} nats/token over {evaluated:,} tokens = {nats_per_byte:.4f} "
          f"nats/byte ({nats_per_byte / np.log(2):.4f} bits/byte)")

    model = nnx.merge(graphdef, params)
    save_hf_model(model, FLAGS.out, dtype=FLAGS.dtype)
    tok.save(os.path.join(FLAGS.out, "tokenizer.json"))
    with open(os.path.join(FLAGS.out, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
                   "add_bos_token": True, "model_max_length": cfg.max_position_embeddings}, f, indent=2)
    samples = _greedy_samples(FLAGS.out)
    total_secs = time.perf_counter() - t_start
    _write_card(cfg, n_params, len(train_files), len(held_files), len(train), len(held), held_bytes,
                curve, final, nats_per_byte, samples, train_secs, total_secs)
    size = sum(os.path.getsize(os.path.join(FLAGS.out, f)) for f in os.listdir(FLAGS.out))
    print(f"wrote {FLAGS.out} ({size / 2**20:.1f} MiB) in {total_secs / 60:.1f} min")


def _greedy_samples(model_dir: str) -> list[tuple[str, str]]:
    """Greedy continuations through the engine, loaded back from the files just written."""
    from jinfer.config import CacheConfig, SchedulerConfig
    from jinfer.engine import Engine
    from jinfer.loader.hf import load_hf_model
    from jinfer.sampling_params import SamplingParams
    from jinfer.tokenizer import Tokenizer

    engine = Engine(load_hf_model(model_dir), Tokenizer.from_dir(model_dir), CacheConfig(page_size=16, num_pages=64),
                    SchedulerConfig(max_num_batched_tokens=128, max_num_seqs=8, max_model_len=256))
    outs = engine.generate(SAMPLE_PROMPTS, SamplingParams(temperature=0, max_tokens=48))
    return [(p, o.text) for p, o in zip(SAMPLE_PROMPTS, outs)]


def _write_card(cfg, n_params, n_train_files, n_held_files, n_train, n_held, held_bytes, curve, final,
                nats_per_byte, samples, train_secs, total_secs):
    import math
    command = " ".join(["python tools/train_default_model.py"] + [f"--{f.name}={f.value}" for f in FLAGS.get_key_flags_for_module(sys.argv[0])
                                                                     if f.present and f.name != "out"])
    rows = "\n".join(f"| {s} | {tr:.3f} | {ho:.3f} |" for s, tr, ho in curve)
    sample_md = "\n\n".join(f"Prompt `{p!r}`:\n\n```python\n{p}{t}\n```" for p, t in samples)
    card = f"""# jinfer test model: a {n_params / 1e6:.1f}M-parameter Llama trained on the Python standard library

The embedded test model of jinfer (`--config.model.path=test-5m`, or `configs/test_5m.py`):
what the tests and several benchmarks run, fast to compile and to run. It is small and weak,
but real: it has learnt the shape of Python source, so it repeats itself the way real models
do (prefix caching and speculative drafting see realistic behaviour) and its greedy text is
recognisably code.

Made by `{command}` ({total_secs / 60:.1f} min in all on
{os.cpu_count()} CPU cores, {platform.machine()}, Python {platform.python_version()}; training itself
{train_secs / 60:.1f} min). Files: `config.json`, `generation_config.json`, `model.safetensors`
({FLAGS.dtype}), `tokenizer.json`, `tokenizer_config.json` — standard HF format; transformers'
`AutoModelForCausalLM` loads it and gives the same greedy tokens as jinfer (tested).

## Model

| field | value |
|---|---|
| architecture | LlamaForCausalLM (RMSNorm, RoPE θ={cfg.rope_theta:g}, SwiGLU, GQA) |
| parameters | {n_params:,} |
| layers / hidden / MLP | {cfg.num_layers} / {cfg.hidden_size} / {cfg.intermediate_size} |
| heads / KV heads / head dim | {cfg.num_heads} / {cfg.num_kv_heads} / {cfg.head_dim} |
| vocabulary | {cfg.vocab_size} (byte-level BPE, `<s>`={cfg.bos_token_id}, `</s>`={cfg.eos_token_ids[0]}) |
| trained context | {FLAGS.seq_len} tokens (config allows {cfg.max_position_embeddings}; quality past {FLAGS.seq_len} is untrained) |

## Data

Every `.py` file of the Python {platform.python_version()} standard library that decodes as UTF-8,
excluding test directories, sorted by path; each file is `<s>` + text + `</s>`. Files whose
CRC32(relative path) mod 100 < {FLAGS.holdout_percent} are held out: {n_train_files} train files
({n_train:,} tokens), {n_held_files} held-out files ({n_held:,} tokens, {held_bytes:,} bytes).
The tokenizer is trained on the train files only.

## Training

AdamW (β2 0.95, weight decay {FLAGS.weight_decay}), peak learning rate {FLAGS.lr} with
{FLAGS.warmup_steps} warm-up steps and cosine decay to a tenth, gradient clipping at 1.0,
{FLAGS.steps} steps of {FLAGS.batch_size} random blocks of {FLAGS.seq_len + 1} tokens
({FLAGS.steps * FLAGS.batch_size * FLAGS.seq_len:,} training tokens), float32, seed {FLAGS.seed}.

Training curve (train loss: mean over the steps since the previous row; held-out: the first
{FLAGS.eval_blocks} held-out blocks), nats per token:

| step | train loss | held-out loss |
|---:|---:|---:|
{rows}

## Held-out loss

Over all held-out blocks: **{final:.4f} nats/token**, i.e. **{nats_per_byte:.4f} nats/byte
({nats_per_byte / math.log(2):.4f} bits/byte)** (nats/token × held-out tokens / held-out bytes).

## Greedy samples (jinfer engine, 48 tokens)

{sample_md}

## Limits

A few million parameters trained for minutes: it knows Python's surface (indentation,
keywords, docstrings, common names), not semantics; completions drift and loop. The training
text is the CPython standard library (Python Software Foundation License).
"""
    with open(os.path.join(FLAGS.out, "README.md"), "w") as f:
        f.write(card)


if __name__ == "__main__":
    app.run(main)
