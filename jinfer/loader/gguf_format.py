"""The GGUF container format (versions 2 and 3): metadata and tensor directory parsed, tensor
data memory-mapped. Only the layout is read here; what the values mean is gguf.py's business.

The `gguf` package's reader builds an object per array element; a real model's 49k tokens and
49k merges then take it 1-2 s. This one walks the file once with plain struct reads (~0.1 s).

    header  : b"GGUF", u32 version, u64 tensor_count, u64 kv_count
    kv      : string key, u32 value type, value   (arrays: u32 element type, u64 count, values)
    tensor  : string name, u32 n_dims, u64 dims[n_dims] (fastest first), u32 ggml type, u64 offset
    data    : at the next multiple of general.alignment (32) after the directory; offsets relative
"""

from __future__ import annotations

import dataclasses
import struct

import numpy as np

# value type -> struct format of one scalar (8: string, 9: array are read by hand).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    tensor_type: int
    """GGML type id (gguf.GGMLQuantizationType)."""
    shape: tuple[int, ...]
    """numpy order: slowest dimension first ([rows, cols] for a matrix)."""
    data: np.ndarray
    """u8[..., bytes per row] over the file (memory-mapped; dequantize it, do not write)."""


class _Cursor:
    def __init__(self, buf: memoryview):
        self.buf, self.at = buf, 0

    def scalar(self, fmt: str):
        value = struct.unpack_from(fmt, self.buf, self.at)[0]
        self.at += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("<Q")
        if self.at + n > len(self.buf):
            raise ValueError(f"a string of {n} bytes runs past the end of the file")
        s = bytes(self.buf[self.at:self.at + n]).decode("utf-8")
        self.at += n
        return s

    def value(self, vtype: int):
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.scalar("<I"), self.scalar("<Q")
            if etype == _STRING:
                return [self.string() for _ in range(count)]
            if etype in _NUMPY:
                width = np.dtype(_NUMPY[etype]).itemsize
                if self.at + count * width > len(self.buf):
                    raise ValueError(f"an array of {count} values runs past the end of the file")
                arr = np.frombuffer(self.buf, _NUMPY[etype], count, self.at)
                self.at += count * width
                return arr.tolist()
            return [self.value(etype) for _ in range(count)]  # arrays of arrays
        if vtype not in _SCALARS:
            raise ValueError(f"unknown metadata value type {vtype}")
        return self.scalar(_SCALARS[vtype])


def read(path: str) -> tuple[dict, dict[str, TensorInfo]]:
    """(metadata key -> value, tensor name -> TensorInfo) of a GGUF file. Raises ValueError
    (struct.error, IndexError) on a truncated or malformed file; callers name the file."""
    import gguf  # block sizes of the GGML types

    mm = np.memmap(path, dtype=np.uint8, mode="r")
    c = _Cursor(memoryview(mm))
    if bytes(c.buf[:4]) != b"GGUF":
        raise ValueError("no GGUF magic")
    c.at = 4
    version = c.scalar("<I")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} (supported: 2, 3)")
    n_tensors, n_kv = c.scalar("<Q"), c.scalar("<Q")
    meta = {}
    for _ in range(n_kv):
        key = c.string()
        meta[key] = c.value(c.scalar("<I"))
    infos = []
    for _ in range(n_tensors):
        name = c.string()
        dims = [c.scalar("<Q") for _ in range(c.scalar("<I"))]
        infos.append((name, dims, c.scalar("<I"), c.scalar("<Q")))
    align = meta.get("general.alignment", 32)
    if not isinstance(align, int) or align < 1 or align & (align - 1):
        raise ValueError(f"general.alignment={align!r} is not a power of two")
    start = -(-c.at // align) * align
    tensors = {}
    for name, dims, ttype, offset in infos:
        try:
            block, type_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)]
        except (ValueError, KeyError):
            raise ValueError(f"tensor {name!r} has unknown GGML type {ttype}") from None
        if dims[0] % block:
            raise ValueError(f"tensor {name!r}: row of {dims[0]} values is not a whole number of "
                             f"{block}-value blocks")
        row_bytes = dims[0] // block * type_bytes
        rows = int(np.prod(dims[1:], dtype=np.int64)) if len(dims) > 1 else 1
        begin = start + offset
        if begin + rows * row_bytes > len(mm):
            raise ValueError(f"tensor {name!r} runs past the end of the file")
        data = mm[begin:begin + rows * row_bytes].reshape(*reversed(dims[1:]), row_bytes)
        tensors[name] = TensorInfo(name, ttype, tuple(reversed(dims)), data)
    return meta, tensors
