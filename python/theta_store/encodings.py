"""How each chunk of a version is stored: whole ("plain") or as which delta against its bases.

The frames table records each frame's bases; which delta a frame is (bit-level XOR or integer
difference, sparse, low-rank) is in its header, read here for frames that have bases only.
`show`, `delta` and `diff` name encodings with these words.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from . import _native

if TYPE_CHECKING:
    from .gitstore import GitStore, StoredFrame

__all__ = ["KINDS", "chunk_kinds", "frame_kind"]

# Every name an encoding may have, most general first.
KINDS = ("plain", "xor", "diff", "sparse", "low-rank")


HEAD_LEN = 6  # a frame's bytes that say its codec: magic, format version, codec


def frame_kind(frame: bytes) -> str:
    """The encoding of one frame, from its first HEAD_LEN bytes (the core names its codec)."""
    return _native.frame_kind(frame[:HEAD_LEN])


def chunk_kinds(store: GitStore, frames: Mapping[bytes, StoredFrame], chunk_ids: Iterable[bytes]) -> dict[bytes, str]:
    """The encoding of each chunk (reading the first bytes of the frames that have bases only)."""
    out: dict[bytes, str] = {}
    for cid in chunk_ids:
        f = frames.get(cid)
        if cid in out or f is None:
            continue
        out[cid] = frame_kind(store.read_object_head(f.object_id, HEAD_LEN)) if f.bases else "plain"
    return out
