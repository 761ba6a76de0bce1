"""Memory-mapped safetensors reading into numpy (bf16 included, which safetensors' numpy API lacks).

A tensor is a view into the mapped file: nothing is read until a slice of it is used, so a
sharded load touches only the bytes its devices need.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


def read_header(path: str) -> dict:
    """The JSON header of a .safetensors file: name -> {dtype, shape, data_offsets}."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > os.path.getsize(path) - 8:
            raise ValueError(f"{path} is not a safetensors file (header length {n} past the end)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ValueError(f"{path} has a corrupt safetensors header: {e}") from None
    header.pop("__metadata__", None)
    return header


def open_tensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of one file as read-only memory-mapped numpy arrays."""
    header = read_header(path)
    data_start = 8 + struct.unpack("<Q", open(path, "rb").read(8))[0]
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, info in header.items():
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"tensor {name!r} in {path} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        dtype = np.dtype(_DTYPES[info["dtype"]])
        shape = tuple(info["shape"])
        if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise ValueError(f"tensor {name!r} in {path}: byte range does not match shape {shape}")
        out[name] = mapped[data_start + begin:data_start + end].view(dtype).reshape(shape)
    return out
