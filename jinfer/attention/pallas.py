"""The "pallas" AttentionBackend: K/V scattered into pages, then the split-K decode kernel for
decode-only steps and the ragged paged-attention kernel for every other step (decodes and
prefill chunks mixed). "pallas_split" differs in those other steps only: their one-token
sequences go through the split-K decode kernel too (pallas_kernels.mixed_paged_attention).
Compiled through Triton on NVIDIA GPUs, interpreted elsewhere (CPU: slow, for tests).

Under tensor parallelism (the runner traces the step inside `jax.set_mesh`) the kernels run
per device in a shard_map over the mesh's one axis: query heads are split; KV heads are split
too when the axis divides them, otherwise every device keeps (and writes) all KV heads and
attends only with the one its query heads belong to. The metadata (draft-tree bits included)
is replicated.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pallas_kernels import decode_paged_attention, mixed_paged_attention, ragged_paged_attention, write_kv_ref


class PallasBackend:
    """split_decodes: in a step that is not decode-only, the one-token sequences go through the
    split-K decode kernel instead of the ragged one (pallas_kernels.mixed_paged_attention; the
    "pallas_split" backend)."""

    decode_path = True

    def __init__(self, interpret: bool | None = None, split_decodes: bool = False):
        self.interpret = jax.default_backend() != "gpu" if interpret is None else interpret
        self.split_decodes = split_decodes

    def __call__(self, q, k, v, k_pages, v_pages, md, *, sm_scale, sliding_window):
        local = functools.partial(self._local, sm_scale=sm_scale, sliding_window=sliding_window)
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty or mesh.size == 1:
            return local(q, k, v, k_pages, v_pages, md)
        if len(mesh.axis_names) != 1:
            raise ValueError(f"the pallas backend partitions over a 1-D mesh, got axes {mesh.axis_names}")
        axis, tp = mesh.axis_names[0], mesh.size
        num_heads, num_kv_heads = q.shape[1], k.shape[1]
        heads = P(None, axis, None)
        if num_kv_heads % tp == 0:  # KV heads split like the query heads: groups stay whole
            kv, pages = heads, P(axis)
        else:  # KV heads replicated; each device's query heads share one KV head
            kv, pages = P(), P()
            group, per_device = num_heads // num_kv_heads, num_heads // tp

            def local(q, k, v, k_pages, v_pages, md):
                kv_head = jax.lax.axis_index(axis) * per_device // group
                return self._local(q, k, v, k_pages, v_pages, md, sm_scale=sm_scale,
                                   sliding_window=sliding_window, kv_head=kv_head)
        return jax.shard_map(local, mesh=mesh, in_specs=(heads, kv, kv, pages, pages, P()),
                             out_specs=(heads, pages, pages), check_vma=False)(q, k, v, k_pages, v_pages, md)

    def _local(self, q, k, v, k_pages, v_pages, md, *, sm_scale, sliding_window, kv_head=None):
        """One device's heads. kv_head: attend with that KV head only (KV replicated under tp)."""
        # The write is an XLA scatter of T rows (pallas_kernels.write_kv_ref), which XLA fuses
        # into the step. The Pallas write kernel (pallas_kernels.write_kv) is not wired in: on an
        # H200, run standalone, neither was clearly faster (benchmarks/kernels.md). The attention
        # kernel then reads this step's keys from the pages like any others.
        k_pages, v_pages = write_kv_ref(k_pages, v_pages, k, v, md.cu_q_lens, md.kv_lens,
                                        md.page_indices, md.num_seqs)
        k_att, v_att = k_pages, v_pages
        if kv_head is not None:
            k_att = jax.lax.dynamic_slice_in_dim(k_pages, kv_head, 1, axis=0)
            v_att = jax.lax.dynamic_slice_in_dim(v_pages, kv_head, 1, axis=0)
        if md.decode_only and md.tree_bits is None:  # a tree step never takes the decode-only path
            return _decode(q, k_att, v_att, md, sm_scale, sliding_window, self.interpret), k_pages, v_pages
        ragged = mixed_paged_attention if self.split_decodes else ragged_paged_attention
        out = ragged(q, k_att, v_att, md.cu_q_lens, md.kv_lens, md.page_indices, md.num_seqs, sm_scale=sm_scale,
                     sliding_window=sliding_window, interpret=self.interpret, tree_bits=md.tree_bits)
        return out, k_pages, v_pages


def _decode(q, k_pages, v_pages, md, sm_scale, sliding_window, interpret):
    """Row i of q is sequence i's one token (cu_q_lens = arange); padded sequences have
    kv_len 0 and come back as zeros."""
    rows = min(q.shape[0], md.kv_lens.shape[0])
    out = decode_paged_attention(q[:rows], k_pages, v_pages, md.kv_lens[:rows], md.page_indices[:rows],
                                 sm_scale=sm_scale, sliding_window=sliding_window, interpret=interpret)
    return jnp.pad(out, ((0, q.shape[0] - rows), (0, 0), (0, 0)))
