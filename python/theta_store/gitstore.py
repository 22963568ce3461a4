"""The store, mapped onto Git objects. The only module that imports dulwich.

Git-as-storage: the object store and refs (remote.py is the transport; see repo.py for the two parts).

Layout of one checkpoint version (all ordinary Git objects):

    refs/theta/<manifest-id hex>  ->  commit (deterministic: fixed author, time 0, no parent)
        tree
          manifest            blob: the msgpack manifest
          <ab>/               tree (256-way fan-out by chunk id prefix)
              frames          blob: msgpack {chunk_id: [frame_len, plane modes(, base ids)]} of this subtree's chunks
              <cdef...>       blob: the frame of chunk abcdef...

Besides the file's chunks, a version holds every chunk its delta frames are decoded against
(chunks of earlier versions, low-rank factors), bases of bases included: a version's tree is all
it needs, so push, fetch and gc move and keep bases with the versions that need them.

A version that changes a few chunks shares every other subtree, table included, with the
version before it. Versions written before the tables were split have one `frames` blob at the
top for all chunks instead; both layouts are read.

Frames are written by the Rust core straight into packs (zlib level 0, index written directly);
the few small objects (manifest, trees, commit) go through dulwich's pack writer.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
import subprocess
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
from dulwich.errors import ChecksumMismatch, NotGitRepository, ObjectFormatException
from dulwich.index import IndexEntry
from dulwich.objects import Blob, Commit, ObjectID, Tree
from dulwich.pack import PackFileDisappeared
from dulwich.refs import Ref
from dulwich.repo import Repo as DulwichRepo

from . import _native
from .errors import CorruptObject, GitCommandError, LockTimeout, NotARepository, ObjectNotFound
from .manifest import unpack_problem
from .plan import INDEX_PREFIX, Location, index_ref_name, ref_name
from .plan import REF_PREFIX as _REF_PREFIX

REF_PREFIX = Ref(_REF_PREFIX.encode())
AUTHOR = b"theta-store <theta-store@localhost>"
# chunk id (32) | git object id (20) | frame length (u64 LE) | plane count (u8) | modes (u16 LE, 2 bits each)
# | CRC-32 of the rest (u32 LE)
_RECORD = struct.Struct("<32s20sQBHI")
# chunk id (32) | id of one of its bases (32), in the order the frame names them | CRC-32
_BASE_RECORD = struct.Struct("<32s32sI")
_MODES = ("raw", "zstd", "rans")
# git prunes files named tmp_obj_* it finds in object folders (after two weeks), and so do we, at once, once their writer is gone
LOOSE_TEMP = "tmp_obj_theta_"
REF_TEMP = "ref-"  # a version ref being written (GitStore._set_version_ref), in the state folder
_TABLE = b"frames"  # the frames table's name: never a frame's (those are hex)
# What dulwich raises for an object it finds but cannot read (a damaged loose file or pack entry).
_UNREADABLE = (ObjectFormatException, ChecksumMismatch, zlib.error, ValueError, EOFError)


@dataclass(frozen=True)
class StoredFrame:
    object_id: bytes
    frame_len: int
    planes: str  # "raw+raw+raw+rans"
    bases: tuple[bytes, ...] = ()  # the chunks a delta frame is decoded against


def frame_entry(value: Any) -> tuple[int, str, tuple[bytes, ...]]:
    """A frames table's entry of one chunk, `[frame length, plane modes(, [base ids])]`, checked
    field by field (the table may come from a remote: ValueError names the bad field)."""
    if not isinstance(value, list | tuple) or len(value) not in (2, 3):
        raise ValueError(
            f"is a {type(value).__name__} of {len(value) if isinstance(value, list | tuple) else 1}, not [length, planes(, bases)]"
        )
    flen, planes, *rest = value
    if not isinstance(flen, int) or isinstance(flen, bool) or not 0 <= flen < 1 << 63:
        raise ValueError(f"frame length {flen!r} is not a byte count")
    if not isinstance(planes, str) or any(m not in _MODES for m in planes.split("+") if planes):
        raise ValueError(f"plane modes {planes!r} are not '+'-joined {'/'.join(_MODES)}")
    raw = rest[0] if rest else []
    if not isinstance(raw, list | tuple) or not all(isinstance(b, bytes) and len(b) == 32 for b in raw):
        raise ValueError("base ids are not a list of 32-byte ids")
    return flen, planes, tuple(raw)


def with_bases(frames: dict[bytes, StoredFrame], lookup: Callable[[bytes], StoredFrame | None], where: str) -> dict[bytes, StoredFrame]:
    """`frames` and every chunk their frames are decoded against, bases of bases included
    (`lookup` finds a chunk that is not in `frames`); what a version's tree must hold."""
    out = dict(frames)
    todo = [b for f in frames.values() for b in f.bases]
    while todo:
        cid = todo.pop()
        if cid in out:
            continue
        f = lookup(cid)
        if f is None:
            raise CorruptObject(f"{where}: base chunk {cid.hex()[:16]} of a delta frame is not stored here", hint="run `theta-store fsck`")
        out[cid] = f
        todo.extend(f.bases)
    return out


def remove_stale(folder: Path, prefix: str) -> int:
    """Remove files (and folders) `<prefix><pid>_...` left by a killed process (whose pid is gone). Returns the count."""
    removed = 0
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return 0
    for name in names:
        if not name.startswith(prefix):
            continue
        pid = name[len(prefix) :].split("_", 1)[0].split(".", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        if _running(int(pid)):
            continue
        if (folder / name).is_dir():  # a folder of files (a fetch's incoming objects)
            shutil.rmtree(folder / name, ignore_errors=True)
            removed += 1
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(folder / name)
            removed += 1
    return removed


def _record(layout: struct.Struct, *fields: Any) -> bytes:
    """One record of the chunk index, its CRC-32 last."""
    body = layout.pack(*fields, 0)[:-4]
    return body + struct.pack("<I", zlib.crc32(body))


def _records(path: Path, layout: struct.Struct) -> Iterator[tuple[Any, ...]]:
    """The records of a chunk index file, without their checksum. A record that fails its checksum
    (a damaged cache) is dropped, and so is a partial last record a crash left: their chunks are
    then stored again."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    for i in range(0, len(data) - layout.size + 1, layout.size):
        rec = data[i : i + layout.size]
        *fields, crc = layout.unpack(rec)
        if zlib.crc32(rec[:-4]) == crc:
            yield tuple(fields)


def _running(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie: a killed process stays one until its
    parent reaps it, forever under a container's PID 1 that never does."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True  # no /proc (not Linux): it exists


# How long an update of the git index waits for another process's index.lock (git itself gives up
# at once; a `git status` or another add holds it for well under a second).
INDEX_LOCK_WAIT = 20.0


class LockFile:
    """Git's kind of lock: `path` created with O_EXCL, held until it is removed or renamed onto the
    file it guards. Entering waits up to `wait` seconds for another process to release it."""

    def __init__(self, path: Path, wait: float) -> None:
        self.path = path
        self.wait = wait
        self.held = False

    def __enter__(self) -> LockFile:
        self._wait(take=True)
        self.held = True
        return self

    def wait_free(self) -> None:
        """Wait until no process holds the lock, without taking it (a git command starting
        meanwhile must not find it taken)."""
        self._wait(take=False)

    def _wait(self, take: bool) -> None:
        deadline = time.monotonic() + self.wait
        pause = 0.005
        while True:
            try:
                if take:
                    os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
                    return
                if not self.path.exists():
                    return
            except FileExistsError:
                pass
            if time.monotonic() >= deadline:
                raise LockTimeout(
                    f"{self.path} exists: another git process seems to be running in this repository (waited {self.wait:.0f} s)",
                    hint="wait for it to finish and run the command again; if no git process is running, remove the file",
                )
            time.sleep(pause)
            pause = min(pause * 2, 0.1)

    def commit(self, target: Path) -> None:
        """Rename the lock file (written with the new content) onto `target`: that releases it."""
        os.replace(self.path, target)
        self.held = False

    def __exit__(self, *exc: object) -> None:
        if self.held:  # not after commit: the name may be another process's lock by now
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self.held = False


def _append(path: Path, blob: bytes, record: int) -> None:
    """Append `blob` to a file of fixed-size records, first dropping a partial record a crash left."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size % record:
            os.ftruncate(fd, size - size % record)
        os.write(fd, blob)
    finally:
        os.close(fd)


def _hex(oid: bytes) -> ObjectID:
    """A binary object id as dulwich's hex ObjectID."""
    return ObjectID(oid.hex().encode())


def _ref(manifest_id: bytes) -> Ref:
    return Ref(ref_name(manifest_id).encode())


def _pack_modes(planes: str) -> tuple[int, int]:
    modes = planes.split("+") if planes else []
    code = 0
    for j, m in enumerate(modes):
        code |= _MODES.index(m) << (2 * j)
    return len(modes), code


def _unpack_modes(n: int, code: int) -> str:
    return "+".join(_MODES[(code >> (2 * j)) & 3] for j in range(n))


def _fixed_commit(tree: ObjectID, message: str) -> Commit:
    """A deterministic parentless commit: fixed author, time 0 (the same objects give the same id)."""
    commit = Commit()
    commit.tree = tree
    commit.author = commit.committer = AUTHOR
    commit.author_time = commit.commit_time = 0
    commit.author_timezone = commit.commit_timezone = 0
    commit.encoding = None
    commit.message = message.encode()
    return commit


def _unknown_revision(rev: str) -> ObjectNotFound:
    return ObjectNotFound(
        f"{rev}: unknown revision (no branch, tag or commit of that name here)",
        hint="`git log --oneline --all` lists the commits; `git fetch` brings a remote's branches",
    )


def _inflate_head(f: Any, data: bytes, n: int) -> bytes:
    """The first `n` bytes of the zlib stream that starts `data` and goes on in file `f`."""
    z = zlib.decompressobj()
    out = z.decompress(data, n)
    while len(out) < n and not z.eof:
        more = f.read(4096)
        if not more:
            break
        out += z.decompress(z.unconsumed_tail + more, n - len(out))
    return out


def _packed_head(pack: str, offset: int, n: int) -> bytes | None:
    """The first `n` bytes of the whole (not git-deltified) object at `offset` in `pack`; None
    for a git delta or anything unreadable."""
    try:
        with open(pack, "rb") as f:
            f.seek(offset)
            data = f.read(4096)
            kind = (data[0] >> 4) & 7
            i = 0
            while data[i] & 0x80:  # the object's size, seven bits a byte
                i += 1
            if kind not in (1, 2, 3, 4):
                return None
            return _inflate_head(f, data[i + 1 :], n)
    except (OSError, IndexError, zlib.error):
        return None


def _loose_head(path: Path, n: int) -> bytes | None:
    """The first `n` bytes of a loose object's content (after its `blob SIZE\\0` header)."""
    try:
        with open(path, "rb") as f:
            head = _inflate_head(f, f.read(4096), n + 32)
    except (OSError, zlib.error):
        return None
    end = head.find(b"\0")
    return head[end + 1 : end + 1 + n] if 0 <= end < 32 else None


class GitStore:
    """A Git repository's object database as the chunk store."""

    def __init__(self, path: str | os.PathLike[str] = ".") -> None:
        try:
            self.repo = DulwichRepo.discover(os.fspath(path))
        except NotGitRepository:
            raise NotARepository(f"{os.path.abspath(path)}: not inside a Git repository", hint="run git init first") from None
        self.worktree = Path(self.repo.path).resolve()
        self.common_dir = Path(self.repo.commondir()).resolve()
        self.objects_dir = Path(self.repo.object_store.path)
        self.pack_dir = self.objects_dir / "pack"
        self.state_dir = self.common_dir / "theta-store"
        self._index: dict[bytes, StoredFrame] | None = None

    def close(self) -> None:
        self.repo.close()

    def __enter__(self) -> GitStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the chunk index: a cache BLAKE3 -> object, rebuildable from the version trees ----
    @property
    def _index_path(self) -> Path:
        return self.state_dir / "chunks2.idx"

    @property
    def _bases_path(self) -> Path:
        return self.state_dir / "chunk-bases2.idx"

    def chunk_index(self) -> dict[bytes, StoredFrame]:
        if self._index is None:
            if not self._index_path.exists() and (self.state_dir / "chunks.idx").exists():
                # The index of an earlier release, whose records had no checksum: rebuilt once.
                with contextlib.suppress(ObjectNotFound, CorruptObject):
                    self.rebuild_chunk_index()
                for old in ("chunks.idx", "chunk-bases.idx"):
                    (self.state_dir / old).unlink(missing_ok=True)
                if self._index is not None:
                    return self._index
            index: dict[bytes, StoredFrame] = {}
            bases: dict[bytes, list[bytes]] = {}
            for cid, base in _records(self._bases_path, _BASE_RECORD):
                bases.setdefault(cid, []).append(base)
            for cid, oid, flen, n, code in _records(self._index_path, _RECORD):
                if n <= 8 and all((code >> (2 * j)) & 3 < len(_MODES) for j in range(n)):
                    index[cid] = StoredFrame(oid, flen, _unpack_modes(n, code), tuple(bases.get(cid, ())))
            self._index = index
        return self._index

    def record_chunks(self, frames: dict[bytes, StoredFrame]) -> None:
        """Append to the chunk index in one write (after the objects and the ref are durable)."""
        index = self.chunk_index()
        new = {k: v for k, v in frames.items() if index.get(k) != v}
        if not new:
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        # Bases first: a chunk whose record made it has its bases recorded (a crash in between
        # leaves bases of a chunk the index does not know, which nothing reads).
        based = b"".join(_record(_BASE_RECORD, cid, b) for cid, f in sorted(new.items()) for b in f.bases)
        if based:
            _append(self._bases_path, based, _BASE_RECORD.size)
        _append(
            self._index_path,
            b"".join(_record(_RECORD, cid, f.object_id, f.frame_len, *_pack_modes(f.planes)) for cid, f in sorted(new.items())),
            _RECORD.size,
        )
        index.update(new)

    def rebuild_chunk_index(self) -> int:
        """Rebuild the chunk index from every version tree. Returns the number of chunks."""
        frames: dict[bytes, StoredFrame] = {}
        for mid in self.versions():
            frames.update(self.version_frames(mid))
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self._bases_path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(b"".join(_record(_BASE_RECORD, cid, b) for cid, f in sorted(frames.items()) for b in f.bases))
        os.replace(tmp, self._bases_path)
        tmp = self._index_path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(
            b"".join(_record(_RECORD, cid, f.object_id, f.frame_len, *_pack_modes(f.planes)) for cid, f in sorted(frames.items()))
        )
        os.replace(tmp, self._index_path)
        self._index = frames
        return len(frames)

    def known_frame(self, cid: bytes) -> StoredFrame | None:
        """The stored frame of a chunk, if the index knows it and the object really exists."""
        f = self.chunk_index().get(cid)
        if f is not None and self.has_object(f.object_id):
            return f
        return None

    # ---- objects ----
    def has_object(self, oid: bytes) -> bool:
        return _hex(oid) in self.repo.object_store

    def refresh(self) -> None:
        """See packs written behind dulwich's back (by the Rust core)."""
        self.repo.object_store._update_pack_cache()

    def read_object(self, oid: bytes) -> bytes:
        try:
            _, data = self.repo.object_store.get_raw(_hex(oid))
        except KeyError:
            raise ObjectNotFound(
                f"object {oid.hex()} is not in {self.common_dir}", hint="run `theta-store fetch` or check the remote"
            ) from None
        except _UNREADABLE as e:
            raise self._corrupt(oid.hex(), "", e) from None
        return bytes(data)

    def read_object_head(self, oid: bytes, n: int) -> bytes:
        """The first `n` bytes of an object (all of it if shorter), inflating only those: dulwich
        maps a whole pack to read any object in it, and reading the head of every frame of a
        version that way would put the version's packs in our resident set."""
        hexid = _hex(oid)
        found = self._find_packed(hexid)
        if found is not None:
            head = _packed_head(found[0], found[1], n)
            if head is not None:
                return head
        else:
            head = _loose_head(self.objects_dir / hexid[:2].decode() / hexid[2:].decode(), n)
            if head is not None:
                return head
        return self.read_object(oid)[:n]  # a git delta, or damage: the whole read says which

    def _corrupt(self, hexid: str, what: str, e: BaseException) -> CorruptObject:
        """The error for an object git has but cannot read, naming it and where it lies."""
        loose = self.objects_dir / hexid[:2] / hexid[2:]
        where = f" at {loose}" if loose.exists() else ""
        return CorruptObject(
            f"object {hexid}{what}{where} is corrupt ({type(e).__name__}: {e})",
            hint="`git fsck` lists every damaged object; a clone of the remote has an intact copy",
        )

    def _load(self, sha: ObjectID, manifest_id: bytes, what: str) -> Any:
        """A dulwich object of version `manifest_id`; a damaged one raises CorruptObject naming it."""
        try:
            return self.repo[sha]
        except _UNREADABLE as e:
            raise self._corrupt(sha.decode(), f", the {what} of checkpoint version {manifest_id.hex()[:16]},", e) from None

    def locate(self, oids: Iterable[bytes]) -> tuple[list[str], list[Location | None]]:
        """Pack paths and, per object, where it lies in them (None: not in a pack)."""
        paths: list[str] = []
        numbers: dict[str, int] = {}
        out: list[Location | None] = []
        packs = self._packs()
        for oid in oids:
            found = self._find_packed(_hex(oid), packs)
            if found is None:
                out.append(None)
                continue
            path, offset = found
            if path not in numbers:
                numbers[path] = len(paths)
                paths.append(path)
            out.append(Location(numbers[path], offset))
        return paths, out

    def _packs(self) -> list[Any]:
        """The packs there are now, but git's temporary ones (.tmp-*, renamed or removed any moment).
        dulwich's list holds the packs it saw before it looked again, one removed since included
        (its index, once read, still answers): it looks once more."""
        self.refresh()
        return [p for p in self.repo.object_store.packs if os.path.basename(p._data_path).startswith("pack-")]

    def _find_packed(self, hexid: ObjectID, packs: list[Any] | None = None) -> tuple[str, int] | None:
        """The pack file holding object `hexid` and the object's offset there; None if no pack
        does. `packs`: the list to search (from `_packs`), updated in place if one is gone. A pack
        gone meanwhile (a gc or rollup replaced it, git's or ours) is forgotten and the packs are
        listed again: its objects are in the pack that replaced it."""
        if packs is None:
            packs = self._packs()
        for _ in range(8):
            try:
                for pack in packs:
                    try:
                        return pack._data_path, pack.index.object_offset(hexid)
                    except KeyError:
                        continue
                return None
            except PackFileDisappeared:
                self.refresh()
                packs[:] = self._packs()
        return None

    # ---- versions ----
    def version_object_count(self, new_chunk_ids: Iterable[bytes]) -> int:
        """How many objects `write_version` writes for a new version whose new frames are these
        chunks: root tree, manifest, commit, and a subtree and its table per id prefix they fall
        in. An add announces its pack's size before it knows the objects; a subtree that changes
        without a new chunk (a chunk dropped) makes the count short, and the pack is recounted."""
        return 3 + 2 * len({cid[:1] for cid in new_chunk_ids})

    def write_version(
        self,
        manifest_id: bytes,
        manifest: bytes,
        frames: dict[bytes, StoredFrame],
        write: Callable[[list[tuple[str, bytes]]], object] | None = None,
    ) -> bytes:
        """Write manifest + trees + commit and point refs/theta/<id> at it. Returns the commit id.
        `write`: where the objects go (the add's pack, being written), if not to a pack of their
        own; it returns once they are durable."""
        commit, objects = self.version_objects(manifest_id, manifest, frames)
        if objects:
            # The commit is written last of all, with its trees, so a commit that is here has all of them.
            raw = [(o.type_name.decode(), o.as_raw_string()) for o in objects]
            if write is None:
                _native.write_objects(raw, str(self.pack_dir))
            else:
                write(raw)
            self.refresh()
        self._set_version_ref(_ref(manifest_id), commit.id)
        return bytes.fromhex(commit.id.decode())

    def version_objects(self, manifest_id: bytes, manifest: bytes, frames: dict[bytes, StoredFrame]) -> tuple[Commit, list[Any]]:
        """The commit of a version and those of its objects (manifest, tables, trees, commit) that
        are not stored yet: a version that changed a few chunks costs a few subtrees and the root."""
        mblob = Blob.from_string(manifest)
        fan: dict[str, dict[bytes, StoredFrame]] = {}
        for cid, f in sorted(frames.items()):
            fan.setdefault(cid[:1].hex(), {})[cid] = f
        objects: list[Any] = [mblob]
        root = Tree()
        root.add(b"manifest", 0o100644, mblob.id)
        for prefix, part in fan.items():
            table = {cid: [f.frame_len, f.planes, list(f.bases)] if f.bases else [f.frame_len, f.planes] for cid, f in part.items()}
            tblob = Blob.from_string(bytes(msgpack.packb(table, use_bin_type=True)))
            sub = Tree()
            sub.add(_TABLE, 0o100644, tblob.id)
            for cid, f in part.items():
                sub.add(cid.hex()[2:].encode(), 0o100644, _hex(f.object_id))
            objects += [tblob, sub]
            root.add(prefix.encode(), 0o040000, sub.id)
        objects.append(root)
        commit = _fixed_commit(root.id, f"theta-store version {manifest_id.hex()}\n")
        stored = self._stored([commit.id, *(o.id for o in objects)])
        if commit.id in stored:
            return commit, []
        return commit, [*(o for o in objects if o.id not in stored), commit]

    def _stored(self, ids: Sequence[ObjectID]) -> set[ObjectID]:
        """Those of `ids` that are here, packed or loose, looked up with one scan of the pack folder
        (asking dulwich object by object rescans the folder on every miss)."""
        found: set[ObjectID] = set()
        packs = self._packs()
        for sha in ids:
            if self._find_packed(sha, packs) is not None:
                found.add(sha)
            else:
                h = sha.decode()
                if (self.objects_dir / h[:2] / h[2:]).exists():
                    found.add(sha)
        return found

    def versions(self) -> list[bytes]:
        out = []
        for ref in self.repo.refs.keys(base=REF_PREFIX):
            try:
                out.append(bytes.fromhex(ref.decode()))
            except ValueError:
                continue
        return sorted(out)

    def _version_tree(self, manifest_id: bytes) -> Tree:
        ref = _ref(manifest_id)
        try:
            commit = self._load(self.repo.refs[ref], manifest_id, "commit")
            assert isinstance(commit, Commit)
            tree = self._load(commit.tree, manifest_id, "tree")
        except KeyError:
            if ref in self.repo.refs:  # the ref is here, an object of it is not: damage, not a version never fetched
                raise ObjectNotFound(
                    f"checkpoint version {manifest_id.hex()[:16]} is damaged in this repository: its {ref.decode()} names a missing object",
                    hint="`theta-store fsck --repair` fetches an intact copy from a remote",
                ) from None
            raise ObjectNotFound(
                f"checkpoint version {manifest_id.hex()[:16]} is not in this repository ({ref.decode()} missing)",
                hint="run `theta-store fetch` to get it from the remote",
            ) from None
        assert isinstance(tree, Tree)
        return tree

    def _set_version_ref(self, ref: Ref, sha: ObjectID) -> None:
        """Point a version ref (refs/theta/ or refs/theta-index/) at `sha`: a temporary file
        renamed over the loose ref, without a `.lock` file, which a writer killed in between
        would leave behind, making every later write of that version fail. A version ref only
        ever names a complete version of its id, so a concurrent write of it needs no lock."""
        path = self.common_dir / ref.decode()
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(self.state_dir, REF_TEMP)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_dir / f"{REF_TEMP}{os.getpid()}_{time.monotonic_ns()}"
        try:
            tmp.write_bytes(sha + b"\n")
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise

    def read_manifest_bytes(self, manifest_id: bytes) -> bytes:
        tree = self._version_tree(manifest_id)
        _, sha = tree[b"manifest"]
        return bytes(self._load(sha, manifest_id, "manifest").as_raw_string())

    def version_frames(self, manifest_id: bytes) -> dict[bytes, StoredFrame]:
        tree = self._version_tree(manifest_id)
        table = None
        if _TABLE in tree:  # the layout before per-subtree tables: one table for all chunks
            _, fsha = tree[_TABLE]
            table = self._table(fsha, manifest_id)
        out: dict[bytes, StoredFrame] = {}
        for entry in tree.items():
            if entry.mode != 0o040000:
                continue
            sub = self._load(entry.sha, manifest_id, "tree")
            assert isinstance(sub, Tree)
            part = table
            if part is None:
                if _TABLE not in sub:
                    raise CorruptObject(f"frames table {entry.path.decode()}/frames of version {manifest_id.hex()[:16]} is missing")
                part = self._table(sub[_TABLE][1], manifest_id)
            for leaf in sub.items():
                if leaf.path == _TABLE:
                    continue
                try:
                    cid = bytes.fromhex((entry.path + leaf.path).decode())
                except ValueError:
                    raise CorruptObject(f"version {manifest_id.hex()[:16]} names a frame {leaf.path!r}") from None
                try:
                    flen, planes, bases = frame_entry(part.get(cid, [0, ""]))
                except ValueError as e:
                    raise CorruptObject(f"frames table of version {manifest_id.hex()[:16]}: entry of chunk {cid.hex()[:16]}: {e}") from None
                out[cid] = StoredFrame(bytes.fromhex(leaf.sha.decode()), flen, planes, bases)
        return out

    def _table(self, sha: ObjectID, manifest_id: bytes) -> dict[bytes, Any]:
        raw = self._load(sha, manifest_id, "frames table").as_raw_string()
        try:
            table = msgpack.unpackb(raw, raw=False, strict_map_key=False)
        except Exception as e:
            raise CorruptObject(f"frames table of version {manifest_id.hex()[:16]}: {unpack_problem(e)}") from None
        if not isinstance(table, dict):
            raise CorruptObject(f"frames table of version {manifest_id.hex()[:16]} is not a map")
        return table

    def version_commit(self, manifest_id: bytes) -> bytes | None:
        try:
            return bytes.fromhex(self.repo.refs[_ref(manifest_id)].decode())
        except KeyError:
            return None

    # ---- index records: versions whose frames live in a chunk store (chunkstore.py) ----
    def write_index_record(self, manifest_id: bytes, manifest: bytes, record: bytes) -> bytes:
        """Point refs/theta-index/<id> at a deterministic commit of `manifest` and `record`
        (where the version's frames are in a chunk store). Returns the commit id."""
        mblob, rblob = Blob.from_string(manifest), Blob.from_string(record)
        root = Tree()
        root.add(b"manifest", 0o100644, mblob.id)
        root.add(b"record", 0o100644, rblob.id)
        commit = _fixed_commit(root.id, f"theta-store index {manifest_id.hex()}\n")
        missing = [o for o in (mblob, rblob, root, commit) if o.id not in self._stored([o.id])]
        if missing:
            _native.write_objects([(o.type_name.decode(), o.as_raw_string()) for o in missing], str(self.pack_dir))
            self.refresh()
        self._set_version_ref(Ref(index_ref_name(manifest_id).encode()), commit.id)
        return bytes.fromhex(commit.id.decode())

    def read_index_record(self, manifest_id: bytes) -> tuple[bytes, bytes] | None:
        """(manifest, record) of the version's index record, None if there is none here."""
        try:
            sha = self.repo.refs[Ref(index_ref_name(manifest_id).encode())]
        except KeyError:
            return None
        commit = self._load(sha, manifest_id, "index record")
        assert isinstance(commit, Commit)
        tree = self._load(commit.tree, manifest_id, "index record tree")
        assert isinstance(tree, Tree)
        try:
            parts = [bytes(self._load(tree[name][1], manifest_id, "index record").as_raw_string()) for name in (b"manifest", b"record")]
        except KeyError:
            raise CorruptObject(f"index record of version {manifest_id.hex()[:16]} lacks its manifest or record") from None
        return parts[0], parts[1]

    def index_records(self) -> dict[bytes, bytes]:
        """Versions with an index record here -> the record's commit id."""
        out = {}
        base = Ref(INDEX_PREFIX.encode())
        for ref in self.repo.refs.keys(base=base):
            with contextlib.suppress(ValueError, KeyError):
                out[bytes.fromhex(ref.decode())] = bytes.fromhex(self.repo.refs[Ref(base + ref)].decode())
        return out

    # ---- the work tree and the index (through the git binary: it owns the index format) ----
    def git(self, *args: str, input: bytes | None = None) -> bytes:
        r = subprocess.run(["git", "-C", str(self.worktree), *args], input=input, capture_output=True, check=False)
        if r.returncode != 0:
            raise GitCommandError(f"git {' '.join(args[:3])} failed: {r.stderr.decode(errors='replace').strip()}")
        return r.stdout

    def stage_blob(self, relpath: str, data: bytes) -> None:
        """Stage `data` (a pointer) for `relpath`, with the work-tree file's stat data.

        With the file's stat data in the index, git sees the file as unchanged and does not
        re-read it (without it, `git commit` hashes the whole checkpoint again). This is the
        state a clean filter leaves too. Falls back to `git update-index` if the index is in a
        form dulwich does not write (split index...).
        """
        blob = Blob.from_string(data)
        if blob.id not in self.repo.object_store:
            self._write_loose(blob)
        st = os.stat(self.worktree / relpath)
        # Racy git: an entry whose mtime is not older than the index (in whole seconds) is
        # re-read by the next git command. Wait out the second the file was written in, so the
        # index we write is newer than it (only files modified less than a second ago wait).
        wait = int(st.st_mtime) + 1 - time.time()
        if 0 < wait <= 1:
            time.sleep(wait)
        mode = 0o100755 if st.st_mode & 0o111 else 0o100644
        entry = IndexEntry(
            ctime=(int(st.st_ctime), st.st_ctime_ns % 1_000_000_000),
            mtime=(int(st.st_mtime), st.st_mtime_ns % 1_000_000_000),
            dev=st.st_dev & 0xFFFFFFFF,
            ino=st.st_ino & 0xFFFFFFFF,
            mode=mode,
            uid=st.st_uid & 0xFFFFFFFF,
            gid=st.st_gid & 0xFFFFFFFF,
            size=st.st_size & 0xFFFFFFFF,
            sha=blob.id,
        )
        index_path = Path(self.repo.index_path())
        lock = index_path.with_name(index_path.name + ".lock")
        try:
            # Read the index under git's index.lock: an entry another process (git, or a second
            # add) staged since we started is kept, not overwritten by an older copy.
            with LockFile(lock, INDEX_LOCK_WAIT) as held:
                # dulwich's own lock on the file it writes: one left here is a killed writer's (it
                # held index.lock, which is ours now)
                lock.with_name(lock.name + ".lock").unlink(missing_ok=True)
                index = self.repo.open_index()
                index[relpath.encode()] = entry
                # dulwich writes `<name>.lock`, then renames it to <name>: here onto the index.lock
                # we hold, which then becomes the index as git's own writers do it
                index._filename = str(lock)
                index.write()
                held.commit(index_path)
        except LockTimeout:
            raise
        except Exception:  # any index dulwich cannot write (split index, new extensions): let git do it
            self.git("update-index", "--add", "--cacheinfo", f"{mode:o},{blob.id.decode()},{relpath}")

    def _write_loose(self, obj: Blob) -> None:
        """Write a loose object as git does: a temporary file renamed into place, no `.lock` file
        (dulwich's, left by a process killed in between, made every later write of that object
        fail). Its content is its id, so a concurrent write of it needs no lock."""
        hexid = obj.id.decode()
        folder = self.objects_dir / hexid[:2]
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale(folder, LOOSE_TEMP)
        tmp = folder / f"{LOOSE_TEMP}{os.getpid()}_{time.monotonic_ns()}"
        try:
            tmp.write_bytes(obj.as_legacy_object())
            os.chmod(tmp, 0o444)
            os.replace(tmp, folder / hexid[2:])
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise

    def read_path(self, relpath: str, rev: str | None) -> bytes:
        """The blob stored for `relpath` in the index (rev None) or in commit `rev`."""
        spec = f":{relpath}" if rev is None else f"{rev}:{relpath}"
        r = subprocess.run(["git", "-C", str(self.worktree), "cat-file", "blob", spec], capture_output=True, check=False)
        if r.returncode != 0:
            if rev is None:
                raise ObjectNotFound(f"{relpath}: not in the index", hint="add it with `theta-store add` first")
            if not self.has_revision(rev):
                raise _unknown_revision(rev)
            raise ObjectNotFound(
                f"{relpath}: not in {rev}",
                hint=f"`git ls-tree -r --name-only {rev}` lists its files; add and commit it with `theta-store add` first",
            )
        return r.stdout

    def has_revision(self, rev: str) -> bool:
        """`rev` names a commit or tree here (as `git rev-parse` reads it)."""
        args = ["git", "-C", str(self.worktree), "rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{tree}}"]
        return subprocess.run(args, capture_output=True, check=False).returncode == 0

    def ls_tree(self, rev: str, pathspecs: Sequence[str] = ()) -> bytes:
        """`git ls-tree -r -z` of the whole tree of `rev` (limited to `pathspecs`); an unknown
        revision is said as such."""
        try:
            return self.git("ls-tree", "-r", "-z", "--full-tree", rev, "--", *pathspecs)
        except GitCommandError:
            if not self.has_revision(rev):
                raise _unknown_revision(rev) from None
            raise

    def iter_paths(self, rev: str | None) -> Iterator[tuple[str, bytes]]:
        """(path, blob id) of every file in the index or in `rev`."""
        if rev is None:
            out = self.git("ls-files", "-s", "-z")
            for rec in out.split(b"\0"):
                if rec:
                    meta, path = rec.split(b"\t", 1)
                    yield path.decode(), bytes.fromhex(meta.split()[1].decode())
        else:
            out = self.ls_tree(rev)
            for rec in out.split(b"\0"):
                if rec:
                    meta, path = rec.split(b"\t", 1)
                    parts = meta.split()
                    if parts[1] == b"blob":
                        yield path.decode(), bytes.fromhex(parts[2].decode())
