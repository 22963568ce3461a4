"""`theta-store demo`: a small model, several versions, restores, and the storage table."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from . import _native
from .formats.safetensors import save
from .history import tree_pointers
from .reader import open as theta_store_open
from .repo import Repo

GIT_ENV = {
    "GIT_AUTHOR_NAME": "demo",
    "GIT_AUTHOR_EMAIL": "demo@example.com",
    "GIT_COMMITTER_NAME": "demo",
    "GIT_COMMITTER_EMAIL": "demo@example.com",
    "GIT_CONFIG_NOSYSTEM": "1",
}


def make_model(seed: int = 0, layers: int = 4, hidden: int = 256, vocab: int = 8000) -> dict[str, np.ndarray]:
    """A BERT-like state dict of float32 weights (randn * 0.02)."""
    rng = np.random.default_rng(seed)
    m: dict[str, np.ndarray] = {"embeddings.word.weight": (rng.standard_normal((vocab, hidden)) * 0.02).astype(np.float32)}
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for name in ("query", "key", "value", "output"):
            m[p + f"attention.{name}.weight"] = (rng.standard_normal((hidden, hidden)) * 0.02).astype(np.float32)
            m[p + f"attention.{name}.bias"] = np.zeros(hidden, np.float32)
        m[p + "ffn.in.weight"] = (rng.standard_normal((4 * hidden, hidden)) * 0.02).astype(np.float32)
        m[p + "ffn.out.weight"] = (rng.standard_normal((hidden, 4 * hidden)) * 0.02).astype(np.float32)
        m[p + "norm.weight"] = np.ones(hidden, np.float32)
        m[p + "norm.bias"] = np.zeros(hidden, np.float32)
    return m


# the updates a delta encoding should make cheap: their cost and exact restore are printed on their own
LORA, SPARSE, FEW = "LoRA r=8 folded into 4 matrices", "1% of 3 matrices changed", "8 entries of one matrix changed"


def versions(base: dict[str, np.ndarray]) -> list[tuple[str, dict[str, np.ndarray]]]:
    rng = np.random.default_rng(1)
    v2 = dict(base)
    v2["encoder.layer.0.attention.output.bias"] = base["encoder.layer.0.attention.output.bias"] + np.float32(0.01)
    v3 = dict(v2)
    for name in (
        "encoder.layer.0.attention.query.weight",
        "encoder.layer.0.attention.value.weight",
        "encoder.layer.1.attention.query.weight",
        "encoder.layer.1.attention.value.weight",
    ):
        w = v3[name]
        a = (rng.standard_normal((w.shape[0], 8)) * 0.01).astype(np.float32)
        b = (rng.standard_normal((8, w.shape[1])) * 0.01).astype(np.float32)
        v3[name] = w + a @ b
    v4 = dict(v3)
    for name in ("encoder.layer.2.ffn.in.weight", "encoder.layer.2.ffn.out.weight", "encoder.layer.3.attention.key.weight"):
        w = v4[name].copy()
        idx = rng.choice(w.size, w.size // 100, replace=False)
        w.flat[idx] += np.float32(1e-3)
        v4[name] = w
    v5 = dict(v4)
    w = v5["encoder.layer.1.ffn.in.weight"].copy()
    w.flat[rng.choice(w.size, 8, replace=False)] = (rng.standard_normal(8) * 0.02).astype(np.float32)
    v5["encoder.layer.1.ffn.in.weight"] = w
    return [
        ("initial weights", base),
        ("one bias changed", v2),
        (LORA, v3),
        (SPARSE, v4),
        (FEW, v5),
    ]


def _git(cwd: str, *args: str) -> str:
    env = dict(os.environ, **GIT_ENV)
    r = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise SystemExit(f"demo: git {' '.join(args)} failed: {r.stderr.strip()}")
    return r.stdout.strip()


def _du(path: str) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _diff_and_merge(repo: str, path: str, say: Any) -> dict[str, Any]:
    """What `theta-store diff` says of the LoRA version, then two branches that fine-tuned
    different layers, merged by plain `git merge` tensor by tensor with no prompt."""
    from .diffview import file_report

    with Repo(repo) as r, r.delta(path, "v2", "v3") as d:
        line = file_report(d)["summary_line"]
    say(f"  theta-store diff v2 v3: {line}")
    rng = np.random.default_rng(7)
    tuned: dict[str, dict[str, np.ndarray]] = {}
    with theta_store_open(path, rev="HEAD", repo=repo) as f:
        head = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a reader, not a dict)
    for branch, layer in (("tune-layer-0", 0), ("tune-layer-1", 1)):
        _git(repo, "checkout", "-q", "-b", branch, "main")
        t = dict(head)
        for k in t:
            if k.startswith(f"encoder.layer.{layer}.") and k.endswith(".weight"):
                t[k] = (t[k] + rng.standard_normal(t[k].shape).astype(np.float32) * np.float32(1e-4)).astype(np.float32)
        save(path, t, {"format": "pt"})
        _git(repo, "commit", "-q", "-am", f"fine-tune layer {layer}")
        tuned[branch] = t
    _git(repo, "checkout", "-q", "tune-layer-0")
    _git(repo, "merge", "-q", "--no-edit", "tune-layer-1")
    want = dict(tuned["tune-layer-0"])
    want.update({k: v for k, v in tuned["tune-layer-1"].items() if k.startswith("encoder.layer.1.")})
    with theta_store_open(path, rev="HEAD", repo=repo) as f:
        exact = sorted(f.keys()) == sorted(want) and all(np.array_equal(f.get_tensor(k), v) for k, v in want.items())
    clean = _git(repo, "status", "--porcelain") == ""
    say(
        "  git merge of branches that fine-tuned layer 0 and layer 1: merged tensor by tensor, no prompt;"
        + (" the result holds both, exactly, git status clean" if exact and clean else " WRONG RESULT")
    )
    _git(repo, "checkout", "-q", "main")
    return {"diff_v2_v3": line, "exact": exact and clean}


def _chunk_store(work: str, repo: str, digest: bytes, cfg: list[str], say: Any) -> dict[str, Any]:
    """Every version again to a second Git remote whose frames go to a chunk store (a directory
    here, as a shared drive; S3 and Git LFS work the same): Git gets pointers and index records."""
    from .sizes import human_size

    store, team = os.path.join(work, "chunk-store"), os.path.join(work, "team.git")
    os.makedirs(store)
    _git(work, "init", "-q", "--bare", "-b", "main", team)
    _git(repo, "remote", "add", "team", team)
    with Repo(repo) as r:
        r.store_add("shared", "file://" + store)
    _git(repo, "config", "remote.origin.thetastore", "git")  # origin keeps its frames in Git objects
    _git(repo, "commit", "-q", "-m", "frames for team live in the chunk store", ".thetastore")
    _git(repo, "push", "-q", "team", "main", "--tags")
    in_git, in_store = _du(os.path.join(team, "objects")), _du(store)
    carol = os.path.join(work, "carol")
    _git(work, "clone", "-q", *cfg, "file://" + team, carol)
    exact = _native.chunk_id(Path(os.path.join(carol, "model.safetensors")).read_bytes()) == digest
    say(
        f"  pushed to a second remote with a chunk store: Git got {human_size(in_git)} (pointers, index records),"
        f" the store {human_size(in_store)} of frames; a clone of it restores" + (" byte-identically" if exact else " WRONG")
    )
    return {"git_bytes": in_git, "store_bytes": in_store, "exact": exact}


def _damage_and_repair(clone: str, digest: bytes, say: Any) -> dict[str, Any]:
    """A byte flipped in a pack of the clone, as a failing disk would: fsck names the version and
    the commits that use it, and `fsck --repair` fetches an intact copy from origin."""
    with Repo(clone) as r:
        mid = tree_pointers(r.store, "v1")["model.safetensors"].manifest_id
        frames = r.store.version_frames(mid)
        paths, where = r.store.locate([max(frames.values(), key=lambda f: f.frame_len).object_id])
    loc = where[0]
    assert loc is not None
    pack = Path(paths[loc.pack])
    data = bytearray(pack.read_bytes())
    data[loc.offset + 1000] ^= 0x20
    os.chmod(pack, 0o644)
    pack.write_bytes(bytes(data))
    with Repo(clone) as r:
        found = r.fsck(progress=False)
        hit = next((d for d in found["damaged"] if d["version"] == mid.hex()), None)
        fixed = r.repair("origin", progress=False)
    _git(clone, "checkout", "-q", "v1")
    exact = _native.chunk_id(Path(os.path.join(clone, "model.safetensors")).read_bytes()) == digest
    _git(clone, "checkout", "-q", "main")
    named = hit is not None and hit["paths"] == ["model.safetensors"]
    commits = len({c["commit"] for d in found["damaged"] for c in d["commits"]})
    say(
        f"  a byte flipped in a pack of the clone: fsck names {len(found['damaged'])} damaged version(s)"
        + (f" and the {commits} commit(s) of model.safetensors using them" if named else " WRONG")
        + "; fsck --repair fetched intact copies from origin"
        + ("; v1 restores byte-identically" if fixed["ok"] and exact else " WRONG")
    )
    return {"damaged_named": named, "repaired": fixed["ok"], "exact": exact}


def run_demo(directory: str | None = None, json_out: bool = False, quiet: bool = False) -> int:
    """Versions of a small model through plain git: add, commit, push, clone, checkout, storage table."""
    from .install import config_items, install, track
    from .sizes import human_size

    work = directory or tempfile.mkdtemp(prefix="theta-store-demo-")
    os.makedirs(work, exist_ok=True)
    say = (lambda *a: None) if (json_out or quiet) else print
    say(f"theta-store demo in {work}")
    remote = os.path.join(work, "remote.git")
    repo = os.path.join(work, "alice")
    _git(work, "init", "-q", "--bare", "-b", "main", remote)
    _git(work, "init", "-q", "-b", "main", repo)
    _git(repo, "remote", "add", "origin", remote)
    install(repo, "local")
    track(["*.safetensors"], repo)
    path = os.path.join(repo, "model.safetensors")
    rows: list[dict[str, Any]] = []
    digests: list[bytes] = []
    for i, (what, tensors) in enumerate(versions(make_model()), 1):
        save(path, tensors, {"format": "pt"})
        before, remote_before = _du(os.path.join(repo, ".git")), _du(os.path.join(remote, "objects"))
        _git(repo, "add", ".gitattributes", "model.safetensors")
        _git(repo, "commit", "-q", "-m", f"v{i}: {what}")
        _git(repo, "tag", f"v{i}")
        stored = _du(os.path.join(repo, ".git")) - before
        _git(repo, "push", "-q", "origin", "main", f"v{i}")
        pushed = _du(os.path.join(remote, "objects")) - remote_before
        digests.append(_native.chunk_id(Path(path).read_bytes()))
        raw = os.path.getsize(path)
        rows.append({"version": f"v{i}", "change": what, "raw": raw, "stored": stored, "pushed": pushed})
        say(
            f"  v{i} {what}: git add + commit grew .git by {human_size(stored)} ({stored / raw:.1%} of the"
            f" {human_size(raw)} file), git push sent {human_size(pushed)}"
        )
    clone = os.path.join(work, "bob")
    cfg = [a for key, value in config_items() for a in ("--config", f"{key}={value}")]
    _git(work, "clone", "-q", *cfg, "file://" + remote, clone)
    cloned = os.path.join(clone, "model.safetensors")
    ok = _native.chunk_id(Path(cloned).read_bytes()) == digests[-1]
    for i, (row, digest) in enumerate(zip(rows, digests, strict=True), 1):
        _git(clone, "checkout", "-q", f"v{i}")
        row["restores_exactly"] = _native.chunk_id(Path(cloned).read_bytes()) == digest and _git(clone, "status", "--porcelain") == ""
        ok = ok and row["restores_exactly"]
    _git(clone, "checkout", "-q", "main")
    say(f"  cloned into {clone}; checked out v1..v{len(digests)}: " + ("byte-identical, git status clean" if ok else "MISMATCH"))
    for r in rows:
        if r["change"] in (LORA, SPARSE, FEW):
            say(
                f"  {r['change']}: {human_size(r['stored'])} in .git for a {human_size(r['raw'])} file, restores"
                + (" byte-identically" if r["restores_exactly"] else " WRONG")
            )
    with Repo(clone) as cloned_repo:
        fsck = cloned_repo.fsck(progress=False)
        status = cloned_repo.status()
    real = sum(f["worktree"] == "materialised" for f in status["files"])
    say(f"  theta-store status in the clone: {real} of {len(status['files'])} checkpoint(s) are real files, none untracked")
    ok = ok and real == len(status["files"]) and not status["uncovered"]
    with Repo(repo) as alice:
        check = alice.check_remote("origin", ["--branches", "--tags"])
    say(f"  theta-store push --check origin: {'origin has every version' if check['ok'] else check['missing']} its branches and tags need")
    ok = ok and check["ok"]
    merged = _diff_and_merge(repo, path, say)
    ok = ok and merged["exact"]
    stored_elsewhere = _chunk_store(work, repo, digests[-1], cfg, say)
    ok = ok and stored_elsewhere["exact"]
    repaired = _damage_and_repair(clone, digests[0], say)
    ok = ok and all(repaired.values())
    total_raw = sum(r["raw"] for r in rows)
    total_stored = sum(r["stored"] for r in rows)
    if json_out:
        out = {
            "dir": work,
            "versions": rows,
            "clone_exact": ok,
            "fsck_ok": fsck["ok"],
            "clone_status": status,
            "remote_check": check,
            "merge": merged,
            "chunk_store": stored_elsewhere,
            "repair": repaired,
        }
        print(json.dumps(out, indent=2))
    elif not quiet:
        print("\nstorage: what each version added to .git and sent by git push (Git LFS stores and sends the whole file)")
        print(f"{'version':8} {'change':34} {'raw MB':>8} {'stored MB':>10} {'of raw':>7} {'pushed MB':>10} {'Git LFS MB':>11}")
        for r in rows:
            print(
                f"{r['version']:8} {r['change']:34} {r['raw'] / 1e6:8.2f} {r['stored'] / 1e6:10.3f} {r['stored'] / r['raw']:7.1%} "
                f"{r['pushed'] / 1e6:10.3f} {r['raw'] / 1e6:11.2f}"
            )
        print(
            f"{'total':8} {'':34} {total_raw / 1e6:8.2f} {total_stored / 1e6:10.3f} {total_stored / total_raw:7.1%} "
            f"{sum(r['pushed'] for r in rows) / 1e6:10.3f} {total_raw / 1e6:11.2f}"
        )
        print(f"\nfsck of the clone: {'ok' if fsck['ok'] else fsck['problems']}")
    return 0 if ok and fsck["ok"] else 1
