"""Minimal safetensors reader and writer (numpy).

Own writer because the `safetensors` package writes `__metadata__` in hash-map order, which changes
from run to run; fixtures must be byte-identical when regenerated. The writer sorts tensor names and
metadata keys. The reader also handles BF16 (numpy has no bfloat16), for checkpoints written by others.

Layout: u64 little-endian header size N, N bytes of JSON header (padded with spaces to a multiple of 8),
then the raw little-endian tensor bytes at the header's data_offsets.
"""

import json
import struct

import numpy as np

_WRITE_DTYPES = {
    np.dtype(np.float64): "F64",
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(np.int64): "I64",
    np.dtype(np.int32): "I32",
    np.dtype(np.uint16): "U16",
    np.dtype(np.uint8): "U8",
}
_READ_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
}


def write(path, tensors, metadata=None):
    """Write {name: ndarray} with optional {str: str} metadata, deterministically."""
    header = {}
    if metadata:
        header["__metadata__"] = {k: str(metadata[k]) for k in sorted(metadata)}
    blobs = []
    offset = 0
    for name in sorted(tensors):
        arr = np.asarray(tensors[name])
        if arr.dtype not in _WRITE_DTYPES:
            raise ValueError(f"{name}: unsupported dtype {arr.dtype}")
        data = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
        header[name] = {
            "dtype": _WRITE_DTYPES[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)


def read(path):
    """Read a safetensors file: returns ({name: ndarray}, metadata dict). BF16 comes back as float32."""
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise ValueError(f"{path}: too short to be a safetensors file")
    (n,) = struct.unpack("<Q", raw[:8])
    if 8 + n > len(raw):
        raise ValueError(f"{path}: header size {n} runs past the end of the file")
    header = json.loads(raw[8 : 8 + n])
    base = 8 + n
    metadata = header.pop("__metadata__", {}) or {}
    tensors = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        if base + end > len(raw):
            raise ValueError(f"{path}: tensor {name} runs past the end of the file")
        buf = raw[base + start : base + end]
        shape = tuple(info["shape"])
        if info["dtype"] == "BF16":
            bits = np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16
            arr = bits.view(np.float32)
        elif info["dtype"] in _READ_DTYPES:
            arr = np.frombuffer(buf, dtype=_READ_DTYPES[info["dtype"]])
        else:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        tensors[name] = arr.reshape(shape).copy()
    return tensors, metadata
