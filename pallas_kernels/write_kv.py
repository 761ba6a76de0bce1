"""KV write: each new token's K and V go to their page slot, one (KV head, token) per program.

The slot of every token (page, offset, or none for padding) is computed in XLA from the same
metadata the attention kernels take; the pools are aliased input->output so only the written
rows move. Same contract as reference.write_kv_ref.
"""

from __future__ import annotations

import functools

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.reference import token_slots
from pallas_kernels.validate import static_validate_write_inputs


def _kernel(page_ref, slot_ref, k_ref, v_ref, k_pages_ref, v_pages_ref, k_out_ref, v_out_ref):
    # k_ref/v_ref: [head_dim] of this (token, KV head); *_out_ref: [num_pages, page_size, head_dim]
    del k_pages_ref, v_pages_ref  # aliased to the outputs
    token = pl.program_id(1)
    page, slot = page_ref[token], slot_ref[token]

    @pl.when(page >= 0)
    def _():
        k_out_ref[page, slot, :] = k_ref[...].astype(k_out_ref.dtype)
        v_out_ref[page, slot, :] = v_ref[...].astype(v_out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("interpret",), donate_argnums=(0, 1))
def write_kv(k_pages, v_pages, k, v, cu_q_lens, kv_lens, page_indices, num_seqs, *,
             interpret: bool = False):
    """Places k, v (f[T, num_kv_heads, head_dim]) in their pages; returns (k_pages, v_pages)."""
    static_validate_write_inputs(k_pages, v_pages, k, v, cu_q_lens, kv_lens, page_indices, num_seqs)
    num_tokens, num_kv_heads, head_dim = k.shape
    _, num_pages, page_size, _ = k_pages.shape
    page, slot = token_slots(cu_q_lens, kv_lens, page_indices, num_seqs, num_tokens, page_size)
    whole = lambda shape: pl.BlockSpec(shape, lambda h, t: (0,) * len(shape))
    row = pl.BlockSpec((None, None, head_dim), lambda h, t: (t, h, 0))
    pages = pl.BlockSpec((None, num_pages, page_size, head_dim), lambda h, t: (h, 0, 0, 0))
    return pl.pallas_call(
        _kernel,
        grid=(num_kv_heads, num_tokens),
        in_specs=[whole(page.shape), whole(slot.shape), row, row, pages, pages],
        out_specs=[pages, pages],
        out_shape=[jax.ShapeDtypeStruct(k_pages.shape, k_pages.dtype),
                   jax.ShapeDtypeStruct(v_pages.shape, v_pages.dtype)],
        input_output_aliases={4: 0, 5: 1},
        compiler_params=plgpu.CompilerParams(num_warps=1, num_stages=1),
        interpret=interpret,
        name="write_kv",
    )(page, slot, k.astype(k_pages.dtype), v.astype(v_pages.dtype), k_pages, v_pages)
