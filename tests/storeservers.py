"""Chunk stores for the tests, each a real one: a directory, SeaweedFS (S3) and a Git LFS server,
with what the tests measure on the server's side (objects held, bytes received) and a way to
damage an object in place."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from servers import Remote, SeaweedFS, seaweedfs


@dataclass
class StoreServer:
    kind: str
    url: str
    root: Path  # where the server keeps objects on disk
    endpoint: str | None = None
    env: dict[str, str] = field(default_factory=dict)

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

    def stop(self) -> None:
        """Stop the server at once (as a crash would), keeping its data."""
        raise NotImplementedError(self.kind)

    def start(self) -> None:
        raise NotImplementedError(self.kind)

    def wrong_credentials(self) -> dict[str, str]:
        """Environment under which a client has credentials the server refuses."""
        raise NotImplementedError(self.kind)

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


class S3Server(StoreServer):
    """SeaweedFS: objects from its filer's listing, bytes and requests from its S3 metrics."""

    server: SeaweedFS | None = None

    @property
    def sw(self) -> SeaweedFS:
        assert self.server is not None
        return self.server

    def objects(self) -> dict[str, int]:
        return {k.rsplit("/", 1)[1]: n for k, n in self.sw.objects("theta/frames").items()}

    def received_bytes(self) -> int:
        return int(self.sw.counters().bytes_received)

    def requests(self) -> int:
        return int(self.sw.counters().count())

    def stop(self) -> None:
        self.sw.stop(kill=True)

    def start(self) -> None:
        self.sw.start()

    def wrong_credentials(self) -> dict[str, str]:
        return dict(self.env, AWS_SECRET_ACCESS_KEY="not-" + self.env["AWS_SECRET_ACCESS_KEY"])

    def corrupt(self, key: str, offset: int) -> None:
        name = f"theta/frames/{key}"
        data = bytearray(self.sw.read(name))
        data[offset] ^= 0x40
        self.sw.write(name, bytes(data))


@contextlib.contextmanager
def store_server(kind: str, base: Path, git_remote: Remote) -> Iterator[StoreServer]:
    base.mkdir(parents=True)
    if kind == "file":
        yield DirServer(kind, f"file://{base}", base)
        return
    if kind == "s3":
        with seaweedfs(base / "seaweedfs") as sw:
            env = sw.env()
            env.pop("AWS_ENDPOINT_URL")  # the endpoint is committed in .thetastore instead
            s3 = S3Server(kind, f"s3://{sw.bucket}/theta", base, endpoint=sw.endpoint, env=env)
            s3.server = sw
            yield s3
        return
    raise ValueError(f"unknown store kind {kind!r}")
