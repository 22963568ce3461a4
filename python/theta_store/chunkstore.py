"""Versions whose frames live in a chunk store (an S3-compatible bucket, a Git LFS server).

Git-as-storage, one level out: the Git remote keeps the pointers (in the user's commits) and, per
version, an *index record* under refs/theta-index/<manifest id>: the manifest and where each frame
is. The frames travel to the chunk store (blobstore.py) packed into objects of about
`thetastore.packSize` (32 MiB): a 140 GB model is thousands of requests, not the hundreds of
thousands its 2 MiB chunks would make.

Which store: `.thetastore`, a file in git-config syntax committed at the top of the work tree (as
`.lfsconfig` is), so a fresh clone finds it; credentials never go there:

    [thetastore]
        store = weights
    [store "weights"]
        url = s3://bucket/prefix
        endpoint = http://127.0.0.1:8333

`git config remote.<name>.thetastore <store>` (local) overrides it per Git remote; `git` there
means "frames in Git objects", as without a `.thetastore`.

Push: the frames the store lacks (not in an index record the remote has, nor in an object this
repository uploaded before: the journal) are packed in a deterministic order, each object named by
its content; an object the store already holds is not sent again, so a push killed midway resumes
at the first object it had not finished. The index records go to Git last, so a remote never names
frames the store does not hold.

Fetch: the index record from Git, then only the frames that are not here, by ranged GETs, checked
against their Git object ids before anything is written (restore checks each chunk's BLAKE3 again),
into one local pack with the version's objects: afterwards the version is local like any other.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from . import _native, packs
from .blobstore import BlobStore, coalesce
from .errors import BlobStoreCorrupt, CorruptObject, ThetaStoreError
from .gitstore import GitStore, StoredFrame
from .progress import Progress

CONFIG_FILE = ".thetastore"
PACK_SIZE = 32 << 20
RECORD_VERSION = 1
# Ranges closer than this are read in one GET: a request costs more than the bytes between.
COALESCE_GAP = 1 << 20
# Objects downloaded at once: bounds memory to about this many objects of PACK_SIZE.
PARALLEL_GETS = 4
# Objects uploaded at once (each streamed from a temporary file in parts).
PARALLEL_PUTS = 4


@dataclass(frozen=True)
class StoreConfig:
    name: str
    url: str
    endpoint: str | None = None
    region: str | None = None


@dataclass(frozen=True)
class Placed:
    """Where one frame is in the chunk store: in object `key` (of `size` bytes) at `offset`."""

    frame: StoredFrame
    key: str
    offset: int
    size: int


# ---- configuration ----
def _git(store: GitStore, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["git", *args], cwd=store.worktree, input=input or b"", capture_output=True, check=False)


def config_text(store: GitStore) -> bytes | None:
    """`.thetastore` from the work tree, else from HEAD (a clone smudges before it is checked out)."""
    path = store.worktree / CONFIG_FILE
    if path.is_file():
        return path.read_bytes()
    for spec in (f"HEAD:{CONFIG_FILE}", f":{CONFIG_FILE}"):
        r = _git(store, "cat-file", "blob", spec)
        if r.returncode == 0:
            return r.stdout
    return None


def _parse(text: bytes) -> dict[str, str]:
    """git-config syntax, parsed by git itself (keys lowercased as git does, subsections as given)."""
    with tempfile.NamedTemporaryFile(prefix="thetastore-", suffix=".cfg") as f:
        f.write(text)
        f.flush()
        r = subprocess.run(["git", "config", "-f", f.name, "--list", "-z"], capture_output=True, check=False, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise ThetaStoreError(f"{CONFIG_FILE}: not in git-config syntax: {r.stderr.decode(errors='replace').strip()}")
    out: dict[str, str] = {}
    for item in r.stdout.split(b"\0"):
        if item:
            k, _, v = item.decode().partition("\n")
            out[k] = v
    return out


def stores(store: GitStore) -> tuple[dict[str, StoreConfig], str | None]:
    """The chunk stores `.thetastore` names, and its default one."""
    text = config_text(store)
    if text is None:
        return {}, None
    cfg = _parse(text)
    found: dict[str, StoreConfig] = {}
    for key, value in cfg.items():
        if key.startswith("store.") and key.endswith(".url"):
            name = key[len("store.") : -len(".url")]
            found[name] = StoreConfig(name, value, cfg.get(f"store.{name}.endpoint"), cfg.get(f"store.{name}.region"))
    return found, cfg.get("thetastore.store")


def for_remote(store: GitStore, remote: str | None) -> StoreConfig | None:
    """The chunk store that versions pushed to (fetched from) Git remote `remote` use, if any."""
    found, default = stores(store)
    name = default
    if remote:
        r = _git(store, "config", f"remote.{remote}.thetastore")
        if r.returncode == 0:
            name = r.stdout.decode().strip()
    if not name or name == "git":
        return None
    if name not in found:
        raise ThetaStoreError(
            f"{CONFIG_FILE}: chunk store {name!r} is not defined", hint=f"theta-store remote add {name} URL (then commit {CONFIG_FILE})"
        )
    return found[name]


def add_store(store: GitStore, name: str, url: str, endpoint: str | None = None, region: str | None = None, default: bool = True) -> Path:
    """`theta-store remote add`: write the store into `.thetastore` and stage it."""
    if not name or any(c in name for c in ' "\\\n[]') or name == "git":
        raise ThetaStoreError(f"{name!r} cannot name a chunk store (no spaces, quotes or brackets; not 'git')")
    if not (url == "lfs" or url.startswith(("s3://", "http://", "https://", "file://"))):
        raise ThetaStoreError(
            f"{url!r}: a chunk store is s3://bucket/prefix, lfs (the Git remote's LFS server), an LFS server's URL"
            " or file:///path (a shared drive)"
        )
    path = store.worktree / CONFIG_FILE
    if not path.exists():
        text = config_text(store)
        path.write_bytes(text or b"")
    settings = [(f"store.{name}.url", url), (f"store.{name}.endpoint", endpoint), (f"store.{name}.region", region)]
    if default:
        settings.append(("thetastore.store", name))
    for key, value in settings:
        args = ["config", "-f", str(path)] + ([key, value] if value else ["--unset", key])
        r = _git(store, *args)
        if r.returncode not in (0, 5):  # 5: unset of a key that is not there
            raise ThetaStoreError(f"{path}: {r.stderr.decode(errors='replace').strip()}")
    _git(store, "add", "--", CONFIG_FILE)
    return path


def remove_store(store: GitStore, name: str) -> None:
    found, default = stores(store)
    if name not in found:
        raise ThetaStoreError(f"{CONFIG_FILE}: no chunk store named {name!r}")
    path = store.worktree / CONFIG_FILE
    _git(store, "config", "-f", str(path), "--remove-section", f"store.{name}")
    if default == name:
        _git(store, "config", "-f", str(path), "--unset", "thetastore.store")
    _git(store, "add", "--", CONFIG_FILE)


def open_store(store: GitStore, cfg: StoreConfig, remote: str | None = None) -> BlobStore:
    """The backend for `cfg` (imported here: the filter process pays for it only when used)."""
    if cfg.url.startswith("file://"):
        from .dirstore import DirStore

        return DirStore(cfg.url)
    if cfg.url.startswith("s3://"):
        from .s3store import S3Store

        return S3Store(cfg.url, endpoint=cfg.endpoint, region=cfg.region)
    from .lfsstore import LfsStore

    return LfsStore(cfg.url, store.worktree, remote)


def pack_size(store: GitStore) -> int:
    r = _git(store, "config", "--type=int", "thetastore.packSize")
    if r.returncode == 0 and r.stdout.strip():
        return max(int(r.stdout), 1 << 20)
    return PACK_SIZE


# ---- index records ----
def encode_record(placed: dict[bytes, Placed]) -> bytes:
    """msgpack {"v": 1, "objects": [key...], "sizes": [object size...], "frames": [[chunk, git id,
    length, planes, bases, object number, offset]...]} sorted by chunk id: the same placement
    gives the same bytes."""
    sizes = {p.key: p.size for p in placed.values()}
    keys = sorted(sizes)
    number = {k: i for i, k in enumerate(keys)}
    frames = [
        [cid, p.frame.object_id, p.frame.frame_len, p.frame.planes, list(p.frame.bases), number[p.key], p.offset]
        for cid, p in sorted(placed.items())
    ]
    record = {"v": RECORD_VERSION, "objects": keys, "sizes": [sizes[k] for k in keys], "frames": frames}
    return bytes(msgpack.packb(record, use_bin_type=True))


def decode_record(data: bytes, version: bytes) -> dict[bytes, Placed]:
    where = f"index record of checkpoint version {version.hex()[:16]}"
    try:
        rec = msgpack.unpackb(data, raw=False, strict_map_key=False)
        if not isinstance(rec, dict) or rec.get("v") != RECORD_VERSION:
            raise ValueError(f"unknown record version {rec.get('v') if isinstance(rec, dict) else type(rec).__name__}")
        keys = [str(k) for k in rec["objects"]]
        sizes = [int(n) for n in rec["sizes"]]
        if len(sizes) != len(keys):
            raise ValueError("objects and sizes differ in number")
        out: dict[bytes, Placed] = {}
        for cid, oid, flen, planes, bases, n, offset in rec["frames"]:
            if len(cid) != 32 or len(oid) != 20 or any(len(b) != 32 for b in bases) or flen < 0 or offset < 0:
                raise ValueError(f"bad entry for chunk {bytes(cid).hex()[:16]}")
            frame = StoredFrame(bytes(oid), int(flen), str(planes), tuple(bytes(b) for b in bases))
            if offset + flen > sizes[n]:
                raise ValueError(f"chunk {bytes(cid).hex()[:16]} lies past the end of its object")
            out[bytes(cid)] = Placed(frame, keys[n], int(offset), sizes[n])
        return out
    except (KeyError, TypeError, ValueError, IndexError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise CorruptObject(f"{where}: {e}", hint="run `theta-store fsck`") from None


def _journal(store: GitStore, bs: BlobStore) -> Path:
    """Objects this repository stored in `bs`, with the frames in each: what lets a push resume."""
    name = hashlib.sha256(bs.url.encode()).hexdigest()[:16]
    return store.state_dir / "chunkstore" / f"{name}.journal"


def _journal_entries(path: Path) -> dict[bytes, tuple[str, int, int]]:
    """chunk id -> (object key, offset, object size); a partial last entry (a crash mid-append)
    is ignored."""
    out: dict[bytes, tuple[str, int, int]] = {}
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return out
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(data)
    with contextlib.suppress(ValueError, msgpack.OutOfData):
        for entry in unpacker:
            key, size, frames = entry
            for cid, offset in frames:
                out[bytes(cid)] = (str(key), int(offset), int(size))
    return out


def _journal_add(path: Path, key: str, size: int, frames: list[tuple[bytes, int]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as f:
        f.write(msgpack.packb([key, size, [[cid, off] for cid, off in frames]], use_bin_type=True))
        f.flush()
        os.fsync(f.fileno())


# ---- push ----
def upload(
    store: GitStore,
    bs: BlobStore,
    versions: list[bytes],
    remote_indexed: Iterable[bytes],
    progress: bool = False,
) -> dict[str, Any]:
    """Put the frames of `versions` that the store lacks into it and write their index records
    (refs/theta-index/, local: the caller pushes them to Git). `remote_indexed`: versions whose
    index records the Git remote has (their frames are in the store)."""
    placed: dict[bytes, tuple[str, int, int]] = {}
    for v in remote_indexed:
        rec = store.read_index_record(v)
        if rec is not None:
            placed.update({cid: (p.key, p.offset, p.size) for cid, p in decode_record(rec[1], v).items()})
    journal = _journal(store, bs)
    journaled = _journal_entries(journal)
    frames: dict[bytes, dict[bytes, StoredFrame]] = {v: store.version_frames(v) for v in versions}
    todo: list[tuple[bytes, StoredFrame]] = []
    seen: set[bytes] = set()
    for v in sorted(versions):
        for cid, f in sorted(frames[v].items()):
            if cid not in placed and cid not in seen:
                seen.add(cid)
                todo.append((cid, f))
    # What the journal says was stored is checked once per object (one HEAD / batch request).
    gone = set(bs.missing(sorted({(journaled[c][0], 0) for c, _ in todo if c in journaled})))
    reuse = [(cid, f) for cid, f in todo if cid in journaled and journaled[cid][0] not in gone]
    for cid, _ in reuse:
        placed[cid] = journaled[cid]
    todo = [(cid, f) for cid, f in todo if cid not in placed]
    total = sum(f.frame_len for _, f in todo)
    sent = objects = skipped = 0
    target = pack_size(store)
    store.state_dir.mkdir(parents=True, exist_ok=True)
    with (
        Progress("Uploading frames", total, enabled=progress) as meter,
        tempfile.TemporaryDirectory(prefix="upload-", dir=store.state_dir) as tmp,
        ThreadPoolExecutor(max_workers=PARALLEL_PUTS) as pool,
    ):
        pending: list[Future[tuple[str, int, list[tuple[bytes, int]], bool]]] = []
        for group in _groups(todo, target):
            # Pack the next object while earlier ones upload; at most PARALLEL_PUTS wait on disk.
            path = Path(tmp) / f"obj-{objects}"
            offsets = _write_object(store, group, path)
            pending.append(pool.submit(_put_one, bs, path, offsets, meter))
            objects += 1
            while len(pending) >= PARALLEL_PUTS:
                sent, skipped = _done(journal, placed, *pending.pop(0).result(), sent, skipped)
        for fut in pending:
            sent, skipped = _done(journal, placed, *fut.result(), sent, skipped)
    for v in versions:
        manifest = store.read_manifest_bytes(v)
        entries = {cid: Placed(f, *placed[cid]) for cid, f in frames[v].items()}
        store.write_index_record(v, manifest, encode_record(entries))
    return {"objects": objects, "objects_sent": sent, "objects_skipped": skipped, "frames": len(todo), "bytes": total, "reused": len(reuse)}


def _done(
    journal: Path,
    placed: dict[bytes, tuple[str, int, int]],
    key: str,
    size: int,
    offsets: list[tuple[bytes, int]],
    was_sent: bool,
    sent: int,
    skipped: int,
) -> tuple[int, int]:
    _journal_add(journal, key, size, offsets)
    for cid, off in offsets:
        placed[cid] = (key, off, size)
    return (sent + 1, skipped) if was_sent else (sent, skipped + 1)


def _groups(todo: list[tuple[bytes, StoredFrame]], target: int) -> Iterator[list[tuple[bytes, StoredFrame]]]:
    group: list[tuple[bytes, StoredFrame]] = []
    size = 0
    for item in todo:
        group.append(item)
        size += item[1].frame_len
        if size >= target:
            yield group
            group, size = [], 0
    if group:
        yield group


def _write_object(store: GitStore, group: list[tuple[bytes, StoredFrame]], path: Path) -> list[tuple[bytes, int]]:
    """Concatenate the group's frames into `path`; returns each chunk's offset. Frames are read
    from our packs by positioned reads (a mapped pack would count every page read as ours)."""
    paths, where = store.locate([f.object_id for _, f in group])
    found: dict[int, bytes | None] = {}
    by_pack: dict[int, list[int]] = {}
    for i, loc in enumerate(where):
        if loc is not None:
            by_pack.setdefault(loc.pack, []).append(i)
    for pack, items in by_pack.items():
        blobs = _native.read_pack_blobs(paths[pack], [(where[i].offset, group[i][1].frame_len) for i in items])  # type: ignore[union-attr]
        found.update(zip(items, blobs, strict=True))
    offsets = []
    at = 0
    with open(path, "wb") as out:
        for i, (cid, f) in enumerate(group):
            data = found.get(i)
            if data is None:
                data = store.read_object(f.object_id)  # loose, or stored by git as a delta
            if len(data) != f.frame_len:
                raise CorruptObject(f"frame of chunk {cid.hex()[:16]} is {len(data)} bytes, its table says {f.frame_len}")
            out.write(data)
            offsets.append((cid, at))
            at += len(data)
    return offsets


def _put_one(
    bs: BlobStore, path: Path, offsets: list[tuple[bytes, int]], meter: Progress
) -> tuple[str, int, list[tuple[bytes, int]], bool]:
    key = bs.key(path)
    size = path.stat().st_size
    stats = bs.put([(key, path, size)], progress=meter)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return key, size, offsets, key not in stats.skipped


# ---- fetch ----
def download(store: GitStore, bs: BlobStore, versions: list[bytes], progress: bool = False) -> dict[str, Any]:
    """Make `versions` (whose index records are here) local: fetch the frames not here from the
    chunk store into one new pack with the versions' objects, then point refs/theta/ at them."""
    records: dict[bytes, tuple[bytes, dict[bytes, Placed]]] = {}
    for v in versions:
        rec = store.read_index_record(v)
        if rec is None:
            raise ThetaStoreError(f"checkpoint version {v.hex()[:16]} has no index record here")
        records[v] = (rec[0], decode_record(rec[1], v))
    need: dict[bytes, Placed] = {}
    for _, placed in records.values():
        for cid, p in placed.items():
            if cid not in need and store.known_frame(cid) is None:
                need[cid] = p
    total = sum(p.frame.frame_len for p in need.values())
    meter = Progress("Downloading frames", total, enabled=progress)
    n_objects = sum(2 + 2 * len({cid[:1] for cid in placed}) for _, placed in records.values())
    builder = _native.PackBuilder(str(store.pack_dir), len(need) + n_objects)
    try:
        objects = _fetch_frames(bs, need, builder, meter)
        commits = []
        for v, (manifest, placed) in sorted(records.items()):
            frames_of = {cid: p.frame for cid, p in placed.items()}
            commit, objs = store.version_objects(v, manifest, frames_of)
            builder.add_objects([(o.type_name.decode(), o.as_raw_string()) for o in objs])
            commits.append((v, commit.id.decode()))
        path = builder.finish()
    except BaseException:
        builder.abort()
        raise
    finally:
        meter.__exit__(None, None, None)
    store.refresh()
    _git(store, "update-ref", "--stdin", input="".join(f"update refs/theta/{v.hex()} {c}\n" for v, c in commits).encode())
    for _, placed in records.values():
        store.record_chunks({cid: p.frame for cid, p in placed.items()})
    if path is not None:
        packs.settle(store, [str(path)])
    return {"versions": len(versions), "frames": len(need), "bytes": total, "objects": objects}


def _fetch_frames(bs: BlobStore, need: dict[bytes, Placed], builder: Any, meter: Progress) -> int:
    """Append the frames `need` names to `builder`, each checked against its Git object id;
    returns how many store objects were read."""
    by_key: dict[str, list[tuple[bytes, Placed]]] = {}
    for cid, p in sorted(need.items(), key=lambda kv: (kv[1].key, kv[1].offset)):
        by_key.setdefault(p.key, []).append((cid, p))
    for key, frames in _fetch_objects(bs, by_key):
        ids = builder.add_frames([data for _, _, data in frames])
        for (cid, p, _), (oid, _) in zip(frames, ids, strict=True):
            if oid != p.frame.object_id:
                raise BlobStoreCorrupt(
                    f"{bs.url}: object {key} at offset {p.offset}: the frame of chunk {cid.hex()[:16]} does not match its id"
                    f" (Git object {oid.hex()[:12]}, the index record says {p.frame.object_id.hex()[:12]})",
                    hint="the object in the store is damaged: push the version again from a clone that has it",
                )
            meter(p.frame.frame_len)
    return len(by_key)


class LazyVersion:
    """A version whose index record is here but whose frames may not be: what a lazy reader
    (`theta_store.open`) plans from, fetching only the frames of what it reads (`ensure`)."""

    def __init__(self, store: GitStore, bs: BlobStore, manifest_id: bytes) -> None:
        rec = store.read_index_record(manifest_id)
        if rec is None:
            raise ThetaStoreError(f"checkpoint version {manifest_id.hex()[:16]} has no index record here")
        self.store, self.bs, self.manifest_id = store, bs, manifest_id
        self.manifest = rec[0]
        self.placed = decode_record(rec[1], manifest_id)
        self.state_dir = store.state_dir

    def read_manifest_bytes(self, manifest_id: bytes) -> bytes:
        return self.manifest

    def version_frames(self, manifest_id: bytes) -> dict[bytes, StoredFrame]:
        return {cid: p.frame for cid, p in self.placed.items()}

    def locate(self, oids: Iterable[bytes]) -> tuple[list[str], list[Any]]:
        return self.store.locate(oids)

    def ensure(self, chunks: Iterable[bytes]) -> int:
        """Fetch the frames of these chunks, and of the chunks they are decoded against, that are
        not here; returns how many were fetched."""
        need: dict[bytes, Placed] = {}
        todo = list(chunks)
        while todo:
            cid = todo.pop()
            p = self.placed.get(cid)
            if p is None or cid in need or self.store.known_frame(cid) is not None:
                continue
            need[cid] = p
            todo.extend(p.frame.bases)
        if not need:
            return 0
        builder = _native.PackBuilder(str(self.store.pack_dir), len(need))
        try:
            with Progress("Downloading frames", sum(p.frame.frame_len for p in need.values())) as meter:
                _fetch_frames(self.bs, need, builder, meter)
            path = builder.finish()
        except BaseException:
            builder.abort()
            raise
        self.store.refresh()
        self.store.record_chunks({cid: p.frame for cid, p in need.items()})
        if path is not None:
            packs.settle(self.store, [str(path)])
        return len(need)

    def close(self) -> None:
        self.bs.close()


def _ranges(frames: list[tuple[bytes, Placed]]) -> list[tuple[int, int]]:
    return coalesce([(p.offset, p.offset + p.frame.frame_len) for _, p in frames], COALESCE_GAP)


def _fetch_objects(
    bs: BlobStore, by_key: dict[str, list[tuple[bytes, Placed]]]
) -> Iterator[tuple[str, list[tuple[bytes, Placed, memoryview]]]]:
    """Each object's frames, fetched PARALLEL_GETS objects ahead, in a fixed order."""

    def one(key: str, frames: list[tuple[bytes, Placed]]) -> list[tuple[bytes, Placed, memoryview]]:
        ranges = _ranges(frames)
        blobs = bs.get(key, ranges, frames[0][1].size)
        out = []
        i = 0
        for cid, p in frames:
            while not (ranges[i][0] <= p.offset < ranges[i][1]):
                i += 1
            start = p.offset - ranges[i][0]
            view = memoryview(blobs[i])[start : start + p.frame.frame_len]
            if len(view) != p.frame.frame_len:
                raise BlobStoreCorrupt(f"{bs.url}: object {key} is shorter than its index record says (chunk {cid.hex()[:16]})")
            out.append((cid, p, view))
        return out

    keys = list(by_key)
    bs.prefetch([(k, by_key[k][0][1].size) for k in keys])
    with ThreadPoolExecutor(max_workers=PARALLEL_GETS) as pool:
        futures: list[Future[list[tuple[bytes, Placed, memoryview]]]] = []
        nxt = 0
        for key in keys:
            while nxt < len(keys) and len(futures) < PARALLEL_GETS:
                futures.append(pool.submit(one, keys[nxt], by_key[keys[nxt]]))
                nxt += 1
            fut = futures.pop(0)
            yield key, fut.result()
