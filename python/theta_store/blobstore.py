"""Chunk stores outside Git: where frame packs live when one Git server is not enough.

A chunk store holds immutable objects named by their content: packs of frames (tens of MB,
concatenated frame bytes) that `chunkstore.py` builds and indexes. This module is only the
interface the two backends implement, and their selection by URL:

- `s3://bucket/prefix` (s3store.py): an S3-compatible bucket; keys `<prefix>/frames/<BLAKE3 hex>`.
- `lfs` or an `http(s)://.../info/lfs` URL (lfsstore.py): a Git LFS server's batch API; objects are
  LFS objects named by their SHA-256 oid.
- `file:///path` (dirstore.py): a directory, e.g. a shared or network drive.

Which names the backends give objects differs (LFS needs SHA-256), so `key` is the backend's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


@dataclass
class TransferStats:
    """What one call moved, counted on our side (tests count the server's side too)."""

    requests: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    skipped: list[str] = field(default_factory=list)  # keys the store already had


class BlobStore(Protocol):
    """One chunk store. Every method raises BlobStoreUnreachable / BlobStoreAuthError /
    BlobStoreError (errors.py) naming `url` and the object; none leaves a partial object behind
    under a key (an object is stored whole or not at all)."""

    url: str  # as the user configured it, for messages

    def key(self, path: Path) -> str:
        """The name an object with this file's content has in this store (hex digest)."""
        ...

    def missing(self, objects: Sequence[tuple[str, int]]) -> list[str]:
        """Of these (key, size), the keys the store does not hold, without listing the store."""
        ...

    def put(self, objects: Sequence[tuple[str, Path, int]], progress: Callable[[int], object] | None = None) -> TransferStats:
        """Upload these (key, file, size), in parallel, skipping those already stored
        (put-if-absent); `progress` gets byte counts as they are sent."""
        ...

    def get(self, key: str, ranges: Sequence[tuple[int, int]], size: int | None = None) -> list[bytes]:
        """The byte ranges [start, end) of one object, in the order asked (ranged GETs where the
        store allows them); `size`: the object's, where the caller knows it (LFS asks for it)."""
        ...

    def prefetch(self, objects: Sequence[tuple[str, int]]) -> None:
        """These (key, size) will be read soon: a store that must ask where objects are (LFS's
        batch API) asks for all of them in one request."""
        ...

    def stats(self) -> TransferStats:
        """Totals since this store object was made."""
        ...

    def close(self) -> None: ...


def coalesce(ranges: Sequence[tuple[int, int]], gap: int) -> list[tuple[int, int]]:
    """The spans covering these ranges, merging those less than `gap` bytes apart.

    >>> coalesce([(10, 20), (0, 5), (2_000_000, 2_000_010)], 1 << 20)
    [(0, 20), (2000000, 2000010)]
    """
    spans: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if spans and start <= spans[-1][1] + gap:
            spans[-1] = (spans[-1][0], max(spans[-1][1], end))
        else:
            spans.append((start, end))
    return spans


def file_key(path: Path) -> str:
    """BLAKE3 hex of a file's content, read in 8 MiB blocks (the S3 and directory stores' key)."""
    from . import _native

    h = _native.Hasher()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    return h.digest().hex()
