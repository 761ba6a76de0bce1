"""The "pallas" AttentionBackend: K/V scattered into pages, then the split-K decode kernel for
decode-only steps and the ragged paged-attention kernel for every other step (decodes and
prefill chunks mixed). Compiled through Triton on NVIDIA GPUs, interpreted elsewhere (CPU:
slow, for tests)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import decode_paged_attention, ragged_paged_attention, write_kv_ref


class PallasBackend:
    decode_path = True

    def __init__(self, interpret: bool | None = None):
        self.interpret = jax.default_backend() != "gpu" if interpret is None else interpret

    def __call__(self, q, k, v, k_pages, v_pages, md, *, sm_scale, sliding_window):
        # The write is an XLA scatter of T rows (its jnp reference is the implementation); the
        # attention kernel then reads this step's keys from the pages like any others.
        k_pages, v_pages = write_kv_ref(k_pages, v_pages, k, v, md.cu_q_lens, md.kv_lens,
                                        md.page_indices, md.num_seqs)
        if md.decode_only:
            return _decode(q, k_pages, v_pages, md, sm_scale, sliding_window, self.interpret), k_pages, v_pages
        out = ragged_paged_attention(q, k_pages, v_pages, md.cu_q_lens, md.kv_lens, md.page_indices,
                                     md.num_seqs, sm_scale=sm_scale, sliding_window=sliding_window,
                                     interpret=self.interpret)
        return out, k_pages, v_pages


def _decode(q, k_pages, v_pages, md, sm_scale, sliding_window, interpret):
    """Row i of q is sequence i's one token (cu_q_lens = arange); padded sequences have
    kv_len 0 and come back as zeros."""
    rows = min(q.shape[0], md.kv_lens.shape[0])
    out = decode_paged_attention(q[:rows], k_pages, v_pages, md.kv_lens[:rows], md.page_indices[:rows],
                                 sm_scale=sm_scale, sliding_window=sliding_window, interpret=interpret)
    return jnp.pad(out, ((0, q.shape[0] - rows), (0, 0), (0, 0)))
