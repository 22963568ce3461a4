"""Hostile files, one test each: refused with a clear error naming the file and the place, in less
than 1 s of CPU and 100 MB of memory, nothing executed, nothing written to the store.

Each case runs `theta_store.Repo.add` (or restore, or the parser that reads it) in a child process
that caps itself once it is set up: an address space of what it has mapped plus 100 MB
(RLIMIT_AS: an allocation above fails) and 1 s of CPU (ITIMER_PROF: SIGPROF ends the process).
The parent checks the error the child reports, that the sentinel file a payload would create is
not there, and that nothing under the repository changed. A wall-clock timeout guards hangs.

Covered elsewhere and referenced, not repeated: the refusal messages of the malformed fixtures
(tests/test_formats.py::test_malformed_fixture_is_refused, ::test_malformed_messages_name_the_field),
hostile and broken pickles parsed in-process (::test_torch_hostile_and_broken_pickles_are_format_errors),
sharded-index shard names with `..` or absolute paths (::test_sharded_index_faults), corrupt
frames and packs (tests/test_store.py). Here each of those kinds gets its resource-bounded,
store-untouched run through the porcelain, with the cases they do not have.
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures"
CPU_SECONDS = 1.0
MEMORY_MB = 100


# ----------------------------------------------------------------------------- the bounded child
def child() -> None:
    """`python test_hostile.py OP REPO PATH`: run OP on PATH under the caps; print what it raised."""
    import resource
    import signal

    op, repo, path = sys.argv[1:4]
    import msgpack  # noqa: F401  (imports and the first store open happen before the caps)

    import theta_store
    import theta_store.formats
    from theta_store import _native
    from theta_store.formats import sharded
    from theta_store.manifest import Manifest

    _native.chunk_id(b"warm")
    r = theta_store.Repo(repo) if op in ("add", "restore") else None
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    limit = vm + (MEMORY_MB << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    hwm = _status_kb("VmHWM")
    cpu = time.process_time()
    signal.setitimer(signal.ITIMER_PROF, CPU_SECONDS)
    out: dict[str, Any] = {"error": None}
    try:
        if op == "add":
            assert r is not None
            r.add([path])
        elif op == "restore":
            assert r is not None
            r.restore([path])
        elif op == "manifest":
            with open(path, "rb") as f:
                Manifest.from_bytes(f.read(), path)
        elif op == "detect":
            theta_store.formats.detect(path)
        elif op == "index":
            sharded.read_index(path)
        else:
            raise SystemExit(f"unknown op {op}")
    except BaseException as e:
        out = {"error": type(e).__name__, "bases": [c.__name__ for c in type(e).__mro__], "message": str(e)}
    signal.setitimer(signal.ITIMER_PROF, 0)
    # For the record (pytest -s prints it): the caps above are what the tests hold to.
    out.update(cpu_s=round(time.process_time() - cpu, 4), peak_growth_kb=_status_kb("VmHWM") - hwm)
    print(json.dumps(out))


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under `root` (work tree and .git): size and mtime."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns)
    return out


def refused(repo: Path, path: Path, error: str, message: str, op: str = "add", sentinel: Path | None = None) -> dict[str, Any]:
    """Run `op` on `path` in the bounded child; check the refusal and that nothing changed."""
    before = snapshot(repo)
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "PYTHONPATH": os.pathsep.join([str(HERE), *sys.path])}
    r = subprocess.run(
        [sys.executable, str(Path(__file__)), op, str(repo), str(path)], capture_output=True, text=True, timeout=60, env=env, cwd=repo
    )
    assert r.returncode == 0, f"the child died (exit {r.returncode}: -27 is SIGPROF, over {CPU_SECONDS} s of CPU):\n{r.stderr[-3000:]}"
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["error"] is not None, f"{path.name} was accepted"
    assert error in out["bases"], f"expected {error}, got {out['error']}: {out['message']}"
    assert re.search(message, out["message"]), f"message {out['message']!r} does not match {message!r}"
    assert "MemoryError" not in out["bases"]
    print(f"{path.name}: {out['error']} in {out['cpu_s']} s of CPU, peak RSS +{out['peak_growth_kb']} kB")
    if sentinel is not None:
        assert not sentinel.exists(), "a payload ran"
    after = snapshot(repo)
    assert after == before, f"the repository changed: {sorted(set(after.items()) ^ set(before.items()))[:5]}"
    return out


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    d = tmp_path / "repo"
    d.mkdir()
    subprocess.run(["git", "init", "-q", "-b", "main", str(d)], check=True)
    subprocess.run(["git", "-C", str(d), "commit", "-q", "--allow-empty", "-m", "start"], check=True)
    import theta_store

    with theta_store.Repo(d):  # its first open sets up hooks and attributes: before the snapshots
        pass
    return d


# ----------------------------------------------------------------------------- pickles
def g(module: str, name: str) -> bytes:
    """GLOBAL opcode."""
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def s(text: str) -> bytes:
    """BINUNICODE opcode."""
    b = text.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def t(*items: bytes) -> bytes:
    """MARK items TUPLE."""
    return b"(" + b"".join(items) + b"t"


def sg(module: str, name: str) -> bytes:
    """Protocol 4 STACK_GLOBAL from two short strings (the names are data, not an opcode argument)."""
    return b"\x8c" + bytes([len(module)]) + module.encode() + b"\x8c" + bytes([len(name)]) + name.encode() + b"\x93"


def hostile_pickles(sentinel: Path) -> dict[str, tuple[bytes, str, bool]]:
    """name -> (pickle, what the refusal names, whether plain `pickle.loads` runs it without torch)."""
    touch = f"touch {sentinel}"
    inner = b"\x80\x02" + g("os", "system") + t(s(touch)) + b"R."
    return {
        "os.system": (b"\x80\x02" + g("os", "system") + t(s(touch)) + b"R.", r"imports os\.system", True),
        "eval": (
            b"\x80\x02" + g("builtins", "eval") + t(s(f"__import__('os').system({touch!r})")) + b"R.",
            r"imports builtins\.eval",
            True,
        ),
        # what a class whose __reduce__ returns (subprocess.Popen, (argv,)) pickles to
        "reduce Popen": (
            b"\x80\x02" + g("subprocess", "Popen") + t(b"]" + b"(" + s("touch") + s(str(sentinel)) + b"e") + b"R.",
            r"imports subprocess\.Popen",
            True,
        ),
        # a pickle inside a pickle: the outer one only names pickle.loads
        "reduce pickle.loads": (
            b"\x80\x02" + g("pickle", "loads") + t(b"C" + bytes([len(inner)]) + inner) + b"R.",
            r"imports pickle\.loads",
            True,
        ),
        # protocol 0 INST: the call and its class in one opcode, no REDUCE
        "INST posix.system": (b"(" + s(touch) + b"iposix\nsystem\n.", r"imports posix\.system", True),
        # the module and name pushed as data and memoized before STACK_GLOBAL joins them
        "memoized STACK_GLOBAL": (
            b"\x80\x04" + b"\x8c\x02os\x94\x8c\x06system\x94h\x00h\x01\x93" + t(s(touch)) + b"R.",
            r"imports os\.system",
            True,
        ),
        # getattr(__import__('os'), 'system')(cmd), every step a global call
        "getattr chain": (
            b"\x80\x02"
            + g("builtins", "getattr")
            + t(g("builtins", "__import__") + t(s("os")) + b"R" + s("system"))
            + b"R"
            + t(s(touch))
            + b"R.",
            r"imports builtins\.getattr",
            True,
        ),
        # the same walk as a dotted protocol-4 name, through a module that imported os
        "dotted name through a module": (
            b"\x80\x04" + sg("tempfile", "_os.system") + t(s(touch)) + b"R.",
            r"imports tempfile\._os\.system",
            True,
        ),
        # torch's own callables as gadgets: each loads or builds code (torch is not needed to refuse them)
        "torch.serialization.os.system": (b"\x80\x04" + sg("torch.serialization", "os.system") + t(s(touch)) + b"R.", r"os\.system", False),
        "torch.load": (b"\x80\x02" + g("torch", "load") + t(s("/tmp/other.pt")) + b"R.", r"imports torch\.load", False),
        "torch.hub.load": (
            b"\x80\x02" + g("torch.hub", "load") + t(s("attacker/repo"), s("model")) + b"R.",
            r"imports torch\.hub\.load",
            False,
        ),
        "torch cpp_extension": (
            b"\x80\x02" + g("torch.utils.cpp_extension", "load_inline") + t(s("x"), s('int f(){system("touch");}')) + b"R.",
            r"imports torch\.utils\.cpp_extension\.load_inline",
            False,
        ),
        "torch dunder walk": (b"\x80\x04" + sg("torch", "load.__globals__") + b".", r"torch\.load\.__globals__", False),
    }


def torch_zip(pkl: bytes, prefix: str = "archive") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{prefix}/data.pkl", pkl)
        z.writestr(f"{prefix}/byteorder", b"little")
        z.writestr(f"{prefix}/version", b"3\n")
    return buf.getvalue()


CASES = list(hostile_pickles(Path("/x")))


@pytest.mark.parametrize("case", CASES)
def test_hostile_pickle_is_refused(repo: Path, tmp_path: Path, case: str) -> None:
    sentinel = tmp_path / "pwned"
    pkl, names, _ = hostile_pickles(sentinel)[case]
    path = repo / "model.pt"
    path.write_bytes(torch_zip(pkl))
    out = refused(repo, path, "FormatError", names + r".*runs code when the pickle is loaded.*nothing was executed", sentinel=sentinel)
    assert out["message"].startswith(f"{path}: zip entry 'archive/data.pkl' at pickle byte ")


@pytest.mark.parametrize("case", [c for c in CASES if hostile_pickles(Path("/x"))[c][2]])
def test_hostile_pickle_is_live(tmp_path: Path, case: str) -> None:
    """The payloads above are real: plain pickle.loads runs them (in a child, on a sentinel of its own)."""
    sentinel = tmp_path / "ran"
    pkl, _, _ = hostile_pickles(sentinel)[case]
    subprocess.run([sys.executable, "-c", "import pickle, sys; pickle.loads(sys.stdin.buffer.read())"], input=pkl, timeout=60, check=False)
    assert sentinel.exists(), f"{case}: the payload did not run under pickle.loads, so the test proves nothing"


# ----------------------------------------------------------------------------- zips
def test_zip_bomb_pickle_is_refused(repo: Path) -> None:
    """A 64 MB data.pkl of EMPTY_LIST opcodes deflated to ~64 KB: unbounded, it would inflate to
    64 MB and build 64 million lists."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        with z.open("bomb/data.pkl", "w", force_zip64=True) as m:
            m.write(b"\x80\x02")
            block = b"]" * (1 << 20)
            for _ in range(64):
                m.write(block)
            m.write(b".")
        z.writestr("bomb/version", b"3\n")
    path = repo / "bomb.pt"
    path.write_bytes(buf.getvalue())
    assert path.stat().st_size < 1 << 20
    refused(
        repo, path, "FormatError", r"zip entry 'bomb/data\.pkl': claims 67108867 bytes deflated into \d+.*refusing to inflate.*zip bomb"
    )


def test_pickle_building_an_object_per_byte_is_refused(repo: Path) -> None:
    """A 1 MB data.pkl (stored, no compression) of EMPTY_LIST opcodes: unbounded, the interpreter
    held a million lists and walked them, +306 MB and 5 s of CPU for a 1 MB file."""
    path = repo / "lists.pt"
    path.write_bytes(torch_zip(b"\x80\x02](" + b"]" * 1_000_000 + b"e."))
    refused(repo, path, "FormatError", r"lists\.pt: zip entry 'archive/data\.pkl' at pickle byte \d+: builds more containers")


def test_zip_members_overlapping_are_refused(repo: Path) -> None:
    """Member 0's data claims to run over member 1's local header and data (the overlapping-member
    zip bomb: one stretch of bytes counted as many members)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("o/data.pkl", b"\x80\x02}q\x00.")
        z.writestr("o/data/0", bytes(64))
        z.writestr("o/data/1", bytes(64))
    data = bytearray(buf.getvalue())
    entry0 = data.index(b"PK\x01\x02", data.index(b"PK\x01\x02") + 4)  # the second central entry
    assert data[entry0 + 46 : entry0 + 54] == b"o/data/0"
    grown = 64 + 30 + len(b"o/data/1") + 64  # over member 1 whole
    struct.pack_into("<II", data, entry0 + 20, grown, grown)
    path = repo / "overlap.pt"
    path.write_bytes(bytes(data))
    refused(repo, path, "FormatError", r"zip entries 'o/data/0' and 'o/data/1'.*overlap")


# ----------------------------------------------------------------------------- headers claiming terabytes
def _st(header: dict[str, Any], data: bytes = b"") -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def _npy(header: str) -> bytes:
    h = header.encode()
    h += b" " * (-(len(h) + 11) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(h)) + h


def _gguf(*parts: bytes) -> bytes:
    return b"GGUF" + b"".join(parts)


def _gstr(text: str) -> bytes:
    return struct.pack("<Q", len(text)) + text.encode()


TB = 1 << 40
TERABYTES: dict[str, tuple[str, bytes, str]] = {
    "safetensors header length": (
        "a.safetensors",
        struct.pack("<Q", TB) + b"{}" + bytes(64),
        r"header length.*claims a 1099511627776-byte",
    ),
    "safetensors tensor": (
        "b.safetensors",
        _st({"w": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 4 * TB]}}, bytes(16)),
        r"tensor 'w'.*data_offsets \[0, 4398046511104\) end past",
    ),
    "npy shape": (
        "c.npy",
        _npy("{'descr': '<f4', 'fortran_order': False, 'shape': (1099511627776,), }") + bytes(16),
        r"array data.*needs 4398046511104 bytes",
    ),
    "gguf tensor dims": (
        "d.gguf",
        _gguf(
            struct.pack("<IQQ", 3, 1, 0),
            _gstr("w"),
            struct.pack("<I", 2),
            struct.pack("<QQ", 1 << 30, 1 << 30),
            struct.pack("<IQ", 0, 0),
            bytes(64),
        ),
        r"tensor 'w': F32 \[1073741824, 1073741824\] needs bytes \[96, \d+\) but the file has 129",
    ),
    "zip entry size": ("e.pt", (FIXTURES / "malformed/zip_huge_uncompressed.pt").read_bytes(), r"4294967280 uncompressed bytes.*zip bomb"),
    "flax array": (
        "f.msgpack",
        b"\x81\xa1w\xc7\x1d\x01" + b"\x93\x91\xcf" + struct.pack(">Q", TB) + b"\xa7float32\xc4\x08" + bytes(8),
        r"array 'w': float32 shape \[1099511627776\] needs 4398046511104 bytes but holds 8",
    ),
}


@pytest.mark.parametrize("case", list(TERABYTES))
def test_header_claiming_terabytes_is_refused(repo: Path, case: str) -> None:
    name, data, message = TERABYTES[case]
    path = repo / name
    path.write_bytes(data)
    refused(repo, path, "FormatError", message)


# ----------------------------------------------------------------------------- nesting and counts
def test_deeply_nested_msgpack_is_refused(repo: Path) -> None:
    """A Flax checkpoint that is a million nested one-element maps."""
    path = repo / "deep.msgpack"
    path.write_bytes(b"\x81\xa1k" * 1_000_000 + b"\xc0")
    refused(repo, path, "FormatError", r"deep\.msgpack.*nest")


def test_deeply_nested_manifest_is_refused(tmp_path: Path, repo: Path) -> None:
    """A manifest (what a remote may send) that is a million nested arrays."""
    path = tmp_path / "manifest"
    path.write_bytes(b"\x91" * 1_000_000 + b"\xc0")
    refused(repo, path, "CorruptObject", r"manifest: cannot read manifest: .*nest", op="manifest")


GGUF_COUNTS: dict[str, tuple[bytes, str]] = {
    "tensor count": ((FIXTURES / "malformed/gguf_absurd_tensor_count.gguf").read_bytes(), r"tensor_count \(bytes 8-16\)"),
    "kv count": (_gguf(struct.pack("<IQQ", 3, 0, 1 << 60), bytes(64)), r"kv_count"),
    "array length": (_gguf(struct.pack("<IQQ", 3, 0, 1), _gstr("k"), struct.pack("<IIQ", 9, 8, 1 << 62)), r"array length"),
    "string length": (_gguf(struct.pack("<IQQ", 3, 0, 1), struct.pack("<Q", 1 << 63), bytes(64)), r"string|key"),
    "n_dims": (_gguf(struct.pack("<IQQ", 3, 1, 0), _gstr("w"), struct.pack("<I", 1 << 31), bytes(64)), r"n_dims 2147483648"),
    "nested arrays": (
        _gguf(struct.pack("<IQQ", 3, 0, 1), _gstr("k"), struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 100_000),
        r"nests arrays deeper",
    ),
}


@pytest.mark.parametrize("case", list(GGUF_COUNTS))
def test_gguf_absurd_counts_are_refused(repo: Path, case: str) -> None:
    data, message = GGUF_COUNTS[case]
    path = repo / "model.gguf"
    path.write_bytes(data)
    refused(repo, path, "FormatError", message)


# ----------------------------------------------------------------------------- not a regular file
def test_fifo_is_refused(repo: Path) -> None:
    """A FIFO named like a checkpoint: opening it to read would wait for a writer forever."""
    path = repo / "model.safetensors"
    os.mkfifo(path)
    refused(repo, path, "FormatError", r"model\.safetensors: is a FIFO, not a regular file")


def test_fifo_is_refused_by_detect(repo: Path) -> None:
    path = repo / "model.safetensors"
    os.mkfifo(path)
    refused(repo, path, "FormatError", r"model\.safetensors: is a FIFO, not a regular file", op="detect")


def test_symlink_is_refused(repo: Path, tmp_path: Path) -> None:
    """A link to a checkpoint outside the repository: git commits the link, not what it points at."""
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(_st({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(16)))
    path = repo / "model.safetensors"
    path.symlink_to(outside)
    refused(repo, path, "FormatError", r"model\.safetensors: is a symbolic link")


def test_symlink_to_a_device_is_refused(repo: Path) -> None:
    path = repo / "zeros.safetensors"
    path.symlink_to("/dev/zero")
    refused(repo, path, "FormatError", r"is a character device, not a regular file", op="detect")


# ----------------------------------------------------------------------------- manifests
def _stored_version(repo: Path) -> tuple[Any, bytes, bytes]:
    """A checkpoint added and committed: (GitStore, its manifest id, its manifest bytes)."""
    import theta_store
    from theta_store.gitstore import GitStore

    path = repo / "model.safetensors"
    path.write_bytes(
        _st(
            {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}},
            bytes(range(24)),
        )
    )
    with theta_store.Repo(repo) as r:
        r.add([str(path)])
    subprocess.run(["git", "-C", str(repo), "commit", "-q", "-m", "model"], check=True)
    store = GitStore(repo)
    with theta_store.Repo(repo) as r:
        mid = r.pointer(str(path)).manifest_id
    return store, mid, store.read_manifest_bytes(mid)


HOSTILE_MANIFESTS: dict[str, tuple[Any, str]] = {
    "overlapping spans": (
        lambda spans: [spans[0], {**spans[1], "offset": spans[1]["offset"] - 4}, *spans[2:]],
        r"spans\[1\] starts at byte \d+ but the spans before it end at \d+",
    ),
    "negative length": (
        lambda spans: [{**spans[0], "length": -spans[0]["length"]}, *spans[1:]],
        r"spans\[0\]\.length -\d+ is not a non-negative integer",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE_MANIFESTS))
def test_hostile_manifest_is_refused_on_restore(repo: Path, case: str) -> None:
    """A version whose manifest (its id is its hash: a remote can send any) has spans that do
    not tile the file: restore names the span and writes nothing."""
    import msgpack

    from theta_store import _native
    from theta_store.pointer import Pointer

    store, mid, raw = _stored_version(repo)
    obj = msgpack.unpackb(raw, raw=False)
    change, message = HOSTILE_MANIFESTS[case]
    obj["spans"] = change(obj["spans"])
    bad = msgpack.packb(obj, use_bin_type=True)
    bad_id = _native.chunk_id(bad)
    store.write_version(bad_id, bad, store.version_frames(mid))
    old = Pointer.parse(subprocess.run(["git", "-C", str(repo), "show", ":model.safetensors"], capture_output=True, check=True).stdout)
    hostile = Pointer(bad_id, old.size, old.blake3, old.tensors, old.format)
    store.stage_blob("model.safetensors", hostile.to_bytes())
    store.close()
    refused(
        repo, repo / "model.safetensors", "CorruptObject", rf"manifest {bad_id.hex()[:16]}: cannot read manifest: {message}", op="restore"
    )


def test_sharded_index_escaping_its_folder_is_refused(repo: Path) -> None:
    """A sharded-checkpoint index naming shards by `..` and absolute paths (the messages are
    tested in test_formats.py::test_sharded_index_faults; here: bounded, nothing read or written)."""
    for shard in ("../../outside.safetensors", "/etc/passwd", "C:\\x.safetensors"):
        path = repo / "model.safetensors.index.json"
        path.write_text(json.dumps({"weight_map": {"w": shard}}))
        refused(repo, path, "FormatError", r"is not a relative path inside the index's directory", op="index")


if __name__ == "__main__":
    child()


def test_saved_plan_naming_files_outside_the_pack_folder_is_dropped(repo: Path, tmp_path: Path) -> None:
    """A saved plan (a cache under .git) naming a `..` path or another absolute path as a pack is
    not read: the plan is dropped and rebuilt from the store, and restore gives the right bytes."""
    import msgpack

    import theta_store
    from theta_store import plan

    store, mid, _ = _stored_version(repo)
    store.close()
    data = (repo / "model.safetensors").read_bytes()
    with theta_store.Repo(repo) as r:
        ptr = r.pointer(str(repo / "model.safetensors"))
        state = r.store.state_dir
    saved = plan.load_plan(state, ptr)
    assert saved is not None and len(saved.packs) == 1
    real = saved.packs[0]
    decoy = tmp_path / "pack" / "pack-0.pack"
    decoy.parent.mkdir()
    decoy.write_bytes(b"\0" * os.path.getsize(real))
    raw = msgpack.unpackb(Path(plan.plan_path(state, mid)).read_bytes())
    dotted = os.path.join(os.path.dirname(real), "..", "..", "..", "..", os.path.relpath(decoy, repo.parent))
    for bad in (str(decoy), dotted, "pack/pack-1.pack"):
        raw[3] = [[bad, os.path.getsize(decoy)]]
        Path(plan.plan_path(state, mid)).write_bytes(msgpack.packb(raw, use_bin_type=True))
        assert plan.load_plan(state, ptr) is None, bad
    (repo / "model.safetensors").unlink()
    with theta_store.Repo(repo) as r:
        r.restore([str(repo / "model.safetensors")])
    assert (repo / "model.safetensors").read_bytes() == data
