"""Ref scheme cost: one ref per version (refs/theta/<manifest id>) with 1,000 versions, beside the
same repository without them, over file:// and git daemon. Prints ref advertisement bytes and
times of ls-remote, a push of one branch commit and a protocol-v2 fetch of one version.

    python benches/bench_refs.py [--versions 1000] [--runs 5]
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from common import ENV, median, sh, write_json


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_remote(root: Path, name: str, versions: int) -> Path:
    bare = root / f"{name}.git"
    sh(root, "git", "init", "-q", "--bare", "-b", "main", str(bare))
    work = root / f"{name}-work"
    sh(root, "git", "init", "-q", "-b", "main", str(work))
    (work / "f").write_text("x\n")
    sh(work, "git", "add", "f")
    sh(work, "git", "commit", "-q", "-m", "base")
    sh(work, "git", "push", "-q", str(bare), "main")
    if versions:
        # One small distinct commit per version, like theta-store's version commits.
        lines = []
        for i in range(versions):
            blob = sh(work, "git", "hash-object", "-w", "--stdin", input=f"{i}\n".encode()).strip()
            tree = sh(work, "git", "mktree", input=f"100644 blob {blob}\tmanifest\n".encode()).strip()
            commit = sh(work, "git", "commit-tree", tree, "-m", f"v{i}").strip()
            lines.append(f"update refs/theta/{i:064x} {commit}\n")
        sh(work, "git", "update-ref", "--stdin", input="".join(lines).encode())
        sh(work, "git", "push", "-q", str(bare), "refs/theta/*:refs/theta/*")
    return bare


def timed_run(cwd: Path, *args: str) -> tuple[float, int]:
    t = time.perf_counter()
    r = subprocess.run(list(args), cwd=cwd, env=ENV, capture_output=True, check=True)
    return time.perf_counter() - t, len(r.stdout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--versions", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="theta-refs-"))
    res: dict[str, dict[str, float]] = {}
    port = free_port()
    daemon = subprocess.Popen(
        [
            "git",
            "daemon",
            f"--port={port}",
            "--listen=127.0.0.1",
            "--export-all",
            "--enable=receive-pack",
            "--reuseaddr",
            f"--base-path={root}",
            str(root),
        ],
        env=ENV,
        stderr=subprocess.DEVNULL,
    )
    try:
        for label, n in (("without", 0), ("with", args.versions)):
            bare = make_remote(root, label, n)
            client = root / f"{label}-client"
            sh(root, "git", "clone", "-q", str(bare), str(client))
            for transport, url in (("file", f"file://{bare}"), ("daemon", f"git://127.0.0.1:{port}/{bare.name}")):
                time.sleep(0.2)
                ls, adv, push, fetch = [], 0, [], []
                for i in range(args.runs):
                    t, adv = timed_run(client, "git", "-c", "protocol.version=0", "ls-remote", url)
                    ls.append(t)
                    (client / "f").write_text(f"{transport} {i}\n")
                    sh(client, "git", "commit", "-q", "-am", f"c{i}")
                    push.append(timed_run(client, "git", "push", "-q", url, "HEAD:main")[0])
                    if n:
                        ref = f"refs/theta/{i:064x}"
                        fetch.append(timed_run(client, "git", "fetch", "-q", url, f"{ref}:{ref}")[0])
                res[f"{label}/{transport}"] = {
                    "advertised_bytes": adv,
                    "ls_remote_s": median(ls),
                    "push_s": median(push),
                    "fetch_one_version_s": median(fetch) if fetch else 0.0,
                }
    finally:
        daemon.terminate()
        daemon.wait()
    write_json("refs", res)
    print(f"== ref scheme: one ref per version, {args.versions} versions vs none (median of {args.runs})")
    print(f"{'remote':18} {'advertised':>11} {'ls-remote':>10} {'push 1 commit':>14} {'fetch 1 version (v2)':>21}")
    for k, v in res.items():
        print(
            f"{k:18} {v['advertised_bytes'] / 1e3:9.1f}KB {v['ls_remote_s'] * 1e3:8.1f}ms {v['push_s'] * 1e3:12.1f}ms "
            f"{v['fetch_one_version_s'] * 1e3:19.1f}ms"
        )
    for t in ("file", "daemon"):
        w, wo = res[f"with/{t}"], res[f"without/{t}"]
        print(f"{t}: push with {args.versions} version refs costs {w['push_s'] / wo['push_s']:.2f}x the push without them")


if __name__ == "__main__":
    main()
