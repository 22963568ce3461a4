"""safetensors: 8-byte little-endian header length, a JSON header, then the data section.

Only the header is read. Every field that decides a byte range is checked against the file size
before it is used, so a hostile header cannot make us read out of bounds or allocate by a claim.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any, BinaryIO

from ..errors import FormatError
from .base import CODEC_DTYPES, Layout, TensorRegion

NAME = "safetensors"
EXTENSIONS = (".safetensors",)
# safetensors itself refuses headers above 100 MB.
MAX_HEADER = 100_000_000

# Sub-byte and exotic dtypes are stored as opaque bytes; their element size (bits) for checking.
_OPAQUE_BITS = {"F8_E8M0": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "C64": 64, "C128": 128, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8}


def sniff(head: bytes, size: int) -> bool:
    if len(head) < 10 or size < 10:
        return False
    (n,) = struct.unpack_from("<Q", head)
    return 2 <= n <= min(size - 8, MAX_HEADER) and head[8:9] == b"{"


def parse(path: str, f: BinaryIO, size: int) -> Layout:
    if size < 8:
        raise FormatError(path, "header", f"file is {size} bytes, shorter than the 8-byte header length field")
    f.seek(0)
    (n,) = struct.unpack("<Q", f.read(8))
    if n > size - 8:
        raise FormatError(
            path,
            "header length (bytes 0-8)",
            f"claims a {n}-byte JSON header but the file has only {size - 8} bytes after it",
            hint="the file is truncated or not safetensors",
        )
    if n > MAX_HEADER:
        raise FormatError(path, "header length (bytes 0-8)", f"claims a {n}-byte JSON header, above the 100 MB safetensors limit")
    raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(path, f"JSON header (bytes 8-{8 + n})", f"is not valid UTF-8 JSON: {e}") from None
    if not isinstance(header, dict):
        raise FormatError(path, "JSON header", "is not a JSON object")
    data_start = 8 + n
    data_len = size - data_start
    metadata = header.get("__metadata__", {})
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise FormatError(path, "__metadata__", "is not a JSON object of strings")
    regions: list[TensorRegion] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"tensor {name!r}"
        if not isinstance(info, dict):
            raise FormatError(path, where, "header entry is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str):
            raise FormatError(path, where, "has no dtype string")
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise FormatError(path, where, f"shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise FormatError(path, where, f"data_offsets {offsets!r} is not a pair of integers")
        begin, end = offsets
        if not 0 <= begin <= end:
            raise FormatError(path, where, f"data_offsets [{begin}, {end}) are not ordered")
        if end > data_len:
            raise FormatError(
                path,
                where,
                f"data_offsets [{begin}, {end}) end past the {data_len}-byte data section (file offset {data_start + end} > size {size})",
                hint="the file is truncated or its header is corrupt",
            )
        elem = CODEC_DTYPES.get(dtype)
        bits = elem * 8 if elem is not None else _OPAQUE_BITS.get(dtype)
        count = math.prod(shape)
        if bits is not None and (count * bits + 7) // 8 != end - begin:
            raise FormatError(
                path, where, f"{dtype} shape {shape} needs {(count * bits + 7) // 8} bytes but data_offsets span {end - begin}"
            )
        align = elem if elem is not None else max(1, (bits or 8) // 8) if (bits or 8) % 8 == 0 else 1
        regions.append(TensorRegion(name, dtype, tuple(shape), data_start + begin, end - begin, align))
    regions.sort(key=lambda r: (r.offset, r.length))
    prev: TensorRegion | None = None
    for r in regions:
        if prev is not None and r.offset < prev.end:
            raise FormatError(
                path,
                f"tensors {prev.name!r} and {r.name!r}",
                f"overlap in the data section ([{prev.offset - data_start}, {prev.end - data_start}) "
                f"and [{r.offset - data_start}, {r.end - data_start}))",
            )
        prev = r
    return Layout(NAME, size, regions, metadata={"__metadata__": metadata})


_NUMPY_TO_ST = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "uint16": "U16",
    "uint32": "U32",
    "uint64": "U64",
    "bool": "BOOL",
}


def save(path: str, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> None:
    """Write numpy arrays as a safetensors file (names sorted, header padded to 8 bytes).

    numpy has no bfloat16: pass ``(uint16_array, "BF16")`` to store raw bf16 bit patterns.
    """
    import numpy as np

    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    blobs = []
    pos = 0
    for name in sorted(tensors):
        value = tensors[name]
        arr, dtype = value if isinstance(value, tuple) else (value, None)
        arr = np.asarray(arr)  # not ascontiguousarray: it turns 0-d arrays into 1-d
        if not arr.flags.c_contiguous:
            arr = arr.copy(order="C")
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        st = dtype or _NUMPY_TO_ST[arr.dtype.name]
        data = arr.tobytes()
        header[name] = {"dtype": st, "shape": list(arr.shape), "data_offsets": [pos, pos + len(data)]}
        blobs.append(data)
        pos += len(data)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
