"""Store and restore one checkpoint file: format adapter -> spans -> Rust core -> Git objects."""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import _native, packs
from .errors import CorruptObject, ObjectNotFound
from .manifest import Manifest, Pointer, SpanEntry
from .plan import (
    PLAN_TEMP,
    PlannedChunk,
    ReadPlan,
    damaged_chunk,
    load_manifest,
    native_chunks,
    pack_lock,
    plan_for,
    plan_from_store,
    save_plan,
)
from .progress import Progress

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from pathlib import Path

    from typing_extensions import Buffer

    from .deflated import Deflated, Expanded
    from .formats.base import Layout
    from .gitstore import GitStore, StoredFrame

__all__ = ["DEFAULT_CHUNK_BYTES", "AddResult", "ScanSpan", "Scanned", "add_file", "load_manifest", "restore_to", "scan", "spans_of"]

# Chosen by benchmark (benches/bench_chunk_size.py): see README "Chunk size".
DEFAULT_CHUNK_BYTES = 2 << 20
# Most delta frames a chunk is decoded through (`thetastore.deltaDepth`): see README "Deltas".
DEFAULT_DELTA_DEPTH = 1
MAX_DELTA_DEPTH = 7  # the core refuses bases nested deeper than 8
# A user-supplied low-rank predictor per tensor name: (rows, cols, rank, U f32 bytes, V f32 bytes).
Factors = tuple[int, int, int, bytes, bytes]


@dataclass
class AddResult:
    pointer: Pointer
    manifest: Manifest
    raw_bytes: int
    new_chunks: int
    reused_chunks: int
    new_bytes: int  # frame bytes written now
    reused_bytes: int  # raw bytes that were already stored
    delta_chunks: int = 0  # new chunks stored as deltas


@dataclass(frozen=True)
class ScanSpan:
    """A tile of the file as the core scans it: a tensor region, or opaque bytes between regions."""

    offset: int
    length: int
    codec_dtype: str  # what the Rust codec sees ("BYTES" for opaque data)
    align: int
    opaque: bool
    name: str = ""
    dtype: str = "BYTES"  # as the format names it (kept in the manifest), e.g. "Q8_0"
    shape: tuple[int, ...] = ()


def spans_of(layout: Layout) -> list[ScanSpan]:
    """Tile the file: tensor regions plus opaque gaps between them."""
    from .formats.base import CODEC_DTYPES  # the adapters load only when a file is stored

    out: list[ScanSpan] = []
    pos = 0
    for r in layout.regions:
        if r.offset > pos:
            out.append(ScanSpan(pos, r.offset - pos, "BYTES", 1, True))
        codec = r.dtype if r.dtype in CODEC_DTYPES else "BYTES"
        out.append(ScanSpan(r.offset, r.length, codec, r.align, False, r.name, r.dtype, r.shape))
        pos = r.end
    if pos < layout.size:
        out.append(ScanSpan(pos, layout.size - pos, "BYTES", 1, True))
    return out


def native_spans(spans: list[ScanSpan]) -> list[tuple[int, int, str, int, bool]]:
    """The spans as `_native.scan_file` takes them."""
    return [(s.offset, s.length, s.codec_dtype, s.align, s.opaque) for s in spans]


# What `_native.scan_file` gives per chunk and `_native.write_pack` takes: (file offset, length,
# codec dtype, chunk id). Not the read side's chunks (plan.PlannedChunk).
ScannedChunk = tuple[int, int, str, bytes]


@dataclass
class Scanned:
    """A checkpoint cut into chunks and hashed: what an add knows before it touches the store."""

    path: str
    layout: Layout
    spans: list[ScanSpan]
    size: int
    file_id: bytes
    chunked: list[list[ScannedChunk]]
    stamp: tuple[int, int, int, int, int] | None
    chunk_bytes: int
    # The bytes themselves, when they are in memory rather than in the file at `path`.
    buffers: Sequence[Buffer] | None = None
    # The expanded file (deflated members inflated) that `layout`, `spans` and `chunked` describe,
    # when the file at `path` is stored so (theta_store.deflated); `add_file` closes it.
    expanded: Expanded | None = None

    @property
    def source(self) -> str:
        """The file the core reads: the expanded one, else the file itself."""
        return self.expanded.path if self.expanded is not None else self.path


def scan(
    path: str,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: bool | None = None,
    started: Callable[[], object] | None = None,
    known: Deflated | None = None,
) -> Scanned:
    """Parse the file's format, cut it into chunks and hash them (one pass, in the core).
    `started` is called when the hashing starts (the GIL is then free for other threads).
    An .npz whose deflated members the pinned zlib reproduces is scanned as its expanded file
    (`known`: an earlier version's deflated members, see deflated.expand)."""
    from .deflated import expand
    from .formats import detect  # imports every adapter: only when a file is really stored

    layout = detect(path)
    expanded, layout = expand(path, layout, known)
    try:
        spans = spans_of(layout)
        if started is not None:
            started()
        with Progress(f"hashing {os.path.basename(path)}", layout.size, progress) as p:
            source = expanded.path if expanded is not None else path
            size, file_id, chunked, stamp = _native.scan_file(source, native_spans(spans), chunk_bytes, p)
    except BaseException:
        if expanded is not None:
            expanded.close()
        raise
    return Scanned(path, layout, spans, size, file_id, chunked, stamp, chunk_bytes, expanded=expanded)


def add_file(
    store: GitStore,
    path: str,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: bool | None = None,
    scanned: Scanned | None = None,
    base: Pointer | None = None,
    max_depth: int = DEFAULT_DELTA_DEPTH,
    factors: dict[str, Factors] | None = None,
    lossy: dict[str, dict[str, Any]] | None = None,
    before_store: Callable[[], object] | None = None,
) -> AddResult:
    """Store the file at `path` and return its pointer. Nothing is changed if anything fails.
    `scanned`: the file's scan, if it was done already (with this path and chunk size).
    `base`: an earlier version of the file (usually the one in HEAD): each tensor that changed but
    kept its name, shape and dtype is coded against its chunks there, chunk by chunk as the
    smallest of the plain frame and the deltas, at most `max_depth` deltas deep (0: no deltas).
    `factors`: low-rank predictors of the change per tensor name (a LoRA adapter's).
    `lossy`: what the manifest records of tensors that are approximations (lossy.apply_lossy).
    `before_store`: called once the file is read and parsed, before anything is written (where a
    caller takes its locks, so that a file refused writes nothing, not even a lock file)."""
    from .gitstore import remove_stale

    remove_stale(store.pack_dir, "tmp_pack_theta_")  # packs (and keep files) of an add that was killed
    remove_stale(store.state_dir / "plans", PLAN_TEMP)
    if scanned is None or scanned.path != path or scanned.chunk_bytes != chunk_bytes:
        scanned = scan(path, chunk_bytes, progress, known=_deflated_of(store, base))
    try:
        if before_store is not None:
            before_store()
        return _add_scanned(store, path, chunk_bytes, progress, scanned, base, max_depth, factors, lossy)
    finally:
        if scanned.expanded is not None:
            scanned.expanded.close()


def _add_scanned(
    store: GitStore,
    path: str,
    chunk_bytes: int,
    progress: bool | None,
    scanned: Scanned,
    base: Pointer | None,
    max_depth: int,
    factors: dict[str, Factors] | None,
    lossy: dict[str, dict[str, Any]] | None,
) -> AddResult:
    layout, size, file_id = scanned.layout, scanned.size, scanned.file_id
    entries: list[SpanEntry] = []
    all_chunks: dict[bytes, ScannedChunk] = {}
    for span, chunks in zip(scanned.spans, scanned.chunked, strict=True):
        entries.append(
            SpanEntry(
                kind="skeleton" if span.opaque else "tensor",
                offset=span.offset,
                length=span.length,
                chunks=tuple((cid, n) for _, n, _, cid in chunks),
                name=span.name,
                dtype=span.dtype,
                shape=span.shape,
            )
        )
        for c in chunks:
            all_chunks.setdefault(c[3], c)
    deflated = scanned.expanded.deflated if scanned.expanded is not None else None
    manifest = Manifest(layout.format, size, file_id, chunk_bytes, entries, layout.metadata, layout.note, dict(lossy or {}), deflated)
    mbytes = manifest.to_bytes()

    # Shared from the lookup of stored frames until the version's ref names them (_add_frames lets
    # go then): no gc prunes or moves a frame this add reuses or codes against before the new
    # version keeps it.
    with contextlib.ExitStack() as reading:
        reading.enter_context(pack_lock(store.state_dir, shared=True))
        frames: dict[bytes, StoredFrame] = {}
        todo: list[ScannedChunk] = []
        for cid, c in all_chunks.items():
            known = store.known_frame(cid)
            if known is not None:
                frames[cid] = known
            else:
                todo.append(c)
        todo.sort()
        max_depth = min(max_depth, MAX_DELTA_DEPTH)
        deltas = _delta_plan(store, scanned, todo, base, factors or {}, max_depth) if base is not None and max_depth > 0 else None
        if deltas is not None:
            coded = {c[3] for job in deltas.jobs for c in job[4]}
            todo = [c for c in todo if c[3] not in coded]
        if deltas is not None:
            try:
                return _add_frames(store, path, progress, scanned, manifest, mbytes, all_chunks, frames, todo, deltas, max_depth, reading)
            except (CorruptObject, ObjectNotFound) as e:
                # A damaged base must not stop the new version from being saved (git stash, a fine-tune's
                # add): its tensors are stored whole instead, and the damage is named once.
                assert base is not None and deltas.jobs
                sys.stderr.write(
                    f"theta-store: {path}: version {base.manifest_id.hex()[:16]} (the delta base) is damaged, storing whole frames: {e}\n"
                )
                todo = sorted(c for c in all_chunks.values() if c[3] not in frames)
        return _add_frames(store, path, progress, scanned, manifest, mbytes, all_chunks, frames, todo, None, max_depth, reading)


def _add_frames(
    store: GitStore,
    path: str,
    progress: bool | None,
    scanned: Scanned,
    manifest: Manifest,
    mbytes: bytes,
    all_chunks: dict[bytes, ScannedChunk],
    frames: dict[bytes, StoredFrame],
    todo: list[ScannedChunk],
    deltas: _Deltas | None,
    max_depth: int,
    reading: contextlib.ExitStack,
) -> AddResult:
    """The rest of `add_file`: one pack holding the `todo` chunks' frames (and `deltas`' coded
    chunks), then the version's objects; `frames` holds the chunks already stored. `reading` holds
    the shared pack lock: closed once the version's ref is written, before the rollup."""
    layout = scanned.layout
    manifest_id = _native.chunk_id(mbytes)
    frames = dict(frames)
    # One pack per add: the new frames, then the version's objects (which name the frames).
    try:
        written, new, frames, pack = _write_version(store, path, manifest_id, mbytes, frames, todo, deltas, scanned, max_depth, progress)
    except OSError as e:
        from .errors import disk_full
        from .sizes import human_size

        raw = sum(c[1] for c in todo) + (deltas.bytes if deltas else 0)
        full = disk_full(e, path, str(store.pack_dir), f"writing its frames (up to {human_size(raw)})", "nothing was stored")
        if full is None:
            raise
        raise full from None
    reading.close()
    store.record_chunks(new)
    # Before the plan is saved: a rollup moves the frames the plan names.
    rolled = packs.settle(store, [pack] if pack is not None else [])
    pointer = Pointer(manifest_id, manifest.file_size, manifest.file_blake3, len(manifest.tensors), layout.format)
    # Where each chunk is, for the next checkout of this version (an old version, the usual case):
    # it then starts streaming at once (plan.load_plan). The new frames' places are known; a rollup
    # of the tier the pack joined moved them, and the pack indexes say where to.
    placed = {w.object_id: (pack, w.offset) for w in written} if pack is not None and not rolled["packs"] else {}
    save_plan(store.state_dir, pointer, plan_from_store(store, manifest_id, manifest, frames, placed))
    reused_raw = sum(c[1] for cid, c in all_chunks.items() if cid not in new)
    return AddResult(
        pointer,
        manifest,
        manifest.file_size,
        len(new),
        sum(1 for cid in all_chunks if cid not in new),
        sum(f.frame_len for f in new.values()),
        reused_raw,
        sum(1 for f in new.values() if f.bases),
    )


def _write_version(
    store: GitStore,
    path: str,
    manifest_id: bytes,
    mbytes: bytes,
    frames: dict[bytes, StoredFrame],
    todo: list[ScannedChunk],
    deltas: _Deltas | None,
    scanned: Scanned,
    max_depth: int,
    progress: bool | None,
) -> tuple[list[Any], dict[bytes, StoredFrame], dict[bytes, StoredFrame], str | None]:
    """Write the new frames and the version's objects into one new pack and point the version's
    ref at it; a failure leaves no pack. Returns (frames written, new frames by chunk, all
    frames by chunk, the pack's path or None)."""
    from .gitstore import StoredFrame, with_bases

    stamp = scanned.stamp
    builder = _native.PackBuilder(str(store.pack_dir), store.version_object_count(c[3] for c in todo))
    with builder:
        with Progress(f"storing {os.path.basename(path)}", sum(c[1] for c in todo) + (deltas.bytes if deltas else 0), progress) as p:
            if scanned.buffers is not None:
                written = builder.write_buffers(scanned.buffers, todo, p)
            else:
                written = builder.write_file(scanned.source, todo, stamp, p)
            if deltas is not None and deltas.jobs:
                written += builder.write_deltas(
                    deltas.jobs,
                    deltas.plan.packs,
                    store.read_object,
                    deltas.plan.native_bases(),
                    max_depth,
                    path=scanned.source if scanned.buffers is None else None,
                    stamp=stamp,
                    buffers=scanned.buffers,
                    progress=p,
                )
        new = {w.chunk_id: StoredFrame(w.object_id, w.frame_len, w.planes, tuple(w.bases)) for w in written}
        frames.update(new)
        if deltas is not None:
            base_frames = deltas.frames
            frames = with_bases(frames, lambda cid: base_frames.get(cid) or store.known_frame(cid), path)
        finished: list[Path | None] = []

        def finish(objects: list[tuple[str, bytes]]) -> None:
            builder.add_objects(objects)
            finished.append(builder.finish())

        store.write_version(manifest_id, mbytes, frames, write=finish)
        if not finished:  # the version was there already: the frames alone
            finished.append(builder.finish())
            store.refresh()
    pack = os.fspath(finished[0]) if finished[0] is not None else None
    return written, new, frames, pack


def _deflated_of(store: GitStore, base: Pointer | None) -> Deflated | None:
    """The deflated members of version `base`, if it is here and has any."""
    if base is None:
        return None
    try:
        return load_manifest(store, base.manifest_id).deflated
    except (ObjectNotFound, CorruptObject):
        return None


@dataclass
class _Deltas:
    """The changed tensors of an add that have a base, as `PackBuilder.write_deltas` takes them."""

    jobs: list[Any]
    plan: ReadPlan  # the base version's (its chunks and theirs bases, with their places)
    frames: dict[bytes, StoredFrame]  # the base version's frames
    bytes: int


def _delta_plan(
    store: GitStore, scanned: Scanned, todo: list[ScannedChunk], base: Pointer, factors: dict[str, Factors], max_depth: int
) -> _Deltas | None:
    """Pair each tensor with new chunks with the same tensor (name, shape, dtype) of version
    `base`. None when that version is not here (the add then stores whole frames).

    A chunk of the base version that is already `max_depth` deltas deep is replaced by the
    whole frame its chain starts from (the same place of the tensor in an older version): the
    new chunk is coded against that keyframe, one delta deep, rather than stored whole. A
    chunk changed in every version (a training run's checkpoints) is so coded against the
    keyframe, until a whole frame is smaller than the delta and the chain starts again."""
    try:
        bm = load_manifest(store, base.manifest_id)
        bframes = store.version_frames(base.manifest_id)
        bplan = plan_from_store(store, base.manifest_id, bm, bframes)
    except (ObjectNotFound, CorruptObject):
        return None
    # Each base tensor and where its chunks start in the base plan (which is in manifest order).
    btensors: dict[str, tuple[SpanEntry, int]] = {}
    pos = 0
    for s in bm.spans:
        if s.kind == "tensor":
            btensors.setdefault(s.name, (s, pos))
        pos += len(s.chunks)
    planned = {c.chunk_id: c for c in [*bplan.chunks, *bplan.bases]}

    def chain(cid: bytes) -> tuple[int, bytes]:
        """A base chunk's depth and the chunk its chain starts from (the first base is the
        same place's chunk in the version before; any other is a factors chunk)."""
        depth = 0
        while bframes[cid].bases and depth <= MAX_DELTA_DEPTH:
            cid = bframes[cid].bases[0]
            depth += 1
        return depth, cid

    def base_chunks(chunks: list[PlannedChunk]) -> list[PlannedChunk]:
        out = []
        for c in chunks:
            depth, root = chain(c.chunk_id) if c.chunk_id in bframes else (0, c.chunk_id)
            r = planned.get(root)
            out.append(PlannedChunk(c.length, r.chunk_id, r.object_id, r.location) if depth >= max_depth and r is not None else c)
        return out

    wanted = {c[3] for c in todo}
    jobs: list[Any] = []
    total = 0
    taken: set[bytes] = set()
    for span, chunks in zip(scanned.spans, scanned.chunked, strict=True):
        if span.opaque:
            continue
        if span.name not in btensors:
            continue
        b, k = btensors[span.name]
        if b.dtype != span.dtype or b.shape != span.shape or b.length != span.length:
            continue
        mine = [c for c in chunks if c[3] in wanted and c[3] not in taken]
        if not mine:
            continue
        taken.update(c[3] for c in mine)
        bchunks = native_chunks(base_chunks(bplan.chunks[k : k + len(b.chunks)]))
        f = factors.get(span.name)
        jobs.append((span.offset, span.length, span.codec_dtype, list(span.shape), mine, bchunks, f))
        total += sum(c[1] for c in mine)
    return _Deltas(jobs, bplan, bframes, total)


def scan_buffers(
    name: str, layout: Layout, buffers: Sequence[Buffer], chunk_bytes: int = DEFAULT_CHUNK_BYTES, progress: bool | None = None
) -> Scanned:
    """`scan` of a checkpoint whose bytes are in memory: `buffers` laid end to end are the file
    that `layout` describes (e.g. the header's bytes, then each tensor's)."""
    spans = spans_of(layout)
    with Progress(f"hashing {name}", layout.size, progress) as p:
        size, file_id, chunked, _ = _native.scan_buffers(
            list(buffers), [(s.offset, s.length, s.codec_dtype, s.align, s.opaque) for s in spans], chunk_bytes, p
        )
    return Scanned(name, layout, spans, size, file_id, chunked, None, chunk_bytes, list(buffers))


def add_buffers(
    store: GitStore,
    name: str,
    layout: Layout,
    buffers: Sequence[Buffer],
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: bool | None = None,
) -> AddResult:
    """Store a checkpoint from memory without writing it to a file: the same version, manifest
    id included, as `add_file` of a file holding those bytes. `name` names it in messages."""
    scanned = scan_buffers(name, layout, buffers, chunk_bytes, progress)
    return add_file(store, name, chunk_bytes, progress, scanned)


def restore_to(store: GitStore, pointer: Pointer, dest: str, progress: bool | None = None) -> Manifest:
    """Rebuild the checkpoint of `pointer` at `dest`: temp file in the same folder, fsync, rename."""
    # Shared: no gc or rollup removes a pack between the plan naming it and the core opening it.
    with pack_lock(store.state_dir, shared=True):
        return _restore_locked(store, pointer, dest, progress)


def _restore_locked(store: GitStore, pointer: Pointer, dest: str, progress: bool | None) -> Manifest:
    from .errors import ThetaStoreError
    from .gitstore import remove_stale  # dulwich: only when a store is at hand anyway

    try:
        manifest = load_manifest(store, pointer.manifest_id)
        plan = plan_for(store, pointer, manifest=manifest, where=dest)
    except ThetaStoreError as e:
        raise _damaged_version(e, dest, pointer, "") from None
    folder = os.path.dirname(os.path.abspath(dest))
    os.makedirs(folder, exist_ok=True)
    import tempfile  # here, not at the top: an add need not wait for pathlib and tempfile
    from pathlib import Path

    prefix = f".{os.path.basename(dest)}.theta-tmp."
    remove_stale(Path(folder), prefix)  # left by a restore that was killed
    fd, tmp = tempfile.mkstemp(prefix=f"{prefix}{os.getpid()}_", dir=folder)
    os.close(fd)
    try:
        try:
            with Progress(f"restoring {os.path.basename(dest)}", manifest.size, progress) as p:
                if manifest.deflated is None:
                    _restore(store, plan, tmp, dest, pointer, p)
                else:
                    _restore_deflated(store, plan, manifest.deflated, tmp, dest, pointer, p)
        except OSError as e:
            from .errors import disk_full
            from .sizes import human_size

            full = disk_full(e, dest, folder, f"restoring it ({human_size(plan.size)})", "the file was left as it was")
            if full is None:
                raise
            raise full from None
        try:
            os.chmod(tmp, os.stat(dest).st_mode & 0o7777)
        except FileNotFoundError:
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return manifest


def _restore(store: GitStore, plan: ReadPlan, out: str, dest: str, pointer: Pointer, progress: Callable[[int], object] | None) -> None:
    from .errors import ThetaStoreError

    try:
        _native.restore_file(out, plan.native(), plan.packs, plan.size, plan.blake3, store.read_object, progress, plan.native_bases())
    except ThetaStoreError as e:
        raise _damaged_version(e, dest, pointer, damaged_chunk(plan, store.read_object)) from None


def _restore_deflated(
    store: GitStore, plan: ReadPlan, deflated: Deflated, out: str, dest: str, pointer: Pointer, progress: Callable[[int], object] | None
) -> None:
    """Restore the expanded file to a nameless temporary beside `out`, then deflate its members
    back into `out` (theta_store.deflated)."""
    from .deflated import rebuild, temporary
    from .errors import ThetaStoreError

    with temporary(out) as expanded:
        path = f"/proc/self/fd/{expanded.fileno()}"
        _restore(store, plan, path, dest, pointer, progress)
        try:
            rebuild(path, out, deflated)
        except ThetaStoreError as e:
            raise _damaged_version(e, dest, pointer, "") from None


def _damaged_version(e: Exception, dest: str, pointer: Pointer, chunk: str) -> Exception:
    """A version that cannot be read, said naming the checkpoint, the version and (if known) the chunk."""
    from .errors import PointerError, ThetaStoreError, VersionsMissing

    if isinstance(e, (PointerError, VersionsMissing)) or not e.args:
        return e
    hint = "`theta-store fsck` lists what is damaged; `theta-store fsck --repair` fetches an intact copy from a remote"
    message = str(e.args[0]).removeprefix(f"{dest}: ")
    cls: type[ThetaStoreError] = ObjectNotFound if type(e) is ObjectNotFound else CorruptObject
    return cls(f"{dest}: checkpoint version {pointer.manifest_id.hex()[:16]} cannot be read{chunk}: {message}", hint=hint)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
