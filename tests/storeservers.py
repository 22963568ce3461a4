"""Chunk stores for the tests, each a real one: a directory, SeaweedFS (S3) and a Git LFS server,
with what the tests measure on the server's side (objects held, bytes received) and a way to
damage an object in place."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from servers import LfsServer, Remote, SeaweedFS, lfs_server, seaweedfs


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


class LfsStoreServer(StoreServer):
    """dulwich's LFS server with Basic auth; the client's credentials come from a git credential
    helper (`store`) named in the environment, as a user's global config would name it."""

    server: LfsServer | None = None
    stack: contextlib.ExitStack | None = None

    @property
    def lfs(self) -> LfsServer:
        assert self.server is not None
        return self.server

    def objects(self) -> dict[str, int]:
        return {k: p.stat().st_size for k, p in self.lfs.objects().items()}

    def received_bytes(self) -> int:
        return int(self.lfs.stats().get("upload", {}).get("bytes_in", 0))

    def requests(self) -> int:
        return sum(int(op.get("requests", 0)) for op in self.lfs.stats().values())

    def stop(self) -> None:
        self.lfs.stop()

    def start(self) -> None:
        assert self.stack is not None
        port = int(self.url.rsplit(":", 1)[1])
        self.server = self.stack.enter_context(lfs_server(self.root, user=LFS_USER, password=LFS_PASSWORD, port=port))

    def wrong_credentials(self) -> dict[str, str]:
        bad = self.root.parent / "wrong-credentials"
        bad.write_text(f"http://{LFS_USER}:not-{LFS_PASSWORD}@{self.url.split('://', 1)[1]}\n")
        return dict(self.env, GIT_CONFIG_VALUE_0=f"store --file={bad}")


LFS_USER, LFS_PASSWORD = "theta", "s3cret-lfs"


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
    if kind == "lfs":
        with contextlib.ExitStack() as stack:
            srv = stack.enter_context(lfs_server(base / "lfs", user=LFS_USER, password=LFS_PASSWORD))
            creds = base / "git-credentials"
            creds.write_text(f"http://{LFS_USER}:{LFS_PASSWORD}@{srv.url.split('://', 1)[1]}\n")
            env = {"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "credential.helper", "GIT_CONFIG_VALUE_0": f"store --file={creds}"}
            lfs = LfsStoreServer(kind, srv.url, base / "lfs", env=env)
            lfs.server, lfs.stack = srv, stack
            yield lfs
        return
    raise ValueError(f"unknown store kind {kind!r}")
