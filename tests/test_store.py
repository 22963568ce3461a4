"""Issue 2 acceptance: byte-exact round trips, known answers, malformed input, determinism."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import blake3
import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import theta_store
from conftest import FIXTURES, fixture_entries, git, settled
from theta_store import _native
from theta_store.formats.base import CODEC_DTYPES

SAFETENSORS_FIXTURES = [e["name"] for e in fixture_entries("safetensors/", valid=True) if e["name"].endswith(".safetensors")]
MALFORMED_SAFETENSORS = [e for e in fixture_entries("malformed/") if e["name"].endswith(".safetensors")]


def round_trip(repo: theta_store.Repo, path: Path) -> theta_store.AddReport:
    original = path.read_bytes()
    settled(path)
    report = repo.add([str(path)])[0]
    path.unlink()
    repo.restore([str(path)])
    assert path.read_bytes() == original
    return report


@pytest.mark.parametrize("name", SAFETENSORS_FIXTURES)
def test_safetensors_fixture_round_trip(repo: theta_store.Repo, repo_dir: Path, name: str) -> None:
    entry = next(e for e in fixture_entries() if e["name"] == name)
    dest = repo_dir / Path(name).name
    shutil.copy(FIXTURES / name, dest)
    report = round_trip(repo, dest)
    assert report.format == "safetensors"
    info = repo.show(str(dest))
    tensors = [(r["name"], r["dtype"], r["shape"]) for r in info["rows"] if r["kind"] == "tensor"]
    expected = [(t["name"], t["dtype"], t["shape"]) for t in entry["tensors"]]
    assert sorted(tensors) == sorted(expected)
    assert info["size"] == entry["size"] == dest.stat().st_size
    assert git(repo_dir, "fsck", "--full", "--strict").returncode == 0


def _safetensors_bytes(tensors: list[tuple[str, str, list[int], bytes]], metadata: dict[str, str] | None, pad: int) -> bytes:
    header: dict[str, object] = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    pos = 0
    for name, dtype, shape, data in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + len(data)]}
        pos += len(data)
    h = json.dumps(header).encode() + b" " * pad
    return struct.pack("<Q", len(h)) + h + b"".join(t[3] for t in tensors)


@st.composite
def safetensors_files(draw: st.DrawFn) -> bytes:
    names = draw(st.lists(st.text(min_size=1, max_size=12).filter(lambda s: s != "__metadata__"), max_size=6, unique=True))
    tensors = []
    for name in names:
        dtype = draw(st.sampled_from(sorted(CODEC_DTYPES)))
        shape = draw(st.lists(st.integers(0, 9), max_size=3))
        n = int(np.prod(shape)) * CODEC_DTYPES[dtype]
        tensors.append((name, dtype, shape, draw(st.binary(min_size=n, max_size=n))))
    metadata = draw(st.none() | st.dictionaries(st.text(max_size=8), st.text(max_size=16), max_size=3))
    return _safetensors_bytes(tensors, metadata, draw(st.integers(0, 7)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=safetensors_files())
def test_generated_safetensors_round_trip(repo: theta_store.Repo, repo_dir: Path, data: bytes) -> None:
    path = repo_dir / "gen.safetensors"
    path.write_bytes(data)
    report = round_trip(repo, path)
    assert report.format == "safetensors"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=20000), seed=st.integers(0, 2**32 - 1), big=st.booleans())
def test_random_binary_round_trip_raw(repo: theta_store.Repo, repo_dir: Path, data: bytes, seed: int, big: bool) -> None:
    if big:  # several CDC chunks
        data += np.random.default_rng(seed).integers(0, 256, 3_000_000, dtype=np.uint8).tobytes()
    path = repo_dir / "blob.bin"
    path.write_bytes(data)
    report = round_trip(repo, path)
    assert report.format == "raw"


def test_model_round_trip_and_dedup(repo: theta_store.Repo, repo_dir: Path) -> None:
    rng = np.random.default_rng(0)
    tensors = {f"layer{i}.weight": (rng.standard_normal((512, 512)) * 0.02).astype(np.float32) for i in range(6)}
    tensors["bias"] = np.zeros(512, np.float32)
    path = repo_dir / "model.safetensors"
    theta_store.save_safetensors(str(path), tensors)
    first = round_trip(repo, path)
    assert first.new_chunks > 0 and first.reused_chunks == 0
    assert first.new_bytes < 0.9 * first.size  # float-aware codec on randn weights
    tensors["bias"] = tensors["bias"] + np.float32(1)
    theta_store.save_safetensors(str(path), tensors)
    second = round_trip(repo, path)
    assert second.new_chunks == 1 and second.new_bytes < 4096
    # the same bytes again store nothing new
    third = round_trip(repo, path)
    assert third.new_chunks == 0 and third.manifest == second.manifest


def test_bf16_fp16_fp8_and_every_codec_dtype(repo: theta_store.Repo, repo_dir: Path) -> None:
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((300, 300)) * 0.02).astype(np.float32)
    bf16 = (w.view(np.uint32) >> 16).astype(np.uint16)
    tensors: dict[str, object] = {
        "bf16": (bf16, "BF16"),
        "f16": w.astype(np.float16),
        "f64": w.astype(np.float64),
        "fp8": (rng.integers(0, 256, (64, 64), dtype=np.uint8), "F8_E4M3"),
        "i64": rng.integers(-5, 5, 1000),
        "mask": rng.random(777) > 0.5,
        "scalar": np.float32(3.5).reshape(()),
    }
    path = repo_dir / "m.safetensors"
    theta_store.save_safetensors(str(path), tensors)  # type: ignore[arg-type]
    round_trip(repo, path)
    rows = {r["name"]: r for r in repo.show(str(path))["rows"]}
    assert rows["bf16"]["dtype"] == "BF16" and rows["bf16"]["stored"] < 0.75 * rows["bf16"]["bytes"]
    assert rows["scalar"]["shape"] == []


# ---- known answers ----


def test_chunk_ids_equal_blake3_package(repo: theta_store.Repo, repo_dir: Path) -> None:
    data = np.random.default_rng(1).standard_normal(700_000).astype(np.float32)
    path = repo_dir / "m.safetensors"
    theta_store.save_safetensors(str(path), {"w": data})
    report = repo.add([str(path)])[0]
    raw = path.read_bytes()
    from theta_store.checkpoint import load_manifest

    m = load_manifest(repo.store, bytes.fromhex(report.manifest))
    assert m.blake3 == blake3.blake3(raw).digest()
    for span in m.spans:
        pos = span.offset
        for cid, n in span.chunks:
            assert cid == blake3.blake3(raw[pos : pos + n]).digest()
            pos += n
    assert _native.chunk_id(b"abc") == blake3.blake3(b"abc").digest()


def test_object_ids_equal_git_hash_object(repo: theta_store.Repo, repo_dir: Path) -> None:
    path = repo_dir / "m.safetensors"
    theta_store.save_safetensors(str(path), {"w": np.arange(100000, dtype=np.float32)})
    report = repo.add([str(path)])[0]
    frames = repo.store.version_frames(bytes.fromhex(report.manifest))
    assert frames
    for f in frames.values():
        data = repo.store.read_object(f.object_id)
        p = repo_dir / "obj"
        p.write_bytes(data)
        assert git(repo_dir, "hash-object", str(p)).stdout.strip() == f.object_id.hex()
        assert _native.blob_id(data) == f.object_id
        assert len(data) == f.frame_len
    for blob in (b"", b"hello\n", os.urandom(5000)):
        p = repo_dir / "x"
        p.write_bytes(blob)
        assert _native.blob_id(blob).hex() == git(repo_dir, "hash-object", str(p)).stdout.strip()


def _planes(frame: bytes) -> list[tuple[int, bytes]]:
    p = frame[7]
    pos = 48 + 9 * p
    out = []
    for j in range(p):
        mode, n = struct.unpack_from("<BQ", frame, 48 + 9 * j)
        out.append((mode, frame[pos : pos + n]))
        pos += n
    return out


def test_zstd_planes_decode_with_zstandard_package() -> None:
    # A plane with repeats (zstd's strength) next to noise: the codec picks zstd for it.
    rng = np.random.default_rng(5)
    pattern = rng.integers(0, 256, 4096, dtype=np.uint8)
    data = np.tile(pattern, 256).tobytes()
    frame = _native.encode_frame(data, "U8")
    ((mode, payload),) = _planes(frame)
    assert mode == 1, "expected the zstd mode for a repetitive plane"
    assert zstandard.ZstdDecompressor().decompress(payload, max_output_size=len(data)) == data
    assert _native.decode_frame(frame) == data


def test_frame_header_is_as_documented() -> None:
    data = np.linspace(-1, 1, 5000, dtype=np.float32).tobytes()
    frame = _native.encode_frame(data, "F32")
    assert frame[:4] == b"\x89TSF" and frame[4] == 2 and frame[5] == 1 and frame[6] == 12 and frame[7] == 4
    assert struct.unpack_from("<Q", frame, 8)[0] == len(data)
    assert frame[16:48] == blake3.blake3(data).digest()
    info = _native.frame_info(frame)
    assert info["stored_len"] == len(frame) and info["dtype"] == "F32"


def test_corrupt_frames_raise_corrupt_object() -> None:
    data = np.random.default_rng(2).standard_normal(10000).astype(np.float32).tobytes()
    frame = bytearray(_native.encode_frame(data, "F32"))
    for at in (0, 4, 6, 7, 9, 20, 50, len(frame) // 2, len(frame) - 1):
        bad = bytearray(frame)
        bad[at] ^= 0x11
        with pytest.raises(theta_store.CorruptObject):
            _native.decode_frame(bytes(bad))
    with pytest.raises(theta_store.CorruptObject):
        _native.decode_frame(bytes(frame[:100]))


# ---- determinism ----


def test_same_file_same_pointer_and_objects(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    src = tmp_path / "m.safetensors"
    theta_store.save_safetensors(str(src), {"a": rng.standard_normal((256, 300)).astype(np.float32), "b": np.arange(10)})
    seen = []
    for name in ("r1", "r2"):
        d = tmp_path / name
        d.mkdir()
        git(d, "init", "-q")
        shutil.copy(src, d / "m.safetensors")
        with theta_store.Repo(d) as repo:
            repo.add([str(d / "m.safetensors")])
            pointer = git(d, "cat-file", "blob", ":m.safetensors").stdout
            refs = git(d, "for-each-ref", "refs/theta/").stdout
        seen.append((pointer, refs))
    assert seen[0] == seen[1]
    assert seen[0][0].startswith("version theta-store/v1\nformat safetensors\nmanifest ")


# ---- malformed input ----


@pytest.mark.parametrize("entry", MALFORMED_SAFETENSORS, ids=lambda e: e["name"])
def test_malformed_safetensors_rejected_nothing_written(repo: theta_store.Repo, repo_dir: Path, entry: dict[str, object]) -> None:
    name = str(entry["name"])
    dest = repo_dir / Path(name).name
    shutil.copy(FIXTURES / name, dest)
    before = sorted(p.name for p in (repo_dir / ".git" / "objects").rglob("*") if p.is_file())
    with pytest.raises(theta_store.FormatError) as exc:
        repo.add([str(dest)])
    msg = str(exc.value)
    assert dest.name in msg
    after = sorted(p.name for p in (repo_dir / ".git" / "objects").rglob("*") if p.is_file())
    assert after == before
    assert git(repo_dir, "for-each-ref", "refs/theta/").stdout == ""
    assert dest.read_bytes() == (FIXTURES / name).read_bytes()


def test_malformed_messages_name_the_fault(repo_dir: Path) -> None:
    cases = {
        "header_len_too_large.safetensors": "header length",
        "offsets_out_of_range.safetensors": "'c'",
        "overlapping_offsets.safetensors": "overlap",
        "truncated.safetensors": "past the",
    }
    for name, needle in cases.items():
        with pytest.raises(theta_store.FormatError, match=needle):
            theta_store.detect(str(FIXTURES / "malformed" / name))


def test_fixture_copy_is_identical_to_shared() -> None:
    for e in fixture_entries():
        assert hashlib.sha256((FIXTURES / e["name"]).read_bytes()).hexdigest() == e["sha256"], e["name"]


# The SIGBUS handler installed in the process (ctypes over sigaction(2); the handler is the first
# member of struct sigaction, 152 bytes on x86-64 glibc).
HANDLER_OF = """
import ctypes
def handler_of(sig):
    act = ctypes.create_string_buffer(256)
    assert ctypes.CDLL(None).sigaction(sig, None, act) == 0
    return ctypes.c_void_p.from_buffer(act).value
"""


@pytest.mark.parametrize("faulthandler", [False, True])
def test_a_bus_error_that_is_not_ours_still_ends_the_process(tmp_path: Path, faulthandler: bool) -> None:
    """The core maps the file it adds and handles SIGBUS for its own mappings (a file cut short
    meanwhile reads zeros and is an error). A bus error anywhere else still ends the process, as
    it would without us: after the default action, or after the handler that was there before."""
    script = (
        HANDLER_OF
        + """
import mmap, signal, sys
from theta_store.checkpoint import scan
path = sys.argv[1]
with open(path, "wb") as f:
    f.write(b"x" * 65536)
before = handler_of(signal.SIGBUS)
scan(path)  # maps the file: the core's SIGBUS handler is now installed
assert handler_of(signal.SIGBUS) not in (before, None), "the core installed no handler"
with open(path, "r+b") as f:
    m = mmap.mmap(f.fileno(), 65536, access=mmap.ACCESS_READ)
    f.truncate(0)
    print(m[40000])  # beyond the end of the file: SIGBUS
print("survived")
"""
    )
    flags = ["-X", "faulthandler"] if faulthandler else []
    r = subprocess.run([sys.executable, *flags, "-c", script, str(tmp_path / "f.bin")], capture_output=True, text=True, timeout=60)
    assert r.returncode == -signal.SIGBUS, (r.returncode, r.stdout, r.stderr)
    assert "survived" not in r.stdout
    if faulthandler:
        assert "Bus error" in r.stderr  # the previous handler ran


def test_add_still_reads_the_file_when_another_handler_takes_sigbus(tmp_path: Path) -> None:
    """Once another library installs its own SIGBUS handler over the core's, the core maps no more
    files (it would not be told of a file cut short) and reads them instead: same result."""
    script = (
        HANDLER_OF
        + """
import signal, sys, blake3
from theta_store.checkpoint import scan
path = sys.argv[1]
with open(path, "wb") as f:
    f.write(bytes(range(256)) * 40000)
want = blake3.blake3(open(path, "rb").read()).digest()
assert scan(path).file_id == want  # mapped; the core's handler is installed
signal.signal(signal.SIGBUS, lambda *a: None)  # another handler, over the core's
other = handler_of(signal.SIGBUS)
assert scan(path).file_id == want  # read with pread
assert handler_of(signal.SIGBUS) == other, "the core installed its handler over another one"
print("ok")
"""
    )
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path / "f.bin")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stdout, r.stderr)
