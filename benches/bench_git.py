"""Issue 3 benchmark: plain git with theta-store beside Git LFS on the same steps, same run.

Steps on a ~400 MB fp32 model (v1) and a second version with one bias changed (v2):
git add + commit, `touch; git status`, push of v1 and of v2 (bytes sent = growth of the bare
remote), clone, and checkout of the old version. Remotes are bare repositories over file://
(git-lfs serves file:// remotes with its standalone transfer agent).

    python benches/bench_git.py [--params 100e6] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

import theta_store
from common import ENV, bert_like, dir_bytes, ensure_tools, median, sh, timed, write_json


def setup_tool(root: Path, tool: str) -> tuple[Path, Path]:
    remote = root / f"{tool}-remote.git"
    work = root / f"{tool}-work"
    for p in (remote, work):
        if p.exists():
            shutil.rmtree(p)
    sh(root, "git", "init", "-q", "--bare", "-b", "main", str(remote))
    sh(root, "git", "init", "-q", "-b", "main", str(work))
    sh(work, "git", "remote", "add", "origin", f"file://{remote}")
    if tool == "theta":
        sh(work, "theta-store", "track", "*.safetensors")
    else:
        sh(work, "git", "lfs", "track", "*.safetensors")
    sh(work, "git", "add", ".gitattributes")
    sh(work, "git", "commit", "-q", "-m", "attributes")
    sh(work, "git", "push", "-q", "origin", "main")
    return remote, work


def one_run(root: Path, tool: str, v1: Path, v2: Path) -> dict[str, float]:
    remote, work = setup_tool(root, tool)
    out: dict[str, float] = {}
    model = work / "model.safetensors"
    shutil.copy(v1, model)
    out["add_commit_v1_s"] = timed(lambda: (sh(work, "git", "add", "model.safetensors"), sh(work, "git", "commit", "-q", "-m", "v1")))
    sh(work, "git", "tag", "v1")
    touches = []
    for _ in range(3):
        os.utime(model)
        touches.append(timed(lambda: sh(work, "git", "status", "--porcelain")))
    out["touch_status_s"] = median(touches)
    before = dir_bytes(remote)
    out["push_v1_s"] = timed(lambda: sh(work, "git", "push", "-q", "origin", "main", "v1"))
    out["push_v1_bytes"] = dir_bytes(remote) - before
    shutil.copy(v2, model)
    out["add_commit_v2_s"] = timed(lambda: (sh(work, "git", "add", "model.safetensors"), sh(work, "git", "commit", "-q", "-m", "v2")))
    before = dir_bytes(remote)
    out["push_v2_s"] = timed(lambda: sh(work, "git", "push", "-q", "origin", "main"))
    out["push_v2_bytes"] = dir_bytes(remote) - before
    out["checkout_old_s"] = timed(lambda: sh(work, "git", "checkout", "-q", "v1", "--", "model.safetensors"))
    assert model.read_bytes() == v1.read_bytes()
    sh(work, "git", "checkout", "-q", "main", "--", "model.safetensors")
    clone = root / f"{tool}-clone"
    if clone.exists():
        shutil.rmtree(clone)
    out["clone_s"] = timed(lambda: sh(root, "git", "clone", "-q", f"file://{remote}", str(clone)))
    out["clone_bytes"] = dir_bytes(clone / ".git")
    assert (clone / "model.safetensors").read_bytes() == v2.read_bytes()
    out["clone_checkout_old_s"] = timed(lambda: sh(clone, "git", "checkout", "-q", "v1", "--", "model.safetensors"))
    assert (clone / "model.safetensors").read_bytes() == v1.read_bytes()
    out["clone_old_bytes"] = dir_bytes(clone / ".git") - out["clone_bytes"]
    status = sh(clone, "git", "status", "--porcelain")
    assert status.strip() in ("", "M  model.safetensors"), status
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=float, default=100e6)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    ensure_tools()
    root = Path(tempfile.mkdtemp(prefix="theta-git-bench-"))
    cfg = root / "gitconfig"
    cfg.write_text("")
    ENV["GIT_CONFIG_GLOBAL"] = str(cfg)
    os.environ["GIT_CONFIG_GLOBAL"] = str(cfg)
    sh(root, "theta-store", "install", "--global")
    sh(root, "git", "lfs", "install")
    m = bert_like(int(args.params))
    v1, v2 = root / "v1.safetensors", root / "v2.safetensors"
    theta_store.save_safetensors(str(v1), m)
    m["encoder.layer.0.output.dense.bias"] = m["encoder.layer.0.output.dense.bias"] + np.float32(1e-3)
    theta_store.save_safetensors(str(v2), m)
    runs: dict[str, list[dict[str, float]]] = {"theta": [], "lfs": []}
    for _ in range(args.runs):
        for tool in runs:
            runs[tool].append(one_run(root, tool, v1, v2))
            time.sleep(0.1)
    res = {tool: {k: median([r[k] for r in rs]) for k in rs[0]} for tool, rs in runs.items()}
    res["raw_bytes"] = {"v1": v1.stat().st_size}
    write_json("git", res)
    t, lfs = res["theta"], res["lfs"]
    print(f"\n== plain git on a {v1.stat().st_size / 1e6:.0f} MB model, theta-store vs Git LFS (median of {args.runs})")
    print(f"{'step':34} {'theta-store':>12} {'Git LFS':>12} {'LFS/theta':>10}")
    rows = [
        ("git add + commit v1", "add_commit_v1_s", "s"),
        ("touch; git status", "touch_status_s", "s"),
        ("git push v1", "push_v1_s", "s"),
        ("  bytes sent", "push_v1_bytes", "MB"),
        ("git add + commit v2 (one bias)", "add_commit_v2_s", "s"),
        ("git push v2", "push_v2_s", "s"),
        ("  bytes sent", "push_v2_bytes", "MB"),
        ("checkout old version", "checkout_old_s", "s"),
        ("git clone (v2)", "clone_s", "s"),
        ("  bytes in .git", "clone_bytes", "MB"),
        ("checkout v1 in the clone", "clone_checkout_old_s", "s"),
        ("  bytes fetched", "clone_old_bytes", "MB"),
    ]
    for label, key, unit in rows:
        a, b = t[key], lfs[key]
        fmt = (lambda x: f"{x / 1e6:10.3f}MB") if unit == "MB" else (lambda x: f"{x:11.3f}s")
        print(f"{label:34} {fmt(a)} {fmt(b)} {b / a if a else float('inf'):10.1f}")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
