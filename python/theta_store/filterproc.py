"""git's long-running filter process (`filter.thetastore.process`), pkt-line protocol version 2.

clean  (git add, git status): the checkpoint streams in; out goes its pointer. The stream is hashed
       as it arrives and compared with the work-tree file; if they match, the work-tree file is
       stored directly (no temporary copy). A content-addressed cache (file BLAKE3 -> pointer) makes
       re-cleaning an unchanged file cost one pass of hashing: this is what `touch; git status` pays.
smudge (checkout, clone): the pointer comes in; out go the checkpoint's bytes, decoded by the core
       and verified. A version not present locally is fetched from the remote; when git allows
       (`can-delay`), missing versions are collected and fetched in one batch.
"""

from __future__ import annotations

import os
import struct
import sys
import tempfile
from collections.abc import Iterator
from typing import BinaryIO

from . import _native
from .checkpoint import add_file, chunk_tuples, load_manifest
from .errors import ThetaStoreError
from .gitstore import GitStore
from .manifest import POINTER_MAX, Pointer, looks_like_pointer

MAX_PKT_DATA = 65516
SMUDGE_BATCH = 64 << 20
_CACHE_REC = struct.Struct("<32sH")


class ProtocolError(ThetaStoreError):
    pass


class PktIO:
    def __init__(self, rfile: BinaryIO, wfile: BinaryIO) -> None:
        self.r = rfile
        self.w = wfile

    def read_pkt(self) -> bytes | None:
        """One packet's payload, or None for a flush packet."""
        head = self.r.read(4)
        if len(head) < 4:
            raise EOFError
        n = int(head, 16)
        if n == 0:
            return None
        if n < 4:
            raise ProtocolError(f"bad pkt-line length {n}")
        data = self.r.read(n - 4)
        if len(data) != n - 4:
            raise EOFError
        return data

    def read_text_list(self) -> list[str]:
        out = []
        while (p := self.read_pkt()) is not None:
            out.append(p.decode().rstrip("\n"))
        return out

    def read_stream(self) -> Iterator[bytes]:
        while (p := self.read_pkt()) is not None:
            yield p

    def write_pkt(self, data: bytes) -> None:
        self.w.write(b"%04x" % (len(data) + 4) + data)

    def write_text(self, *lines: str) -> None:
        for line in lines:
            self.write_pkt(line.encode() + b"\n")

    def flush_pkt(self) -> None:
        self.w.write(b"0000")
        self.w.flush()

    def write_stream(self, data: bytes | memoryview) -> None:
        mv = memoryview(data)
        for i in range(0, len(mv), MAX_PKT_DATA):
            self.write_pkt(bytes(mv[i : i + MAX_PKT_DATA]))


class CleanCache:
    """file BLAKE3 -> pointer bytes, appended as records to .git/theta-store/clean.cache."""

    def __init__(self, store: GitStore) -> None:
        self.path = store.state_dir / "clean.cache"
        self.entries: dict[bytes, bytes] = {}
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            data = b""
        pos = 0
        while pos + _CACHE_REC.size <= len(data):
            h, n = _CACHE_REC.unpack_from(data, pos)
            pos += _CACHE_REC.size
            if pos + n > len(data):
                break
            self.entries[h] = data[pos : pos + n]
            pos += n

    def get(self, store: GitStore, file_hash: bytes) -> bytes | None:
        ptr = self.entries.get(file_hash)
        if ptr is None:
            return None
        try:
            p = Pointer.parse(ptr)
        except ThetaStoreError:
            return None
        return ptr if store.version_commit(p.manifest_id) is not None else None

    def put(self, file_hash: bytes, pointer: bytes) -> None:
        if self.entries.get(file_hash) == pointer:
            return
        self.entries[file_hash] = pointer
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as f:
            f.write(_CACHE_REC.pack(file_hash, len(pointer)) + pointer)


def clean(store: GitStore, cache: CleanCache, pathname: str, stream: Iterator[bytes]) -> bytes:
    """Turn the streamed checkpoint into its pointer."""
    hasher = _native.Hasher()
    head = bytearray()
    total = 0
    worktree: BinaryIO | None
    try:
        worktree = open(os.path.join(store.worktree, pathname), "rb")  # noqa: SIM115
    except OSError:
        worktree = None
    spill: BinaryIO | None = None
    spill_path = ""
    try:
        for pkt in stream:
            hasher.update(pkt)
            if len(head) <= POINTER_MAX:
                head += pkt[: POINTER_MAX + 1 - len(head)]
            if spill is None and worktree is not None and worktree.read(len(pkt)) != pkt:
                worktree.close()
                worktree = None
            if spill is None and worktree is None:
                # Content differs from the work tree (or it is gone): keep our own copy.
                store.state_dir.mkdir(parents=True, exist_ok=True)
                fd, spill_path = tempfile.mkstemp(prefix="clean-", dir=store.state_dir)
                spill = os.fdopen(fd, "wb")
                _copy_prefix(os.path.join(store.worktree, pathname), total, spill, bytes(head[:total]) if total <= POINTER_MAX else None)
            if spill is not None:
                spill.write(pkt)
            total += len(pkt)
        if worktree is not None and worktree.read(1):
            worktree.close()  # the work-tree file is longer than what git sent
            worktree = None
            if spill is None:
                raise ThetaStoreError(f"{pathname}: changed while git was reading it; run git add again")
        if total <= POINTER_MAX and looks_like_pointer(bytes(head)):
            return bytes(head)  # already a pointer: cleaning is the identity
        digest = hasher.digest()
        cached = cache.get(store, digest)
        if cached is not None:
            return cached
        source = os.path.join(store.worktree, pathname)
        if spill is not None:
            spill.close()
            source = spill_path
        result = add_file(store, source, progress=False)
        if result.pointer.blake3 != digest:
            raise ThetaStoreError(f"{pathname}: changed while being stored; run git add again")
        ptr = result.pointer.to_bytes()
        cache.put(digest, ptr)
        return ptr
    finally:
        _close(worktree)
        if spill is not None:
            spill.close()
            os.unlink(spill_path)


def _close(f: BinaryIO | None) -> None:
    if f is not None:
        f.close()


def _copy_prefix(path: str, n: int, out: BinaryIO, head: bytes | None) -> None:
    """Copy the first n bytes already received (and matched against the work tree) to out."""
    if n == 0:
        return
    if head is not None and len(head) == n:
        out.write(head)
        return
    with open(path, "rb") as f:
        left = n
        while left:
            block = f.read(min(left, 1 << 20))
            if not block:
                raise ThetaStoreError(f"{path}: shrank while git was reading it")
            out.write(block)
            left -= len(block)


def smudge_bytes(store: GitStore, pointer: Pointer) -> Iterator[bytes]:
    """The checkpoint's bytes in order, in batches, each chunk verified by the core."""
    manifest = load_manifest(store, pointer.manifest_id)
    chunks = [c for s in manifest.spans for c in s.chunks]
    packs, tuples = chunk_tuples(store, pointer.manifest_id, chunks)
    hasher = _native.Hasher()
    i = 0
    while i < len(tuples):
        j, size = i, 0
        while j < len(tuples) and (j == i or size + tuples[j][0] <= SMUDGE_BATCH):
            size += tuples[j][0]
            j += 1
        for block in _native.read_chunks(tuples[i:j], packs, store.read_object):
            hasher.update(block)
            yield block
        i = j
    if hasher.digest() != manifest.blake3:
        raise ThetaStoreError(f"checkpoint {pointer.manifest_id.hex()[:16]}: restored bytes do not hash to the file's BLAKE3")


def run(rfile: BinaryIO | None = None, wfile: BinaryIO | None = None) -> int:
    from .remote import ensure_versions

    io = PktIO(rfile or sys.stdin.buffer, wfile or sys.stdout.buffer)
    hello = io.read_text_list()
    if "git-filter-client" not in hello or "version=2" not in hello:
        raise ProtocolError(f"unexpected filter handshake {hello!r}")
    io.write_text("git-filter-server", "version=2")
    io.flush_pkt()
    caps = io.read_text_list()
    ours = [c for c in ("capability=clean", "capability=smudge", "capability=delay") if c in caps]
    io.write_text(*ours)
    io.flush_pkt()
    skip_smudge = os.environ.get("THETA_STORE_SKIP_SMUDGE") == "1"
    with GitStore(".") as store:
        from .install import ensure_hooks

        ensure_hooks(store)
        cache = CleanCache(store)
        delayed: dict[str, Pointer] = {}
        ready: dict[str, Pointer] = {}
        while True:
            try:
                headers = io.read_text_list()
            except EOFError:
                return 0
            meta = dict(h.split("=", 1) for h in headers if "=" in h)
            command = meta.get("command")
            pathname = meta.get("pathname", "")
            if command == "list_available_blobs":
                if delayed:
                    try:
                        ensure_versions(store, {p.manifest_id for p in delayed.values()}, quiet=True)
                    except ThetaStoreError as e:
                        print(f"theta-store: {e}", file=sys.stderr)
                    ready.update(delayed)
                    delayed.clear()
                for path in sorted(ready):
                    io.write_text(f"pathname={path}")
                io.flush_pkt()
                io.write_text("status=success")
                io.flush_pkt()
                continue
            content = io.read_stream()
            try:
                if command == "clean":
                    out = clean(store, cache, pathname, content)
                    io.write_text("status=success")
                    io.flush_pkt()
                    io.write_stream(out)
                    io.flush_pkt()
                    io.flush_pkt()
                elif command == "smudge":
                    data = b"".join(content)
                    if pathname in ready:
                        ptr: Pointer | None = ready.pop(pathname)
                    elif looks_like_pointer(data) and not skip_smudge:
                        ptr = Pointer.parse(data, pathname)
                    else:
                        ptr = None
                    if ptr is None:
                        io.write_text("status=success")
                        io.flush_pkt()
                        io.write_stream(data)
                        io.flush_pkt()
                        io.flush_pkt()
                        continue
                    if store.version_commit(ptr.manifest_id) is None:
                        if meta.get("can-delay") == "1":
                            delayed[pathname] = ptr
                            io.write_text("status=delayed")
                            io.flush_pkt()
                            continue
                        ensure_versions(store, {ptr.manifest_id}, quiet=True, what=pathname)
                    blocks = smudge_bytes(store, ptr)
                    first = next(blocks, b"")  # fail before announcing success when we can
                    io.write_text("status=success")
                    io.flush_pkt()
                    try:
                        io.write_stream(first)
                        for block in blocks:
                            io.write_stream(block)
                    except ThetaStoreError as e:
                        print(f"theta-store: {pathname}: {e}", file=sys.stderr)
                        io.flush_pkt()
                        io.write_text("status=error")
                        io.flush_pkt()
                        continue
                    io.flush_pkt()
                    io.flush_pkt()
                else:
                    for _ in content:
                        pass
                    io.write_text("status=error")
                    io.flush_pkt()
            except (ThetaStoreError, OSError) as e:
                for _ in content:  # drain what git is still sending
                    pass
                hint = f" (hint: {e.hint})" if isinstance(e, ThetaStoreError) and e.hint else ""
                print(f"theta-store: {command} {pathname}: {e.args[0] if e.args else e}{hint}", file=sys.stderr)
                io.write_text("status=error")
                io.flush_pkt()
