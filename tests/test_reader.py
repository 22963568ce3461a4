"""theta_store.open: lazy reads of any revision equal what numpy reads from the original."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

import theta_store
from conftest import FIXTURES, fixture_entries, git


def add_commit(repo_dir: Path, path: Path) -> None:
    with theta_store.Repo(repo_dir) as r:
        r.add([str(path)])
    git(repo_dir, "commit", "-q", "-m", path.name)


def test_safetensors_values_and_revisions(repo_dir: Path) -> None:
    rng = np.random.default_rng(0)
    p = repo_dir / "m.safetensors"
    a = {"emb": rng.standard_normal((3000, 256)).astype(np.float32), "b": np.arange(7, dtype=np.int64)}
    theta_store.save_safetensors(str(p), a, {"format": "pt"})
    add_commit(repo_dir, p)
    b = dict(a, b=a["b"] * 2)
    theta_store.save_safetensors(str(p), b)
    add_commit(repo_dir, p)
    with theta_store.open(p, rev="HEAD~1") as f:
        assert sorted(f.keys()) == ["b", "emb"]
        assert f.metadata() == {"format": "pt"}
        np.testing.assert_array_equal(f.get_tensor("emb"), a["emb"])
        np.testing.assert_array_equal(f.get_tensor("b"), a["b"])
        np.testing.assert_array_equal(f.get_slice("emb")[1000:1003], a["emb"][1000:1003])
        np.testing.assert_array_equal(f.get_slice("emb")[5:9, 3:6], a["emb"][5:9, 3:6])
        assert f.get_slice("emb").get_shape() == [3000, 256]
    with theta_store.open(p) as f:
        np.testing.assert_array_equal(f.get_tensor("b"), b["b"])
        with pytest.raises(KeyError, match="no tensor named"):
            f.get_tensor("missing")


def test_slice_reads_only_needed_chunks(repo_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = repo_dir / "m.safetensors"
    big = np.random.default_rng(1).standard_normal((4096, 1024)).astype(np.float32)  # 16 MiB: 8 chunks
    theta_store.save_safetensors(str(p), {"w": big})
    add_commit(repo_dir, p)
    calls: list[int] = []
    real = theta_store.reader._native.read_joined

    def counting(chunks, packs, read, bases=()):  # type: ignore[no-untyped-def]
        calls.append(len(chunks))
        return real(chunks, packs, read, list(bases))

    monkeypatch.setattr(theta_store.reader._native, "read_joined", counting)
    with theta_store.open(p) as f:
        np.testing.assert_array_equal(f.get_slice("w")[10:20], big[10:20])
    assert calls == [1]


@pytest.mark.parametrize("name", [e["name"] for e in fixture_entries("numpy/", valid=True)])
def test_numpy_values(repo_dir: Path, name: str) -> None:
    dest = repo_dir / Path(name).name
    shutil.copy(FIXTURES / name, dest)
    add_commit(repo_dir, dest)
    original = np.load(FIXTURES / name)
    with theta_store.open(dest) as f:
        if name.endswith(".npy"):
            np.testing.assert_array_equal(f.get_tensor(""), original)
        else:
            stored = set(f.keys())
            for key in original.files:
                if key in stored:  # compressed members stay in the skeleton
                    np.testing.assert_array_equal(f.get_tensor(key), original[key])
            if "compressed" not in name:
                assert stored == set(original.files)


@pytest.mark.parametrize("name", [e["name"] for e in fixture_entries("torch/", valid=True) if e.get("tensors")])
def test_torch_values_equal_storage_bytes(repo_dir: Path, name: str) -> None:
    entry = next(e for e in fixture_entries() if e["name"] == name)
    dest = repo_dir / Path(name).name
    shutil.copy(FIXTURES / name, dest)
    add_commit(repo_dir, dest)
    layout = theta_store.detect(str(FIXTURES / name))
    if layout.format != "torch":
        pytest.skip(f"{name} is stored opaque ({layout.note})")
    zf = zipfile.ZipFile(FIXTURES / name)
    with theta_store.open(dest) as f:
        for t in entry["tensors"]:
            arr = f.get_tensor(t["name"])
            assert list(arr.shape) == t["shape"]
            storage = zf.read(t["zip_entry"])
            dt = theta_store.reader.numpy_dtype(next(v["dtype"] for v in layout.metadata["views"] if v["name"] == t["name"]))
            base = np.frombuffer(storage, dt)
            expect = np.lib.stride_tricks.as_strided(
                base[t["storage_offset"] :], shape=t["shape"], strides=[s * dt.itemsize for s in t["stride"]]
            )
            assert arr.tobytes() == np.ascontiguousarray(expect).tobytes()


def test_open_errors(repo_dir: Path) -> None:
    p = repo_dir / "plain.txt"
    p.write_text("hello")
    git(repo_dir, "add", "plain.txt")
    git(repo_dir, "commit", "-q", "-m", "x")
    with pytest.raises(theta_store.PointerError, match="not a theta-store pointer"):
        theta_store.open(p)
    with pytest.raises(theta_store.ObjectNotFound):
        theta_store.open(repo_dir / "nothing.safetensors")
