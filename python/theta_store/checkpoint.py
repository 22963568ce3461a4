"""Store and restore one checkpoint file: format adapter -> spans -> Rust core -> Git objects."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import _native
from .errors import CorruptObject
from .filterproc import save_plan
from .manifest import Manifest, Pointer, SpanEntry
from .progress import Progress

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from typing_extensions import Buffer

    from .formats.base import Layout
    from .gitstore import GitStore, StoredFrame

# Chosen by benchmark (benches/bench_chunk_size.py): see README "Chunk size".
DEFAULT_CHUNK_BYTES = 2 << 20


@dataclass
class AddResult:
    pointer: Pointer
    manifest: Manifest
    raw_bytes: int
    new_chunks: int
    reused_chunks: int
    new_bytes: int  # frame bytes written now
    reused_bytes: int  # raw bytes that were already stored


@dataclass(frozen=True)
class PlannedSpan:
    offset: int
    length: int
    codec_dtype: str  # what the Rust codec sees ("BYTES" for opaque data)
    align: int
    opaque: bool
    name: str = ""
    dtype: str = "BYTES"  # as the format names it (kept in the manifest), e.g. "Q8_0"
    shape: tuple[int, ...] = ()


def spans_of(layout: Layout) -> list[PlannedSpan]:
    """Tile the file: tensor regions plus opaque gaps between them."""
    from .formats.base import CODEC_DTYPES  # the adapters load only when a file is stored

    out: list[PlannedSpan] = []
    pos = 0
    for r in layout.regions:
        if r.offset > pos:
            out.append(PlannedSpan(pos, r.offset - pos, "BYTES", 1, True))
        codec = r.dtype if r.dtype in CODEC_DTYPES else "BYTES"
        out.append(PlannedSpan(r.offset, r.length, codec, r.align, False, r.name, r.dtype, r.shape))
        pos = r.end
    if pos < layout.size:
        out.append(PlannedSpan(pos, layout.size - pos, "BYTES", 1, True))
    return out


@dataclass
class Scanned:
    """A checkpoint cut into chunks and hashed: what an add knows before it touches the store."""

    path: str
    layout: Layout
    spans: list[PlannedSpan]
    size: int
    file_id: bytes
    chunked: list[list[tuple[int, int, str, bytes]]]
    stamp: tuple[int, int, int, int, int] | None
    chunk_bytes: int
    # The bytes themselves, when they are in memory rather than in the file at `path`.
    buffers: Sequence[Buffer] | None = None


def scan(
    path: str, chunk_bytes: int = DEFAULT_CHUNK_BYTES, progress: bool | None = None, started: Callable[[], object] | None = None
) -> Scanned:
    """Parse the file's format, cut it into chunks and hash them (one pass, in the core).
    `started` is called when the hashing starts (the GIL is then free for other threads)."""
    from .formats import detect  # imports every adapter: only when a file is really stored

    layout = detect(path)
    spans = spans_of(layout)
    if started is not None:
        started()
    with Progress(f"hashing {os.path.basename(path)}", layout.size, progress) as p:
        size, file_id, chunked, stamp = _native.scan_file(
            path, [(s.offset, s.length, s.codec_dtype, s.align, s.opaque) for s in spans], chunk_bytes, p
        )
    return Scanned(path, layout, spans, size, file_id, chunked, stamp, chunk_bytes)


def add_file(
    store: GitStore, path: str, chunk_bytes: int = DEFAULT_CHUNK_BYTES, progress: bool | None = None, scanned: Scanned | None = None
) -> AddResult:
    """Store the file at `path` and return its pointer. Nothing is changed if anything fails.
    `scanned`: the file's scan, if it was done already (with this path and chunk size)."""
    from .gitstore import StoredFrame, remove_stale

    remove_stale(store.pack_dir, "tmp_pack_theta_")  # packs of an add that was killed
    if scanned is None or scanned.path != path or scanned.chunk_bytes != chunk_bytes:
        scanned = scan(path, chunk_bytes, progress)
    layout, size, file_id, stamp = scanned.layout, scanned.size, scanned.file_id, scanned.stamp
    entries: list[SpanEntry] = []
    all_chunks: dict[bytes, tuple[int, int, str, bytes]] = {}
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
    manifest = Manifest(layout.format, size, file_id, chunk_bytes, entries, layout.metadata, layout.note)
    mbytes = manifest.to_bytes()
    manifest_id = _native.chunk_id(mbytes)

    frames: dict[bytes, StoredFrame] = {}
    todo: list[tuple[int, int, str, bytes]] = []
    for cid, c in all_chunks.items():
        known = store.known_frame(cid)
        if known is not None:
            frames[cid] = known
        else:
            todo.append(c)
    todo.sort()
    # One pack per add: the new frames, then the version's objects (which name the frames).
    builder = _native.PackBuilder(str(store.pack_dir), store.version_object_count(all_chunks))
    with builder:
        with Progress(f"storing {os.path.basename(path)}", sum(c[1] for c in todo), progress) as p:
            if scanned.buffers is not None:
                written = builder.write_buffers(scanned.buffers, todo, p)
            else:
                written = builder.write_file(path, todo, stamp, p)
        new = {w.chunk_id: StoredFrame(w.object_id, w.frame_len, w.planes) for w in written}
        frames.update(new)
        packs: list[str | None] = []

        def finish(objects: list[tuple[str, bytes]]) -> None:
            builder.add_objects(objects)
            packs.append(builder.finish())

        store.write_version(manifest_id, mbytes, frames, write=finish)
        if not packs:  # the version was there already: the frames alone
            packs.append(builder.finish())
            store.refresh()
    located = {w.object_id: (str(packs[0]), w.offset) for w in written}
    store.record_chunks(new)
    pointer = Pointer(manifest_id, size, file_id, len(manifest.tensors), layout.format)
    # Where each chunk is, for the next checkout of this version (an old version, the usual case):
    # it then starts streaming at once (filterproc.load_plan).
    in_order = [c for s in entries for c in s.chunks]
    save_plan(store.state_dir, pointer, (*chunk_tuples(store, manifest_id, in_order, frames, located), size, file_id))
    reused_raw = sum(c[1] for cid, c in all_chunks.items() if cid not in new)
    return AddResult(pointer, manifest, size, len(new), len(all_chunks) - len(new), sum(f.frame_len for f in new.values()), reused_raw)


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


def load_manifest(store: GitStore, manifest_id: bytes) -> Manifest:
    data = store.read_manifest_bytes(manifest_id)
    if _native.chunk_id(data) != manifest_id:
        raise CorruptObject(f"manifest {manifest_id.hex()[:16]} does not hash to its id", hint="run `theta-store fsck`")
    return Manifest.from_bytes(data, f"manifest {manifest_id.hex()[:16]}")


def chunk_tuples(
    store: GitStore,
    manifest_id: bytes,
    chunks: list[tuple[bytes, int]],
    frames: dict[bytes, StoredFrame] | None = None,
    located: dict[bytes, tuple[str, int]] | None = None,
) -> tuple[list[str], list[tuple[int, int, bytes, bytes]]]:
    """Pack paths, and per chunk (length, location, chunk id, object id), as the core reads them.
    `frames`: the version's frames when known (else read from its tree); `located`: (pack path,
    offset) of objects whose place is known (frames just written), the others are looked up."""
    if frames is None:
        frames = store.version_frames(manifest_id)
    missing = [cid for cid, _ in chunks if cid not in frames]
    if missing:
        raise CorruptObject(
            f"version {manifest_id.hex()[:16]} has no frame for chunk {missing[0].hex()[:16]}", hint="run `theta-store fsck`"
        )
    oids = [frames[cid].object_id for cid, _ in chunks]
    located = located or {}
    packs, locs = store.locate([o for o in oids if o not in located])
    numbers = {p: i for i, p in enumerate(packs)}
    found = iter(locs)
    out: list[tuple[int, int, bytes, bytes]] = []
    for (cid, n), oid in zip(chunks, oids, strict=True):
        if oid in located:
            pack, offset = located[oid]
            loc = (numbers.setdefault(pack, len(numbers)) << 48) | offset
        else:
            loc = next(found)
        out.append((n, loc, cid, oid))
    packs += list(numbers)[len(packs) :]
    return packs, out


def restore_to(store: GitStore, pointer: Pointer, dest: str, progress: bool | None = None) -> Manifest:
    """Rebuild the checkpoint of `pointer` at `dest`: temp file in the same folder, fsync, rename."""
    from .gitstore import remove_stale  # dulwich: only when a store is at hand anyway

    manifest = load_manifest(store, pointer.manifest_id)
    if manifest.blake3 != pointer.blake3 or manifest.size != pointer.size:
        raise CorruptObject(f"{dest}: pointer and manifest {pointer.manifest_id.hex()[:16]} disagree on the file")
    chunks = [c for s in manifest.spans for c in s.chunks]
    packs, tuples = chunk_tuples(store, pointer.manifest_id, chunks)
    folder = os.path.dirname(os.path.abspath(dest))
    os.makedirs(folder, exist_ok=True)
    import tempfile  # here, not at the top: pathlib and tempfile are 20 ms an add need not wait for
    from pathlib import Path

    prefix = f".{os.path.basename(dest)}.theta-tmp."
    remove_stale(Path(folder), prefix)  # left by a restore that was killed
    fd, tmp = tempfile.mkstemp(prefix=f"{prefix}{os.getpid()}_", dir=folder)
    os.close(fd)
    try:
        with Progress(f"restoring {os.path.basename(dest)}", manifest.size, progress) as p:
            _native.restore_file(tmp, tuples, packs, manifest.size, manifest.blake3, store.read_object, p)
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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
