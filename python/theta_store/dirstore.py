"""A chunk store in a directory (`file:///path`): a shared or network file system as the store.

Objects are files `<dir>/frames/<ab>/<BLAKE3 hex>`, written to a temporary name and renamed, so
a reader never sees a partial object and a second writer of the same content changes nothing.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import unquote, urlparse

from .blobstore import TransferStats, file_key
from .errors import BlobStoreError, BlobStoreUnreachable

_BLOCK = 8 << 20


class DirStore:
    def __init__(self, url: str) -> None:
        parsed = urlparse(url)
        if parsed.scheme != "file" or parsed.netloc not in ("", "localhost"):
            raise BlobStoreError(f"{url}: a directory chunk store is file:///absolute/path")
        self.url = url
        self.root = Path(unquote(parsed.path))
        if not self.root.is_dir():
            raise BlobStoreUnreachable(f"{url}: {self.root} is not a directory", hint="create it, or mount the shared drive")
        self._stats = TransferStats()

    def _path(self, key: str) -> Path:
        if len(key) != 64 or not all(c in "0123456789abcdef" for c in key):
            raise BlobStoreError(f"{self.url}: {key!r} is not an object key")
        return self.root / "frames" / key[:2] / key

    def key(self, path: Path) -> str:
        return file_key(path)

    def missing(self, objects: Sequence[tuple[str, int]]) -> list[str]:
        self._stats.requests += len(objects)
        return [k for k, _ in objects if not self._path(k).is_file()]

    def put(self, objects: Sequence[tuple[str, Path, int]], progress: Callable[[int], object] | None = None) -> TransferStats:
        done = TransferStats()
        for key, src, size in objects:
            dest = self._path(key)
            done.requests += 1
            if dest.is_file():
                done.skipped.append(key)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".tmp-{os.getpid()}-{key}")
            try:
                with open(src, "rb") as fin, open(tmp, "wb") as fout:
                    while block := fin.read(_BLOCK):
                        fout.write(block)
                        if progress is not None:
                            progress(len(block))
                    fout.flush()
                    os.fsync(fout.fileno())
                os.replace(tmp, dest)
            except OSError as e:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise BlobStoreError(f"{self.url}: storing object {key}: {e}") from None
            done.bytes_sent += size
        self._add(done)
        return done

    def prefetch(self, objects: Sequence[tuple[str, int]]) -> None:
        """Nothing to ask ahead: a key is a path."""

    def get(self, key: str, ranges: Sequence[tuple[int, int]], size: int | None = None) -> list[bytes]:
        path = self._path(key)
        out = []
        try:
            with open(path, "rb") as f:
                for start, end in ranges:
                    f.seek(start)
                    out.append(f.read(end - start))
        except FileNotFoundError:
            raise BlobStoreError(f"{self.url}: object {key} is not in the store") from None
        got = TransferStats(requests=len(ranges), bytes_received=sum(len(b) for b in out))
        self._add(got)
        return out

    def _add(self, s: TransferStats) -> None:
        self._stats.requests += s.requests
        self._stats.bytes_sent += s.bytes_sent
        self._stats.bytes_received += s.bytes_received
        self._stats.skipped += s.skipped

    def stats(self) -> TransferStats:
        return self._stats

    def close(self) -> None:
        pass
