"""Fuzz targets for every Python parser of theta-store that reads bytes from outside.

Each target takes one input (bytes) and runs a parser on it the way theta-store does. A parser
may refuse the input only with its documented error (FormatError, CorruptObject, PointerError,
ProtocolError...); anything else it raises is a fault, and so is an accepted input that breaks
the parser's promise (regions outside the file, a pointer that does not print back the same,
pkt-lines git would call broken). Memory and time are bounded by the runner (libFuzzer's
-rss_limit_mb and -timeout, and an address-space limit set by `run`).

    python benches/fuzz_targets.py TARGET SECONDS CORPUS_DIR [ARTIFACT_DIR]

(fault inputs are written to ARTIFACT_DIR/py-TARGET-crash-..., -timeout-..., -oom-...)

runs one target under atheris (coverage-guided libFuzzer) for SECONDS, seeded with files made
from tests/fixtures (written to CORPUS_DIR first); benches/fuzz.sh runs them all. `seeds(name)`
and `TARGETS` are what tests/test_fuzz_regressions.py replays.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import struct
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"


def _fixtures(*suffixes: str) -> Iterator[bytes]:
    for e in json.loads((FIXTURES / "MANIFEST.json").read_text())["files"]:
        if e["name"].endswith(suffixes):
            yield (FIXTURES / e["name"]).read_bytes()


def _check_layout(layout: Any, size: int) -> None:
    """The adapter contract (formats/base.py): regions sorted, disjoint, inside the file."""
    pos = 0
    for r in layout.regions:
        assert r.length >= 0 and r.offset >= pos and r.end <= size, f"region {r} out of order or past {size}"
        pos = r.end


def _adapter(module: str) -> Callable[[bytes], None]:
    def target(data: bytes) -> None:
        import importlib

        from theta_store.errors import FormatError

        mod = importlib.import_module(f"theta_store.formats.{module}")
        try:
            layout = mod.parse(f"fuzz.{module}", io.BytesIO(data), len(data))
        except FormatError as e:
            assert e.path and e.problem, "a FormatError names the file and the problem"
            return
        _check_layout(layout, len(data))

    return target


def _torch_pickle(data: bytes) -> None:
    from theta_store.errors import FormatError
    from theta_store.formats import torch

    with contextlib.suppress(FormatError, torch._Opaque):
        torch._Interpreter("fuzz.pt", "data.pkl", data).run()


def _sharded_index(data: bytes) -> None:
    from theta_store.errors import FormatError
    from theta_store.formats import sharded

    path = os.path.join(_scratch(), "model.safetensors.index.json")
    with open(path, "wb") as f:
        f.write(data)
    try:
        index = sharded.read_index(path)
    except FormatError:
        return
    base = os.path.dirname(path)
    for p in sharded.shard_paths(path, index):
        assert os.path.commonpath([base, os.path.normpath(p)]) == base, f"shard {p} escapes {base}"


def _pointer(data: bytes) -> None:
    from theta_store.errors import PointerError
    from theta_store.pointer import Pointer

    try:
        p = Pointer.parse(data)
    except PointerError:
        return
    assert p.to_bytes() == data, "an accepted pointer prints back byte for byte"


def _manifest(data: bytes) -> None:
    from theta_store.errors import CorruptObject
    from theta_store.manifest import Manifest

    try:
        m = Manifest.from_bytes(data)
    except CorruptObject:
        return
    pos = 0
    for s in m.spans:
        assert s.offset == pos and s.length >= 0 and all(n > 0 and len(c) == 32 for c, n in s.chunks), f"span {s.offset} of {s.length}"
        pos += s.length
    assert pos == m.size
    assert Manifest.from_bytes(m.to_bytes()) == m, "an accepted manifest survives writing it again"


_POINTER_FIELDS = (b"\x01" * 32, 1000, b"\x02" * 32, 1, "safetensors")


def _plan(data: bytes) -> None:
    from theta_store import plan
    from theta_store.pointer import Pointer

    state = os.path.join(_scratch(), "git", "theta-store")
    pointer = Pointer(*_POINTER_FIELDS)
    path = plan.plan_path(state, pointer.manifest_id)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    got = plan.load_plan(state, pointer)  # a saved plan is a cache: a bad one is None, never an error
    if got is not None:
        assert got.size == pointer.size and sum(c.length for c in got.chunks) == got.size
        assert all(c.length >= 0 and c.location is not None and 0 <= c.location.pack < len(got.packs) for c in got.chunks + got.bases)


_STORE: list[Any] = []


def _chunk_index(data: bytes) -> None:
    """chunks2.idx then chunk-bases2.idx (u16 LE length of the first): the local chunk index."""
    from theta_store.gitstore import GitStore

    if not _STORE:
        repo = os.path.join(_scratch(), "repo")
        os.makedirs(repo, exist_ok=True)
        import subprocess

        subprocess.run(["git", "init", "-q", repo], check=True)
        _STORE.append(GitStore(repo))
    store = _STORE[0]
    n = int.from_bytes(data[:2], "little")
    store.state_dir.mkdir(parents=True, exist_ok=True)
    store._index_path.write_bytes(data[2 : 2 + n])
    store._bases_path.write_bytes(data[2 + n :])
    store._index = None
    index = store.chunk_index()  # a cache: every record it holds is read, a partial one dropped
    assert all(len(k) == 32 and len(f.object_id) == 20 and all(len(b) == 32 for b in f.bases) for k, f in index.items())


def _frames_table(data: bytes) -> None:
    import msgpack

    from theta_store.gitstore import frame_entry

    try:
        table = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception:  # gitstore._table turns any unpack failure into CorruptObject
        return
    if not isinstance(table, dict):
        return
    for value in table.values():
        with contextlib.suppress(ValueError):
            frame_entry(value)


def _pktline(data: bytes) -> None:
    """The filter's reading of git's requests: text lists (handshake, headers) and content."""
    from theta_store.errors import ProtocolError
    from theta_store.filterproc import PktIO

    path = os.path.join(_scratch(), "pkt")
    with open(path, "wb") as f:
        f.write(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        pkt = PktIO(fd, io.BytesIO())
        want = _strict_pkts(data)
        got: list[bytes | None] = []
        try:
            while True:
                p = pkt.read_pkt()
                got.append(p)
        except EOFError:
            assert want is not None and want[: len(got)] == got, f"read {got!r}, git's framing gives {want!r}"
        except ProtocolError:
            assert want is None, f"refused packets git would accept: {want!r}"
        os.lseek(fd, 0, os.SEEK_SET)
        pkt = PktIO(fd, io.BytesIO())
        try:
            while True:
                pkt.read_text_list()
        except (EOFError, ProtocolError):
            pass
    finally:
        os.close(fd)


def _strict_pkts(data: bytes) -> list[bytes | None] | None:
    """git's framing of `data` (None: a flush packet), or None where git would call it broken;
    a stream cut short ends the list (EOF is not a framing error)."""
    out: list[bytes | None] = []
    pos = 0
    while pos + 4 <= len(data):
        head = data[pos : pos + 4]
        if not all(c in b"0123456789abcdefABCDEF" for c in head):
            return None
        n = int(head, 16)
        if n == 0:
            out.append(None)
            pos += 4
            continue
        if not 4 < n <= 65520:
            return None
        if pos + n > len(data):
            return out
        out.append(data[pos + 4 : pos + n])
        pos += n
    return out


def _clean_cache(data: bytes) -> None:
    from theta_store.filterproc import CleanCache

    state = _scratch()
    with open(os.path.join(state, "clean.cache"), "wb") as f:
        f.write(data)
    cache = CleanCache(state)  # a cache: whatever it holds, reading it never fails
    assert all(len(k) == 32 for k in cache.entries)


def _index_record(data: bytes) -> None:
    from theta_store.chunkstore import decode_record, encode_record
    from theta_store.errors import CorruptObject

    try:
        placed = decode_record(data, b"\x00" * 32)
    except CorruptObject:
        return
    for p in placed.values():
        assert p.offset >= 0 and p.offset + p.frame.frame_len <= p.size, f"frame at {p.offset} of an object of {p.size}"
    assert decode_record(encode_record(placed), b"\x00" * 32) == placed, "an accepted record survives writing it again"


TARGETS: dict[str, Callable[[bytes], None]] = {
    "safetensors": _adapter("safetensors"),
    "torch": _adapter("torch"),
    "torch_pickle": _torch_pickle,
    "numpy": _adapter("numpy"),
    "flax": _adapter("flax"),
    "gguf": _adapter("gguf"),
    "sharded_index": _sharded_index,
    "pointer": _pointer,
    "manifest": _manifest,
    "plan": _plan,
    "chunk_index": _chunk_index,
    "frames_table": _frames_table,
    "pktline": _pktline,
    "clean_cache": _clean_cache,
    "index_record": _index_record,
}

_SCRATCH: list[str] = []


def _scratch() -> str:
    """A private folder for the files the targets write, removed when the process ends."""
    if not _SCRATCH:
        import atexit
        import shutil

        _SCRATCH.append(tempfile.mkdtemp(prefix="theta-fuzz-"))
        atexit.register(shutil.rmtree, _SCRATCH[0], True)
        atexit.register(lambda: [s.close() for s in _STORE])
    return _SCRATCH[0]


# ---------------------------------------------------------------------------------------- seeds
def _pkl_members() -> Iterator[bytes]:
    for data in _fixtures(".pt", ".bin"):
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                for n in z.namelist():
                    if n.endswith("data.pkl"):
                        yield z.read(n)
        except zipfile.BadZipFile:
            yield data


def _manifests() -> Iterator[bytes]:
    from theta_store import _native
    from theta_store.formats import detect
    from theta_store.manifest import Manifest, SpanEntry

    for e in json.loads((FIXTURES / "MANIFEST.json").read_text())["files"]:
        if not e["valid"]:
            continue
        path = FIXTURES / e["name"]
        data = path.read_bytes()
        layout = detect(path)
        spans, pos = [], 0
        for r in [*layout.regions, None]:
            end = r.offset if r is not None else len(data)
            if end > pos:
                spans.append(SpanEntry("skeleton", pos, end - pos, ((_native.chunk_id(data[pos:end]), end - pos),)))
            if r is not None:
                chunks = ((_native.chunk_id(data[r.offset : r.end]), r.length),) if r.length else ()
                spans.append(SpanEntry("tensor", r.offset, r.length, chunks, r.name, r.dtype, r.shape))
                pos = r.end
        yield Manifest(layout.format, len(data), _native.chunk_id(data), 1 << 20, spans, {}, layout.note).to_bytes()


def seeds(name: str) -> list[bytes]:
    """The seed inputs of a target, made from tests/fixtures."""
    import msgpack

    if name in ("safetensors", "torch", "numpy", "flax", "gguf"):
        ext = {
            "safetensors": (".safetensors",),
            "torch": (".pt", ".bin"),
            "numpy": (".npy", ".npz"),
            "flax": (".msgpack",),
            "gguf": (".gguf",),
        }[name]
        return list(_fixtures(*ext))
    if name == "torch_pickle":
        return list(_pkl_members())
    if name == "sharded_index":
        return list(_fixtures(".index.json"))
    manifests = list(_manifests())
    if name == "manifest":
        return manifests
    from theta_store import _native
    from theta_store.pointer import Pointer

    if name == "pointer":
        return [Pointer(_native.chunk_id(m), 1000 + len(m), _native.chunk_id(m[::-1]), 3, "safetensors").to_bytes() for m in manifests]
    ids = [_native.chunk_id(m) for m in manifests]
    if name == "plan":
        pack = os.path.join(_scratch(), "git", "objects", "pack", "pack-0.pack")
        os.makedirs(os.path.dirname(pack), exist_ok=True)
        with open(pack, "wb") as f:
            f.write(bytes(100))
        size, blake3 = _POINTER_FIELDS[1], _POINTER_FIELDS[2]
        records = [[size // 4, 0, 12 + 40 * k, cid, cid[:20]] for k, cid in enumerate(ids[:4])]
        return [msgpack.packb([3, size, blake3, [[pack, 100]], records, [[0, 12, ids[5], ids[5][:20]]]], use_bin_type=True)]
    if name == "chunk_index":
        recs = b"".join(struct.pack("<32s20sQBH", cid, cid[:20], 100 + k, 4, 0b10000110) for k, cid in enumerate(ids))
        bases = b"".join(struct.pack("<32s32s", a, b) for a, b in itertools.pairwise(ids))
        return [struct.pack("<H", len(recs)) + recs + bases]
    if name == "frames_table":
        return [
            msgpack.packb({cid: [100, "raw+zstd+rans", [ids[0]]] if k % 2 else [7, "raw"] for k, cid in enumerate(ids)}, use_bin_type=True)
        ]
    if name == "pktline":

        def pkt(b: bytes) -> bytes:
            return b"%04x" % (len(b) + 4) + b

        hello = pkt(b"git-filter-client\n") + pkt(b"version=2\n") + b"0000"
        caps = pkt(b"capability=clean\n") + pkt(b"capability=smudge\n") + pkt(b"capability=delay\n") + b"0000"
        req = pkt(b"command=smudge\n") + pkt(b"pathname=model.safetensors\n") + pkt(b"can-delay=1\n") + b"0000"
        ptr = Pointer(ids[0], 1000, ids[1], 3, "safetensors").to_bytes()
        body = next(_fixtures(".safetensors"))
        chunks = b"".join(pkt(body[i : i + 65516]) for i in range(0, len(body), 65516))
        return [hello + caps + req + pkt(ptr) + b"0000", req + chunks + b"0000"]
    if name == "index_record":
        from theta_store.chunkstore import Placed, encode_record
        from theta_store.gitstore import StoredFrame

        placed = {
            cid: Placed(StoredFrame(cid[:20], 100 + k, "raw+zstd", (ids[0],) if k % 2 else ()), f"{k % 3:064x}", 200 * k, 200 * len(ids))
            for k, cid in enumerate(ids)
        }
        return [encode_record(placed)]
    if name == "clean_cache":
        ptrs = [Pointer(i, 10, i, 1, "raw").to_bytes() for i in ids]
        return [b"".join(struct.pack("<32sH", i[::-1], len(p)) + p for i, p in zip(ids, ptrs, strict=True))]
    raise KeyError(name)


# ---------------------------------------------------------------------------------------- runner
def _limit_memory(extra_mb: int) -> None:
    """Cap the address space at what is mapped now plus `extra_mb`: an allocation a hostile claim
    asks for fails (MemoryError, a fault) instead of succeeding lazily and going unnoticed."""
    import resource

    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    limit = vm + (extra_mb << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def run(name: str, seconds: int, corpus: str, artifacts: str) -> None:
    import atheris

    with atheris.instrument_imports(include=["theta_store"]):
        import theta_store.chunkstore
        import theta_store.filterproc
        import theta_store.formats
        import theta_store.formats._zip
        import theta_store.formats.flax
        import theta_store.formats.gguf
        import theta_store.formats.numpy
        import theta_store.formats.safetensors
        import theta_store.formats.sharded
        import theta_store.formats.torch
        import theta_store.gitstore
        import theta_store.manifest
        import theta_store.plan
        import theta_store.pointer  # noqa: F401
    target = TARGETS[name]
    os.makedirs(corpus, exist_ok=True)
    for k, s in enumerate(seeds(name)):
        with open(os.path.join(corpus, f"seed-{k:03d}"), "wb") as f:
            f.write(s)
    target(b"")  # imports and one-off setup happen before the memory cap
    _limit_memory(512)
    os.makedirs(artifacts, exist_ok=True)
    args = [
        sys.argv[0],
        corpus,
        f"-max_total_time={seconds}",
        "-timeout=10",
        "-rss_limit_mb=2048",
        "-max_len=1048576",
        f"-artifact_prefix={artifacts.rstrip('/')}/py-{name}-",
        "-print_final_stats=1",
    ]
    atheris.Setup(args, target)
    atheris.Fuzz()


if __name__ == "__main__":
    run(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else "bench-out/fuzz/artifacts")
