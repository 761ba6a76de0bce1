"""Block sizes of the kernels, as data: one row per (head_dim, page_size), looked up at trace time.

block_q: query tokens per program of the ragged kernel (times the GQA group = rows per dot).
pages_per_block: KV pages loaded per inner-loop iteration (block_k = pages_per_block * page_size).
num_warps / num_stages: Triton compiler parameters.
decode_pages_per_split: pages one split-K partition of the decode kernel covers at most.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    block_q: int
    pages_per_block: int
    num_warps: int
    num_stages: int
    decode_pages_per_split: int


# Keyed by (head_dim, page_size). block_k = pages_per_block * page_size stays 64..128 keys so
# a [rows, block_k] f32 score tile and two [block_k, head_dim] tiles fit in registers/SMEM.
TABLE: dict[tuple[int, int], BlockSizes] = {
    (64, 8): BlockSizes(block_q=16, pages_per_block=16, num_warps=4, num_stages=2, decode_pages_per_split=64),
    (64, 16): BlockSizes(block_q=16, pages_per_block=8, num_warps=4, num_stages=2, decode_pages_per_split=32),
    (64, 32): BlockSizes(block_q=16, pages_per_block=4, num_warps=4, num_stages=2, decode_pages_per_split=16),
    (128, 8): BlockSizes(block_q=16, pages_per_block=8, num_warps=4, num_stages=2, decode_pages_per_split=64),
    (128, 16): BlockSizes(block_q=16, pages_per_block=4, num_warps=4, num_stages=2, decode_pages_per_split=32),
    (128, 32): BlockSizes(block_q=16, pages_per_block=2, num_warps=4, num_stages=2, decode_pages_per_split=16),
}


MIN_BLOCK_K = 16  # Triton's smallest dot dimension: a narrower K/V tile gave wrong bf16 results on an H200


def fit_pages_per_block(pages: int, page_size: int, pages_per_seq: int) -> int:
    """Pages per inner-loop block, from a requested count: no more than a sequence's page table
    needs (rounded up), at least MIN_BLOCK_K keys, and a power of two, since the Triton lowering
    takes only power-of-two arrays (the table is padded to whole blocks). Both kernels use it."""
    pages = min(pages, 1 << max(0, pages_per_seq - 1).bit_length())
    pages = max(pages, -(-MIN_BLOCK_K // page_size))
    return 1 << max(0, pages - 1).bit_length()


def block_sizes(head_dim: int, page_size: int) -> BlockSizes:
    """The table's row, or a derived one for shapes it lacks (64 keys per block)."""
    if (head_dim, page_size) in TABLE:
        return TABLE[(head_dim, page_size)]
    pages = max(1, 64 // page_size)
    return BlockSizes(block_q=16, pages_per_block=pages, num_warps=4, num_stages=2,
                      decode_pages_per_split=max(pages, 512 // page_size))
