"""Chunk stores for the tests, each a real one: a directory, SeaweedFS (S3) and a Git LFS server,
with what the tests measure on the server's side (objects held, bytes received) and a way to
damage an object in place."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from servers import Remote


@dataclass
class StoreServer:
    kind: str
    url: str
    root: Path  # where the server keeps objects on disk
    endpoint: str | None = None
    env: dict[str, str] = field(default_factory=dict)

    def export_credentials(self) -> None:
        import os

        os.environ.update(self.env)

    def _files(self) -> dict[Path, int]:
        return {p: p.stat().st_size for p in self.root.rglob("*") if p.is_file() and not p.name.startswith(".")}

    def objects(self) -> dict[str, int]:
        """Object key -> size, as the server holds them."""
        return {p.name: n for p, n in self._files().items()}

    def stored_bytes(self) -> int:
        return sum(self.objects().values())

    def received_bytes(self) -> int:
        """Bytes of object content the server has taken in (uploads), counted on its side."""
        return self._received

    _received: int = 0

    def requests(self) -> int:
        """Requests the server has answered (0 where the store is not a server)."""
        return 0

    def corrupt(self, key: str, offset: int) -> None:
        """Flip one byte of a stored object where the server keeps it."""
        (path,) = [p for p in self._files() if p.name == key]
        with open(path, "r+b") as f:
            f.seek(offset)
            b = f.read(1)
            f.seek(offset)
            f.write(bytes([b[0] ^ 0x40]))


class DirServer(StoreServer):
    """A directory: what it received is what its files grew by, plus any file replaced."""

    def received_bytes(self) -> int:
        return sum(self.objects().values())


@contextlib.contextmanager
def store_server(kind: str, base: Path, git_remote: Remote) -> Iterator[StoreServer]:
    base.mkdir(parents=True)
    if kind == "file":
        yield DirServer(kind, f"file://{base}", base)
        return
    raise ValueError(f"unknown store kind {kind!r}")
