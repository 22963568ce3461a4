"""Deltas through plain git: changed tensors are stored against the previous version, every
version restores byte-exactly, and bases travel and stay with the versions that need them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

import theta_store
from test_git_e2e import (
    clone,
    commit,
    dir_bytes,
    g,
    global_config,  # noqa: F401
    new_repo,
    pointer_version,
    ts,
    versions,
)
from theta_store.gitstore import GitStore, StoredFrame

ROWS, COLS = 512, 1024  # 2 MiB of fp32: one chunk per matrix


def model(rng: np.random.Generator, layers: int = 4) -> dict[str, np.ndarray]:
    t = {f"layers.{i}.weight": (rng.standard_normal((ROWS, COLS)) * 0.02).astype(np.float32) for i in range(layers)}
    t["layers.0.bias"] = np.zeros(COLS, np.float32)
    return t


def save(path: Path, tensors: dict[str, np.ndarray]) -> str:
    theta_store.save_safetensors(str(path), tensors)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fine_tune(t: dict[str, np.ndarray], rng: np.random.Generator, names: list[str]) -> dict[str, np.ndarray]:
    """A small dense update of the named tensors (every element changes slightly)."""
    out = dict(t)
    for n in names:
        out[n] = (t[n] + rng.standard_normal(t[n].shape).astype(np.float32) * np.float32(2e-5)).astype(np.float32)
    return out


def depth(frames: dict[bytes, StoredFrame], cid: bytes) -> int:
    bases = frames[cid].bases
    return 0 if not bases else 1 + max(depth(frames, b) for b in bases)


def version_frames(repo: Path, rev_path: str) -> dict[bytes, StoredFrame]:
    with GitStore(repo) as s:
        return dict(s.version_frames(bytes.fromhex(pointer_version(repo, rev_path))))


def test_changed_tensors_cost_what_changed_and_restore_exactly(tmp_path: Path) -> None:
    """A version where three tensors changed a little costs much less than with deltas off, and
    every version checks out byte for byte."""
    rng = np.random.default_rng(0)
    grown = {}
    sums: dict[str, list[str]] = {}
    for depth_setting in ("4", "0"):
        repo = new_repo(tmp_path / f"r{depth_setting}")
        g(repo, "config", "thetastore.deltaDepth", depth_setting)
        t = model(np.random.default_rng(0))
        sums[depth_setting] = [save(repo / "m.safetensors", t)]
        commit(repo, "v1")
        before = dir_bytes(repo / ".git")
        t = fine_tune(t, np.random.default_rng(1), ["layers.1.weight", "layers.2.weight"])
        t["layers.0.bias"] = np.full(COLS, 0.5, np.float32)
        sums[depth_setting].append(save(repo / "m.safetensors", t))
        commit(repo, "v2")
        grown[depth_setting] = dir_bytes(repo / ".git") - before
        assert g(repo, "status", "--porcelain").stdout == ""
    del rng
    assert sums["4"] == sums["0"]
    # Two 2 MiB matrices changed by ~1e-3 of their scale: a plain frame costs ~0.86 of raw each.
    assert grown["4"] < 0.8 * grown["0"], grown
    repo = tmp_path / "r4"
    frames = version_frames(repo, "HEAD:m.safetensors")
    assert sum(1 for f in frames.values() if f.bases) >= 2
    for rev, want in (("HEAD~1", sums["4"][0]), ("HEAD", sums["4"][1])):
        (repo / "m.safetensors").unlink()
        g(repo, "checkout", rev, "--", "m.safetensors")
        assert hashlib.sha256((repo / "m.safetensors").read_bytes()).hexdigest() == want, rev
    report = json.loads(ts(repo, "fsck", "--json").stdout)
    assert report["ok"], report


def test_chains_are_bounded_by_delta_depth(tmp_path: Path) -> None:
    """With thetastore.deltaDepth=2, a tensor changed in every version is never more than two
    deltas deep (then coded against the chain's keyframe again), and every version restores."""
    repo = new_repo(tmp_path / "r")
    g(repo, "config", "thetastore.deltaDepth", "2")
    rng = np.random.default_rng(3)
    t = model(rng, layers=2)
    sums = [save(repo / "m.safetensors", t)]
    commit(repo, "v0")
    for k in range(1, 6):
        t = fine_tune(t, rng, ["layers.0.weight"])
        sums.append(save(repo / "m.safetensors", t))
        commit(repo, f"v{k}")
    depths = []
    for k in range(6):
        frames = version_frames(repo, f"HEAD~{5 - k}:m.safetensors")
        depths.append(max(depth(frames, c) for c in frames))
    # Once the chain is full, the next version is coded against the keyframe it started from.
    assert depths == [0, 1, 2, 1, 2, 1], depths
    v0 = version_frames(repo, "HEAD~5:m.safetensors")
    v3 = version_frames(repo, "HEAD~2:m.safetensors")
    assert {f.bases[0] for f in v3.values() if f.bases} <= set(v0)
    for k in range(6):
        g(repo, "checkout", "-q", f"HEAD~{5 - k}" if k < 5 else "main", "--", "m.safetensors")
        assert hashlib.sha256((repo / "m.safetensors").read_bytes()).hexdigest() == sums[k], k


def test_clone_fetches_bases_and_gc_keeps_them(tmp_path: Path) -> None:
    """A clone of only the newest commit restores a delta version (its tree holds its bases);
    after the version that introduced the bases is dropped and gc prunes, it still restores."""
    repo = new_repo(tmp_path / "r")
    rng = np.random.default_rng(5)
    t = model(rng, layers=2)
    save(repo / "m.safetensors", t)
    commit(repo, "v1")
    v1 = pointer_version(repo, "HEAD:m.safetensors")
    t = fine_tune(t, rng, ["layers.0.weight", "layers.1.weight"])
    want = save(repo / "m.safetensors", t)
    commit(repo, "v2")
    assert any(f.bases for f in version_frames(repo, "HEAD:m.safetensors").values())
    bare = tmp_path / "remote.git"
    g(tmp_path, "init", "-q", "--bare", str(bare))
    g(repo, "push", "-q", str(bare), "main")
    other = tmp_path / "c"
    clone(f"file://{bare}", other, "--depth", "1")
    assert hashlib.sha256((other / "m.safetensors").read_bytes()).hexdigest() == want
    # Drop v1 from the history: an orphan branch with only v2, the old branch deleted, then gc.
    g(repo, "checkout", "-q", "--orphan", "only-v2")
    g(repo, "commit", "-q", "-m", "v2 alone")
    g(repo, "branch", "-D", "main")
    g(repo, "reflog", "expire", "--expire=now", "--all")
    ts(repo, "gc", "--prune")
    assert v1 not in versions(repo)
    (repo / "m.safetensors").unlink()
    g(repo, "checkout", "--", "m.safetensors")
    assert hashlib.sha256((repo / "m.safetensors").read_bytes()).hexdigest() == want
    assert json.loads(ts(repo, "fsck", "--json").stdout)["ok"]


def test_add_base_names_the_version_to_code_against(tmp_path: Path) -> None:
    """`theta-store add --base REV` codes against the file in REV; a REV without the file is an
    error naming both."""
    repo = new_repo(tmp_path / "r")
    rng = np.random.default_rng(7)
    t1 = model(rng, layers=2)
    save(repo / "m.safetensors", t1)
    commit(repo, "v1")
    t2 = dict(t1)
    t2["layers.0.weight"] = rng.standard_normal((ROWS, COLS)).astype(np.float32)  # a new, unrelated matrix
    save(repo / "m.safetensors", t2)
    commit(repo, "v2")
    t3 = fine_tune(t1, rng, ["layers.0.weight"])  # close to v1, far from v2
    want = save(repo / "m.safetensors", t3)
    ts(repo, "add", "--base", "HEAD~1", "m.safetensors")
    frames = version_frames(repo, ":m.safetensors")
    v1_frames = version_frames(repo, "HEAD~1:m.safetensors")
    based = {b for f in frames.values() for b in f.bases}
    assert based and based <= set(v1_frames), "coded against v1's chunks"
    commit(repo, "v3")
    (repo / "m.safetensors").unlink()
    g(repo, "checkout", "--", "m.safetensors")
    assert hashlib.sha256((repo / "m.safetensors").read_bytes()).hexdigest() == want
    r = ts(repo, "add", "--base", "nosuchrev", "m.safetensors", ok=False)
    assert r.returncode == 1 and "nosuchrev" in r.stderr, r.stderr


@pytest.mark.parametrize("setting", ["-1", "x", "99"])
def test_bad_delta_depth_is_named(tmp_path: Path, setting: str) -> None:
    repo = new_repo(tmp_path / "r")
    g(repo, "config", "thetastore.deltaDepth", setting)
    save(repo / "m.safetensors", model(np.random.default_rng(0), layers=1))
    r = ts(repo, "add", "m.safetensors", ok=False)
    assert "thetastore.deltaDepth" in r.stderr and setting in r.stderr, r.stderr


def test_damaged_base_is_named_never_wrong_bytes(tmp_path: Path) -> None:
    """A base chunk whose frame is damaged: the delta version's restore fails naming the damage,
    and the work-tree file is left as it was."""
    repo = new_repo(tmp_path / "r")
    rng = np.random.default_rng(9)
    t = model(rng, layers=1)
    save(repo / "m.safetensors", t)
    commit(repo, "v1")
    t = fine_tune(t, rng, ["layers.0.weight"])
    save(repo / "m.safetensors", t)
    commit(repo, "v2")
    frames = version_frames(repo, "HEAD:m.safetensors")
    base = next(b for f in frames.values() for b in f.bases)
    obj = frames[base].object_id
    # One payload byte of the base's frame flipped, in the pack.
    with GitStore(repo) as s:
        packs, locs = s.locate([obj])
    loc = locs[0]
    assert loc is not None
    pack = Path(packs[loc.pack])
    data = bytearray(pack.read_bytes())
    data[loc.offset + 400] ^= 0x40
    pack.chmod(0o644)
    pack.write_bytes(bytes(data))
    for plan in (repo / ".git" / "theta-store" / "plans").glob("*"):
        plan.unlink()
    (repo / "m.safetensors").write_bytes(b"placeholder")
    r = ts(repo, "restore", "--source", "HEAD", "m.safetensors", ok=False)
    assert r.returncode == 1
    assert "corrupt" in r.stderr.lower() or "hash" in r.stderr.lower(), r.stderr
    assert (repo / "m.safetensors").read_bytes() == b"placeholder"


def _added_bytes(repo: Path, rev_path: str, base_rev_path: str) -> int:
    """Frame bytes of the version at `rev_path` that the version at `base_rev_path` does not have."""
    new, old = version_frames(repo, rev_path), version_frames(repo, base_rev_path)
    return sum(f.frame_len for c, f in new.items() if c not in old)


def test_lora_adapter_predicts_the_change(tmp_path: Path) -> None:
    """`add --lora DIR` with the PEFT adapter that was folded in stores about the adapter's size,
    exactly; a wrong adapter is refused naming the module."""
    repo = new_repo(tmp_path / "r")
    rng = np.random.default_rng(11)
    t = model(rng, layers=2)
    save(repo / "m.safetensors", t)
    commit(repo, "v1")
    r, alpha = 8, 16
    a = (rng.standard_normal((r, COLS)) * 0.01).astype(np.float32)
    b = (rng.standard_normal((ROWS, r)) * 0.01).astype(np.float32)
    t2 = dict(t)
    t2["layers.0.weight"] = (t["layers.0.weight"] + np.float32(alpha / r) * (b @ a)).astype(np.float32)
    want = save(repo / "m.safetensors", t2)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    theta_store.save_safetensors(
        str(adapter / "adapter_model.safetensors"),
        {"base_model.model.layers.0.lora_A.weight": a, "base_model.model.layers.0.lora_B.weight": b},
    )
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["0"]}))
    ts(repo, "add", "--lora", str(adapter), "m.safetensors")
    added = _added_bytes(repo, ":m.safetensors", "HEAD:m.safetensors")
    factors = (a.nbytes + b.nbytes) * 1.05
    assert added < factors + 40_000, (added, factors)
    info = json.loads(ts(repo, "show", "--json", ":m.safetensors").stdout)
    assert {row["name"]: row["encoding"] for row in info["rows"]}["layers.0.weight"] == "low-rank"
    commit(repo, "v2")
    with theta_store.delta("m.safetensors", "HEAD~1", "HEAD", repo=repo) as d:
        factors = d["layers.0.weight"].factors
    assert factors is not None
    assert np.array_equal(factors[0], b * np.float32(alpha / r)) and np.array_equal(factors[1], a)  # the adapter's, not an SVD's
    (repo / "m.safetensors").unlink()
    g(repo, "checkout", "--", "m.safetensors")
    assert hashlib.sha256((repo / "m.safetensors").read_bytes()).hexdigest() == want
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": alpha}))
    theta_store.save_safetensors(
        str(adapter / "adapter_model.safetensors"),
        {"base_model.model.nope.lora_A.weight": a, "base_model.model.nope.lora_B.weight": b},
    )
    bad = ts(repo, "add", "--lora", str(adapter), "m.safetensors", ok=False)
    assert bad.returncode == 1 and "nope" in bad.stderr and "adapter_model.safetensors" in bad.stderr, bad.stderr


def test_lossy_low_rank_is_opt_in_recorded_and_clean(tmp_path: Path) -> None:
    """`add --lossy low-rank:rank=4` stores the change as factors alone, rewrites the file to
    exactly what is stored (git status clean, restore byte-identical to the rewritten file), and
    show names the tensor as an approximation."""
    repo = new_repo(tmp_path / "r")
    rng = np.random.default_rng(13)
    t = model(rng, layers=2)
    save(repo / "m.safetensors", t)
    commit(repo, "v1")
    t2 = dict(t)
    update = (rng.standard_normal((ROWS, 4)) @ rng.standard_normal((4, COLS))).astype(np.float32) * np.float32(1e-3)
    noise = rng.standard_normal((ROWS, COLS)).astype(np.float32) * np.float32(1e-6)
    t2["layers.0.weight"] = (t["layers.0.weight"] + update + noise).astype(np.float32)
    original = save(repo / "m.safetensors", t2)
    out = ts(repo, "add", "--lossy", "low-rank:rank=4", "m.safetensors").stdout
    assert "approximated" in out, out
    rewritten = hashlib.sha256((repo / "m.safetensors").read_bytes()).hexdigest()
    assert rewritten != original
    with theta_store.open(repo / "m.safetensors", rev=None, repo=repo) as f:
        got = f.get_tensor("layers.0.weight")
        assert np.array_equal(f.get_tensor("layers.1.weight"), t["layers.1.weight"])  # unchanged tensors stay exact
    err = np.linalg.norm(got.astype(np.float64) - t2["layers.0.weight"]) / np.linalg.norm(update.astype(np.float64))
    assert err < 0.05, err
    assert _added_bytes(repo, ":m.safetensors", "HEAD:m.safetensors") < 4 * (ROWS + COLS) * 4 + 40_000
    info = json.loads(ts(repo, "show", "--json", ":m.safetensors").stdout)
    assert info["lossy"]["layers.0.weight"]["rank"] == 4, info["lossy"]
    assert "lossy" in ts(repo, "show", ":m.safetensors").stdout
    commit(repo, "v2")
    assert g(repo, "status", "--porcelain").stdout == ""
    (repo / "m.safetensors").unlink()
    g(repo, "checkout", "--", "m.safetensors")
    assert hashlib.sha256((repo / "m.safetensors").read_bytes()).hexdigest() == rewritten
    for spec in ("low-rank", "low-rank:rank=0", "svd:rank=4", "low-rank:rtol=2"):
        bad = ts(repo, "add", "--lossy", spec, "m.safetensors", ok=False)
        assert "--lossy" in bad.stderr and bad.returncode in (1, 2), bad.stderr


def test_lossy_needs_a_base(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "r")
    save(repo / "m.safetensors", model(np.random.default_rng(0), layers=1))
    bad = ts(repo, "add", "--lossy", "low-rank:rank=4", "m.safetensors", ok=False)
    assert "earlier version" in bad.stderr and "m.safetensors" in bad.stderr, bad.stderr


def test_lazy_read_finds_a_base_that_is_another_tensor_of_the_file(tmp_path: Path) -> None:
    """A changed tensor coded against a chunk that another tensor of the same version still holds
    (two equal tensors, one fine-tuned): reading it alone finds its base."""
    repo = new_repo(tmp_path / "r")
    rng = np.random.default_rng(17)
    w = (rng.standard_normal((ROWS, COLS)) * 0.02).astype(np.float32)
    save(repo / "m.safetensors", {"a": w, "b": w.copy()})
    commit(repo, "v1")
    a2 = (w + rng.standard_normal(w.shape).astype(np.float32) * np.float32(2e-5)).astype(np.float32)
    save(repo / "m.safetensors", {"a": a2, "b": w})
    commit(repo, "v2")
    frames = version_frames(repo, "HEAD:m.safetensors")
    assert any(f.bases for f in frames.values())
    for plan in (repo / ".git" / "theta-store" / "plans").glob("*"):
        plan.unlink()  # the plan from the store, as a fresh clone would make it
    with theta_store.open(repo / "m.safetensors", rev="HEAD", repo=repo) as f:
        assert np.array_equal(f.get_tensor("a"), a2)
    assert json.loads(ts(repo, "fsck", "--json").stdout)["ok"]
