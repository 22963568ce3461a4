"""The read plan: where each chunk of a stored version lives, and the names of stored versions.

Part of the git-as-storage side. An add saves the plan of the version it wrote; restore, smudge
and lazy reads get one from `plan_for`; gc drops it. A saved plan is a cache, a plain file at
`<git dir>/theta-store/plans/<manifest id>`, read without dulwich: the filter's checkout of a
known version starts streaming without opening the object store.

A plan names pack files, which gc and rollups (packs.py) rewrite and remove: `pack_lock` is held
shared from making or loading a plan until the core has opened its packs, and exclusive while
packs are removed, so no reader is ever pointed at a pack that is gone.

Not typing, dataclasses, re or pathlib: the filter process imports this on every start.
"""

from __future__ import annotations

import contextlib
import os
import sys

from .errors import CorruptObject, PointerError

TYPE_CHECKING = False  # not typing's: see __init__.py
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
    from typing import Protocol

    from .deflated import Deflated
    from .manifest import Manifest
    from .pointer import Pointer

    class StoredObject(Protocol):
        """What a plan needs of a stored frame (gitstore.StoredFrame)."""

        @property
        def object_id(self) -> bytes: ...

        @property
        def bases(self) -> tuple[bytes, ...]: ...

    class VersionStore(Protocol):
        """What a plan needs of the store (gitstore.GitStore), without importing it."""

        @property
        def state_dir(self) -> str | os.PathLike[str]: ...

        def read_manifest_bytes(self, manifest_id: bytes) -> bytes: ...

        def version_frames(self, manifest_id: bytes) -> Mapping[bytes, StoredObject]: ...

        def locate(self, oids: Iterable[bytes]) -> tuple[list[str], list[Location | None]]: ...


# Every stored version is kept reachable by refs/theta/<manifest id hex> (README "In Git").
REF_PREFIX = "refs/theta/"
# Versions whose frames are in a chunk store: a small commit of the manifest and where each frame is.
INDEX_PREFIX = "refs/theta-index/"
PLAN_VERSION = 3
PLAN_TEMP = "tmp_"  # a plan being saved: plans/tmp_<pid>_<id> (adds remove those of dead processes)
_NOT_IN_PACK = (1 << 64) - 1  # what the core reads as "ask read_object for it"


def ref_name(manifest_id: bytes) -> str:
    """The ref that keeps version `manifest_id`: refs/theta/<hex>."""
    return REF_PREFIX + manifest_id.hex()


def index_ref_name(manifest_id: bytes) -> str:
    """The ref of version `manifest_id`'s index record: refs/theta-index/<hex>."""
    return INDEX_PREFIX + manifest_id.hex()


def version_of_ref(name: str, prefix: str = REF_PREFIX) -> bytes | None:
    """The manifest id a refs/theta/ ref (or another `prefix`'s) names, or None for any other name."""
    if not name.startswith(prefix):
        return None
    tail = name[len(prefix) :]
    if len(tail) != 64:
        return None
    try:
        return bytes.fromhex(tail)
    except ValueError:
        return None


class Location:
    """Where a frame's object lies: the pack (an index into the plan's `packs`) and the byte
    offset of its entry there."""

    __slots__ = ("offset", "pack")

    pack: int
    offset: int

    def __init__(self, pack: int, offset: int) -> None:
        self.pack = pack
        self.offset = offset

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Location) and (self.pack, self.offset) == (other.pack, other.offset)

    def __hash__(self) -> int:
        return hash((self.pack, self.offset))

    def __repr__(self) -> str:
        return f"Location(pack={self.pack}, offset={self.offset})"


class PlannedChunk:
    """One chunk of a stored file: its raw length, its id, the Git object holding its frame, and
    where that object lies (None: not in a pack; read through the object store)."""

    __slots__ = ("chunk_id", "length", "location", "object_id")

    length: int
    chunk_id: bytes
    object_id: bytes
    location: Location | None

    def __init__(self, length: int, chunk_id: bytes, object_id: bytes, location: Location | None) -> None:
        self.length = length
        self.chunk_id = chunk_id
        self.object_id = object_id
        self.location = location

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PlannedChunk) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def _key(self) -> tuple[int, bytes, bytes, Location | None]:
        return (self.length, self.chunk_id, self.object_id, self.location)

    def __repr__(self) -> str:
        return f"PlannedChunk({self.length}, {self.chunk_id.hex()[:16]}, {self.object_id.hex()[:16]}, {self.location!r})"


class ReadPlan:
    """What the core needs to rebuild a file: the packs, its chunks in file order, its size and
    BLAKE3, and the other chunks its delta frames are decoded against (`bases`: chunks of earlier
    versions and low-rank factors, length 0 as the plan does not need it). `deflated`: when the
    chunks make the expanded file of the real one, its deflated members (theta_store.deflated)."""

    __slots__ = ("_starts", "bases", "blake3", "chunks", "deflated", "packs", "size")

    packs: list[str]
    chunks: list[PlannedChunk]
    size: int
    blake3: bytes
    bases: list[PlannedChunk]
    deflated: Deflated | None

    def __init__(
        self,
        packs: list[str],
        chunks: list[PlannedChunk],
        size: int,
        blake3: bytes,
        bases: list[PlannedChunk] | None = None,
        deflated: Deflated | None = None,
    ) -> None:
        self.packs = packs
        self.chunks = chunks
        self.size = size
        self.blake3 = blake3
        self.bases = bases or []
        self.deflated = deflated
        self._starts: list[int] | None = None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ReadPlan) and (self.packs, self.chunks, self.size, self.blake3, self.bases) == (
            other.packs,
            other.chunks,
            other.size,
            other.blake3,
            other.bases,
        )

    __hash__ = None  # type: ignore[assignment]  # mutable lists inside

    def __repr__(self) -> str:
        return f"ReadPlan({len(self.packs)} packs, {len(self.chunks)} chunks, size={self.size})"

    def covering(self, start: int, end: int) -> tuple[list[PlannedChunk], int]:
        """The chunks holding file bytes [start, end), and the file offset of the first of them."""
        from bisect import bisect_left, bisect_right

        if self._starts is None:
            starts, pos = [], 0
            for c in self.chunks:
                starts.append(pos)
                pos += c.length
            self._starts = starts
        if end <= start or not self.chunks:
            return [], start
        i = max(bisect_right(self._starts, start) - 1, 0)
        j = bisect_left(self._starts, end)
        return self.chunks[i:j], self._starts[i]

    def native(self) -> list[tuple[int, int, bytes, bytes]]:
        """Every chunk, as the core's calls take them (see `native_chunks`)."""
        return native_chunks(self.chunks)

    def native_bases(self) -> list[tuple[int, int, bytes, bytes]]:
        """The base chunks, as the core's calls take them (their `bases` argument)."""
        return native_chunks(self.bases)


def native_chunks(chunks: Sequence[PlannedChunk]) -> list[tuple[int, int, bytes, bytes]]:
    """Planned chunks as the core's calls (restore_file, send_file, read_chunks) take them:
    (length, location, chunk id, object id), the location packed as pack << 48 | offset, all
    ones when not in a pack. The only place that spells this encoding."""
    return [
        (c.length, _NOT_IN_PACK if c.location is None else c.location.pack << 48 | c.location.offset, c.chunk_id, c.object_id)
        for c in chunks
    ]


def damaged_chunk(plan: ReadPlan, read_object: Callable[[bytes], bytes]) -> str:
    """After a read of `plan` failed: ", chunk <id> (file offset N)" for the first chunk that does
    not read back by itself, else "" (each chunk is intact: the whole file is what is wrong).
    Reads the version again, a chunk at a time: on the error path only."""
    from . import _native

    bases, offset = native_chunks(plan.bases), 0
    for c in plan.chunks:
        try:
            _native.read_chunks(native_chunks([c]), plan.packs, read_object, bases)
        except Exception:  # whatever the core or the object store raises for it, this chunk is the one
            return f", chunk {c.chunk_id.hex()[:16]} (file offset {offset})"
        offset += c.length
    return ""


def damaged_chunks(
    chunks: Sequence[PlannedChunk], plan: ReadPlan, read_object: Callable[[bytes], bytes], batch: int = 16
) -> dict[tuple[bytes, bytes], str]:
    """Which of `chunks` (of `plan`) do not read back, by (chunk id, object id), each with why.
    Reads `batch` chunks at a time and a failed batch again chunk by chunk."""
    from . import _native
    from .errors import ObjectNotFound

    bases, bad = plan.native_bases(), {}
    for i in range(0, len(chunks), batch):
        part = chunks[i : i + batch]
        try:
            _native.read_chunks(native_chunks(part), plan.packs, read_object, bases)
            continue
        except (ObjectNotFound, CorruptObject, OSError):
            pass
        for c in part:  # find which ones
            try:
                _native.read_chunks(native_chunks([c]), plan.packs, read_object, bases)
            except (ObjectNotFound, CorruptObject, OSError) as e:
                bad[(c.chunk_id, c.object_id)] = f"chunk {c.chunk_id.hex()[:16]}: {e}"
    return bad


# ---- versions and where their chunks are, from the store ----
def load_manifest(store: VersionStore, manifest_id: bytes) -> Manifest:
    """The manifest of version `manifest_id`, checked against its id."""
    from . import _native
    from .manifest import Manifest

    data = store.read_manifest_bytes(manifest_id)
    if _native.chunk_id(data) != manifest_id:
        raise CorruptObject(f"manifest {manifest_id.hex()[:16]} does not hash to its id", hint="run `theta-store fsck`")
    return Manifest.from_bytes(data, f"manifest {manifest_id.hex()[:16]}")


def locate(
    store: VersionStore,
    manifest_id: bytes,
    chunks: Sequence[tuple[bytes, int]],
    frames: Mapping[bytes, StoredObject] | None = None,
    known: Mapping[bytes, tuple[str, int]] | None = None,
) -> tuple[list[str], list[PlannedChunk]]:
    """The packs and the planned chunks of `chunks` ((chunk id, length), in file order) of version
    `manifest_id`. `frames`: the version's frames when known (else read from its tree); `known`:
    object id -> (pack path, offset) of frames whose place is known (just written), the others
    are found in the pack indexes. A chunk with no frame in the version raises CorruptObject."""
    if frames is None:
        frames = store.version_frames(manifest_id)
    missing = [cid for cid, _ in chunks if cid not in frames]
    if missing:
        raise CorruptObject(
            f"version {manifest_id.hex()[:16]} has no frame for chunk {missing[0].hex()[:16]}", hint="run `theta-store fsck`"
        )
    oids = [frames[cid].object_id for cid, _ in chunks]
    known = known or {}
    packs, found = store.locate([o for o in oids if o not in known])
    numbers = {p: i for i, p in enumerate(packs)}
    looked_up = iter(found)
    where: list[Location | None] = []
    for oid in oids:
        if oid in known:
            pack, offset = known[oid]
            where.append(Location(numbers.setdefault(pack, len(numbers)), offset))
        else:
            where.append(next(looked_up))
    packs += list(numbers)[len(packs) :]
    return packs, [PlannedChunk(n, cid, oid, loc) for (cid, n), oid, loc in zip(chunks, oids, where, strict=True)]


def plan_from_store(
    store: VersionStore,
    manifest_id: bytes,
    manifest: Manifest,
    frames: Mapping[bytes, StoredObject] | None = None,
    known: Mapping[bytes, tuple[str, int]] | None = None,
) -> ReadPlan:
    """The read plan of a version whose manifest is known; the places of frames not `known` (see
    `locate`) read from the pack indexes. Every chunk of the version's frames that the file does
    not hold is a base of some delta frame of it; so may be some that it holds (a zero bias that
    is the base of another tensor's chunk), and the plan's `bases` list both: a read of part of
    the file must find every base."""
    if frames is None:
        frames = store.version_frames(manifest_id)
    mine = [c for s in manifest.spans for c in s.chunks]
    held = {cid for cid, _ in mine}
    named = {b for f in frames.values() for b in f.bases}
    extra = sorted(cid for cid in frames if cid not in held or cid in named)
    packs, chunks = locate(store, manifest_id, mine + [(cid, 0) for cid in extra], frames, known)
    return ReadPlan(packs, chunks[: len(mine)], manifest.size, manifest.blake3, chunks[len(mine) :], manifest.deflated)


def plan_for(store: VersionStore, pointer: Pointer, *, manifest: Manifest | None = None, where: str = "") -> ReadPlan:
    """The read plan of the checkpoint `pointer` names, from the store (and saved for the next
    checkout). What restore, smudge and lazy reads use.

    `manifest`: the version's manifest, if loaded already. `where`: the file, for the error.
    Raises PointerError when pointer and manifest disagree on the file, ObjectNotFound when the
    version is not here, CorruptObject when it is damaged.
    """
    if manifest is None:
        manifest = load_manifest(store, pointer.manifest_id)
    if manifest.file_blake3 != pointer.blake3 or manifest.file_size != pointer.size:
        raise PointerError(
            f"{where + ': ' if where else ''}pointer and stored version {pointer.manifest_id.hex()[:16]} disagree on the file"
            f" (size {pointer.size} vs {manifest.file_size}, BLAKE3 {pointer.blake3.hex()[:16]} vs {manifest.file_blake3.hex()[:16]})",
            hint="the pointer was edited: check out another commit, or commit the checkpoint again",
        )
    plan = plan_from_store(store, pointer.manifest_id, manifest)
    save_plan(store.state_dir, pointer, plan)
    return plan


# ---- saved plans ----
def plan_path(state_dir: str | os.PathLike[str], manifest_id: bytes) -> str:
    return os.path.join(state_dir, "plans", manifest_id.hex())


def load_plan(state_dir: str | os.PathLike[str], pointer: Pointer) -> ReadPlan | None:
    """The plan saved for this version, if it is well formed and every pack it names is still
    there with the same size; else None.

    Pack names are hashes of their content, so the offsets hold while the pack does; a plan that
    is wrong anyway fails the BLAKE3 check of every chunk (and is then dropped)."""
    import msgpack

    try:
        with open(plan_path(state_dir, pointer.manifest_id), "rb") as f:
            version, size, blake3, packs, records, base_records = msgpack.unpackb(f.read(), use_list=True)
        if version != PLAN_VERSION or size != pointer.size or blake3 != pointer.blake3:
            return None
        paths = []
        folders = _pack_folders(state_dir)
        for path, length in packs:
            if not _is_pack_path(path, folders) or os.stat(path).st_size != length:
                return None
            paths.append(path)
        chunks = []
        total = 0
        for n, pack, offset, cid, oid in records:
            if not (0 <= pack < len(paths) and offset >= 0 and n >= 0 and _is_id(cid, 32) and _is_id(oid, 20)):
                return None
            total += n
            chunks.append(PlannedChunk(n, cid, oid, Location(pack, offset)))
        if total != size:
            return None
        bases = []
        for pack, offset, cid, oid in base_records:
            if not (0 <= pack < len(paths) and offset >= 0 and _is_id(cid, 32) and _is_id(oid, 20)):
                return None
            bases.append(PlannedChunk(0, cid, oid, Location(pack, offset)))
        return ReadPlan(paths, chunks, size, blake3, bases)
    except (OSError, ValueError, TypeError, msgpack.UnpackException):
        return None


def _pack_folders(state_dir: str | os.PathLike[str]) -> set[str]:
    """The pack folders of the repository whose state folder is `state_dir` (<git dir>/theta-store):
    its own and its alternates'."""
    objects = os.path.join(os.path.dirname(os.path.abspath(state_dir)), "objects")
    folders = {os.path.join(objects, "pack")}
    with contextlib.suppress(OSError), open(os.path.join(objects, "info", "alternates"), encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                folders.add(os.path.normpath(os.path.join(objects, line, "pack")))
    return folders


def _is_pack_path(path: object, folders: set[str]) -> bool:
    """A pack as plans name them: pack-*.pack, by an absolute path without `..`, in one of the
    repository's pack folders (a plan naming any other file is not ours: it is dropped, not read)."""
    if not isinstance(path, str) or not os.path.isabs(path) or os.path.normpath(path) != path:
        return False
    folder, name = os.path.split(path)
    return folder in folders and name.startswith("pack-") and name.endswith(".pack")


def _is_id(value: object, n: int) -> bool:
    return isinstance(value, bytes) and len(value) == n


def save_plan(state_dir: str | os.PathLike[str], pointer: Pointer, plan: ReadPlan) -> None:
    """Keep `plan` for the next checkout of this version (best effort: it is only a cache)."""
    if plan.deflated is not None:
        return  # its restore needs the manifest's members anyway
    if any(c.location is None for c in [*plan.chunks, *plan.bases]):
        return  # a loose object: read through the object store each time
    import msgpack

    path = plan_path(state_dir, pointer.manifest_id)
    folder = os.path.dirname(path)
    tmp = os.path.join(folder, f"{PLAN_TEMP}{os.getpid()}_{os.path.basename(path)}")
    try:
        os.makedirs(folder, exist_ok=True)
        packs = [[p, os.stat(p).st_size] for p in plan.packs]
        records = [[c.length, c.location.pack, c.location.offset, c.chunk_id, c.object_id] for c in plan.chunks if c.location is not None]
        bases = [[c.location.pack, c.location.offset, c.chunk_id, c.object_id] for c in plan.bases if c.location is not None]
        with open(tmp, "wb") as f:
            f.write(msgpack.packb([PLAN_VERSION, plan.size, plan.blake3, packs, records, bases], use_bin_type=True))
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def drop_plan(state_dir: str | os.PathLike[str], manifest_id: bytes) -> None:
    with contextlib.suppress(OSError):
        os.unlink(plan_path(state_dir, manifest_id))


# ---- the pack lock: the places a plan names stay valid while it is held ----
# How long a reader waits for a pack rewrite (or a rewrite for readers) before giving up.
PACK_LOCK_WAIT = 600.0


def pack_lock(
    state_dir: str | os.PathLike[str], *, shared: bool, wait: float | None = PACK_LOCK_WAIT
) -> contextlib.AbstractContextManager[bool]:
    """Hold `<state dir>/packs.lock`: shared while a plan is made or read (restore, smudge, an add
    coding against stored frames), exclusive while packs are rewritten and removed (packs.py).
    `wait` None: yield False at once if the lock is taken; else wait up to `wait` seconds, then
    raise LockTimeout. Without flock (Windows) it yields True and guards nothing."""
    return _flock(state_dir, "packs.lock", shared, wait, "rewriting" if shared else "reading", "packs")


def version_lock(
    state_dir: str | os.PathLike[str], *, shared: bool, wait: float | None = PACK_LOCK_WAIT
) -> contextlib.AbstractContextManager[bool]:
    """Hold `<state dir>/versions.lock`: shared by an add from before it writes a version's ref
    until the version's pointer is staged, exclusive while gc decides which versions nothing
    needs and drops their refs: gc never drops a version an add is about to stage."""
    return _flock(state_dir, "versions.lock", shared, wait, "dropping" if shared else "adding", "versions")


@contextlib.contextmanager
def _flock(state_dir: str | os.PathLike[str], name: str, shared: bool, wait: float | None, doing: str, what: str) -> Iterator[bool]:
    if sys.platform == "win32":
        yield True
        return
    import fcntl
    import time

    try:
        os.makedirs(state_dir, exist_ok=True)
        fd = os.open(os.path.join(state_dir, name), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        if not shared:
            raise
        yield True  # a repository we may not write to: no process of ours rewrites its packs either
        return
    try:
        op = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        deadline = time.monotonic() + (wait or 0)
        pause = 0.002
        while True:
            try:
                fcntl.flock(fd, op | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if wait is None:
                    yield False
                    return
                if time.monotonic() >= deadline:
                    from .errors import LockTimeout

                    raise LockTimeout(
                        f"{os.path.join(state_dir, name)}: another theta-store process has been {doing} {what} for {wait:.0f} s",
                        hint="wait for it (a `theta-store gc`, a checkout) to finish and run the command again",
                    ) from None
                time.sleep(pause)
                pause = min(pause * 2, 0.05)
        yield True
    finally:
        os.close(fd)
