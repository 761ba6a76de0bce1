"""Paged-attention kernels in Pallas (Triton lowering on NVIDIA GPUs, interpret mode on CPU),
each beside a pure-jnp reference with the same signature. Imports nothing from jinfer."""

from pallas_kernels.blocks import TABLE, BlockSizes, block_sizes
from pallas_kernels.decode_attention import decode_paged_attention
from pallas_kernels.mixed_attention import mixed_paged_attention
from pallas_kernels.ragged_paged_attention import ragged_paged_attention
from pallas_kernels.reference import decode_paged_attention_ref, ragged_paged_attention_ref, write_kv_ref
from pallas_kernels.validate import (static_validate_decode_inputs, static_validate_ragged_inputs,
                                     static_validate_tree_bits, static_validate_write_inputs)
from pallas_kernels.write_kv import write_kv

__all__ = ["TABLE", "BlockSizes", "block_sizes", "decode_paged_attention", "decode_paged_attention_ref",
           "mixed_paged_attention", "ragged_paged_attention", "ragged_paged_attention_ref",
           "static_validate_decode_inputs", "static_validate_ragged_inputs", "static_validate_tree_bits",
           "static_validate_write_inputs", "write_kv", "write_kv_ref"]
