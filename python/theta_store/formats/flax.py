"""Flax msgpack checkpoints (``flax.serialization.to_bytes`` / ``msgpack_serialize``).

The file is one msgpack object, normally nested maps of parameters. An array is msgpack ext type 1
(type 3 for a numpy scalar) whose payload is itself msgpack ``[shape, dtype name, raw bytes]``
with the bytes in C order. Each array's raw bytes are a region named by its key path joined with
"." (list positions are indices); everything else (map structure, keys, ext/bin headers, plain
values) is skeleton. Flax splits arrays above 1 GiB into ``{"__msgpack_chunked_array__": ..,
"chunks": {...}}`` maps; each chunk is then its own region (``name.chunks.0``, ...).

The msgpack structure is walked here, iteratively, with a bounded reader that tracks absolute
offsets (the ``msgpack`` package cannot report them): a claimed length or count is checked against
the bytes that remain before it is used, and payloads that are not keys are skipped, never read.

dtype names (float32, bfloat16, int8, bool, float8_e4m3fn, ...) map to the codec names (F32, BF16,
I8, BOOL, F8_E4M3, ...); others (complex64, int4, float8 variants, ...) keep the numpy name as an
opaque dtype with ``align`` = their item size.
"""

from __future__ import annotations

import io
import math
from typing import Any, BinaryIO

from ..errors import FormatError
from ._zip import BoundedReader
from .base import Layout, TensorRegion

NAME = "flax"
EXTENSIONS = (".msgpack",)
MAX_KEY = 1 << 16
MAX_DIMS = 64
MAX_DEPTH = 1_000
ARRAY_EXT_TYPES = (1, 3)  # ndarray, numpy scalar

DTYPES: dict[str, tuple[str, int]] = {
    "float32": ("F32", 4),
    "float16": ("F16", 2),
    "bfloat16": ("BF16", 2),
    "float64": ("F64", 8),
    "int8": ("I8", 1),
    "int16": ("I16", 2),
    "int32": ("I32", 4),
    "int64": ("I64", 8),
    "uint8": ("U8", 1),
    "uint16": ("U16", 2),
    "uint32": ("U32", 4),
    "uint64": ("U64", 8),
    "bool": ("BOOL", 1),
    "float8_e4m3fn": ("F8_E4M3", 1),
    "float8_e5m2": ("F8_E5M2", 1),
}
OPAQUE_SIZES: dict[str, int] = {
    "complex64": 8,
    "complex128": 16,
    "float8_e4m3fnuz": 1,
    "float8_e5m2fnuz": 1,
    "float8_e4m3b11fnuz": 1,
    "float8_e4m3": 1,
    "float8_e3m4": 1,
    "float8_e8m0fnu": 1,
    "float4_e2m1fn": 1,
    "float6_e2m3fn": 1,
    "float6_e3m2fn": 1,
    "int4": 1,
    "uint4": 1,
    "int2": 1,
    "uint2": 1,
}

# msgpack first byte -> (kind, size of the length/value field) for the non-fix formats.
_FORMATS: dict[int, tuple[str, int]] = {
    0xC0: ("nil", 0),
    0xC2: ("false", 0),
    0xC3: ("true", 0),
    0xC4: ("bin", 1),
    0xC5: ("bin", 2),
    0xC6: ("bin", 4),
    0xC7: ("ext", 1),
    0xC8: ("ext", 2),
    0xC9: ("ext", 4),
    0xCA: ("float", 4),
    0xCB: ("float", 8),
    0xCC: ("uint", 1),
    0xCD: ("uint", 2),
    0xCE: ("uint", 4),
    0xCF: ("uint", 8),
    0xD0: ("int", 1),
    0xD1: ("int", 2),
    0xD2: ("int", 4),
    0xD3: ("int", 8),
    0xD4: ("fixext", 1),
    0xD5: ("fixext", 2),
    0xD6: ("fixext", 4),
    0xD7: ("fixext", 8),
    0xD8: ("fixext", 16),
    0xD9: ("str", 1),
    0xDA: ("str", 2),
    0xDB: ("str", 4),
    0xDC: ("array", 2),
    0xDD: ("array", 4),
    0xDE: ("map", 2),
    0xDF: ("map", 4),
}
_UINT = {1: ">B", 2: ">H", 4: ">I", 8: ">Q"}
_SINT = {1: ">b", 2: ">h", 4: ">i", 8: ">q"}


class _Item:
    """One msgpack header: kind, and either a scalar value, a length (str/bin/ext) or a count (array/map)."""

    __slots__ = ("at", "ext_type", "kind", "n", "value")

    def __init__(self, kind: str, at: int, value: Any = None, n: int = 0, ext_type: int = 0) -> None:
        self.kind, self.at, self.value, self.n, self.ext_type = kind, at, value, n, ext_type


def _header(r: BoundedReader, where: str) -> _Item:
    at = r.pos
    (b,) = r.read(1, where)
    if b <= 0x7F:
        return _Item("uint", at, value=b)
    if b >= 0xE0:
        return _Item("int", at, value=b - 0x100)
    if 0x80 <= b <= 0x8F:
        return _Item("map", at, n=b & 0x0F)
    if 0x90 <= b <= 0x9F:
        return _Item("array", at, n=b & 0x0F)
    if 0xA0 <= b <= 0xBF:
        return _Item("str", at, n=b & 0x1F)
    fmt = _FORMATS.get(b)
    if fmt is None:
        raise FormatError(r.path, f"{where} (byte {at})", f"0x{b:02x} is not a valid msgpack type byte")
    kind, w = fmt
    if kind in ("nil", "false", "true"):
        return _Item(kind, at, value={"nil": None, "false": False, "true": True}[kind])
    if kind == "fixext":
        (t,) = r.unpack(">b", where)
        return _Item("ext", at, n=w, ext_type=t)
    if kind == "float":
        return _Item(kind, at, value=r.unpack(">f" if w == 4 else ">d", where)[0])
    if kind == "int":
        return _Item(kind, at, value=r.unpack(_SINT[w], where)[0])
    n = r.unpack(_UINT[w], where)[0]
    if kind == "uint":
        return _Item(kind, at, value=n)
    if kind == "ext":
        (t,) = r.unpack(">b", where)
        return _Item(kind, at, n=n, ext_type=t)
    return _Item(kind, at, n=n)


class _Frame:
    """An open map or array. ``skip``: inside a map key (arrays there are not regions); ``is_key``: it is a key."""

    __slots__ = ("index", "is_key", "is_map", "key", "left", "path", "skip", "want_key")

    def __init__(self, is_map: bool, n: int, path: list[str], skip: bool, is_key: bool) -> None:
        self.is_map, self.path, self.skip, self.is_key = is_map, path, skip, is_key
        self.left = 2 * n if is_map else n
        self.key: str = ""
        self.want_key = is_map
        self.index = 0


class _Walker:
    def __init__(self, path: str, f: BinaryIO, size: int) -> None:
        self.path, self.size = path, size
        self.r = BoundedReader(path, f, size)
        self.regions: list[TensorRegion] = []
        self.names: set[str] = set()
        self.arrays_seen = 0

    def fail(self, where: str, problem: str) -> FormatError:
        return FormatError(self.path, where, problem)

    def walk(self, sniffing: bool = False) -> None:
        """Walk the whole object. ``sniffing``: stop at the first ndarray ext header, tolerate a cut payload."""
        r = self.r
        stack: list[_Frame] = []
        root = True
        while root or stack:
            frame = stack[-1] if stack else None
            if frame is not None and frame.left == 0:
                stack.pop()
                if not frame.is_key:
                    self._after_value(stack)
                continue
            is_key = frame is not None and frame.want_key
            skip = is_key or (frame is not None and frame.skip)
            where = f"msgpack item at byte {r.pos}"
            it = _header(r, where)
            root = False
            if frame is not None:
                frame.left -= 1
                if is_key:
                    frame.want_key = False
                    frame.key = f"<key@{it.at}>"  # replaced below for scalar keys
            if it.kind in ("map", "array"):
                need = it.n * (2 if it.kind == "map" else 1)
                if need > r.remaining():
                    problem = f"claims {it.n} {it.kind} items but only {r.remaining()} bytes remain"
                    raise self.fail(self._where(frame, is_key, it.at), problem)
                if len(stack) >= MAX_DEPTH:
                    raise self.fail(self._where(frame, is_key, it.at), f"nests deeper than {MAX_DEPTH} levels")
                child_path = [] if frame is None or is_key else self._child_path(frame)
                stack.append(_Frame(it.kind == "map", it.n, child_path, skip, is_key))
                continue
            if it.kind == "ext" and it.ext_type in ARRAY_EXT_TYPES and not skip and sniffing:
                # a plausible ndarray payload starts with a 3-array whose first item (the shape) is an array
                lead = r.read(min(2, it.n, r.remaining()), where)
                if lead[:1] in (b"", b"\x93") and (len(lead) < 2 or 0x90 <= lead[1] <= 0x9F or lead[1] in (0xDC, 0xDD)):
                    self.arrays_seen += 1
                return
            if it.kind in ("str", "bin", "ext") and it.n > r.remaining():
                problem = f"{it.kind} of {it.n} bytes runs past the end ({r.remaining()} bytes remain)"
                raise self.fail(self._where(frame, is_key, it.at), problem)
            if is_key and frame is not None:
                if it.kind in ("str", "bin"):
                    if it.n > MAX_KEY:
                        raise self.fail(self._where(frame, is_key, it.at), f"map key of {it.n} bytes is above the {MAX_KEY}-byte limit")
                    data = r.read(it.n, where)
                    frame.key = data.decode("utf-8", "replace") if it.kind == "str" else data.hex()
                elif it.kind == "ext":
                    r.skip(it.n, where)
                else:
                    frame.key = str(it.value)
                continue
            if it.kind == "ext" and it.ext_type in ARRAY_EXT_TYPES and not skip:
                name = ".".join(self._child_path(frame)) if frame is not None else ""
                self._array(name, r.pos, r.pos + it.n)
                self.arrays_seen += 1
            if it.kind in ("str", "bin", "ext"):
                r.skip(it.n, where)
            self._after_value(stack)
        if r.pos != self.size:
            raise self.fail(f"byte {r.pos}", f"{self.size - r.pos} bytes follow the msgpack object")

    @staticmethod
    def _after_value(stack: list[_Frame]) -> None:
        if stack:
            fr = stack[-1]
            if fr.is_map:
                fr.want_key = True
            else:
                fr.index += 1

    @staticmethod
    def _child_path(frame: _Frame) -> list[str]:
        return [*frame.path, frame.key if frame.is_map else str(frame.index)]

    def _where(self, frame: _Frame | None, is_key: bool, at: int) -> str:
        if frame is None:
            return f"msgpack root (byte {at})"
        base = ".".join(frame.path)
        if is_key:
            return f"map key in {base!r} (byte {at})" if base else f"map key (byte {at})"
        return f"value {'.'.join(self._child_path(frame))!r} (byte {at})"

    def _array(self, name: str, start: int, end: int) -> None:
        """Parse an ndarray ext payload [shape, dtype, bytes] in [start, end) and add its region."""
        where = f"array {name!r}"
        r = BoundedReader(self.path, self.r.f, end, start)
        top = _header(r, where)
        if top.kind != "array" or top.n != 3:
            raise self.fail(f"{where} (byte {top.at})", "payload is not a msgpack [shape, dtype, data] triple")
        sh = _header(r, f"{where} shape")
        if sh.kind != "array" or sh.n > MAX_DIMS:
            raise self.fail(f"{where} (byte {sh.at})", f"shape is not an array of at most {MAX_DIMS} integers")
        shape: list[int] = []
        for _ in range(sh.n):
            d = _header(r, f"{where} shape")
            if d.kind not in ("uint", "int") or d.value < 0:
                raise self.fail(f"{where} (byte {d.at})", f"shape entry is not a non-negative integer ({d.kind} {d.value!r})")
            shape.append(d.value)
        dt = _header(r, f"{where} dtype")
        if dt.kind not in ("str", "bin") or dt.n > 64:
            raise self.fail(f"{where} (byte {dt.at})", "dtype is not a short string")
        dname = r.read(dt.n, f"{where} dtype").decode("utf-8", "replace")
        data = _header(r, f"{where} data")
        if data.kind not in ("bin", "str"):
            raise self.fail(f"{where} (byte {data.at})", f"data is a msgpack {data.kind}, not bin")
        if r.pos + data.n != end:
            raise self.fail(f"{where} (byte {data.at})", f"data of {data.n} bytes does not end the {end - start}-byte ext payload")
        known = DTYPES.get(dname)
        if known is not None:
            dtype, itemsize = known
        else:
            dtype, itemsize = dname, OPAQUE_SIZES.get(dname, 0)
        if itemsize and math.prod(shape) * itemsize != data.n:
            raise self.fail(where, f"{dname} shape {shape} needs {math.prod(shape) * itemsize} bytes but holds {data.n}")
        if name in self.names:
            raise self.fail(where, "appears twice (two arrays with the same key path)")
        self.names.add(name)
        self.regions.append(TensorRegion(name, dtype, tuple(shape), r.pos, data.n, max(itemsize, 1)))


def sniff(head: bytes, size: int) -> bool:
    """A msgpack map at the top whose first bytes reach an ndarray ext (type 1) payload."""
    if not head or not (0x80 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF)):
        return False
    w = _Walker("<head>", io.BytesIO(head), len(head))
    try:
        w.walk(sniffing=True)
    except FormatError:
        return False
    return w.arrays_seen > 0


def parse(path: str, f: BinaryIO, size: int) -> Layout:
    w = _Walker(path, f, size)
    w.walk()
    w.regions.sort(key=lambda r: (r.offset, r.length))
    return Layout(NAME, size, w.regions, metadata={"arrays": len(w.regions)})
