"""Shape and dtype checks shared by the kernels and their references (trace time, no device work)."""

from __future__ import annotations

import jax.numpy as jnp

_FLOATS = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _check_pages(q, k_pages, v_pages) -> None:
    _check(k_pages.ndim == 4, f"k_pages must be [num_kv_heads, num_pages, page_size, head_dim], "
                              f"got shape {k_pages.shape}")
    _check(v_pages.shape == k_pages.shape, f"v_pages shape {v_pages.shape} != k_pages shape {k_pages.shape}")
    _check(q.dtype in _FLOATS, f"q dtype {q.dtype} must be float32 or bfloat16")
    _check(k_pages.dtype == v_pages.dtype == q.dtype,
           f"q, k_pages, v_pages dtypes must match, got {q.dtype}, {k_pages.dtype}, {v_pages.dtype}")
    num_kv_heads, _, _, head_dim = k_pages.shape
    _check(q.shape[-1] == head_dim, f"q head_dim {q.shape[-1]} != k_pages head_dim {head_dim}")
    _check(q.shape[-2] % num_kv_heads == 0,
           f"num_heads {q.shape[-2]} is not a multiple of num_kv_heads {num_kv_heads}")


def _check_int(name: str, x, shape) -> None:
    _check(x.dtype == jnp.int32, f"{name} dtype {x.dtype} must be int32")
    _check(tuple(x.shape) == tuple(shape), f"{name} shape {tuple(x.shape)} must be {tuple(shape)}")


def _check_ragged_metadata(cu_q_lens, kv_lens, page_indices, num_seqs) -> None:
    _check(page_indices.ndim == 2, f"page_indices must be [max_seqs, pages_per_seq], got shape "
                                   f"{page_indices.shape}")
    max_seqs = page_indices.shape[0]
    _check_int("page_indices", page_indices, page_indices.shape)
    _check_int("cu_q_lens", cu_q_lens, (max_seqs + 1,))
    _check_int("kv_lens", kv_lens, (max_seqs,))
    _check_int("num_seqs", num_seqs, (1,))


def static_validate_tree_bits(tree_bits, num_tokens: int, *, sliding_window=None) -> None:
    """Raises ValueError unless tree_bits is None or i32[num_tokens, words >= 1] without a
    sliding window (a tree token's position is not its slot, so the window would be wrong)."""
    if tree_bits is None:
        return
    _check(tree_bits.ndim == 2 and tree_bits.shape[0] == num_tokens and tree_bits.shape[1] >= 1,
           f"tree_bits must be [num_tokens={num_tokens}, words], got shape {tuple(tree_bits.shape)}")
    _check(tree_bits.dtype == jnp.int32, f"tree_bits dtype {tree_bits.dtype} must be int32")
    _check(sliding_window is None, f"tree_bits with sliding_window={sliding_window} is not "
                                   f"supported: tree tokens' positions are not their slots")


def static_validate_ragged_inputs(q, k_pages, v_pages, cu_q_lens, kv_lens, page_indices, num_seqs,
                                  *, soft_cap=None, sliding_window=None, tree_bits=None) -> None:
    """Raises ValueError naming the bad shape/dtype/value of a ragged_paged_attention call."""
    _check(q.ndim == 3, f"q must be [num_tokens, num_heads, head_dim], got shape {q.shape}")
    _check_pages(q, k_pages, v_pages)
    _check_ragged_metadata(cu_q_lens, kv_lens, page_indices, num_seqs)
    _check(soft_cap is None or soft_cap > 0, f"soft_cap={soft_cap} must be > 0 or None")
    _check(sliding_window is None or sliding_window > 0,
           f"sliding_window={sliding_window} must be > 0 or None")
    static_validate_tree_bits(tree_bits, q.shape[0], sliding_window=sliding_window)


def static_validate_decode_inputs(q, k_pages, v_pages, kv_lens, page_indices, *, soft_cap=None,
                                  sliding_window=None) -> None:
    """Raises ValueError naming the bad shape/dtype/value of a decode_paged_attention call."""
    _check(q.ndim == 3, f"q must be [num_seqs, num_heads, head_dim], got shape {q.shape}")
    _check_pages(q, k_pages, v_pages)
    _check(page_indices.ndim == 2 and page_indices.shape[0] == q.shape[0],
           f"page_indices must be [num_seqs={q.shape[0]}, pages_per_seq], got shape {page_indices.shape}")
    _check_int("page_indices", page_indices, page_indices.shape)
    _check_int("kv_lens", kv_lens, (q.shape[0],))
    _check(soft_cap is None or soft_cap > 0, f"soft_cap={soft_cap} must be > 0 or None")
    _check(sliding_window is None or sliding_window > 0,
           f"sliding_window={sliding_window} must be > 0 or None")


def static_validate_write_inputs(k_pages, v_pages, k, v, cu_q_lens, kv_lens, page_indices,
                                 num_seqs) -> None:
    """Raises ValueError naming the bad shape/dtype of a write_kv call."""
    _check(k.ndim == 3, f"k must be [num_tokens, num_kv_heads, head_dim], got shape {k.shape}")
    _check(v.shape == k.shape, f"v shape {v.shape} != k shape {k.shape}")
    _check(k_pages.ndim == 4, f"k_pages must be [num_kv_heads, num_pages, page_size, head_dim], "
                              f"got shape {k_pages.shape}")
    _check(v_pages.shape == k_pages.shape, f"v_pages shape {v_pages.shape} != k_pages shape {k_pages.shape}")
    _check(k_pages.dtype in _FLOATS and v_pages.dtype == k_pages.dtype,
           f"k_pages/v_pages dtypes {k_pages.dtype}/{v_pages.dtype} must be one of float32, bfloat16")
    _check(tuple(k.shape[1:]) == (k_pages.shape[0], k_pages.shape[3]),
           f"k shape {k.shape} does not match k_pages {k_pages.shape} (num_kv_heads, head_dim)")
    _check_ragged_metadata(cu_q_lens, kv_lens, page_indices, num_seqs)
