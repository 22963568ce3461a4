"""Manifests: the documented, versioned, deterministic list of what a checkpoint is made of.
(Pointers, the other format, are in pointer.py.)

A *manifest* (msgpack, maps with sorted keys, no timestamps) lists the spans that tile a file in
order: skeleton spans (opaque bytes) and tensor spans (name, dtype, shape), each with its chunks
as ``[chunk_id, length]``. Its id is the BLAKE3 of its bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack

from .errors import CorruptObject
from .pointer import POINTER_MAX, POINTER_VERSION, Pointer, looks_like_pointer

MANIFEST_TYPE = "theta-store/manifest"
MANIFEST_VERSION = 1
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

    @property
    def tensors(self) -> list[SpanEntry]:
        return [s for s in self.spans if s.kind == "tensor"]

    def chunk_ids(self) -> set[bytes]:
        return {cid for s in self.spans for cid, _ in s.chunks}

    def to_bytes(self) -> bytes:
        obj = {
            "type": MANIFEST_TYPE,
            "version": MANIFEST_VERSION,
            "format": self.format,
            "file": {"size": self.size, "blake3": self.blake3},
            "chunk_bytes": self.chunk_bytes,
            "spans": [s.to_obj() for s in self.spans],
            "metadata": self.metadata,
            "note": self.note,
        }
        if self.lossy:  # absent when empty: a lossless manifest keeps the bytes (and id) it always had
            obj["lossy"] = self.lossy
        return bytes(msgpack.packb(_sorted(obj), use_bin_type=True))

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "manifest") -> Manifest:
        try:
            obj = msgpack.unpackb(data, raw=False, strict_map_key=False)
            if obj.get("type") != MANIFEST_TYPE:
                raise ValueError("not a theta-store manifest")
            if obj.get("version") != MANIFEST_VERSION:
                raise ValueError(f"manifest version {obj.get('version')} is not supported (this build reads {MANIFEST_VERSION})")
            spans = []
            pos = 0
            for s in obj["spans"]:
                chunks = tuple((bytes(c[0]), int(c[1])) for c in s["chunks"])
                if any(len(c) != 32 for c, _ in chunks):
                    raise ValueError("chunk id is not 32 bytes")
                entry = SpanEntry(
                    kind=s["kind"],
                    offset=int(s["offset"]),
                    length=int(s["length"]),
                    chunks=chunks,
                    name=s.get("name", ""),
                    dtype=s.get("dtype", "BYTES"),
                    shape=tuple(s.get("shape", ())),
                )
                if entry.offset != pos or sum(n for _, n in chunks) != entry.length:
                    raise ValueError(f"span at {entry.offset} does not tile the file")
                pos += entry.length
                spans.append(entry)
            f = obj["file"]
            if pos != f["size"]:
                raise ValueError(f"spans cover {pos} bytes, file has {f['size']}")
            return cls(
                obj["format"],
                int(f["size"]),
                bytes(f["blake3"]),
                int(obj["chunk_bytes"]),
                spans,
                obj.get("metadata", {}),
                obj.get("note", ""),
                dict(obj.get("lossy") or {}),
            )
        except (ValueError, KeyError, TypeError, AttributeError, msgpack.UnpackException) as e:
            raise CorruptObject(f"{where}: cannot read manifest: {e}") from None


def _sorted(obj: Any) -> Any:
    """Recursively sort map keys so equal manifests are equal bytes."""
    if isinstance(obj, dict):
        return {k: _sorted(obj[k]) for k in sorted(obj)}
    if isinstance(obj, list | tuple):
        return [_sorted(v) for v in obj]
    return obj
