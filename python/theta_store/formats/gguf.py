"""GGUF (llama.cpp / ggml) model files, versions 1-3, either byte order.

Layout of a file: magic ``GGUF``, version (u32), tensor count and metadata KV count (u64; u32 in
v1), the metadata KVs (key string, value type, value; arrays may hold millions of strings), the
tensor infos (name, n_dims, dims ``ne`` fastest-first, ggml type, offset relative to the data
section), padding to ``general.alignment`` (default 32), then the data section.

Everything before the data section (and any padding inside it) is skeleton. Each tensor is a
region at ``data_start + offset``: plain types map to F32/F16/BF16/F64/I8/I16/I32/I64; quantized
types (Q4_0, Q8_0, K-quants, IQ*, TQ*, MXFP4, ...) are opaque dtypes named like ggml names them,
with ``align`` = the byte size of one quantization block, and ``shape`` = ``reversed(ne)``
(row-major, as gguf-py reports it).

A tensor of a ggml type newer than this table -> the whole file is stored raw with a note
(documented fallback): without the block geometry its byte length is unknown.

Counts and lengths are checked against the bytes that remain before they are used, so a header
claiming 2**63 tensors in a 69-byte file is a FormatError naming ``tensor_count``.
``metadata``: ``gguf_version``, ``alignment``, ``byteorder`` and ``kv`` (key -> value for scalars
and strings up to 256 bytes; a ``{"type", "length"}`` summary for longer strings and arrays).
"""

from __future__ import annotations

import math
import struct
from typing import Any, BinaryIO

from ..errors import FormatError
from . import raw
from ._zip import BoundedReader
from .base import Layout, TensorRegion

NAME = "gguf"
EXTENSIONS = (".gguf",)
MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 16
MAX_NAME = 1 << 16
MAX_ARRAY_DEPTH = 8
MAX_INLINE_STRING = 256

# ggml type id -> (name, elements per block, bytes per block), as in ggml.h / gguf-py GGML_QUANT_SIZES.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    # 31-33 and 36-38: repacked Q4_0 / IQ4_NL layouts, removed from ggml but present in some files.
    31: ("Q4_0_4_4", 32, 18),
    32: ("Q4_0_4_8", 32, 18),
    33: ("Q4_0_8_8", 32, 18),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    36: ("IQ4_NL_4_4", 32, 18),
    37: ("IQ4_NL_4_8", 32, 18),
    38: ("IQ4_NL_8_8", 32, 18),
    39: ("MXFP4", 32, 17),
    40: ("NVFP4", 64, 36),
    41: ("Q1_0", 128, 18),
    42: ("Q2_0", 64, 18),
}
# Types whose elements are plain numbers in the codec table.
_PLAIN = {"F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64"}

# GGUF metadata value types: id -> (name, struct code or None for string/array)
_VALUE_TYPES: dict[int, tuple[str, str | None]] = {
    0: ("UINT8", "B"),
    1: ("INT8", "b"),
    2: ("UINT16", "H"),
    3: ("INT16", "h"),
    4: ("UINT32", "I"),
    5: ("INT32", "i"),
    6: ("FLOAT32", "f"),
    7: ("BOOL", "?"),
    8: ("STRING", None),
    9: ("ARRAY", None),
    10: ("UINT64", "Q"),
    11: ("INT64", "q"),
    12: ("FLOAT64", "d"),
}


def sniff(head: bytes, size: int) -> bool:
    if len(head) < 8 or head[:4] != MAGIC:
        return False
    le, be = struct.unpack_from("<I", head, 4)[0], struct.unpack_from(">I", head, 4)[0]
    return le in (1, 2, 3) or be in (1, 2, 3)


class _Parser:
    def __init__(self, path: str, f: BinaryIO, size: int) -> None:
        self.path, self.size = path, size
        self.r = BoundedReader(path, f, size)
        self.bo = "<"
        self.len_fmt = "Q"

    def fail(self, where: str, problem: str, hint: str = "") -> FormatError:
        return FormatError(self.path, where, problem, hint=hint)

    def num(self, code: str, where: str) -> Any:
        return self.r.unpack(self.bo + code, where)[0]

    def string(self, where: str, limit: int | None = MAX_NAME, strict: bool = True) -> str | dict[str, Any]:
        start = self.r.pos
        n = self.num(self.len_fmt, f"{where} length (byte {start})")
        if n > self.r.remaining():
            raise self.fail(f"{where} length (byte {start})", f"claims a {n}-byte string but only {self.r.remaining()} bytes remain")
        if limit is not None and n > limit:
            if strict:
                raise self.fail(f"{where} (byte {start})", f"is {n} bytes long, above the {limit}-byte limit")
            self.r.skip(n, where)
            return {"type": "STRING", "length": n}
        data = self.r.read(n, where)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            if strict:
                raise self.fail(f"{where} (byte {start})", f"is not valid UTF-8: {e}") from None
            return data.decode("utf-8", "replace")

    def value(self, vtype: int, where: str, depth: int = 0) -> Any:
        info = _VALUE_TYPES.get(vtype)
        if info is None:
            raise self.fail(where, f"has unknown value type {vtype}")
        tname, code = info
        if code is not None:
            v = self.num(code, where)
            return v
        if tname == "STRING":
            return self.string(where, MAX_INLINE_STRING, strict=False)
        # ARRAY: item type, count, items
        if depth >= MAX_ARRAY_DEPTH:
            raise self.fail(where, f"nests arrays deeper than {MAX_ARRAY_DEPTH}")
        itype = self.num("I", f"{where} array item type")
        iinfo = _VALUE_TYPES.get(itype)
        if iinfo is None:
            raise self.fail(where, f"is an array of unknown value type {itype}")
        count_at = self.r.pos
        count = self.num(self.len_fmt, f"{where} array length")
        icode = iinfo[1]
        wsize = struct.calcsize(self.len_fmt)
        # smallest item: a number, a string length, or a nested array's item type + length
        min_item = struct.calcsize(icode) if icode is not None else wsize if iinfo[0] == "STRING" else 4 + wsize
        if count * min_item > self.r.remaining():
            raise self.fail(
                f"{where} array length (byte {count_at})",
                f"claims {count} {iinfo[0]} items (at least {count * min_item} bytes) but only {self.r.remaining()} bytes remain",
            )
        if icode is not None:
            self.r.skip(count * min_item, where)
        elif iinfo[0] == "STRING":
            self.r.skip_prefixed(count, self.bo + self.len_fmt, f"{where} string items")
        else:
            for i in range(count):
                self.value(itype, f"{where}[{i}]", depth + 1)
        return {"type": "ARRAY", "item_type": iinfo[0], "length": count}

    def parse(self) -> Layout:
        r = self.r
        if r.read(4, "magic") != MAGIC:
            raise self.fail("magic (bytes 0-4)", "is not b'GGUF'")
        (version,) = r.unpack("<I", "version (bytes 4-8)")
        if version not in (1, 2, 3):
            swapped = struct.unpack(">I", struct.pack("<I", version))[0]
            if swapped not in (1, 2, 3):
                raise self.fail("version (bytes 4-8)", f"is {version}; only GGUF versions 1, 2 and 3 are supported")
            self.bo, version = ">", swapped
        if version == 1:
            self.len_fmt = "I"
        wsize = struct.calcsize(self.len_fmt)
        tc_at = r.pos
        n_tensors = self.num(self.len_fmt, "tensor_count")
        kv_at = r.pos
        n_kv = self.num(self.len_fmt, "kv_count")
        # smallest tensor info: name length + n_dims + type + offset; smallest KV: key length + type + 1 byte.
        min_ti, min_kv = wsize + 4 + 4 + 8, wsize + 4 + 1
        if n_tensors * min_ti > r.remaining():
            raise self.fail(
                f"tensor_count (bytes {tc_at}-{tc_at + wsize})",
                f"claims {n_tensors} tensors but the {self.size}-byte file can hold at most {r.remaining() // min_ti} "
                "tensor infos after the header",
                hint="the file is truncated or corrupt",
            )
        if n_kv * min_kv + n_tensors * min_ti > r.remaining():
            raise self.fail(
                f"kv_count (bytes {kv_at}-{kv_at + wsize})",
                f"claims {n_kv} metadata entries but the {self.size}-byte file can hold at most {r.remaining() // min_kv} after the header",
                hint="the file is truncated or corrupt",
            )

        kv: dict[str, Any] = {}
        alignment = DEFAULT_ALIGNMENT
        for i in range(n_kv):
            key_at = r.pos
            key = self.string(f"metadata key {i} (byte {key_at})")
            assert isinstance(key, str)
            where = f"metadata {key!r}"
            if key in kv:
                raise self.fail(where, "appears twice")
            vtype = self.num("I", f"{where} value type")
            kv[key] = self.value(vtype, where)
            if key == "general.alignment":
                if vtype != 4:
                    raise self.fail(where, f"has value type {_VALUE_TYPES.get(vtype, ('?',))[0]}, expected UINT32")
                alignment = kv[key]
                if alignment == 0 or alignment & (alignment - 1):
                    raise self.fail(where, f"is {alignment}, not a power of two")

        infos: list[tuple[str, str, int, int, tuple[int, ...], int, int]] = []
        names: set[str] = set()
        for i in range(n_tensors):
            info_at = r.pos
            name = self.string(f"tensor info {i} name (byte {info_at})")
            assert isinstance(name, str)
            where = f"tensor {name!r}"
            if name in names:
                raise self.fail(where, "appears twice in the tensor infos")
            names.add(name)
            n_dims = self.num("I", f"{where} n_dims")
            if n_dims > MAX_DIMS:
                raise self.fail(where, f"has n_dims {n_dims}, above {MAX_DIMS}")
            dim_code = "I" if version == 1 else "Q"
            ne = tuple(self.num(dim_code, f"{where} dims") for _ in range(n_dims))
            if any(d >= 1 << 63 for d in ne):
                raise self.fail(where, f"has a negative dimension in {list(ne)}")
            ttype = self.num("I", f"{where} type")
            offset = self.num("Q", f"{where} offset")
            t = GGML_TYPES.get(ttype)
            if t is None:
                return raw.parse(
                    self.path,
                    self.r.f,
                    self.size,
                    note=f"GGUF tensor {name!r} has ggml type {ttype}, unknown to this version: stored opaque (content-defined chunks)",
                )
            tname, block, tsize = t
            if (ne[0] if ne else 1) % block:
                raise self.fail(where, f"{tname} row length {ne[0] if ne else 1} is not a multiple of the {block}-element block")
            n_elems = math.prod(ne)
            infos.append((name, tname, block, tsize, ne, offset, n_elems // block * tsize))

        data_start = -(-r.pos // alignment) * alignment
        regions: list[TensorRegion] = []
        for name, tname, _block, tsize, ne, offset, nbytes in infos:
            where = f"tensor {name!r}"
            if offset % alignment:
                raise self.fail(where, f"data offset {offset} is not a multiple of the alignment {alignment}")
            start = data_start + offset
            if start + nbytes > self.size:
                raise self.fail(
                    where,
                    f"{tname} {list(ne)} needs bytes [{start}, {start + nbytes}) but the file has {self.size}",
                    hint="the file is truncated or its tensor infos are corrupt",
                )
            dtype = tname
            if self.bo == ">" and tname in _PLAIN and tsize > 1:
                dtype = f"{tname}_BE"  # opaque: the codecs assume little-endian elements
            regions.append(TensorRegion(name, dtype, tuple(reversed(ne)), start, nbytes, tsize))
        regions.sort(key=lambda x: (x.offset, x.length))
        prev: TensorRegion | None = None
        for reg in regions:
            if prev is not None and reg.offset < prev.end:
                raise self.fail(
                    f"tensors {prev.name!r} and {reg.name!r}",
                    f"overlap in the data section ([{prev.offset}, {prev.end}) and [{reg.offset}, {reg.end}))",
                )
            prev = reg
        meta = {"gguf_version": version, "alignment": alignment, "byteorder": "big" if self.bo == ">" else "little", "kv": kv}
        return Layout(NAME, self.size, regions, metadata=meta)


def parse(path: str, f: BinaryIO, size: int) -> Layout:
    return _Parser(path, f, size).parse()
