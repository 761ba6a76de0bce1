"""The "pallas" AttentionBackend: K/V scattered into pages, then the ragged paged-attention
kernel for every step (decodes and prefill chunks alike). Compiled through Triton on NVIDIA
GPUs, interpreted elsewhere (CPU: slow, for tests)."""

from __future__ import annotations

import jax

from pallas_kernels import ragged_paged_attention, write_kv_ref


class PallasBackend:
    def __init__(self, interpret: bool | None = None):
        self.interpret = jax.default_backend() != "gpu" if interpret is None else interpret

    def __call__(self, q, k, v, k_pages, v_pages, md, *, sm_scale, sliding_window):
        # The write is an XLA scatter of T rows (its jnp reference is the implementation); the
        # attention kernel then reads this step's keys from the pages like any others.
        k_pages, v_pages = write_kv_ref(k_pages, v_pages, k, v, md.cu_q_lens, md.kv_lens,
                                        md.page_indices, md.num_seqs)
        out = ragged_paged_attention(q, k_pages, v_pages, md.cu_q_lens, md.kv_lens, md.page_indices,
                                     md.num_seqs, sm_scale=sm_scale, sliding_window=sliding_window,
                                     interpret=self.interpret)
        return out, k_pages, v_pages
