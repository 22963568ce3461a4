"""Every format through the store: Repo.add -> git commit -> delete -> Repo.restore is byte-exact.

tests/test_formats.py checks what each adapter *parses*; this module checks what the store *keeps*:
every fixture comes back with the sha256 MANIFEST.json gives, `show` lists the tensors the adapter
found, malformed files are refused before anything is written, random files of every format
round-trip, and the same weights saved in two formats share their tensor chunks.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import theta_store
from conftest import FIXTURES, fixture_entries, git, settled
from test_formats import (
    FLAX_DTYPES,
    FORMAT_OF,
    NUMPY_DESCR,
    TORCH_DTYPES,
    flax_encode,
    flax_trees,
    gguf_files,
    keys,
    numpy_arrays,
    p_state_dict,
    p_tensor,
    torch_checkpoints,
    torch_zip,
)
from theta_store import deflated
from theta_store.checkpoint import load_manifest
from theta_store.errors import FormatError
from theta_store.formats import ADAPTERS, HEAD_BYTES, Layout, detect
from theta_store.manifest import looks_like_pointer

VALID: list[dict[str, Any]] = fixture_entries(valid=True)
MALFORMED: list[dict[str, Any]] = fixture_entries(valid=False)
PWNED = Path("/tmp/pwned-marker")
STORE = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def ids(entries: list[dict[str, Any]]) -> list[str]:
    return [str(e["name"]) for e in entries]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def marker_state() -> tuple[int, int] | None:
    """(size, mtime) of the hostile pickle's marker file, None if absent: must never change."""
    try:
        st_ = PWNED.stat()
    except FileNotFoundError:
        return None
    return st_.st_size, st_.st_mtime_ns


MARKER_BEFORE = marker_state()


def git_state(repo_dir: Path) -> dict[str, tuple[int, int]]:
    """Every file under .git with its size and mtime: a failed add must leave all of it untouched."""
    root = repo_dir / ".git"
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def theta_refs(repo_dir: Path) -> str:
    return git(repo_dir, "for-each-ref", "refs/theta").stdout


def tensor_rows(info: dict[str, Any]) -> list[tuple[str, str, tuple[int, ...], int, int]]:
    return [(r["name"], r["dtype"], tuple(r["shape"]), r["offset"], r["bytes"]) for r in info["rows"] if r["kind"] == "tensor"]


def layout_rows(layout: Layout) -> list[tuple[str, str, tuple[int, ...], int, int]]:
    return [(r.name, r.dtype, r.shape, r.offset, r.length) for r in layout.regions]


def stored_layout(path: Path) -> Layout:
    """The layout the store keeps `path` by: the adapter's, or for an .npz whose deflated members
    the pinned zlib reproduces, its expanded file's (theta_store.deflated)."""
    expanded, layout = deflated.expand(str(path), detect(path))
    if expanded is not None:
        expanded.close()
    return layout


def check_show(repo: theta_store.Repo, path: Path, layout: Layout, rev: str | None = None) -> dict[str, Any]:
    """`show` lists exactly the regions of the stored layout, and its rows tile that file."""
    info = repo.show(str(path), rev)
    assert info["format"] == layout.format and info["size"] == path.stat().st_size
    named = {"torch": layout.metadata.get("views"), "numpy": layout.metadata.get("arrays")}.get(layout.format)
    assert info["tensors"] == len(named if named is not None else layout.regions)
    assert tensor_rows(info) == layout_rows(layout)
    pos = 0
    for r in (r for r in info["rows"] if r["kind"] in ("tensor", "skeleton")):
        assert r["offset"] == pos
        pos += r["bytes"]
    assert pos == layout.size
    return info


def round_trip(repo: theta_store.Repo, path: Path, data: bytes) -> tuple[theta_store.AddReport, Layout]:
    """Write `data` at `path`, add it, delete it, restore it from the index: the bytes come back."""
    path.write_bytes(data)
    settled(path)
    layout = stored_layout(path)
    (report,) = repo.add([str(path)])
    assert report.format == layout.format and report.size == len(data) and report.tensors == len(layout.regions)
    path.unlink()
    repo.restore([str(path)])
    assert path.read_bytes() == data
    check_show(repo, path, layout)
    return report, layout


# ----------------------------------------------------------------------------- what MANIFEST.json says show must list
def manifest_tensors(entry: dict[str, Any], expanded: bool = False) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, canonical dtype, shape) of each tensor region the fixture must have, from MANIFEST.json
    alone (`expanded`: an .npz stored as its expanded file, deflated members' arrays included)."""
    fmt = entry["format"]
    if fmt in ("safetensors", "gguf"):
        return [(t["name"], t["dtype"], tuple(t["shape"])) for t in entry["tensors"]]
    if fmt == "npy":
        return [("", NUMPY_DESCR[t["descr"]], tuple(t["shape"])) for t in entry["tensors"]]
    if fmt == "npz":  # deflated members stay in the skeleton unless the file is stored expanded
        stored = {z["name"] for z in entry["zip_entries"] if z["compress_type"] == 0 or expanded}
        return [(t["name"], NUMPY_DESCR[t["descr"]], tuple(t["shape"])) for t in entry["tensors"] if t["member"] in stored]
    if fmt == "flax-msgpack":
        return [(t["name"], FLAX_DTYPES[t["dtype"]], tuple(t["shape"])) for t in entry["tensors"]]
    if fmt == "pytorch-zip" and entry.get("expect") != "refuse_or_opaque":
        # one region per storage, named after the first tensor using it; its shape if it covers the storage contiguously
        first: dict[str, dict[str, Any]] = {}
        for t in entry["tensors"]:
            first.setdefault(t["storage_key"], t)
        out = []
        for t in first.values():
            shape, numel = t["shape"], t["storage_numel"]
            c_stride = [math.prod(shape[i + 1 :]) for i in range(len(shape))]
            whole = t["storage_offset"] == 0 and math.prod(shape) == numel and t["stride"] == c_stride
            out.append((t["name"], TORCH_DTYPES[t["dtype"]], tuple(shape) if whole else (numel,)))
        return out
    return []  # legacy torch, pickled modules, the sharded index: opaque bytes


# ----------------------------------------------------------------------------- fixtures: valid files
@pytest.mark.parametrize("entry", VALID, ids=ids(VALID))
def test_fixture_round_trips_through_git(repo: theta_store.Repo, repo_dir: Path, entry: dict[str, Any]) -> None:
    name = entry["name"]
    dest = repo_dir / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(FIXTURES / name, dest)
    layout = stored_layout(dest)
    expected_format = "raw" if entry.get("expect") == "refuse_or_opaque" else FORMAT_OF[entry["format"]]
    assert layout.format == expected_format

    (report,) = repo.add([str(dest)])
    assert (report.path, report.format, report.size, report.tensors) == (name, expected_format, entry["size"], len(layout.regions))
    assert report.reused_chunks == 0 and report.new_chunks > 0
    git(repo_dir, "commit", "-q", "-m", f"add {name}")
    committed = git(repo_dir, "cat-file", "blob", f"HEAD:{name}").stdout.encode()
    assert looks_like_pointer(committed)  # git holds the pointer, not the file

    dest.unlink()
    assert repo.restore([str(dest)], rev="HEAD") == [name]
    assert sha256(dest) == entry["sha256"]
    assert dest.stat().st_size == entry["size"]

    info = check_show(repo, dest, layout, "HEAD")
    assert sorted(r[:3] for r in tensor_rows(info)) == sorted(manifest_tensors(entry, "stored inflated" in layout.note))
    if entry["format"] == "pytorch-zip" and layout.format == "torch":
        # every tensor, views of shared storages included, is in the stored manifest's metadata
        stored = load_manifest(repo.store, bytes.fromhex(info["manifest"]))
        views = [(v["name"], v["dtype"], v["shape"], v["stride"], v["storage_offset"]) for v in stored.metadata["views"]]
        want = [(t["name"], TORCH_DTYPES[t["dtype"]], t["shape"], t["stride"], t["storage_offset"]) for t in entry["tensors"]]
        assert views == want
    assert repo.fsck()["ok"]
    assert git(repo_dir, "fsck", "--strict").returncode == 0


def test_all_fixtures_in_one_repository(repo: theta_store.Repo, repo_dir: Path) -> None:
    """Every valid fixture added at once, committed, the work tree wiped, restored from HEAD."""
    paths = []
    for e in VALID:
        dest = repo_dir / e["name"]
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(FIXTURES / e["name"], dest)
        paths.append(str(dest))
    reports = repo.add(paths)
    assert [r.path for r in reports] == ids(VALID)
    git(repo_dir, "commit", "-q", "-m", "all fixtures")
    for p in paths:
        os.unlink(p)
    repo.restore(paths, rev="HEAD")
    for e in VALID:
        assert sha256(repo_dir / e["name"]) == e["sha256"], e["name"]
    stats = repo.stats()
    assert len(stats["checkpoints"]) == len(VALID) and stats["raw_bytes"] == sum(e["size"] for e in VALID)
    assert repo.fsck()["ok"]


# ----------------------------------------------------------------------------- fixtures: malformed and hostile files
@pytest.mark.parametrize("entry", MALFORMED, ids=ids(MALFORMED))
def test_malformed_fixture_writes_nothing(repo: theta_store.Repo, repo_dir: Path, entry: dict[str, Any]) -> None:
    dest = repo_dir / Path(entry["name"]).name
    shutil.copy(FIXTURES / entry["name"], dest)
    before = git_state(repo_dir)
    with pytest.raises(FormatError) as info:
        repo.add([str(dest)])
    assert info.value.path == str(dest) and info.value.problem
    assert git_state(repo_dir) == before
    assert theta_refs(repo_dir) == ""
    assert not [p for p in (repo_dir / ".git/objects").rglob("*") if p.is_file()]
    assert git(repo_dir, "ls-files", "--stage").stdout == ""  # nothing staged
    assert marker_state() == MARKER_BEFORE


@pytest.mark.parametrize("entry", MALFORMED, ids=ids(MALFORMED))
def test_malformed_fixture_after_a_good_add(repo: theta_store.Repo, repo_dir: Path, entry: dict[str, Any]) -> None:
    """In a repository that already holds a checkpoint, a refused file changes nothing either."""
    good = repo_dir / "good.safetensors"
    shutil.copy(FIXTURES / "safetensors/fp32.safetensors", good)
    repo.add([str(good)])
    git(repo_dir, "commit", "-q", "-m", "good")
    refs = theta_refs(repo_dir)
    dest = repo_dir / Path(entry["name"]).name
    shutil.copy(FIXTURES / entry["name"], dest)
    before = git_state(repo_dir)
    with pytest.raises(FormatError):
        repo.add([str(dest)])
    assert git_state(repo_dir) == before and theta_refs(repo_dir) == refs
    assert git(repo_dir, "ls-files").stdout.split() == ["good.safetensors"]
    assert marker_state() == MARKER_BEFORE


@pytest.mark.parametrize("entry", MALFORMED, ids=ids(MALFORMED))
def test_malformed_fixture_without_its_extension(repo: theta_store.Repo, repo_dir: Path, entry: dict[str, Any]) -> None:
    """Named so no adapter claims it, a malformed file is either refused (nothing written) or kept as
    opaque bytes (the documented fallback of detect()) and restored byte-exactly."""
    dest = repo_dir / "checkpoint.bin"
    shutil.copy(FIXTURES / entry["name"], dest)
    before = git_state(repo_dir)
    try:
        (report,) = repo.add([str(dest)])
    except FormatError:
        assert git_state(repo_dir) == before and theta_refs(repo_dir) == ""
        return
    assert report.format == "raw" and report.tensors == 0
    head = dest.read_bytes()[:HEAD_BYTES]
    if any(a.sniff(head, len(head)) for a in ADAPTERS):  # looked like a format: the note says why it is opaque
        assert "stored as opaque bytes" in repo.show(str(dest))["note"]
    git(repo_dir, "commit", "-q", "-m", "opaque")
    dest.unlink()
    repo.restore([str(dest)], rev="HEAD")
    assert sha256(dest) == entry["sha256"]
    assert marker_state() == MARKER_BEFORE


def test_hostile_pickle_never_runs(repo: theta_store.Repo, repo_dir: Path) -> None:
    """The pickle that would run `echo PWNED > /tmp/pwned-marker`, through every store operation."""
    (entry,) = [e for e in MALFORMED if e["expect"] == "refuse_never_execute"]
    pt = repo_dir / "model.pt"
    shutil.copy(FIXTURES / entry["name"], pt)
    with pytest.raises(FormatError, match=r"os\.system.*nothing was executed"):
        repo.add([str(pt)])
    opaque = repo_dir / "model.bin"
    os.replace(pt, opaque)
    repo.add([str(opaque)])
    git(repo_dir, "commit", "-q", "-m", "hostile bytes, kept opaque")
    opaque.unlink()
    repo.restore([str(opaque)], rev="HEAD")
    repo.show(str(opaque), "HEAD")
    repo.stats()
    assert repo.fsck()["ok"]
    assert sha256(opaque) == entry["sha256"]
    assert marker_state() == MARKER_BEFORE


# ----------------------------------------------------------------------------- property tests: random files of every format
@STORE
@given(case=torch_checkpoints())
def test_random_torch_archives_through_the_store(
    repo: theta_store.Repo, repo_dir: Path, case: tuple[bytes, list[dict[str, Any]], dict[str, tuple[str, bytes, tuple[int, ...]]]]
) -> None:
    data, views, expect = case
    _, layout = round_trip(repo, repo_dir / "random.pt", data)
    assert layout.format == "torch"
    assert sorted(r.name for r in layout.regions) == sorted(name for name, _, _ in expect.values())
    stored = load_manifest(repo.store, bytes.fromhex(repo.show(str(repo_dir / "random.pt"))["manifest"]))
    assert [v["name"] for v in stored.metadata["views"]] == [v["name"] for v in views]


@STORE
@given(arr=numpy_arrays(), version=st.sampled_from([None, (1, 0), (2, 0), (3, 0)]))
def test_random_npy_through_the_store(
    repo: theta_store.Repo, repo_dir: Path, arr: np.ndarray[Any, Any], version: tuple[int, int] | None
) -> None:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, version=version, allow_pickle=False)
    _, layout = round_trip(repo, repo_dir / "a.npy", buf.getvalue())
    assert layout.format == "numpy" and [r.shape for r in layout.regions] == [arr.shape]


@STORE
@given(
    arrays=st.dictionaries(st.from_regex(r"[a-z][a-z0-9_]{0,7}", fullmatch=True), numpy_arrays(), max_size=5),
    compressed=st.booleans(),
)
def test_random_npz_through_the_store(
    repo: theta_store.Repo, repo_dir: Path, arrays: dict[str, np.ndarray[Any, Any]], compressed: bool
) -> None:
    buf = io.BytesIO()
    save: Any = np.savez_compressed if compressed else np.savez
    save(buf, **arrays)
    _, layout = round_trip(repo, repo_dir / "a.npz", buf.getvalue())
    assert layout.format == "numpy"
    # numpy's own deflate (zipfile, zlib level 6) is reproduced: every array is a region either way
    assert sorted(r.name for r in layout.regions) == sorted(arrays)


@STORE
@given(case=gguf_files())
def test_random_gguf_through_the_store(
    repo: theta_store.Repo, repo_dir: Path, case: tuple[bytes, list[tuple[str, str, tuple[int, ...], int, bytes, int]], int]
) -> None:
    data, expect, _ = case
    _, layout = round_trip(repo, repo_dir / "m.gguf", data)
    assert [(r.name, r.dtype, r.shape, r.offset) for r in layout.regions] == [e[:4] for e in expect]


@STORE
@given(tree=st.dictionaries(keys, flax_trees, min_size=1, max_size=4))
def test_random_flax_through_the_store(repo: theta_store.Repo, repo_dir: Path, tree: dict[str, Any]) -> None:
    expect: list[tuple[str, str, tuple[int, ...], bytes, int]] = []
    data = msgpack.packb({"params": flax_encode(tree, ["params"], expect)}, use_bin_type=True)
    _, layout = round_trip(repo, repo_dir / "params.msgpack", data)
    assert layout.format == "flax"
    assert sorted((r.name, r.dtype, r.shape) for r in layout.regions) == sorted(e[:3] for e in expect)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(name=st.sampled_from(ids(fixture_entries())), data=st.data())
def test_mutated_fixtures_are_refused_cleanly_or_round_trip(repo: theta_store.Repo, repo_dir: Path, name: str, data: st.DataObject) -> None:
    """A truncated or bit-flipped fixture, under its own name: FormatError with nothing written, or stored byte-exactly."""
    buf = bytearray((FIXTURES / name).read_bytes())
    if data.draw(st.booleans(), label="truncate"):
        buf = buf[: data.draw(st.integers(0, len(buf)), label="keep")]
    else:
        for _ in range(data.draw(st.integers(1, 8), label="flips")):
            buf[data.draw(st.integers(0, len(buf) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    path = repo_dir / ("mutated-" + Path(name).name)
    before, refs = git_state(repo_dir), theta_refs(repo_dir)
    path.write_bytes(bytes(buf))
    try:
        layout = detect(path)
    except FormatError:
        with pytest.raises(FormatError):
            repo.add([str(path)])
        assert git_state(repo_dir) == before and theta_refs(repo_dir) == refs
    else:
        round_trip(repo, path, bytes(buf))
        assert layout.size == len(buf)
    path.unlink()
    assert marker_state() == MARKER_BEFORE


# ----------------------------------------------------------------------------- the same weights in every format share their chunks
def bf16_bits(a: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    u = a.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def weights() -> dict[str, tuple[np.ndarray[Any, Any], str]]:
    """A small model: several chunks per tensor (2 MiB chunks), odd sizes, fp32 / fp16 / bf16 / int64."""
    rng = np.random.default_rng(7)

    def w(*shape: int) -> np.ndarray[Any, Any]:
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)).astype(np.float32)

    return {
        "embed.weight": (w(1000, 777), "F32"),
        "layer0.attn.weight": (w(768, 768), "F32"),
        "layer0.attn.bias": (np.zeros(768, np.float32), "F32"),
        "layer0.mlp.weight": (w(1536, 700).astype(np.float16), "F16"),
        "layer0.norm.weight": (bf16_bits(w(2048, 600)), "BF16"),
        "position_ids": (np.arange(513, dtype=np.int64), "I64"),
    }


TORCH_STORAGE = {"F32": "FloatStorage", "F16": "HalfStorage", "BF16": "BFloat16Storage", "I64": "LongStorage"}
FLAX_NAME = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64"}
GGML_TYPE = {"F32": 0, "F16": 1, "BF16": 30, "I64": 27}


def as_torch(ws: dict[str, tuple[np.ndarray[Any, Any], str]]) -> bytes:
    """A torch.save state_dict archive, built by hand as test_formats.py does (torch is not needed)."""
    items, storages = [], {}
    for i, (name, (a, dtype)) in enumerate(ws.items()):
        shape = tuple(a.shape)
        stride = tuple(math.prod(shape[j + 1 :]) for j in range(len(shape)))
        items.append((name, p_tensor(TORCH_STORAGE[dtype], str(i), a.size, 0, shape, stride)))
        storages[str(i)] = a.tobytes()
    return torch_zip(p_state_dict(items), storages, prefix="model")


def as_real_torch(ws: dict[str, tuple[np.ndarray[Any, Any], str]]) -> bytes:
    """The archive torch.save itself writes (64-byte aligned members, serialization id): only if torch is installed."""
    torch = pytest.importorskip("torch")
    sd = {}
    for name, (a, dtype) in ws.items():
        sd[name] = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16) if dtype == "BF16" else torch.from_numpy(a)
    buf = io.BytesIO()
    torch.save(sd, buf)
    return buf.getvalue()


def as_npz(ws: dict[str, tuple[np.ndarray[Any, Any], str]]) -> bytes:
    buf = io.BytesIO()
    savez: Any = np.savez
    savez(buf, **{name: a for name, (a, _) in ws.items()})  # bf16 bits as uint16: numpy has no bfloat16
    return buf.getvalue()


def as_npy(ws: dict[str, tuple[np.ndarray[Any, Any], str]]) -> bytes:
    buf = io.BytesIO()
    np.save(buf, ws["embed.weight"][0])
    return buf.getvalue()


def as_flax(ws: dict[str, tuple[np.ndarray[Any, Any], str]]) -> bytes:
    tree: dict[str, Any] = {}
    for name, (a, dtype) in ws.items():
        *parents, leaf = name.split(".")
        node = tree
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = msgpack.ExtType(1, msgpack.packb([list(a.shape), FLAX_NAME[dtype], a.tobytes()], use_bin_type=True))
    return bytes(msgpack.packb({"params": tree}, use_bin_type=True))


def as_gguf(ws: dict[str, tuple[np.ndarray[Any, Any], str]]) -> bytes:
    def s(x: str) -> bytes:
        return struct.pack("<Q", len(x.encode())) + x.encode()

    align = 32
    infos, data = b"", b""
    for name, (a, dtype) in ws.items():
        data += bytes(-len(data) % align)
        ne = list(reversed(a.shape))
        infos += (
            s(name)
            + struct.pack("<I", len(ne))
            + b"".join(struct.pack("<Q", d) for d in ne)
            + struct.pack("<IQ", GGML_TYPE[dtype], len(data))
        )
        data += a.tobytes()
    kv = s("general.architecture") + struct.pack("<I", 8) + s("llama") + s("general.alignment") + struct.pack("<II", 4, align)
    head = b"GGUF" + struct.pack("<IQQ", 3, len(ws), 2) + kv + infos
    return head + bytes(-len(head) % align) + data


# Header and plane table of one frame: a skeleton span that is a few bytes costs this much more to store.
FRAME_OVERHEAD = 64
WRITERS = {"torch": as_torch, "torch.save": as_real_torch, "npz": as_npz, "npy": as_npy, "flax": as_flax, "gguf": as_gguf}
SUFFIX = {"torch": ".pt", "torch.save": ".pt", "npz": ".npz", "npy": ".npy", "flax": ".msgpack", "gguf": ".gguf"}


def tensor_chunks(repo: theta_store.Repo, report: theta_store.AddReport) -> list[tuple[tuple[bytes, int], ...]]:
    """Each tensor span's chunk list (id, length), sorted: names and order differ between formats."""
    m = load_manifest(repo.store, bytes.fromhex(report.manifest))
    return sorted(s.chunks for s in m.tensors)


@pytest.mark.parametrize("safetensors_first", [True, False], ids=["safetensors-first", "safetensors-second"])
@pytest.mark.parametrize("fmt", list(WRITERS))
def test_same_weights_in_two_formats_share_tensor_chunks(repo: theta_store.Repo, repo_dir: Path, fmt: str, safetensors_first: bool) -> None:
    ws = weights()
    if fmt == "npy":  # one array per file
        ws = {"embed.weight": ws["embed.weight"]}
    st_path = repo_dir / "model.safetensors"
    theta_store.save_safetensors(str(st_path), {k: (a, dtype) for k, (a, dtype) in ws.items()})
    other = repo_dir / f"model{SUFFIX[fmt]}"
    other.write_bytes(WRITERS[fmt](ws))
    first, second = (st_path, other) if safetensors_first else (other, st_path)

    (r1,) = repo.add([str(first)])
    stored_before = repo.stats()["stored_bytes"]
    (r2,) = repo.add([str(second)])
    layout1, layout2 = detect(first), detect(second)
    tensor_bytes = sum(a.nbytes for a, _ in ws.values())
    assert sum(r.length for r in layout1.regions) == sum(r.length for r in layout2.regions) == tensor_bytes
    assert r1.tensors == r2.tensors == len(ws)

    # The second add stores only its skeleton: every tensor byte is a reused chunk.
    skeleton2 = r2.size - tensor_bytes
    assert r2.reused_bytes >= tensor_bytes
    skeleton_spans = sum(1 for r in repo.show(str(second))["rows"] if r["kind"] == "skeleton")
    assert r2.new_chunks <= skeleton_spans
    assert r2.new_bytes <= skeleton2 + FRAME_OVERHEAD * r2.new_chunks, (r2.new_bytes, skeleton2)
    assert repo.stats()["stored_bytes"] - stored_before == r2.new_bytes
    # ... and each tensor is cut into the very same chunks in both manifests.
    assert tensor_chunks(repo, r1) == tensor_chunks(repo, r2)

    git(repo_dir, "commit", "-q", "-m", "both")
    want = {p: p.read_bytes() for p in (first, second)}
    for p in want:
        p.unlink()
    repo.restore([str(p) for p in want], rev="HEAD")
    assert all(p.read_bytes() == b for p, b in want.items())


def test_torch_dtype_names_match_safetensors(repo: theta_store.Repo, repo_dir: Path) -> None:
    """A torch storage and the safetensors tensor with the same bytes get the same dtype in the manifest,
    so the codec that encoded the chunk for one is the right one for the other."""
    ws = weights()
    st_path, pt_path = repo_dir / "model.safetensors", repo_dir / "model.pt"
    theta_store.save_safetensors(str(st_path), {k: (a, dtype) for k, (a, dtype) in ws.items()})
    pt_path.write_bytes(as_torch(ws))
    repo.add([str(st_path), str(pt_path)])
    rows = {p: {r[0]: r[1:3] for r in tensor_rows(repo.show(str(p)))} for p in (st_path, pt_path)}
    assert rows[st_path] == rows[pt_path] == {k: (dtype, a.shape) for k, (a, dtype) in ws.items()}
