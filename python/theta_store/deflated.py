"""Deflated ZIP members stored inflated (`.npz` files of ``np.savez_compressed``).

A deflated member's arrays can be chunked, deduplicated and delta-coded only as inflated bytes.
So such a file is stored as its *expanded* file: the same bytes with every deflated array member
inflated in place (headers, directory and stored members unchanged). Its manifest tiles the
expanded file like any other and records, under ``deflated``, the real file (size, BLAKE3) and
per member where it lies in both, its CRC-32 and the deflate parameters that rebuild it.

Rebuilding must give the same bytes on every machine, so the deflating is done by the core
with a zlib built from pinned source (rust/theta-core/src/reflate.rs), never by Python's zlib
(which may be another zlib, or zlib-ng, elsewhere). A file is expanded only when that zlib, with
parameters found at add (Python zipfile's: raw deflate, memLevel 8, default strategy, level 6,
else another level), reproduces *every* deflated array member byte-exactly; otherwise the file is
stored as it is (the members opaque, their arrays still listed and readable), with the reason in
the manifest's note. A restore deflates each member again and checks its CRC-32, its compressed
size and then the file's BLAKE3: a mismatch is an error, never a file with wrong bytes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import IO, TYPE_CHECKING, Any

from . import _native

if TYPE_CHECKING:
    from .formats.base import Layout

__all__ = ["MAX_EXPANSION", "Deflated", "Expanded", "Member", "expand", "rebuild", "temporary"]

# An expansion larger than this many times the file (or 64 MiB) is not made: what a member
# claims to inflate to is not trusted with the disk (a zip bomb keeps its members opaque).
MAX_EXPANSION = 64
_MIN_BUDGET = 64 << 20
_PARAM_KEYS = ("level", "wbits", "memlevel", "strategy")


@dataclass(frozen=True)
class Member:
    """A deflated member: its compressed bytes at `offset` (`packed` long) in the file, its
    inflated bytes at `inflated_offset` (`size` long) in the expanded file."""

    name: str
    offset: int
    packed: int
    inflated_offset: int
    size: int
    crc32: int
    params: tuple[int, int, int, int] = (6, -15, 8, 0)
    packed_blake3: bytes = b""  # of the compressed bytes: an add of the same bytes need not verify them again

    def native(self) -> tuple[int, int, int, int, int]:
        return (self.offset, self.packed, self.inflated_offset, self.size, self.crc32)

    def to_obj(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "offset": self.offset,
            "packed": self.packed,
            "inflated_offset": self.inflated_offset,
            "size": self.size,
            "crc32": self.crc32,
            "packed_blake3": self.packed_blake3,
        }
        d.update(zip(_PARAM_KEYS, self.params, strict=True))
        return d


@dataclass(frozen=True)
class Deflated:
    """What a manifest records of an expanded file: the real file, and its inflated members."""

    size: int
    blake3: bytes
    members: tuple[Member, ...]

    def to_obj(self) -> dict[str, Any]:
        return {"file": {"size": self.size, "blake3": self.blake3}, "members": [m.to_obj() for m in self.members]}

    @classmethod
    def from_obj(cls, obj: Any, expanded_size: int) -> Deflated:
        """Parse and check (members sorted, disjoint, consistent with both sizes); ValueError
        naming the field otherwise."""
        if not isinstance(obj, dict) or not isinstance(obj.get("file"), dict) or not isinstance(obj.get("members"), list):
            raise ValueError("deflated is not a map with 'file' and 'members'")
        size, blake3 = obj["file"].get("size"), obj["file"].get("blake3")
        if not _count(size) or not isinstance(blake3, bytes) or len(blake3) != 32:
            raise ValueError("deflated.file is not {size, 32-byte blake3}")
        members = []
        packed_end, grow = 0, 0
        for i, m in enumerate(obj["members"]):
            w = f"deflated.members[{i}]"
            if not isinstance(m, dict) or not isinstance(m.get("name"), str):
                raise ValueError(f"{w} is not a map with a name")
            nums: list[Any] = [m.get(k) for k in ("offset", "packed", "inflated_offset", "size", "crc32")]
            params: list[Any] = [m.get(k) for k in _PARAM_KEYS]
            if not all(_count(v) for v in nums) or nums[4] >= 1 << 32:
                raise ValueError(f"{w} has a missing or invalid offset, length or CRC-32")
            if not all(isinstance(p, int) and not isinstance(p, bool) and -64 <= p <= 64 for p in params):
                raise ValueError(f"{w} has missing or invalid deflate parameters")
            packed_id = m.get("packed_blake3")
            if not isinstance(packed_id, bytes) or len(packed_id) != 32:
                raise ValueError(f"{w}.packed_blake3 is not 32 bytes")
            offset, packed, inflated_offset, length, crc = nums
            if offset < packed_end or offset + packed > size or inflated_offset != offset + grow:
                raise ValueError(f"{w} overlaps another member, lies outside the file, or is misplaced in the expanded file")
            packed_end, grow = offset + packed, grow + length - packed
            members.append(
                Member(m["name"], offset, packed, inflated_offset, length, crc, (params[0], params[1], params[2], params[3]), packed_id)
            )
        if size + grow != expanded_size:
            raise ValueError(f"deflated members expand the {size}-byte file to {size + grow} bytes, not {expanded_size}")
        return cls(size, blake3, tuple(members))


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0 and v.bit_length() <= 64


class Expanded:
    """An expanded file, on disk without a name (it is gone once closed), and its layout."""

    def __init__(self, handle: IO[bytes], layout: Layout, deflated: Deflated) -> None:
        self.handle, self.layout, self.deflated = handle, layout, deflated

    @property
    def path(self) -> str:
        """A path the core can open (Linux's name for an open file)."""
        return f"/proc/self/fd/{self.handle.fileno()}"

    def close(self) -> None:
        self.handle.close()


def temporary(near: str) -> IO[bytes]:
    """A nameless temporary file in `near`'s folder (same file system), else in the temp folder."""
    import tempfile

    try:
        return tempfile.TemporaryFile(dir=os.path.dirname(os.path.abspath(near)) or ".")
    except OSError:
        return tempfile.TemporaryFile()


def _stat(path: str) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def expand(path: str, layout: Layout, known: Deflated | None = None) -> tuple[Expanded | None, Layout]:
    """The expanded file of `path` if its format has deflated members that the pinned zlib
    reproduces (all of them), else None; and the layout to store the file by when not (the
    same, its note saying why the members stay compressed). `known`: an earlier version's
    members (verified when it was added), whose compressed bytes need no verifying again."""
    from .errors import FileChanged
    from .formats import numpy

    candidates = numpy.deflated_members(path, layout)
    if not candidates:
        return None, layout
    size = layout.size
    grown = sum(e.size - e.compressed_size for e in candidates)
    if size + grown > max(MAX_EXPANSION * size, _MIN_BUDGET):
        return None, _kept(layout, f"deflated members would expand the file {(size + grown) / max(size, 1):.0f}x (a zip bomb?)")
    before = _stat(path)
    members, grow = [], 0
    for e in candidates:
        members.append(Member(e.name, e.data_offset, e.compressed_size, e.data_offset + grow, e.size, e.crc))
        grow += e.size - e.compressed_size
    handle = temporary(path)
    try:
        verified = [(m.packed_blake3, m.params) for m in known.members] if known is not None else []
        outcomes = _native.expand_file(path, f"/proc/self/fd/{handle.fileno()}", [m.native() for m in members], verified)
        kept = [f"{m.name}: {why}" for m, (params, why, _) in zip(members, outcomes, strict=True) if params is None]
        if kept:
            handle.close()
            return None, _kept(layout, "; ".join(kept))
        members = [replace(m, params=p, packed_blake3=h) for m, (p, _, h) in zip(members, outcomes, strict=True) if p is not None]
        file_id = _hash(path)
        if _stat(path) != before:
            raise FileChanged(f"{path}: changed while being added; nothing was stored, add it again")
        handle.flush()
        expanded = numpy.expanded_layout(path, layout, [(m.name, m.offset, m.packed, m.inflated_offset, m.size) for m in members], handle)
        expanded.check(path)
        return Expanded(handle, expanded, Deflated(size, file_id, tuple(members))), expanded
    except BaseException:
        handle.close()
        raise


def _kept(layout: Layout, why: str) -> Layout:
    notes = [n for n in layout.note.split("; ") if n and not n.startswith("deflated members")]
    return replace(layout, note="; ".join([*notes, f"deflated members kept compressed in the skeleton: {why}"]))


def _hash(path: str) -> bytes:
    h = _native.Hasher()
    with open(path, "rb") as f:
        while True:
            block = f.read(16 << 20)
            if not block:
                break
            h.update(block)
    return h.digest()


def rebuild(expanded_path: str, dest: str, deflated: Deflated, progress: Any = None) -> None:
    """Write the real file at `dest` from its expanded file: every member deflated back,
    checked (CRC-32, compressed size, then the file's BLAKE3), fsynced."""
    members = [(m.native(), m.params) for m in deflated.members]
    _native.reflate_file(expanded_path, dest, members, deflated.size, deflated.blake3, progress)
