"""Manifests: the documented, versioned, deterministic list of what a checkpoint is made of.
(Pointers, the other format, are in pointer.py.)

A *manifest* (msgpack, maps with sorted keys, no timestamps) lists the spans that tile a file in
order: skeleton spans (opaque bytes) and tensor spans (name, dtype, shape), each with its chunks
as ``[chunk_id, length]``. Its id is the BLAKE3 of its bytes. An ``.npz`` stored as its expanded
file (theta_store.deflated) has spans that tile the expanded file, and ``deflated`` records the real
file and how to deflate its members back (manifest version 2).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack

from .deflated import Deflated
from .errors import CorruptObject
from .pointer import POINTER_MAX, POINTER_VERSION, Pointer, looks_like_pointer

MANIFEST_TYPE = "theta-store/manifest"
MANIFEST_VERSION = 1
# The version of a manifest that tiles an expanded file (deflated members inflated, `deflated`):
# a build that does not know it refuses it rather than restore the expanded bytes.
MANIFEST_VERSION_DEFLATED = 2
__all__ = ["POINTER_MAX", "POINTER_VERSION", "Manifest", "Pointer", "SpanEntry", "looks_like_pointer"]


@dataclass(frozen=True)
class SpanEntry:
    """One span of a manifest. ``kind`` is "tensor" or "skeleton"."""

    kind: str
    offset: int
    length: int
    chunks: tuple[tuple[bytes, int], ...]
    name: str = ""
    dtype: str = "BYTES"
    shape: tuple[int, ...] = ()

    def to_obj(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "kind": self.kind,
            "offset": self.offset,
            "length": self.length,
            "chunks": [[cid, n] for cid, n in self.chunks],
        }
        if self.kind == "tensor":
            d.update(name=self.name, dtype=self.dtype, shape=list(self.shape))
        return d


@dataclass
class Manifest:
    format: str
    size: int
    blake3: bytes
    chunk_bytes: int
    spans: list[SpanEntry]
    metadata: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    # Tensors stored as approximations (`add --lossy`): name -> {"method", "rank", "rel_err"}.
    lossy: dict[str, dict[str, Any]] = field(default_factory=dict)
    # When the spans tile the expanded file of the real one (theta_store.deflated): its members.
    deflated: Deflated | None = None

    @property
    def file_size(self) -> int:
        """The size of the file as the user has it (`size` is what the spans tile)."""
        return self.deflated.size if self.deflated is not None else self.size

    @property
    def file_blake3(self) -> bytes:
        return self.deflated.blake3 if self.deflated is not None else self.blake3

    @property
    def tensors(self) -> list[SpanEntry]:
        return [s for s in self.spans if s.kind == "tensor"]

    def chunk_ids(self) -> set[bytes]:
        return {cid for s in self.spans for cid, _ in s.chunks}

    def to_bytes(self) -> bytes:
        obj = {
            "type": MANIFEST_TYPE,
            "version": MANIFEST_VERSION if self.deflated is None else MANIFEST_VERSION_DEFLATED,
            "format": self.format,
            "file": {"size": self.size, "blake3": self.blake3},
            "chunk_bytes": self.chunk_bytes,
            "spans": [s.to_obj() for s in self.spans],
            "metadata": self.metadata,
            "note": self.note,
        }
        if self.deflated is not None:
            obj["deflated"] = self.deflated.to_obj()
        if self.lossy:  # absent when empty: a lossless manifest keeps the bytes (and id) it always had
            obj["lossy"] = self.lossy
        return bytes(msgpack.packb(_sorted(obj), use_bin_type=True))

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "manifest") -> Manifest:
        """Parse and check a manifest: every field has its type, and the spans tile the file in
        order (no gap, no overlap, no negative length), so a damaged or hostile manifest is a
        CorruptObject naming the field, never a wrong restore."""
        try:
            obj = msgpack.unpackb(data, raw=False, strict_map_key=False)
        except (ValueError, TypeError, msgpack.UnpackException) as e:  # a map as a key: TypeError
            raise CorruptObject(f"{where}: cannot read manifest: {unpack_problem(e)}") from None
        try:
            return cls._from_obj(obj)
        except _Bad as e:
            raise CorruptObject(f"{where}: cannot read manifest: {e}") from None

    @classmethod
    def _from_obj(cls, obj: Any) -> Manifest:
        if not isinstance(obj, dict) or obj.get("type") != MANIFEST_TYPE:
            raise _Bad("not a theta-store manifest")
        version = obj.get("version")
        if version not in (MANIFEST_VERSION, MANIFEST_VERSION_DEFLATED) or isinstance(version, bool):
            raise _Bad(
                f"manifest version {version!r} is not supported (this build reads {MANIFEST_VERSION} and {MANIFEST_VERSION_DEFLATED})"
            )
        if (version == MANIFEST_VERSION_DEFLATED) != ("deflated" in obj):
            raise _Bad(f"manifest version {version} {'lacks' if version == MANIFEST_VERSION_DEFLATED else 'has'} a 'deflated' map")
        f = _field(obj, "file", dict, "file")
        size = _count(f.get("size"), "file.size")
        blake3 = _field(f, "blake3", bytes, "file.blake3")
        if len(blake3) != 32:
            raise _Bad("file.blake3 is not 32 bytes")
        spans = []
        pos = 0
        for i, s in enumerate(_field(obj, "spans", list, "spans")):
            w = f"spans[{i}]"
            if not isinstance(s, dict):
                raise _Bad(f"{w} is not a map")
            kind = s.get("kind")
            if kind not in ("tensor", "skeleton"):
                raise _Bad(f"{w}.kind {kind!r} is not 'tensor' or 'skeleton'")
            chunks = []
            for j, c in enumerate(_field(s, "chunks", list, f"{w}.chunks")):
                if not (isinstance(c, list) and len(c) == 2 and isinstance(c[0], bytes) and len(c[0]) == 32):
                    raise _Bad(f"{w}.chunks[{j}] is not [32-byte chunk id, length]")
                chunks.append((c[0], _count(c[1], f"{w}.chunks[{j}] length")))
            shape = _field(s, "shape", list, f"{w}.shape", [])
            entry = SpanEntry(
                kind=kind,
                offset=_count(s.get("offset"), f"{w}.offset"),
                length=_count(s.get("length"), f"{w}.length"),
                chunks=tuple(chunks),
                name=_field(s, "name", str, f"{w}.name", ""),
                dtype=_field(s, "dtype", str, f"{w}.dtype", "BYTES"),
                shape=tuple(_count(d, f"{w}.shape") for d in shape),
            )
            if entry.offset != pos:
                raise _Bad(f"{w} starts at byte {entry.offset} but the spans before it end at {pos} (a gap or an overlap)")
            if sum(n for _, n in chunks) != entry.length:
                raise _Bad(f"{w}: its chunks add up to {sum(n for _, n in chunks)} bytes, not its length {entry.length}")
            pos += entry.length
            spans.append(entry)
        if pos != size:
            raise _Bad(f"spans cover {pos} bytes, file has {size}")
        lossy = _field(obj, "lossy", dict, "lossy", {}) or {}
        deflated = None
        if "deflated" in obj:
            try:
                deflated = Deflated.from_obj(obj["deflated"], size)
            except ValueError as e:
                raise _Bad(str(e)) from None
        return cls(
            _field(obj, "format", str, "format"),
            size,
            blake3,
            _count(obj.get("chunk_bytes"), "chunk_bytes"),
            spans,
            _field(obj, "metadata", dict, "metadata", {}),
            _field(obj, "note", str, "note", ""),
            dict(lossy),
            deflated,
        )


def unpack_problem(e: BaseException) -> str:
    """What msgpack's error means (some of them have no message)."""
    if isinstance(e, msgpack.StackError):
        return "msgpack nests deeper than the unpacker allows (corrupt or hostile)"
    return str(e) or type(e).__name__


class _Bad(Exception):
    """A manifest field that is missing or of the wrong type (Manifest.from_bytes names it)."""


_MISSING: Any = object()


def _field(obj: dict[Any, Any], key: str, kind: type, what: str, default: Any = _MISSING) -> Any:
    value = obj.get(key, default)
    if value is _MISSING:
        raise _Bad(f"{what} is missing")
    if not isinstance(value, kind) and not (value is None and default is not _MISSING and key == "lossy"):
        raise _Bad(f"{what} is a {type(value).__name__}, not a {kind.__name__}")
    return value


def _count(value: Any, what: str) -> int:
    """A byte count, offset or dimension: a non-negative integer that fits 64 bits."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0 or value.bit_length() > 64:
        raise _Bad(f"{what} {value!r} is not a non-negative integer")
    return value


def _sorted(obj: Any) -> Any:
    """Recursively sort map keys so equal manifests are equal bytes."""
    if isinstance(obj, dict):
        return {k: _sorted(obj[k]) for k in sorted(obj)}
    if isinstance(obj, list | tuple):
        return [_sorted(v) for v in obj]
    return obj
