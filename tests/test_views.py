"""Every tensor a format holds is visible to show, open and diff: tied weights and views of
shared torch storages, arrays of deflated .npz members, the shards of a sharded safetensors model."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import theta_store
from conftest import FIXTURES, git
from test_npz_deflated import other_encoder

try:
    import torch
except ImportError:  # only the torch-written files need it
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")


def cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "theta_store", *args], cwd=cwd, capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    return r


def setup_repo(d: Path, pattern: str) -> None:
    cli(d, "install")
    cli(d, "track", pattern)


def tied_state_dict() -> dict[str, Any]:
    emb = torch.nn.Embedding(10, 4)
    dec = torch.nn.Linear(4, 10, bias=False)
    dec.weight = emb.weight  # what transformers' tie_weights does for a decoder
    sd: dict[str, Any] = torch.nn.ModuleDict({"embed": emb, "decoder": dec, "norm": torch.nn.LayerNorm(4)}).state_dict()
    return sd


def views_dict() -> dict[str, Any]:
    base = torch.arange(48, dtype=torch.float32)
    return {
        "rows": base[:6].view(2, 3),
        "transposed": base[6:18].view(3, 4).t(),
        "strided": base[::5],
        "tail": base[40:42],
        "column": base[:12].view(3, 4)[:, 1],
    }


@needs_torch
def test_tied_weight_listed_by_show_open_diff(repo_dir: Path) -> None:
    setup_repo(repo_dir, "*.bin")
    path = repo_dir / "pytorch_model.bin"
    sd = tied_state_dict()
    torch.save(sd, path)
    git(repo_dir, "add", "-A")
    git(repo_dir, "commit", "-qm", "one")

    show = json.loads(cli(repo_dir, "show", "--json", "pytorch_model.bin").stdout)
    assert show["tensors"] == len(sd) == 4
    names = [r["name"] for r in show["rows"] if r["kind"] in ("tensor", "view")]
    assert sorted(names) == sorted(sd)
    (tied,) = [r for r in show["rows"] if r["kind"] == "view"]
    assert tied["name"] == "decoder.weight" and tied["view_of"] == "embed.weight" and tied["stored"] == 0
    assert "view of embed.weight" in cli(repo_dir, "show", "pytorch_model.bin").stdout

    with theta_store.open(path, rev="HEAD") as f:
        assert sorted(f.keys()) == sorted(sd)
        for k, t in sd.items():
            np.testing.assert_array_equal(f.get_tensor(k), t.numpy())

    with torch.no_grad():
        sd["embed.weight"][3] += 1.0  # changes the decoder too: one storage
    torch.save(sd, path)
    git(repo_dir, "add", "-A")
    git(repo_dir, "commit", "-qm", "two")
    diff = json.loads(cli(repo_dir, "diff", "--json", "HEAD~1", "HEAD", "--", "pytorch_model.bin").stdout)
    changed = {t["name"] for f in (diff if isinstance(diff, list) else diff["files"]) for t in f["tensors"] if t["kind"] != "unchanged"}
    assert changed == {"embed.weight", "decoder.weight"}


@needs_torch
def test_views_of_one_storage(repo_dir: Path) -> None:
    setup_repo(repo_dir, "*.pt")
    path = repo_dir / "views.pt"
    d = views_dict()
    torch.save(d, path)
    git(repo_dir, "add", "-A")
    git(repo_dir, "commit", "-qm", "views")
    show = json.loads(cli(repo_dir, "show", "--json", "views.pt").stdout)
    assert show["tensors"] == 5
    stored = [r for r in show["rows"] if r["kind"] == "tensor"]
    assert len(stored) == 1 and stored[0]["shape"] == [48]  # one region: the storage, once
    views = {r["name"]: r for r in show["rows"] if r["kind"] == "view"}
    assert set(views) == set(d)
    assert views["transposed"]["stride"] == [1, 4] and views["transposed"]["storage_offset"] == 6
    assert views["column"]["offset"] == stored[0]["offset"] + 4
    with theta_store.open(path, rev="HEAD") as f:
        assert list(f.keys()) == list(d)
        for k, t in d.items():
            got = f.get_tensor(k)
            assert got.shape == tuple(t.shape)
            np.testing.assert_array_equal(got, t.numpy())
        np.testing.assert_array_equal(f.get_slice("transposed")[1:3], d["transposed"][1:3].numpy())


@needs_torch
def test_fixture_with_tied_weights(repo: theta_store.Repo, repo_dir: Path) -> None:
    """The Hugging Face fixture names one tensor more than it has storages; show lists them all."""
    dest = repo_dir / "pytorch_model.bin"
    dest.write_bytes((FIXTURES / "torch/hf/pytorch_model.bin").read_bytes())
    repo.add([str(dest)])  # type: ignore[attr-defined]
    info = repo.show(str(dest))  # type: ignore[attr-defined]
    want = torch.load(dest, weights_only=True)
    assert info["tensors"] == len(want)
    assert sorted(r["name"] for r in info["rows"] if r["kind"] in ("tensor", "view")) == sorted(want)
    with theta_store.open(dest, rev=None) as f:
        for k, t in want.items():
            np.testing.assert_array_equal(f.get_tensor(k), t.numpy())


def npz_arrays() -> dict[str, np.ndarray[Any, Any]]:
    rng = np.random.default_rng(7)
    return {
        "weights": rng.standard_normal((64, 32)).astype(np.float32),
        "ids": np.arange(12, dtype=np.int64).reshape(3, 4),
        "fortran": np.asfortranarray(rng.standard_normal((5, 3))),
        "half": rng.standard_normal(9).astype(np.float16),
    }


def test_deflated_npz_members_listed_and_read(repo_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    setup_repo(repo_dir, "*.npz")
    path = repo_dir / "arrays.npz"
    arrays = npz_arrays()
    other_encoder(monkeypatch)
    np.savez_compressed(path, **arrays)
    git(repo_dir, "add", "-A")
    git(repo_dir, "commit", "-qm", "one")
    show = json.loads(cli(repo_dir, "show", "--json", "arrays.npz").stdout)
    assert show["tensors"] == len(arrays)
    members = {r["name"]: r for r in show["rows"] if r["kind"] == "member"}
    assert list(members) == list(arrays)
    assert members["weights"]["shape"] == [64, 32] and members["weights"]["dtype"] == "F32"
    assert members["ids"]["bytes"] == 96 and members["ids"]["member"] == "ids.npy"
    assert "in deflated member weights.npy" in cli(repo_dir, "show", "arrays.npz").stdout

    with theta_store.open(path, rev="HEAD") as f:
        assert f.keys() == list(arrays)
        for k, a in arrays.items():
            got = f.get_tensor(k)
            assert got.dtype == a.dtype
            np.testing.assert_array_equal(got, a)
        np.testing.assert_array_equal(f.get_slice("weights")[3:5], arrays["weights"][3:5])

    arrays["weights"][10] += 1.0
    np.savez_compressed(path, **arrays)
    git(repo_dir, "add", "-A")
    git(repo_dir, "commit", "-qm", "two")
    diff = json.loads(cli(repo_dir, "diff", "--json", "HEAD~1", "HEAD", "--", "arrays.npz").stdout)
    files = diff if isinstance(diff, list) else diff["files"]
    kinds = {t["name"]: t["kind"] for f in files for t in f["tensors"]}
    assert kinds["weights"] != "unchanged"
    with theta_store.delta(path, "HEAD~1", "HEAD") as d:
        assert sorted(k for k, v in d.items() if v.kind != "unchanged") == ["weights"]
        np.testing.assert_array_equal(np.nonzero(d["weights"].dense())[0], np.full(32, 10))


def test_stored_and_deflated_members_in_one_npz(repo: theta_store.Repo, repo_dir: Path) -> None:
    """A stored member stays a region; a deflated one that the pinned zlib reproduces is one too
    (the file is stored expanded), and the file comes back byte-exact."""
    path = repo_dir / "mixed.npz"
    a, b = np.arange(10, dtype=np.float32), np.ones((2, 2), np.int32)
    with zipfile.ZipFile(path, "w") as z:
        for name, arr, method in (("a", a, zipfile.ZIP_STORED), ("b", b, zipfile.ZIP_DEFLATED)):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, arr)
            z.writestr(f"{name}.npy", buf.getvalue(), compress_type=method)
    repo.add([str(path)])  # type: ignore[attr-defined]
    info = repo.show(str(path))  # type: ignore[attr-defined]
    assert {r["name"]: r["kind"] for r in info["rows"] if r["kind"] != "skeleton"} == {"a": "tensor", "b": "tensor"}
    with theta_store.open(path, rev=None) as f:
        assert f.keys() == ["a", "b"]
        np.testing.assert_array_equal(f.get_tensor("a"), a)
        np.testing.assert_array_equal(f.get_tensor("b"), b)
    raw = path.read_bytes()
    path.unlink()
    repo.restore([str(path)])  # type: ignore[attr-defined]
    assert path.read_bytes() == raw


def write_sharded(d: Path, shards: dict[str, dict[str, np.ndarray[Any, Any]]]) -> None:
    """Shards written by theta_store's safetensors writer, and the index transformers writes."""
    weight_map = {}
    for shard, tensors in shards.items():
        theta_store.save_safetensors(str(d / shard), tensors)
        weight_map.update(dict.fromkeys(tensors, shard))
    total = sum(a.nbytes for t in shards.values() for a in t.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def test_sharded_safetensors_seen_as_one_model(repo_dir: Path) -> None:
    setup_repo(repo_dir, "*.safetensors")
    rng = np.random.default_rng(3)
    a, b, c = (rng.standard_normal((16, 8)).astype(np.float32) for _ in range(3))
    s1, s2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    write_sharded(repo_dir, {s1: {"a": a, "b": b}, s2: {"c": c}})
    git(repo_dir, "add", "-A")
    git(repo_dir, "commit", "-qm", "v1")
    assert git(repo_dir, "show", "HEAD:model.safetensors.index.json").stdout.startswith("{")  # a plain file

    show = json.loads(cli(repo_dir, "show", "--json", "model.safetensors.index.json").stdout)
    assert show["tensors"] == 3 and [s["path"] for s in show["shards"]] == [s1, s2]
    assert {(r["name"], r["shard"]) for r in show["rows"] if r["kind"] == "tensor"} == {("a", s1), ("b", s1), ("c", s2)}
    assert "shards " + s1 in cli(repo_dir, "show", "model.safetensors.index.json").stdout

    with theta_store.open(repo_dir / "model.safetensors.index.json", rev="HEAD") as f:
        assert isinstance(f, theta_store.ShardedReader)
        assert f.keys() == ["a", "b", "c"]
        assert f.metadata() == {"total_size": 3 * a.nbytes}
        np.testing.assert_array_equal(f.get_tensor("c"), c)
        np.testing.assert_array_equal(f.get_slice("a")[2:4], a[2:4])

    # v2: b moves to the second shard unchanged, c changes.
    c2 = c.copy()
    c2[5, 1] += 1.0
    write_sharded(repo_dir, {s1: {"a": a}, s2: {"b": b, "c": c2}})
    git(repo_dir, "add", "-A")
    git(repo_dir, "commit", "-qm", "v2")
    with theta_store.delta(repo_dir / "model.safetensors.index.json", "HEAD~1", "HEAD") as d:
        assert {k: v.kind != "unchanged" for k, v in d.items()} == {"a": False, "b": False, "c": True}
        np.testing.assert_array_equal(d["c"].indices, [5 * 8 + 1])
    diff = json.loads(cli(repo_dir, "diff", "--json", "HEAD~1", "HEAD", "--", "model.safetensors.index.json").stdout)
    (report,) = diff["files"]
    assert report["path"] == "model.safetensors.index.json"
    assert [t["name"] for t in report["tensors"]] == ["c"]
    text = cli(repo_dir, "diff", "HEAD~1", "HEAD", "--", "model.safetensors.index.json").stdout
    assert "1 of 3 tensors changed" in text
    delta_text = cli(repo_dir, "delta", "HEAD~1", "HEAD", "--", "model.safetensors.index.json")
    assert "1 of 3 tensors changed" in delta_text.stdout


def test_sharded_index_naming_a_missing_tensor(repo_dir: Path) -> None:
    setup_repo(repo_dir, "*.safetensors")
    theta_store.save_safetensors(str(repo_dir / "s1.safetensors"), {"a": np.ones(3, np.float32)})
    index = {"metadata": {}, "weight_map": {"a": "s1.safetensors", "ghost": "s1.safetensors"}}
    (repo_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    git(repo_dir, "add", "-A")
    git(repo_dir, "commit", "-qm", "v1")
    with theta_store.open(repo_dir / "model.safetensors.index.json") as f:
        np.testing.assert_array_equal(f.get_tensor("a"), np.ones(3, np.float32))
        with pytest.raises(theta_store.ThetaStoreError, match=r"ghost.*s1\.safetensors"):
            f.get_tensor("ghost")


def test_sharded_index_errors_name_the_file_and_place(repo_dir: Path) -> None:
    setup_repo(repo_dir, "*.safetensors")
    index = repo_dir / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "../outside.safetensors"}}))
    git(repo_dir, "add", "-A")
    git(repo_dir, "commit", "-qm", "bad")
    show = [sys.executable, "-m", "theta_store", "show", "model.safetensors.index.json"]
    r = subprocess.run(show, cwd=repo_dir, capture_output=True, text=True, check=False)
    assert r.returncode != 0
    assert "model.safetensors.index.json" in r.stderr and "weight_map['a']" in r.stderr and "Traceback" not in r.stderr
    index.write_text(json.dumps({"weight_map": {"a": "missing.safetensors"}}))
    git(repo_dir, "commit", "-qam", "missing shard")
    with theta_store.open(index, rev="HEAD") as f, pytest.raises(theta_store.ThetaStoreError, match=r"missing\.safetensors"):
        f.get_tensor("a")
