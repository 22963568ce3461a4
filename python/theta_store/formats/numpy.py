"""NumPy ``.npy`` arrays and ``.npz`` archives (``np.save``, ``np.savez``, ``np.savez_compressed``).

``.npy``: the magic ``\\x93NUMPY``, a version, a header length, then a Python-literal dict
``{'descr': ..., 'fortran_order': ..., 'shape': ...}`` parsed here by a small literal reader of
our own (no ``eval``, no ``ast``, no pickle), then the raw array bytes: one region.

``.npz``: a ZIP archive of ``NAME.npy`` members. A stored member's array bytes are a region named
``NAME`` at their absolute offset in the file. A deflated member's header is read by inflating
only its first bytes, so ``metadata["arrays"]`` lists every array, stored or deflated; the file's
regions are those of stored members. When the pinned zlib reproduces the deflated members, the
file is stored as its expanded file instead (theta_store.deflated), whose layout
(`expanded_layout`) has a region for every array.

dtypes: little-endian (or byte-order-free) ``b1 i1 i2 i4 i8 u1 u2 u4 u8 f2 f4 f8`` map to
BOOL/I8/.../F64. Big-endian, complex, datetime, string and void arrays keep a region whose dtype is
the numpy ``descr`` string (opaque bytes, align = item size). Object arrays (pickles) and structured
dtypes have no region: a ``.npy`` of them is stored raw (documented fallback), an ``.npz`` member of
them stays in the skeleton.

Region shapes are the logical numpy shape; ``fortran_order`` (column-major bytes) is recorded per
array in ``metadata["arrays"]``. The region of a bare ``.npy`` is named ``""``.
"""

from __future__ import annotations

import math
import re
import struct
import sys
from collections.abc import Callable
from typing import IO, Any, BinaryIO, ClassVar

from ..errors import FormatError
from . import _zip, raw
from .base import Layout, TensorRegion

NAME = "numpy"
EXTENSIONS = (".npy", ".npz")
MAGIC = b"\x93NUMPY"
MAX_HEADER = 1 << 20
MAX_DIMS = 64

_KINDS: dict[tuple[str, int], str] = {
    ("b", 1): "BOOL",
    ("i", 1): "I8",
    ("i", 2): "I16",
    ("i", 4): "I32",
    ("i", 8): "I64",
    ("u", 1): "U8",
    ("u", 2): "U16",
    ("u", 4): "U32",
    ("u", 8): "U64",
    ("f", 2): "F16",
    ("f", 4): "F32",
    ("f", 8): "F64",
}
_DESCR = re.compile(r"([<>|=]?)([a-zA-Z])(\d*)(\[[A-Za-z0-9/]*\])?")


class _Unsupported(Exception):
    """A valid array this adapter keeps opaque (object or structured dtype)."""


class _Header:
    __slots__ = ("data_start", "descr", "dtype", "fortran", "itemsize", "shape", "version")

    def __init__(
        self,
        version: tuple[int, int],
        descr: str,
        dtype: str,
        itemsize: int,
        fortran: bool,
        shape: tuple[int, ...],
        data_start: int,
    ) -> None:
        self.version, self.descr, self.dtype, self.itemsize = version, descr, dtype, itemsize
        self.fortran, self.shape, self.data_start = fortran, shape, data_start

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize

    def describe(self, name: str) -> dict[str, Any]:
        return {"name": name, "descr": self.descr, "dtype": self.dtype, "shape": list(self.shape), "fortran_order": self.fortran}


def sniff(head: bytes, size: int) -> bool:
    if head.startswith(MAGIC):
        return True
    name = _zip.first_local_name(head)
    return name is not None and name.endswith(".npy")


def parse(path: str, f: BinaryIO, size: int) -> Layout:
    f.seek(0)
    head = f.read(8)
    if head.startswith(MAGIC):
        return _parse_npy(path, f, size)
    if head[:4] in (_zip.LOCAL_SIG, _zip.EOCD_SIG):
        return _parse_npz(path, f, size)
    raise FormatError(path, "header", "is neither an .npy array (\\x93NUMPY magic) nor an .npz ZIP archive")


def _parse_npy(path: str, f: BinaryIO, size: int) -> Layout:
    def get(n: int) -> bytes:
        f.seek(0)
        return f.read(min(n, size))

    try:
        h = _read_header(path, "npy header", get, size)
    except _Unsupported as e:
        return raw.parse(path, f, size, note=f"numpy array with {e}: stored opaque (content-defined chunks)")
    end = h.data_start + h.nbytes
    if end > size:
        raise FormatError(
            path,
            "array data",
            f"{h.descr} shape {list(h.shape)} needs {h.nbytes} bytes from offset {h.data_start} but the file has {size - h.data_start}",
            hint="the file is truncated",
        )
    info = h.describe("") | {"member": None, "compressed": False, "data_offset": h.data_start}
    region = TensorRegion("", h.dtype, h.shape, h.data_start, h.nbytes, h.itemsize)
    return Layout(NAME, size, [region], metadata={"container": "npy", "version": list(h.version), "arrays": [info]})


def _parse_npz(path: str, f: BinaryIO, size: int) -> Layout:
    entries = _zip.read_directory(path, f, size)
    regions: list[TensorRegion] = []
    arrays: list[dict[str, Any]] = []
    notes: list[str] = []
    for e in entries:
        if not e.name.endswith(".npy"):
            continue
        name = e.name[:-4]
        where = f"member {e.name!r} header"
        if e.encrypted or e.method not in (_zip.STORED, _zip.DEFLATED):
            notes.append(f"{e.name}: encrypted or unsupported compression, kept in the skeleton")
            continue

        def get(n: int, e: _zip.ZipEntry = e) -> bytes:
            return _zip.read_member_prefix(path, f, e, n)

        try:
            h = _read_header(path, where, get, e.size)
        except _Unsupported as exc:
            notes.append(f"{e.name}: {exc}, kept in the skeleton")
            continue
        if h.data_start + h.nbytes > e.size:
            raise FormatError(
                path,
                f"member {e.name!r}",
                f"{h.descr} shape {list(h.shape)} needs {h.nbytes} bytes but the member holds {e.size - h.data_start}",
            )
        info = h.describe(name) | {"member": e.name, "compressed": not e.stored}
        if e.stored:
            offset = e.data_offset + h.data_start
            info["data_offset"] = offset
            regions.append(TensorRegion(name, h.dtype, h.shape, offset, h.nbytes, h.itemsize))
        arrays.append(info)
    regions.sort(key=lambda r: (r.offset, r.length))
    if any(a["compressed"] for a in arrays):
        notes.append("deflated members kept compressed in the skeleton")
    return Layout(NAME, size, regions, metadata={"container": "npz", "arrays": arrays}, note="; ".join(notes))


def deflated_members(path: str, layout: Layout) -> list[_zip.ZipEntry]:
    """The deflated members of an .npz whose arrays `layout` lists, in file order."""
    arrays = layout.metadata.get("arrays") if layout.format == NAME and layout.metadata.get("container") == "npz" else None
    wanted = {a["member"] for a in arrays or [] if a.get("compressed")}
    if not wanted:
        return []
    with open(path, "rb") as f:
        entries = _zip.read_directory(path, f, layout.size)
    found = [e for e in entries if e.name in wanted and e.method == _zip.DEFLATED and not e.encrypted]
    return sorted(found, key=lambda e: e.data_offset)


def expanded_layout(path: str, layout: Layout, members: list[tuple[str, int, int, int, int]], f: IO[bytes]) -> Layout:
    """The layout of the expanded file `f` of the .npz that `layout` describes: its `members`
    ((name, offset, compressed length, offset in `f`, inflated length), in file order) inflated
    in place, each array a region."""
    regions: list[TensorRegion] = []
    growth: list[tuple[int, int]] = []  # (file offset, what the members before it grew)
    grown = 0
    for name, packed_offset, packed_len, offset, length in members:

        def get(n: int, offset: int = offset, length: int = length) -> bytes:
            f.seek(offset)
            return f.read(min(n, length))

        h = _read_header(path, f"member {name!r} header", get, length)
        if h.data_start + h.nbytes > length:
            raise FormatError(
                path,
                f"member {name!r}",
                f"{h.descr} shape {list(h.shape)} needs {h.nbytes} bytes but the member holds {length - h.data_start}",
            )
        regions.append(TensorRegion(name[:-4], h.dtype, h.shape, offset + h.data_start, h.nbytes, h.itemsize))
        grown += length - packed_len
        growth.append((packed_offset, grown))
    for r in layout.regions:
        shift = 0
        for at, g in growth:  # a member can shrink when inflated (stored blocks): take the last before
            if at < r.offset:
                shift = g
        regions.append(TensorRegion(r.name, r.dtype, r.shape, r.offset + shift, r.length, r.align))
    regions.sort(key=lambda r: (r.offset, r.length))
    note = "deflated members are stored inflated (deflated again on restore by the pinned zlib, checked)"
    kept = [n for n in layout.note.split("; ") if n and not n.startswith("deflated members")]
    return Layout(NAME, layout.size + grown, regions, metadata=layout.metadata, note="; ".join([*kept, note]))


def _read_header(path: str, where: str, get: Callable[[int], bytes], avail: int) -> _Header:
    pre = get(12)
    if len(pre) < 10 or pre[:6] != MAGIC:
        raise FormatError(path, where, "does not start with the \\x93NUMPY magic and version")
    version = (pre[6], pre[7])
    if version == (1, 0):
        (hlen,) = struct.unpack_from("<H", pre, 8)
        start = 10
    elif version in ((2, 0), (3, 0)):
        if len(pre) < 12:
            raise FormatError(path, where, "is truncated inside the header length")
        (hlen,) = struct.unpack_from("<I", pre, 8)
        start = 12
    else:
        raise FormatError(path, where, f"format version {version[0]}.{version[1]} is not 1.0, 2.0 or 3.0")
    if hlen > MAX_HEADER:
        raise FormatError(path, where, f"header length {hlen} is above the {MAX_HEADER}-byte limit")
    if start + hlen > avail:
        raise FormatError(
            path,
            where,
            f"header of {hlen} bytes runs past the end ({avail - start} bytes available)",
            hint="the file is truncated",
        )
    blob = get(start + hlen)[start:]
    if len(blob) < hlen:
        raise FormatError(path, where, f"header of {hlen} bytes is truncated to {len(blob)}")
    try:
        text = blob.decode("utf-8" if version == (3, 0) else "latin-1")
    except UnicodeDecodeError as e:
        raise FormatError(path, where, f"is not valid UTF-8: {e}") from None
    d = _Literal(path, where, text).parse()
    if not isinstance(d, dict) or set(d) != {"descr", "fortran_order", "shape"}:
        raise FormatError(path, where, "is not a dict with exactly the keys 'descr', 'fortran_order' and 'shape'")
    descr, fortran, shape = d["descr"], d["fortran_order"], d["shape"]
    if not isinstance(fortran, bool):
        raise FormatError(path, where, f"fortran_order is {fortran!r}, not a bool")
    dims_ok = isinstance(shape, tuple) and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
    if not dims_ok or len(shape) > MAX_DIMS:
        raise FormatError(path, where, f"shape {shape!r} is not a tuple of at most {MAX_DIMS} non-negative integers")
    if isinstance(descr, list):
        raise _Unsupported("a structured dtype")
    if not isinstance(descr, str):
        raise FormatError(path, where, f"descr {descr!r} is not a dtype string")
    dtype, itemsize = _dtype(path, where, descr)
    return _Header(version, descr, dtype, itemsize, fortran, shape, start + hlen)


def _dtype(path: str, where: str, descr: str) -> tuple[str, int]:
    """(dtype name, item size) of a numpy type string such as '<f4', '|b1', '>i8', '<U10', '<M8[ns]'."""
    m = _DESCR.fullmatch(descr)
    if m is None:
        raise FormatError(path, where, f"descr {descr!r} is not a numpy type string")
    order, kind, digits, unit = m.groups()
    if kind == "O":
        raise _Unsupported("an object dtype (pickled Python objects)")
    if unit and kind not in "Mm":
        raise FormatError(path, where, f"descr {descr!r} has a unit but is not a datetime type")
    if not digits:
        raise FormatError(path, where, f"descr {descr!r} has no item size")
    if len(digits) > 10:
        raise FormatError(path, where, f"descr {descr!r} has an absurd item size")
    n = int(digits)
    itemsize = n * 4 if kind == "U" else n
    if itemsize <= 0 or itemsize > 1 << 30:
        raise FormatError(path, where, f"descr {descr!r} has item size {itemsize}")
    if order in ("=", ""):  # native: the reader's byte order, as numpy itself interprets it
        order = "<" if sys.byteorder == "little" else ">"
    little = order in ("<", "|") or itemsize == 1
    canonical = _KINDS.get((kind, itemsize))
    if canonical is not None and little:
        return canonical, itemsize
    return descr, itemsize


class _Literal:
    """A reader of the Python literals an .npy header uses: dict, tuple, list, str, int, True/False/None."""

    _TOKEN = re.compile(
        r"""\s*(?:(?P<punct>[{}()\[\],:])|(?P<str>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")|(?P<int>[-+]?\d+)L?|(?P<name>True|False|None))"""
    )
    _ESCAPES: ClassVar[dict[str, str]] = {"\\": "\\", "'": "'", '"': '"', "n": "\n", "t": "\t", "r": "\r", "0": "\0"}
    MAX_DEPTH = 32

    def __init__(self, path: str, where: str, text: str) -> None:
        self.path, self.where, self.text = path, where, text
        self.tokens: list[tuple[str, str]] = []
        pos = 0
        stripped = text.rstrip()
        while pos < len(stripped):
            m = self._TOKEN.match(stripped, pos)
            if m is None or m.end() == pos:
                raise self.fail(f"unexpected text {stripped[pos : pos + 20]!r} at character {pos}")
            kind = m.lastgroup or ""
            self.tokens.append((kind, m.group(kind)))
            pos = m.end()
        self.i = 0

    def fail(self, problem: str) -> FormatError:
        return FormatError(self.path, self.where, f"is not a valid header literal: {problem}")

    def next(self) -> tuple[str, str]:
        if self.i >= len(self.tokens):
            raise self.fail("ends early")
        t = self.tokens[self.i]
        self.i += 1
        return t

    def parse(self) -> Any:
        v = self.value(0)
        if self.i != len(self.tokens):
            raise self.fail("has text after the value")
        return v

    def value(self, depth: int) -> Any:
        if depth > self.MAX_DEPTH:
            raise self.fail(f"nests deeper than {self.MAX_DEPTH}")
        kind, tok = self.next()
        if kind == "str":
            return self._string(tok)
        if kind == "int":
            if len(tok) > 40:
                raise self.fail("integer is too long")
            return int(tok)
        if kind == "name":
            return {"True": True, "False": False, "None": None}[tok]
        if tok == "{":
            d: dict[Any, Any] = {}
            while True:
                if self._peek("}"):
                    return d
                k = self.value(depth + 1)
                if not isinstance(k, (str, int)) or isinstance(k, bool):
                    raise self.fail("dict key is not a string or integer")
                if self.next()[1] != ":":
                    raise self.fail("expected ':' in dict")
                d[k] = self.value(depth + 1)
                if not self._sep("}"):
                    return d
        if tok in "([":
            close = ")" if tok == "(" else "]"
            items: list[Any] = []
            trailing_comma = False
            while True:
                if self._peek(close):
                    break
                items.append(self.value(depth + 1))
                trailing_comma = self._sep(close)
                if not trailing_comma:
                    break
            if tok == "[":
                return items
            if len(items) == 1 and not trailing_comma:
                return items[0]  # "(x)" is x, as in Python
            return tuple(items)
        raise self.fail(f"unexpected {tok!r}")

    def _peek(self, close: str) -> bool:
        if self.i < len(self.tokens) and self.tokens[self.i][1] == close:
            self.i += 1
            return True
        return False

    def _sep(self, close: str) -> bool:
        """After an item: ',' -> True (more may follow), the closer -> False."""
        tok = self.next()[1]
        if tok == ",":
            return True
        if tok == close:
            return False
        raise self.fail(f"expected ',' or {close!r}, found {tok!r}")

    def _string(self, tok: str) -> str:
        body = tok[1:-1]
        if "\\" not in body:
            return body
        out: list[str] = []
        i = 0
        while i < len(body):
            c = body[i]
            if c == "\\":
                esc = body[i + 1] if i + 1 < len(body) else ""
                if esc not in self._ESCAPES:
                    raise self.fail(f"unsupported escape \\{esc} in a string")
                out.append(self._ESCAPES[esc])
                i += 2
            else:
                out.append(c)
                i += 1
        return "".join(out)
