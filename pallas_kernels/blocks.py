"""Block sizes of the kernels, as data: one row per (head_dim, page_size), looked up at trace time.

block_q: query tokens per program of the ragged kernel (times the GQA group = rows per dot).
pages_per_block: KV pages loaded per inner-loop iteration (block_k = pages_per_block * page_size).
num_warps / num_stages: Triton compiler parameters.
The decode kernel's split-K size is not a table entry: decode_pages_per_split picks it from the
batch's occupancy of the GPU.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    block_q: int
    pages_per_block: int
    num_warps: int
    num_stages: int


# Keyed by (head_dim, page_size). block_k = pages_per_block * page_size stays 64..128 keys so
# a [rows, block_k] f32 score tile and two [block_k, head_dim] tiles fit in registers/SMEM.
TABLE: dict[tuple[int, int], BlockSizes] = {
    (64, 8): BlockSizes(block_q=16, pages_per_block=16, num_warps=4, num_stages=2),
    (64, 16): BlockSizes(block_q=16, pages_per_block=8, num_warps=4, num_stages=2),
    (64, 32): BlockSizes(block_q=16, pages_per_block=4, num_warps=4, num_stages=2),
    (128, 8): BlockSizes(block_q=16, pages_per_block=8, num_warps=4, num_stages=2),
    (128, 16): BlockSizes(block_q=16, pages_per_block=4, num_warps=4, num_stages=2),
    (128, 32): BlockSizes(block_q=16, pages_per_block=2, num_warps=4, num_stages=2),
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
    return BlockSizes(block_q=16, pages_per_block=pages, num_warps=4, num_stages=2)


# The decode kernel's programs are (KV head, sequence, split): at small batch a long context
# needs many splits to fill the GPU, at large batch fewer, longer splits save the combine's
# traffic. Aim for about 8 programs per SM of a 132-SM H100 or H200, each split covering
# 256..2048 keys. From the sweeps in benchmarks/kernels.md (Llama-3-8B heads, page size 16): at
# batch 128 x 4k context 2048 keys per split ran 4-6% faster than the old fixed 512 on both an
# H100 and an H200; at batch 32 x 2k 512-1024 keys were within 2% of each other (this rule keeps
# 512); at batch 1 x 8k (single launches of 40-70 µs, noisy) 256 keys per split was as fast as
# or faster than 512 on both. The grid with this rule in place is not measured yet.
DECODE_TARGET_PROGRAMS = 1024
DECODE_SPLIT_KEYS = (256, 2048)


def decode_pages_per_split(num_seqs: int, num_kv_heads: int, pages_per_seq: int, page_size: int) -> int:
    """Pages per split-K partition of the decode kernel: enough splits for about
    DECODE_TARGET_PROGRAMS programs, a power of two within DECODE_SPLIT_KEYS keys."""
    splits = -(-DECODE_TARGET_PROGRAMS // max(1, num_seqs * num_kv_heads))
    pages = -(-pages_per_seq // splits)
    pages = 1 << max(0, pages - 1).bit_length()
    low, high = (max(1, keys // page_size) for keys in DECODE_SPLIT_KEYS)
    return min(max(pages, low), high)
