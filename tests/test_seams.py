"""Issue 12's seams seen from Python: a version written from memory, one pack per add, the
core's errors as their own exceptions, and the core called from several threads at once."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest

from test_git_e2e import g, global_config, model_bytes
from theta_store import _native
from theta_store.checkpoint import add_buffers, add_file, restore_to
from theta_store.errors import CorruptObject, FileChanged, InvalidArgument, ObjectNotFound, ProtocolError
from theta_store.formats import detect
from theta_store.gitstore import GitStore

__all__ = ["global_config"]


def _repo(path: Path) -> GitStore:
    path.mkdir()
    g(path, "init", "-q", "-b", "main")
    return GitStore(path)


def _packs(store: GitStore) -> set[str]:
    return {p.name for p in store.pack_dir.glob("*.pack")} if store.pack_dir.exists() else set()


def _pack_objects(idx: Path) -> int:
    return int.from_bytes(idx.read_bytes()[8 + 255 * 4 : 8 + 256 * 4], "big")


def test_a_version_written_from_memory_is_the_version_of_the_file(tmp_path: Path) -> None:
    data = model_bytes(seed=3)
    path = tmp_path / "m.safetensors"
    path.write_bytes(data)
    layout = detect(str(path))
    # The header's bytes as bytes, each tensor as a float32 array, the gaps as memoryviews.
    arr = np.frombuffer(data, np.uint8)
    buffers: list[object] = []
    pos = 0
    for r in layout.regions:
        if r.offset > pos:
            buffers.append(data[pos : r.offset])
        buffers.append(arr[r.offset : r.end].view(np.float32) if r.length % 4 == 0 else memoryview(data)[r.offset : r.end])
        pos = r.end
    buffers.append(memoryview(data)[pos:])

    with _repo(tmp_path / "a") as a, _repo(tmp_path / "b") as b:
        from_memory = add_buffers(a, "m.safetensors", layout, buffers)  # type: ignore[arg-type]
        from_file = add_file(b, str(path))
        assert from_memory.pointer.manifest_id == from_file.pointer.manifest_id
        assert from_memory.manifest.to_bytes() == from_file.manifest.to_bytes()
        out = tmp_path / "out.safetensors"
        restore_to(a, from_memory.pointer, str(out))
        assert out.read_bytes() == data
    # Not C-contiguous: refused, not read wrongly.
    with pytest.raises(ValueError, match="contiguous"):
        _native.scan_buffers([np.zeros(64, np.float32)[::2]], [(0, 128, "F32", 4, False)], 1 << 20)


def test_an_add_writes_one_pack_with_frames_and_version_objects(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    with _repo(tmp_path / "r") as store:
        for bias in (0.0, 1.0):  # a first version, then one with a changed bias
            path.write_bytes(model_bytes(seed=1, bias=bias))
            before, stored = _packs(store), set(store.chunk_index())
            r = add_file(store, str(path))
            new = _packs(store) - before
            assert len(new) == 1, new
            idx = store.pack_dir / next(iter(new)).replace(".pack", ".idx")
            fresh = {c for s in r.manifest.spans for c, _ in s.chunks} - stored
            assert len(fresh) == r.new_chunks
            # The pack's header was announced right: the new frames plus the version's new objects.
            assert _pack_objects(idx) == r.new_chunks + store.version_object_count(fresh)
            g(store.worktree, "verify-pack", str(idx))
        g(store.worktree, "fsck", "--strict", "--no-dangling")
        assert not [n for n in os.listdir(store.pack_dir) if n.startswith("tmp_")]


def test_pack_builder_leaves_nothing_on_error_or_ctrl_c(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    path.write_bytes(model_bytes(seed=2))
    size, _, chunked, stamp = _native.scan_file(str(path), [(0, path.stat().st_size, "BYTES", 1, True)], 1 << 16)
    chunks = [c for s in chunked for c in s]
    pack_dir = tmp_path / "pack"
    pack_dir.mkdir()
    calls = []

    def interrupt(n: int) -> None:
        calls.append(n)
        if len(calls) > 40:  # after some frames are in the pack
            raise KeyboardInterrupt

    b = _native.PackBuilder(str(pack_dir))
    with pytest.raises(KeyboardInterrupt):
        b.write_file(str(path), chunks, stamp, interrupt)
    assert len(calls) > 40 and os.listdir(pack_dir) == []
    with pytest.raises(InvalidArgument, match="finished"):
        b.finish()
    with _native.PackBuilder(str(pack_dir)) as b:
        b.write_file(str(path), chunks[:3], stamp)
        b.add_objects([("blob", b"x")])
    assert os.listdir(pack_dir) == [], "left unfinished: aborted"
    b = _native.PackBuilder(str(pack_dir), objects=1)
    written = b.write_file(str(path), chunks[:3], stamp)
    b.add_objects([("blob", b"x")])
    pack = b.finish()
    assert pack is not None and not b.recounted
    assert [w.chunk_id for w in written] == [c[3] for c in chunks[:3]]
    data = Path(pack).read_bytes()
    assert all(data[w.offset] >> 4 & 7 == 3 for w in written), "each offset is a blob entry"
    assert size == path.stat().st_size


# ---- each core error is its own exception ----


def test_changed_while_being_added_is_file_changed(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(bytes(1 << 16))
    _, _, chunked, stamp = _native.scan_file(str(path), [(0, 1 << 16, "BYTES", 1, True)], 1 << 12)
    path.write_bytes(bytes(1 << 16))  # rewritten: a new ctime
    with pytest.raises(FileChanged, match="changed while being added"):
        _native.write_pack(str(path), chunked[0], str(tmp_path / "pack"), stamp)
    assert isinstance(FileChanged("x"), OSError)


def test_a_broken_pkt_line_stream_is_a_protocol_error(tmp_path: Path) -> None:
    bad = tmp_path / "in"
    bad.write_bytes(b"zzzz")
    with pytest.raises(ProtocolError, match="bad packet header"):
        _native.receive_content(str(bad), None, str(tmp_path), compare=False)
    assert not isinstance(ProtocolError("x"), ValueError), "the filter tells it from bad data"


def test_a_damaged_frame_is_corrupt_object() -> None:
    f = bytearray(_native.encode_frame(bytes(range(256)) * 64, "BYTES"))
    f[-1] ^= 1
    with pytest.raises(CorruptObject):
        _native.decode_frame(bytes(f))
    with pytest.raises(CorruptObject):
        _native._raise_core_error("corrupt_pack")


def test_a_caller_bug_is_invalid_argument() -> None:
    with pytest.raises(InvalidArgument, match="chunk_bytes"):
        _native.scan_buffers([b"abc"], [(0, 3, "BYTES", 1, True)], 1)
    with pytest.raises(InvalidArgument):
        _native.PackBuilder("/nonexistent").add_objects([("tag", b"x")])


def test_not_found_io_and_interrupted() -> None:
    with pytest.raises(ObjectNotFound):
        _native._raise_core_error("not_found")
    with pytest.raises(OSError) as e:
        _native._raise_core_error("io")
    assert type(e.value) is FileNotFoundError and e.value.filename == "some/path"
    with pytest.raises(KeyboardInterrupt):
        _native._raise_core_error("interrupted")
    with pytest.raises(FileNotFoundError):
        _native.scan_file("/nonexistent/file", [], 1 << 20)


# ---- the core from several threads at once ----


def test_the_core_from_several_threads_at_once() -> None:
    rng = np.random.default_rng(0)
    blobs = [(rng.standard_normal(1 << 16) * 0.02).astype(np.float32).tobytes() for _ in range(8)]
    shared = _native.Hasher()
    results: dict[int, bool] = {}
    start = threading.Barrier(8)

    def work(i: int) -> None:
        start.wait()
        ok = True
        for _ in range(5):
            f = _native.encode_frame(blobs[i], "F32")
            ok &= _native.decode_frame(f) == blobs[i]
            ok &= _native.chunk_id(blobs[i]) == _native.chunk_id(memoryview(blobs[i]))
            shared.update(blobs[i])
        results[i] = ok

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == dict.fromkeys(range(8), True)
    # The shared hasher saw 40 whole updates, one at a time (their order is the threads').
    assert len(shared.digest()) == 32
    one = _native.Hasher()
    for _ in range(40):
        one.update(blobs[0])
    same = _native.Hasher()
    threads = [threading.Thread(target=lambda: [same.update(blobs[0]) for _ in range(10)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert same.digest() == one.digest()
