"""Pallas kernels (interpret mode on CPU) against their jnp references; references by hand and
(draft trees) against a brute-force dense computation."""

import functools
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jinfer.attention.metadata import MAX_TREE_TOKENS, tree_bits_from_parents
from pallas_kernels import (decode_paged_attention, decode_paged_attention_ref, mixed_paged_attention,
                            ragged_paged_attention, ragged_paged_attention_ref, write_kv, write_kv_ref)

NUM_KV_HEADS = 2
INTERPRET = jax.default_backend() != "gpu"  # compiled through Triton on a GPU


def _ragged_case(rng, *, page_size, group, head_dim, dtype, q_lens, kv_lens, max_seqs=None,
                 pages_per_seq=None):
    """A ragged batch over a tiny pool: permuted page tables, NaN in every unused slot."""
    num_seqs = len(q_lens)
    max_seqs = max_seqs or num_seqs
    pages_per_seq = pages_per_seq or max(1, max(-(-n // page_size) for n in kv_lens))
    num_pages = max_seqs * pages_per_seq + 1
    k_pages = np.full((NUM_KV_HEADS, num_pages, page_size, head_dim), np.nan, np.float32)
    v_pages = k_pages.copy()
    perm = rng.permutation(num_pages)
    table = np.zeros((max_seqs, pages_per_seq), np.int32)
    for i, n in enumerate(kv_lens):
        table[i] = perm[i * pages_per_seq:(i + 1) * pages_per_seq]
        for pos in range(n):  # only real tokens get finite K/V
            p, slot = table[i, pos // page_size], pos % page_size
            k_pages[:, p, slot] = rng.normal(size=(NUM_KV_HEADS, head_dim))
            v_pages[:, p, slot] = rng.normal(size=(NUM_KV_HEADS, head_dim))
    cu = np.zeros(max_seqs + 1, np.int32)
    cu[1:num_seqs + 1] = np.cumsum(q_lens)
    cu[num_seqs + 1:] = cu[num_seqs]
    lens = np.zeros(max_seqs, np.int32)
    lens[:num_seqs] = kv_lens
    num_tokens = int(cu[-1]) + 3  # padding tokens at the end
    q = rng.normal(size=(num_tokens, NUM_KV_HEADS * group, head_dim)).astype(np.float32)
    cast = lambda x: jnp.asarray(x, dtype)
    return (cast(q), cast(k_pages), cast(v_pages), jnp.asarray(cu), jnp.asarray(lens), jnp.asarray(table),
            jnp.asarray([num_seqs], jnp.int32))


def _tol(dtype):
    return dict(atol=2e-2, rtol=2e-2) if dtype == jnp.bfloat16 else dict(atol=2e-5, rtol=2e-5)


# The kernels' grid: head_dim x group x page_size x dtype. The default run takes six points
# that hold every pair of values (a pairwise covering set); the other 18 are in the slow set.
PAIRWISE = {(64, 1, 8, "f32"), (128, 1, 16, "bf16"), (128, 4, 16, "f32"), (64, 4, 8, "bf16"),
            (128, 8, 8, "f32"), (64, 8, 16, "bf16")}


def _kernel_grid():
    dtypes = {"f32": jnp.float32, "bf16": jnp.bfloat16}
    for head_dim in (64, 128):
        for group in (1, 4, 8):
            for page_size in (8, 16):
                for name, dtype in dtypes.items():
                    point = (head_dim, group, page_size, name)
                    marks = () if point in PAIRWISE else (pytest.mark.slow,)
                    yield pytest.param(dtype, page_size, group, head_dim, marks=marks,
                                       id="-".join(map(str, point)))


def _close(a, b, dtype):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.isfinite(a).all(), "NaN/inf leaked into the kernel output"
    np.testing.assert_allclose(a, b, **_tol(dtype))


@pytest.mark.parametrize("dtype, page_size, group, head_dim", list(_kernel_grid()))
def test_ragged_kernel_matches_reference(dtype, page_size, group, head_dim):
    rng = np.random.default_rng(page_size * 1000 + group * 10 + head_dim)
    p = page_size
    # Decodes at lengths 1, page-1, page, page+1; a chunk with a cached prefix; a whole prompt;
    # an empty sequence; the longest one spans several key blocks.
    kv = [1, p - 1, p, p + 1, 2 * p + 5, 19, 0, 4 * p]
    ql = [1, 1, 1, 1, 9, 19, 0, 3]
    args = _ragged_case(rng, page_size=p, group=group, head_dim=head_dim, dtype=dtype, q_lens=ql,
                        kv_lens=kv, max_seqs=10)
    scale = 1 / math.sqrt(head_dim)
    out = ragged_paged_attention(*args, sm_scale=scale, interpret=INTERPRET)
    ref = ragged_paged_attention_ref(*args, sm_scale=scale)
    _close(out, ref, dtype)
    assert not np.asarray(out[-3:], np.float32).any(), "padding tokens must come back as zeros"


@pytest.mark.parametrize("group", [3, 7])
def test_ragged_kernel_groups_of_other_sizes_match_reference(group):
    """Groups that are not a power of two (the default model's 3) run padded with zero query heads."""
    rng = np.random.default_rng(group)
    args = _ragged_case(rng, page_size=8, group=group, head_dim=64, dtype=jnp.float32, q_lens=[1, 9, 0, 3],
                        kv_lens=[7, 20, 0, 33], max_seqs=6)
    out = ragged_paged_attention(*args, sm_scale=0.125, interpret=INTERPRET)
    _close(out, ragged_paged_attention_ref(*args, sm_scale=0.125), jnp.float32)


@pytest.mark.parametrize("soft_cap, window, group, max_decodes", [(None, None, 4, 16), (5.0, 6, 3, 2)])
def test_mixed_attention_takes_decodes_through_the_split_kernel_with_the_same_result(soft_cap, window, group,
                                                                                      max_decodes):
    """mixed_paged_attention: one-token sequences (decodes, over several key blocks) go through
    the split-K decode kernel (at most max_decodes of them: with 2, the third stays with the
    ragged kernel), the others through the ragged kernel, which skips the former (their rows
    zero there); together they equal the reference."""
    rng = np.random.default_rng(11)
    p = 8
    q_lens, kv = [1, 9, 1, 0, 3, 1], [1, 20, 6 * p + 3, 0, 33, p]
    args = _ragged_case(rng, page_size=p, group=group, head_dim=64, dtype=jnp.float32, q_lens=q_lens,
                        kv_lens=kv, max_seqs=8)
    kw = dict(sm_scale=0.125, soft_cap=soft_cap, sliding_window=window)
    out = mixed_paged_attention(*args, interpret=INTERPRET, max_decodes=max_decodes, **kw)
    _close(out, ragged_paged_attention_ref(*args, **kw), jnp.float32)
    single = np.zeros(8, bool)
    single[[0, 2, 5]] = True
    skipped = np.asarray(ragged_paged_attention(*args, interpret=INTERPRET, skip_seqs=jnp.asarray(single), **kw))
    rows = np.cumsum([0] + q_lens)[[0, 2, 5]]  # the decodes' rows
    assert not skipped[rows].any() and skipped[1:10].any()


def test_mixed_attention_with_trees_matches_reference():
    rng = np.random.default_rng(5)
    args, bits, (q_lens, _, _) = _tree_case(rng, [1, 3, 1, 20], page_size=8, group=2, head_dim=64,
                                            dtype=jnp.float32, max_seqs=9)
    assert list(q_lens).count(1) >= 3  # one-token trees and a plain decode beside the trees
    out = mixed_paged_attention(*args, sm_scale=0.125, tree_bits=bits, interpret=INTERPRET)
    _close(out, ragged_paged_attention_ref(*args, sm_scale=0.125, tree_bits=bits), jnp.float32)


@pytest.mark.parametrize("soft_cap, window", [(5.0, None), (None, 6)])
def test_ragged_kernel_soft_cap_and_sliding_window(soft_cap, window):
    rng = np.random.default_rng(1)
    args = _ragged_case(rng, page_size=8, group=4, head_dim=64, dtype=jnp.float32,
                        q_lens=[1, 12, 1], kv_lens=[30, 12, 9])
    kw = dict(sm_scale=0.125, soft_cap=soft_cap, sliding_window=window)
    out = ragged_paged_attention(*args, interpret=INTERPRET, **kw)
    _close(out, ragged_paged_attention_ref(*args, **kw), jnp.float32)
    plain = ragged_paged_attention_ref(*args, sm_scale=0.125)
    assert not np.allclose(np.asarray(plain), np.asarray(out), atol=1e-3), "option had no effect"


@pytest.mark.parametrize("dtype, page_size, group, head_dim", list(_kernel_grid()))
def test_decode_kernel_matches_reference(dtype, page_size, group, head_dim):
    rng = np.random.default_rng(page_size * 999 + group * 7 + head_dim)
    p = page_size
    kv = [0, 1, p - 1, p, p + 1, 6 * p]
    q, k_pages, v_pages, _, lens, table, _ = _ragged_case(
        rng, page_size=p, group=group, head_dim=head_dim, dtype=dtype, q_lens=[1] * len(kv), kv_lens=kv)
    q = q[:len(kv)]
    scale = 1 / math.sqrt(head_dim)
    # Two pages per split: the 6-page sequence needs three splits combined.
    out = decode_paged_attention(q, k_pages, v_pages, lens, table, sm_scale=scale, pages_per_block=1,
                                 pages_per_split=2, interpret=INTERPRET)
    ref = decode_paged_attention_ref(q, k_pages, v_pages, lens, table, sm_scale=scale)
    _close(out, ref, dtype)
    assert not np.asarray(out[0], np.float32).any(), "a sequence with no keys must give zeros"


def test_decode_split_size_follows_the_batch():
    from pallas_kernels.blocks import decode_pages_per_split
    # About 1024 (KV head, sequence, split) programs; a power of two within 256..2048 keys.
    assert decode_pages_per_split(1, 8, 512, 16) == 16  # 128 splits wanted: the 256-key floor
    assert decode_pages_per_split(32, 8, 128, 16) == 32  # 4 splits of 512 keys
    assert decode_pages_per_split(64, 8, 128, 16) == 64  # 2 splits
    assert decode_pages_per_split(128, 8, 256, 16) == 128  # 1 split wanted: the 2048-key cap
    assert decode_pages_per_split(4, 2, 100, 8) == 32  # 128 splits wanted: the floor, 32 pages of 8
    assert decode_pages_per_split(256, 8, 5000, 1) == 2048  # one split wanted: the cap, 2048 one-key pages


def test_decode_kernel_default_split_matches_reference():
    # Page size 4: the default split is 64 pages (256 keys), so a 300-token sequence spans two
    # splits and a 60-token one a single split.
    rng = np.random.default_rng(5)
    kv = [300, 60, 1]
    q, k_pages, v_pages, _, lens, table, _ = _ragged_case(
        rng, page_size=4, group=2, head_dim=64, dtype=jnp.float32, q_lens=[1] * len(kv), kv_lens=kv)
    q = q[:len(kv)]
    out = decode_paged_attention(q, k_pages, v_pages, lens, table, sm_scale=0.125, interpret=INTERPRET)
    _close(out, decode_paged_attention_ref(q, k_pages, v_pages, lens, table, sm_scale=0.125), jnp.float32)


def test_references_on_a_hand_worked_example():
    # One KV head, head_dim 2, pages of 2 slots. Sequence 0 decodes at position 1; sequence 1
    # prefills positions 0 and 1. Keys k0=[0,0], k1=[ln 3, 0]; q=[1, 0] -> scores [0, ln 3] ->
    # softmax [1/4, 3/4]; v0=[4, 0], v1=[0, 8] -> out [1, 6]. Position 0 sees k0 only -> v0.
    nan = np.nan
    k = np.array([[[[0, 0], [np.log(3), 0]], [[nan, nan], [nan, nan]], [[0, 0], [np.log(3), 0]]]],
                 np.float32)
    v = np.array([[[[4, 0], [0, 8]], [[nan, nan], [nan, nan]], [[4, 0], [0, 8]]]], np.float32)
    q = np.array([[[1, 0]], [[1, 0]], [[1, 0]]], np.float32)
    cu, lens = np.array([0, 1, 3], np.int32), np.array([2, 2], np.int32)
    table, n = np.array([[0], [2]], np.int32), np.array([2], np.int32)
    out = ragged_paged_attention_ref(q, k, v, cu, lens, table, n, sm_scale=1.0)
    np.testing.assert_allclose(np.asarray(out)[:, 0], [[1, 6], [4, 0], [1, 6]], atol=1e-6)
    dec = decode_paged_attention_ref(q[:2], k, v, lens, table, sm_scale=1.0)
    np.testing.assert_allclose(np.asarray(dec)[:, 0], [[1, 6], [1, 6]], atol=1e-6)
    # write_kv_ref puts token t of sequence i at position kv_len - q_len + offset of its page table.
    kp, vp = write_kv_ref(jnp.zeros((1, 3, 2, 2)), jnp.zeros((1, 3, 2, 2)), jnp.ones((3, 1, 2)),
                          2 * jnp.ones((3, 1, 2)), cu, lens, table, n)
    written = np.argwhere(np.asarray(kp)[0, :, :, 0] == 1).tolist()
    assert written == [[0, 1], [2, 0], [2, 1]] and float(vp[0, 2, 1, 0]) == 2


@pytest.mark.parametrize("fn, change, message", [
    ("ragged", dict(q=np.zeros((4, 3, 64), np.float32)), "num_heads 3 is not a multiple of num_kv_heads 2"),
    ("ragged", dict(kv_lens=np.zeros(4, np.float32)), "kv_lens dtype float32 must be int32"),
    ("ragged", dict(cu_q_lens=np.zeros(3, np.int32)), r"cu_q_lens shape \(3,\) must be \(5,\)"),
    ("ragged", dict(k_pages=np.zeros((2, 4, 8, 32), np.float32)), "q head_dim 64 != k_pages head_dim 32"),
    ("ragged", dict(q=np.zeros((4, 4, 64), np.float16)), "q dtype float16 must be float32 or bfloat16"),
    ("decode", dict(page_indices=np.zeros((3, 2), np.int32)), r"page_indices must be \[num_seqs=4"),
])
def test_static_validation_names_the_bad_input(fn, change, message):
    args = dict(q=np.zeros((4, 4, 64), np.float32), k_pages=np.zeros((2, 4, 8, 64), np.float32),
                v_pages=np.zeros((2, 4, 8, 64), np.float32), cu_q_lens=np.zeros(5, np.int32),
                kv_lens=np.zeros(4, np.int32), page_indices=np.zeros((4, 2), np.int32),
                num_seqs=np.ones(1, np.int32))
    args.update(change)
    if "v_pages" not in change and "k_pages" in change:
        args["v_pages"] = args["k_pages"]
    with pytest.raises(ValueError, match=message):
        if fn == "ragged":
            ragged_paged_attention(**args, sm_scale=1.0, interpret=INTERPRET)
        else:
            decode_paged_attention(args["q"], args["k_pages"], args["v_pages"], args["kv_lens"],
                                   args["page_indices"], sm_scale=1.0, interpret=INTERPRET)


@pytest.mark.parametrize("dtype, group, head_dim", [(jnp.float32, 4, 128), (jnp.bfloat16, 4, 128),
                                                    (jnp.bfloat16, 3, 64), (jnp.bfloat16, 7, 128)],
                         ids=["f32", "bf16", "bf16-smollm2-group3", "bf16-qwen7b-group7"])
def test_kernels_lower_to_triton_for_cuda(dtype, group, head_dim):
    """Without a GPU, cross-lower for CUDA: every op in both kernels has a Triton lowering and
    all tile shapes are legal (the final PTX compile still needs a GPU). Triton takes only
    power-of-two tiles: a group of 3 (the default model's) failed on an H100, and groups of 3
    and 7 failed this cross-lowering the same way, until padded."""
    rng = np.random.default_rng(0)
    q, kp, vp, cu, lens, table, n = _ragged_case(rng, page_size=16, group=group, head_dim=head_dim,
                                                 dtype=dtype, q_lens=[1, 9, 20], kv_lens=[40, 9, 60])
    ragged = lambda *a: ragged_paged_attention(*a, sm_scale=0.1, soft_cap=30.0, sliding_window=32)
    text = jax.jit(ragged).trace(q, kp, vp, cu, lens, table, n).lower(lowering_platforms=("cuda",)).as_text()
    assert "ragged_paged_attention" in text and "__gpu$xla.gpu.triton" in text
    decode = lambda *a: decode_paged_attention(*a, sm_scale=0.1)
    text = jax.jit(decode).trace(q[:3], kp, vp, lens, table).lower(lowering_platforms=("cuda",)).as_text()
    assert "decode_paged_attention" in text and "__gpu$xla.gpu.triton" in text
    mixed = lambda *a: mixed_paged_attention(*a, sm_scale=0.1, sliding_window=32)
    text = jax.jit(mixed).trace(q, kp, vp, cu, lens, table, n).lower(lowering_platforms=("cuda",)).as_text()
    assert "decode_paged_attention" in text and "ragged_paged_attention" in text


def _bench_kernels(*args):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, os.path.join(root, "tools", "bench_kernels.py"), "--smoke", *args],
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0"})  # one device, fast compiles
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_kernel_benchmark_mixed_steps_smoke_runs_on_cpu():
    out = _bench_kernels("--mixed", "--mixed_chunk=20", "--mixed_slots=6")
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith(("| 1 |", "| 3 |"))]
    assert len(rows) == 2 and all("error" not in "".join(r) for r in rows), out  # batch 1 and 3 at context 64
    assert all(float(r[2].replace(",", "")) > 0 and float(r[3].replace(",", "")) > 0 for r in rows), out


def test_kernel_benchmark_smoke_runs_on_cpu():
    out = _bench_kernels("--write")
    grid, _, writes = out.partition("KV write of one decode step")
    rows = [line for line in grid.splitlines() if line.startswith("| 3 | 64 |")]
    assert len(rows) == 1 and rows[0].count("|") == 11 and "error" not in rows[0], out
    rows = [line.split("|")[1:-1] for line in writes.splitlines() if line.startswith("| 3 | 64 |")]
    assert len(rows) == 1 and all(float(x.replace(",", "")) > 0 for x in rows[0][2:]), out  # both strategies


@pytest.mark.slow  # the tool's main path runs in the smoke test above; fit_pages_per_block has its own
def test_kernel_benchmark_sweep_times_the_table_row_and_alternatives():
    out = _bench_kernels("--sweep")
    assert out.count("configurations ran; defaults") == 2, out  # the decode and prefill points
    assert out.count("| defaults |") == 2 and "pages_per_block" in out and "block_q" in out, out


@pytest.mark.parametrize("pages, page_size, pages_per_seq, want", [
    (4, 16, 100, 4),  # the table's row stands
    (16, 8, 6, 8),  # no more than the table needs, rounded up to a power of two
    (1, 8, 6, 2),  # at least 16 keys: 8-key tiles gave wrong bf16 results compiled
    (4, 16, 3, 4), (4, 16, 1, 1), (2, 32, 1, 1), (3, 16, 100, 4)])
def test_pages_per_block_is_a_power_of_two_of_at_least_16_keys(pages, page_size, pages_per_seq, want):
    from pallas_kernels.blocks import fit_pages_per_block
    assert fit_pages_per_block(pages, page_size, pages_per_seq) == want


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("page_size", [8, 16])
def test_write_kernel_matches_reference(dtype, page_size):
    rng = np.random.default_rng(page_size)
    q, kp, vp, cu, lens, table, n = _ragged_case(rng, page_size=page_size, group=1, head_dim=64, dtype=dtype,
                                                 q_lens=[1, 9, page_size + 1], kv_lens=[5, 9, 2 * page_size + 3],
                                                 max_seqs=4)
    k = jnp.asarray(rng.normal(size=q.shape), dtype)  # q has num_kv_heads heads when group == 1
    v = jnp.asarray(rng.normal(size=q.shape), dtype)
    want = write_kv_ref(kp, vp, k, v, cu, lens, table, n)
    got = write_kv(jnp.array(kp), jnp.array(vp), k, v, cu, lens, table, n, interpret=INTERPRET)
    for a, b in zip(got, want):  # NaN stays NaN in untouched slots; written slots are equal
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    cross = jax.jit(lambda *a: write_kv(*a)).trace(kp, vp, k, v, cu, lens, table, n)
    assert "__gpu$xla.gpu.triton" in cross.lower(lowering_platforms=("cuda",)).as_text()


# ---- Draft trees (speculative decoding): tree_bits restricts a row's new-token keys. ----

TREE_KINDS = ("chain", "star", "deep", "wide", "random", "forest")


def random_parents(rng, n: int, kind: str) -> list[int]:
    """Parents of an n-token draft tree in topological order; token 0 is the root (parent -1)."""
    parents = [-1]
    for i in range(1, n):
        if kind == "chain":
            parents.append(i - 1)
        elif kind == "star":
            parents.append(0)
        elif kind == "deep":  # long paths with a few forks
            parents.append(int(rng.integers(max(0, i - 2), i)))
        elif kind == "wide":  # many children of the first tokens
            parents.append(int(rng.integers(0, min(i, 3))))
        elif kind == "random":
            parents.append(int(rng.integers(0, i)))
        else:  # forest: some tokens have no new-token ancestor
            parents.append(int(rng.integers(-1, i)))
    return parents[:n]


def tree_mix(rng, sizes, page_size: int):
    """(q_lens, kv_lens, parents) of trees of the given sizes (kinds cycling, cached prefixes
    around page edges) mixed with a prefill chunk longer than MAX_TREE_TOKENS, a plain decode
    and an empty sequence."""
    prefixes = [0, page_size - 1, page_size, page_size + 1, 2 * page_size + 3]
    q_lens, kv_lens, parents = [], [], []
    for i, n in enumerate(sizes):
        q_lens.append(n)
        kv_lens.append(n + prefixes[i % len(prefixes)])
        parents.append(random_parents(rng, n, TREE_KINDS[i % len(TREE_KINDS)]))
    for q, kv in [(MAX_TREE_TOKENS + 6, MAX_TREE_TOKENS + 6 + page_size), (1, 2 * page_size + 1), (0, 0)]:
        q_lens.append(q)
        kv_lens.append(kv)
        parents.append(None)
    order = rng.permutation(len(q_lens))
    return [q_lens[i] for i in order], [kv_lens[i] for i in order], [parents[i] for i in order]


def ancestors(parents, i: int) -> set[int]:
    """Token i and its ancestors among the new tokens."""
    seen = {i}
    while parents[i] >= 0:
        i = parents[i]
        seen.add(i)
    return seen


def dense_attention(q, k_pages, v_pages, q_lens, kv_lens, table, sm_scale, visible):
    """Brute force in float64: each new token's softmax over its sequence's cached keys and the
    new tokens visible(s, i) (a set of new-token indices) lists. Returns f64[T, H, D]."""
    q, k_pages, v_pages = (np.asarray(x, np.float64) for x in (q, k_pages, v_pages))
    table = np.asarray(table)
    num_kv_heads, _, page_size, head_dim = k_pages.shape
    group = q.shape[1] // num_kv_heads
    out = np.zeros_like(q)
    row = 0
    for s, (q_len, kv_len) in enumerate(zip(q_lens, kv_lens)):
        cached = kv_len - q_len
        for i in range(q_len):
            slots = np.array(list(range(cached)) + sorted(cached + j for j in visible(s, i)))
            k = k_pages[:, table[s, slots // page_size], slots % page_size]  # [K, n, D]
            v = v_pages[:, table[s, slots // page_size], slots % page_size]
            qh = q[row + i].reshape(num_kv_heads, group, head_dim)
            scores = np.einsum("kgd,knd->kgn", qh, k) * sm_scale
            w = np.exp(scores - scores.max(-1, keepdims=True))
            w /= w.sum(-1, keepdims=True)
            out[row + i] = np.einsum("kgn,knd->kgd", w, v).reshape(-1, head_dim)
        row += q_len
    return out


def tree_visible_sets(parents_per_seq):
    """visible(s, i) for dense_attention: ancestors in a tree, every earlier token otherwise."""
    return lambda s, i: (set(range(i + 1)) if parents_per_seq[s] is None
                         else ancestors(parents_per_seq[s], i))


def _tree_case(rng, sizes, *, page_size, group, head_dim, dtype, max_seqs=None):
    q_lens, kv_lens, parents = tree_mix(rng, sizes, page_size)
    args = _ragged_case(rng, page_size=page_size, group=group, head_dim=head_dim, dtype=dtype,
                        q_lens=q_lens, kv_lens=kv_lens, max_seqs=max_seqs)
    bits = jnp.asarray(tree_bits_from_parents(q_lens, parents, args[0].shape[0]))
    return args, bits, (q_lens, kv_lens, parents)


@pytest.mark.parametrize("page_size, group", [(4, 1), (8, 2)])
def test_tree_reference_matches_dense_brute_force(page_size, group):
    rng = np.random.default_rng(page_size + group)
    sizes = [1, 2, 5, 9, 17, 31, 32, 33, MAX_TREE_TOKENS]  # word edges included
    args, bits, (q_lens, kv_lens, parents) = _tree_case(rng, sizes, page_size=page_size, group=group,
                                                        head_dim=16, dtype=jnp.float32, max_seqs=14)
    out = ragged_paged_attention_ref(*args, sm_scale=0.3, tree_bits=bits)
    want = dense_attention(args[0], args[1], args[2], q_lens, kv_lens, args[5], 0.3, tree_visible_sets(parents))
    real = sum(q_lens)
    _close(out[:real], want[:real], jnp.float32)
    assert not np.asarray(out[real:]).any(), "padding tokens must come back as zeros"


def test_tree_reference_on_a_hand_worked_example():
    # One KV head, head_dim 2, a page of 4 slots: one cached key, then a root (new token 0) with
    # two children (1 and 2). q = [1, 0] everywhere (scale 1), keys kc = k0 = [0, 0],
    # k1 = [ln 4, 0], k2 = [ln 2, 0]; values vc = [4, 0], v0 = [0, 8], v1 = [6, 6], v2 = [2, 2].
    # Token 0 sees kc, k0: weights [1/2, 1/2] -> [2, 4]. Token 1 sees kc, k0, k1: [1, 1, 4] / 6
    # -> [14/3, 16/3]. Token 2 sees kc, k0, k2 but not its sibling k1: [1, 1, 2] / 4 -> [2, 3].
    k = np.array([[[[0, 0], [0, 0], [np.log(4), 0], [np.log(2), 0]], [[np.nan] * 2] * 4]], np.float32)
    v = np.array([[[[4, 0], [0, 8], [6, 6], [2, 2]], [[np.nan] * 2] * 4]], np.float32)
    q = np.tile(np.array([1, 0], np.float32), (4, 1, 1))  # 3 tokens and a padding row
    cu, lens = np.array([0, 3], np.int32), np.array([4], np.int32)
    table, n = np.array([[0]], np.int32), np.array([1], np.int32)
    bits = tree_bits_from_parents([3], [[-1, 0, 0]], 4)
    np.testing.assert_array_equal(bits, [[1, 0], [3, 0], [5, 0], [-1, -1]])
    out = ragged_paged_attention_ref(q, k, v, cu, lens, table, n, sm_scale=1.0, tree_bits=jnp.asarray(bits))
    np.testing.assert_allclose(np.asarray(out)[:, 0], [[2, 4], [14 / 3, 16 / 3], [2, 3], [0, 0]], atol=1e-5)


def test_tree_new_tokens_past_max_tree_tokens_are_visible():
    """Rows whose bits are all clear still see cached keys and the new tokens at index >=
    MAX_TREE_TOKENS (causally); a row of -1s is plain causal."""
    rng = np.random.default_rng(7)
    q_len = MAX_TREE_TOKENS + 3
    args = _ragged_case(rng, page_size=8, group=2, head_dim=16, dtype=jnp.float32, q_lens=[q_len, 5],
                        kv_lens=[q_len + 4, 5])
    bits = np.full((args[0].shape[0], 2), -1, np.int32)
    bits[:q_len] = 0
    out = ragged_paged_attention_ref(*args, sm_scale=0.3, tree_bits=jnp.asarray(bits))
    visible = lambda s, i: (set(range(MAX_TREE_TOKENS, i + 1)) if s == 0 else set(range(i + 1)))
    want = dense_attention(args[0], args[1], args[2], [q_len, 5], [q_len + 4, 5], args[5], 0.3, visible)
    _close(out[:q_len + 5], want[:q_len + 5], jnp.float32)


@pytest.mark.parametrize("dtype, page_size, group", [(jnp.float32, 8, 1), (jnp.bfloat16, 16, 4),
                                                     (jnp.float32, 4, 8)], ids=["f32-8-1", "bf16-16-4", "f32-4-8"])
def test_ragged_kernel_with_trees_matches_reference(dtype, page_size, group):
    rng = np.random.default_rng(page_size * 10 + group)
    args, bits, (q_lens, _, _) = _tree_case(rng, [1, 3, 20, MAX_TREE_TOKENS], page_size=page_size,
                                            group=group, head_dim=64, dtype=dtype, max_seqs=9)
    out = ragged_paged_attention(*args, sm_scale=0.125, tree_bits=bits, interpret=INTERPRET)
    _close(out, ragged_paged_attention_ref(*args, sm_scale=0.125, tree_bits=bits), dtype)
    plain = ragged_paged_attention_ref(*args, sm_scale=0.125)
    assert not np.allclose(np.asarray(out, np.float32), np.asarray(plain, np.float32), atol=1e-2), \
        "the trees had no effect"


def test_chain_trees_and_all_set_bits_equal_causal_attention():
    rng = np.random.default_rng(3)
    q_lens, kv_lens = [1, 4, 40, 2], [9, 4, 45, 20]
    args = _ragged_case(rng, page_size=8, group=2, head_dim=64, dtype=jnp.float32, q_lens=q_lens,
                        kv_lens=kv_lens, max_seqs=5)
    chains = jnp.asarray(tree_bits_from_parents(q_lens, [list(range(-1, q - 1)) for q in q_lens],
                                                args[0].shape[0]))
    ones = jnp.full(chains.shape, -1, jnp.int32)
    causal = ragged_paged_attention_ref(*args, sm_scale=0.125)
    for bits in (chains, ones):
        _close(ragged_paged_attention_ref(*args, sm_scale=0.125, tree_bits=bits), causal, jnp.float32)
    _close(ragged_paged_attention(*args, sm_scale=0.125, tree_bits=chains, interpret=INTERPRET), causal, jnp.float32)


@pytest.mark.parametrize("change, message", [
    (dict(tree_bits=np.zeros((4, 2), np.uint32)), "tree_bits dtype uint32 must be int32"),
    (dict(tree_bits=np.zeros((3, 2), np.int32)), r"tree_bits must be \[num_tokens=4, words\], got shape \(3, 2\)"),
    (dict(tree_bits=np.zeros(4, np.int32)), r"tree_bits must be \[num_tokens=4, words\], got shape \(4,\)"),
    (dict(tree_bits=np.zeros((4, 2), np.int32), sliding_window=8),
     "tree_bits with sliding_window=8 is not supported"),
])
def test_tree_bits_validation_names_the_bad_input(change, message):
    args = dict(q=np.zeros((4, 4, 64), np.float32), k_pages=np.zeros((2, 4, 8, 64), np.float32),
                v_pages=np.zeros((2, 4, 8, 64), np.float32), cu_q_lens=np.zeros(5, np.int32),
                kv_lens=np.zeros(4, np.int32), page_indices=np.zeros((4, 2), np.int32),
                num_seqs=np.ones(1, np.int32))
    for fn in (ragged_paged_attention_ref, functools.partial(ragged_paged_attention, interpret=INTERPRET)):
        with pytest.raises(ValueError, match=message):
            fn(**args, **change, sm_scale=1.0)


@pytest.mark.parametrize("group", [4, 3])
def test_ragged_kernel_with_trees_lowers_to_triton_for_cuda(group):
    rng = np.random.default_rng(0)
    args, bits, _ = _tree_case(rng, [5, 33], page_size=16, group=group, head_dim=128, dtype=jnp.bfloat16)
    fn = lambda *a: ragged_paged_attention(*a[:-1], sm_scale=0.1, soft_cap=30.0, tree_bits=a[-1])
    text = jax.jit(fn).trace(*args, bits).lower(lowering_platforms=("cuda",)).as_text()
    assert "ragged_paged_attention" in text and "__gpu$xla.gpu.triton" in text
