"""Push and clone through chunk stores (issue 15), beside Git LFS pushing the same files to the
same LFS server.

    python benches/bench_chunkstore.py [--gb 2] [--stores s3,lfs,file] [--work DIR]

For each store: push of a model of --gb GB (v1) and of a one-tensor change (v2), a clone (git
smudges: git holds the filter's output in memory) and a clone with smudging skipped followed by
`theta-store pull` (theta-store writes the file); wall time and peak RSS (/usr/bin/time -v, the
largest process of the command's tree) and, counted on the server's side, objects, bytes and
requests. The Git LFS baseline pushes the same two files with git-lfs to the same LFS server.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from common import ENV, ensure_tools
from servers import serve
from storeservers import StoreServer, store_server
from theta_store.formats.safetensors import save


def model(gb: float, seed: int = 0) -> dict[str, np.ndarray]:
    """fp32 matrices of 64 MiB (4096 x 4096), randn * 0.02: about `gb` GB."""
    rng = np.random.default_rng(seed)
    n = max(1, round(gb * 1e9 / (64 << 20)))
    return {f"layers.{i}.weight": (rng.standard_normal((4096, 4096), dtype=np.float32) * np.float32(0.02)) for i in range(n)}


def run(cwd: Path, *args: str, env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MB, stderr) of a command under /usr/bin/time -v."""
    os.sync()
    r = subprocess.run(["/usr/bin/time", "-v", *args], cwd=cwd, env=env or ENV, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed in {cwd}:\n{r.stderr[-3000:]}")
    wall = rss = 0.0
    for line in r.stderr.splitlines():
        if "Elapsed (wall clock)" in line:
            parts = line.rsplit(" ", 1)[1].split(":")
            wall = sum(float(p) * 60**i for i, p in enumerate(reversed(parts)))
        elif "Maximum resident set size" in line:
            rss = int(line.split(":")[1]) / 1024
    return wall, rss, r.stderr


def git(cwd: Path, *args: str, env: dict[str, str] | None = None) -> str:
    r = subprocess.run(["git", *args], cwd=cwd, env=env or ENV, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed: {r.stderr}")
    return r.stdout


def write_versions(path: Path, gb: float) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    v1 = model(gb)
    v2 = dict(v1)
    v2["layers.0.weight"] = v1["layers.0.weight"] + np.float32(1e-3)
    return v1, v2


def server_counts(srv: StoreServer) -> dict[str, int]:
    objs = srv.objects()
    return {"objects": len(objs), "bytes": sum(objs.values()), "requests": srv.requests()}


def push_versions(
    a: Path, srv: StoreServer, versions: tuple[dict[str, np.ndarray], ...], env: dict[str, str], out: dict[str, object]
) -> None:
    """Commit and push each version, measuring the push and what reached the server."""
    for i, tensors in enumerate(versions, 1):
        save(str(a / "model.safetensors"), tensors, {})
        git(a, "add", ".", env=env)
        git(a, "commit", "-q", "-m", f"v{i}", env=env)
        before = server_counts(srv)
        wall, rss, _ = run(a, "git", "push", "-q", "origin", "main", env=env)
        after = server_counts(srv)
        out[f"push_v{i}"] = {"s": wall, "rss_mb": rss, **{k: after[k] - before[k] for k in after}}


def bench_store(kind: str, work: Path, v1: dict[str, np.ndarray], v2: dict[str, np.ndarray], env: dict[str, str]) -> dict[str, object]:
    out: dict[str, object] = {"store": kind}
    with serve("file", work / "git") as remote, store_server(kind, work / "store", remote) as srv:
        env = dict(env, **srv.env)
        a = work / "a"
        a.mkdir()
        git(a, "init", "-q", "-b", "main", env=env)
        git(a, "remote", "add", "origin", remote.url, env=env)
        subprocess.run(["theta-store", "track", "*.safetensors"], cwd=a, env=env, check=True, capture_output=True)
        subprocess.run(
            ["theta-store", "remote", "add", "weights", srv.url, *(["--endpoint", srv.endpoint] if srv.endpoint else [])],
            cwd=a,
            env=env,
            check=True,
            capture_output=True,
        )
        push_versions(a, srv, (v1, v2), env, out)
        b = work / "b"
        wall, rss, _ = run(work, "git", "clone", "-q", remote.url, str(b), env=env)
        assert (b / "model.safetensors").stat().st_size == (a / "model.safetensors").stat().st_size
        out["clone"] = {"s": wall, "rss_mb": rss}
        c = work / "c"
        w1, r1, _ = run(work, "git", "clone", "-q", remote.url, str(c), env=dict(env, THETA_STORE_SKIP_SMUDGE="1"))
        w2, r2, _ = run(c, "theta-store", "pull", "-q", env=env)
        assert (c / "model.safetensors").read_bytes() == (a / "model.safetensors").read_bytes()
        out["clone_skip_smudge_pull"] = {"s": w1 + w2, "rss_mb": max(r1, r2), "pull_rss_mb": r2}
    return out


def bench_git_lfs(work: Path, v1: dict[str, np.ndarray], v2: dict[str, np.ndarray], env: dict[str, str]) -> dict[str, object]:
    out: dict[str, object] = {"store": "git-lfs"}
    with serve("file", work / "git") as remote, store_server("lfs", work / "store", remote) as srv:
        env = dict(env, **srv.env)
        a = work / "a"
        a.mkdir()
        git(a, "init", "-q", "-b", "main", env=env)
        git(a, "remote", "add", "origin", remote.url, env=env)
        git(a, "lfs", "install", "--local", env=env)
        git(a, "lfs", "track", "*.safetensors", env=env)
        git(a, "config", "-f", ".lfsconfig", "lfs.url", srv.url, env=env)
        push_versions(a, srv, (v1, v2), env, out)
        b = work / "b"
        wall, rss, _ = run(work, "git", "clone", "-q", remote.url, str(b), env=env)
        assert (b / "model.safetensors").read_bytes() == (a / "model.safetensors").read_bytes()
        out["clone"] = {"s": wall, "rss_mb": rss}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--gb", type=float, default=2.0)
    ap.add_argument("--stores", default="s3,lfs")
    ap.add_argument("--work", default=None)
    ap.add_argument("--no-baseline", action="store_true", help="skip Git LFS")
    args = ap.parse_args()
    ensure_tools()
    root = Path(args.work or tempfile.mkdtemp(prefix="bench-chunkstore-"))
    home = root / "home"
    home.mkdir(parents=True, exist_ok=True)
    env = dict(ENV, HOME=str(home), GIT_CONFIG_GLOBAL=str(home / ".gitconfig"))
    subprocess.run(["theta-store", "install", "--global"], cwd=home, env=env, check=True, capture_output=True)
    subprocess.run(["git", "lfs", "install", "--skip-repo"], cwd=home, env=env, check=True, capture_output=True)
    v1, v2 = write_versions(root / "model.safetensors", args.gb)
    raw = sum(t.nbytes for t in v1.values())
    results = []
    for kind in args.stores.split(","):
        results.append(bench_store(kind, root / kind, v1, v2, env))
        print(json.dumps(results[-1]), flush=True)
        shutil.rmtree(root / kind, ignore_errors=True)
    if not args.no_baseline:
        results.append(bench_git_lfs(root / "git-lfs", v1, v2, env))
        print(json.dumps(results[-1]), flush=True)
        shutil.rmtree(root / "git-lfs", ignore_errors=True)
    print(f"model: {raw / 1e9:.2f} GB fp32, {len(v1)} tensors of 64 MiB; v2 changes one tensor")
    print(f"{'store':8} {'step':24} {'s':>7} {'peak RSS MB':>12} {'objects':>8} {'MB stored':>10} {'requests':>9}")
    for r in results:
        for step in ("push_v1", "push_v2", "clone", "clone_skip_smudge_pull"):
            m = r.get(step)
            if not isinstance(m, dict):
                continue
            print(
                f"{r['store']:8} {step:24} {m['s']:7.2f} {m['rss_mb']:12.0f} {m.get('objects', ''):>8} "
                f"{(m['bytes'] / 1e6 if 'bytes' in m else float('nan')):10.1f} {m.get('requests', ''):>9}"
            )
    lfs = next((r for r in results if r["store"] == "git-lfs"), None)
    if lfs:
        for r in results:
            if r is lfs:
                continue
            for step in ("push_v1", "push_v2", "clone"):
                ours, theirs = r[step], lfs[step]
                assert isinstance(ours, dict) and isinstance(theirs, dict)
                print(f"{r['store']} {step}: {theirs['s'] / max(ours['s'], 1e-9):.2f}x Git LFS's speed")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
