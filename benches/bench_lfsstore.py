"""Issue 15 benchmark: the LFS chunk store (lfsstore.LfsStore) beside the real git-lfs client, moving
the same bytes to and from the same Git LFS server (dulwich's, tests/lfs_serve.py) in the same run.

~1 GiB of incompressible data in 32 MiB objects. Ours: `put` of all objects into an empty server,
then `get` of every object whole. Baseline: the same bytes as 32 LFS-tracked files, `git lfs push`
into an empty server, then `git lfs fetch` in a fresh clone. Each step runs in its own process under
/usr/bin/time -v (wall time and peak RSS); requests and bytes are counted by the server.

    python benches/bench_lfsstore.py [--mib 1024] [--object-mib 32] [--runs 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import ENV, ensure_tools, median, sh, write_json

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from servers import LfsServer, lfs_server  # the tests' server, so that both measure one thing


def measured(cwd: Path, *args: str, env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MB, stdout) of a command run under /usr/bin/time -v."""
    os.sync()  # each step starts without the previous step's dirty pages to write back
    t0 = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-v", *args], cwd=cwd, env=env or ENV, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{r.stderr[-3000:]}")
    rss = next(int(line.split(":")[1]) for line in r.stderr.splitlines() if "Maximum resident set size" in line)
    return wall, rss / 1024, r.stdout


def server_counts(server: LfsServer) -> dict[str, int]:
    s = server.stats()
    return {
        "requests": sum(v["requests"] for v in s.values()),
        "uploads": s["upload"]["requests"],
        "downloads": s["download"]["requests"],
        "batch": s["batch-upload"]["requests"] + s["batch-download"]["requests"],
        "bytes_in": sum(v["bytes_in"] for v in s.values()),
        "bytes_out": sum(v["bytes_out"] for v in s.values()),
    }


def keyed(data_dir: str) -> list[tuple[str, Path, int]]:
    """The objects and their oids, computed before the measured steps as `git add` does for git-lfs."""
    listed = json.loads((Path(data_dir) / "keys.json").read_text())
    return [(k, Path(data_dir) / name, size) for name, k, size in listed]


def ours_put(url: str, data_dir: str) -> None:
    from theta_store.lfsstore import LfsStore

    with LfsStore(url, Path(data_dir)) as store:
        stats = store.put(keyed(data_dir))
        print(json.dumps({"requests": stats.requests, "bytes_sent": stats.bytes_sent}))


def ours_get(url: str, data_dir: str) -> None:
    from theta_store.lfsstore import LfsStore

    with LfsStore(url, Path(data_dir)) as store:
        received = 0
        objects = [(k, size) for k, _, size in keyed(data_dir)]
        store.prefetch(objects)  # one batch request for all, as git lfs fetch does
        for key, size in objects:
            (data,) = store.get(key, [(0, size)], size=size)
            received += len(data)
            del data
        stats = store.stats()
        print(json.dumps({"requests": stats.requests, "bytes_received": stats.bytes_received, "data": received}))


def make_data(d: Path, total_mib: int, object_mib: int) -> list[Path]:
    d.mkdir(parents=True)
    rng = np.random.default_rng(15)
    paths = []
    for i in range(total_mib // object_mib):
        p = d / f"pack{i:03d}.bin"
        p.write_bytes(rng.bytes(object_mib << 20))
        paths.append(p)
    listed = [(p.name, hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_size) for p in paths]
    (d / "keys.json").write_text(json.dumps(listed))
    return paths


def git_lfs_repo(root: Path, paths: list[Path]) -> tuple[Path, Path]:
    """A repository with the objects as LFS-tracked files, committed (clean filter run), and a bare remote."""
    bare, work = root / "remote.git", root / "work"
    sh(root, "git", "init", "-q", "--bare", "-b", "main", str(bare))
    sh(root, "git", "init", "-q", "-b", "main", str(work))
    sh(work, "git", "lfs", "track", "*.bin")
    for p in paths:
        os.link(p, work / p.name)
    sh(work, "git", "add", ".")
    sh(work, "git", "commit", "-q", "-m", "data")
    sh(work, "git", "remote", "add", "origin", str(bare))
    sh(work, "git", "push", "-q", "--no-verify", "origin", "main")  # the refs only: `git lfs push --all` is measured
    return bare, work


def one_run(root: Path, data: Path, paths: list[Path], bare: Path, work: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    me = str(Path(__file__).resolve())
    py = [sys.executable, me]
    with lfs_server(root / "srv-ours") as server:
        wall, rss, stdout = measured(root, *py, "put", server.url, str(data))
        out |= {"ours_put_s": wall, "ours_put_rss_mb": rss}
        counts = server_counts(server)
        out |= {"ours_put_requests": counts["requests"], "ours_put_bytes_in": counts["bytes_in"]}
        before = counts
        wall, rss, stdout = measured(root, *py, "get", server.url, str(data))
        assert json.loads(stdout)["data"] == sum(p.stat().st_size for p in paths)
        counts = server_counts(server)
        out |= {"ours_get_s": wall, "ours_get_rss_mb": rss, "ours_get_requests": counts["requests"] - before["requests"]}
    shutil.rmtree(root / "srv-ours")

    with lfs_server(root / "srv-lfs") as server:
        sh(work, "git", "config", "lfs.url", server.url)
        sh(work, "git", "config", f"lfs.{server.url}/.locksverify", "false")
        wall, rss, _ = measured(work, "git", "lfs", "push", "--all", "origin")
        counts = server_counts(server)
        out |= {"lfs_push_s": wall, "lfs_push_rss_mb": rss, "lfs_push_requests": counts["requests"]}
        out["lfs_push_bytes_in"] = counts["bytes_in"]
        before = counts
        clone = root / "clone"
        env = dict(ENV, GIT_LFS_SKIP_SMUDGE="1")
        subprocess.run(["git", "clone", "-q", str(bare), str(clone)], env=env, check=True, capture_output=True)
        sh(clone, "git", "config", "lfs.url", server.url)
        wall, rss, _ = measured(clone, "git", "lfs", "fetch", "origin", "main")
        counts = server_counts(server)
        out |= {"lfs_fetch_s": wall, "lfs_fetch_rss_mb": rss, "lfs_fetch_requests": counts["requests"] - before["requests"]}
        shutil.rmtree(clone)
    shutil.rmtree(root / "srv-lfs")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("step", nargs="*", help=argparse.SUPPRESS)  # put|get URL DIR: one measured step
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--object-mib", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    if args.step:
        {"put": ours_put, "get": ours_get}[args.step[0]](*args.step[1:])
        return
    ensure_tools()
    root = Path(tempfile.mkdtemp(prefix="bench-lfsstore-"))
    try:
        data = root / "data"
        paths = make_data(data, args.mib, args.object_mib)
        total = sum(p.stat().st_size for p in paths)
        bare, work = git_lfs_repo(root, paths)
        runs = []
        for i in range(args.runs):
            runs.append(one_run(root, data, paths, bare, work))
            print(f"run {i + 1}: " + ", ".join(f"{k}={v:.3g}" for k, v in runs[-1].items()), flush=True)
        med = {k: median([r[k] for r in runs]) for k in runs[0]}
    finally:
        shutil.rmtree(root, ignore_errors=True)

    mib = total / (1 << 20)
    print(f"\n{len(paths)} objects of {args.object_mib} MiB ({mib:.0f} MiB), dulwich LFS server on 127.0.0.1, median of {args.runs}")
    head = f"{'step':<8}{'ours s':>9}{'git-lfs s':>11}{'ratio':>8}{'ours MiB/s':>12}"
    print(head + f"{'ours RSS MB':>13}{'git-lfs RSS MB':>16}{'requests':>14}")
    for ours, theirs, label in (("ours_put", "lfs_push", "push"), ("ours_get", "lfs_fetch", "fetch")):
        o, t = med[f"{ours}_s"], med[f"{theirs}_s"]
        print(
            f"{label:<8}{o:>9.2f}{t:>11.2f}{o / t:>8.2f}{mib / o:>12.0f}{med[f'{ours}_rss_mb']:>13.0f}{med[f'{theirs}_rss_mb']:>16.0f}"
            f"{med[f'{ours}_requests']:>7.0f}/{med[f'{theirs}_requests']:.0f}"
        )
    print("ratio = ours / git-lfs wall time; requests = ours / git-lfs, counted by the server")
    write_json("bench_lfsstore", {"objects": len(paths), "object_mib": args.object_mib, "runs": runs, "median": med})


if __name__ == "__main__":
    main()
