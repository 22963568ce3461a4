"""Issue 16 part 6 benchmark: an .npz of np.savez_compressed, stored as tensors (expanded file,
deflated back by the pinned zlib) versus stored as before (members opaque) and Git LFS.

A BERT-like fp32 model (randn * 0.02) is written with np.savez_compressed (v1), then again with
one matrix updated as a fine-tuning step would (v2: w += w * 1e-3 * randn). For each tool, in the
same run: `git add` + `git commit` of v1 and of v2 (seconds, CPU seconds, peak RSS, bytes the
repository grew by), and `git checkout` of v1 over v2 (seconds, CPU seconds, peak RSS, bytes
checked). Tools: theta-store of this tree, theta-store of `--baseline-python` (a checkout from
before this change: the deflated members kept opaque), Git LFS. Also zstd-1 of each version, the
cost of a full compressed copy.

    python benches/bench_npz_deflated.py --baseline-python /work/main/python   # ~200 MB
    python benches/bench_npz_deflated.py --params 100e6 --baseline-python ...  # ~400 MB
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from common import ENV, bert_like, ensure_tools, fresh_repo, median, write_json, zstd1_bytes

CHANGED = "encoder.layer.0.intermediate.dense.weight"


def run(cwd: Path, env: dict[str, str], *args: str) -> tuple[float, float, float]:
    """(seconds, peak RSS in MB, CPU seconds: user + system of it and its children) of one
    command, under /usr/bin/time -v. CPU seconds compare better than seconds on a busy machine."""
    os.sync()
    t0 = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-v", *args], cwd=cwd, env=env, capture_output=True, text=True, check=False)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed in {cwd}: {r.stderr[-2000:]}")
    lines = r.stderr.splitlines()
    rss = next(int(line.split(":")[1]) / 1024 for line in lines if "Maximum resident set size" in line)
    cpu = sum(float(line.split(":")[1]) for line in lines if "User time (seconds)" in line or "System time (seconds)" in line)
    return dt, rss, cpu


def stored(repo: Path) -> int:
    """Bytes of the repository's object stores (git objects, theta-store state, LFS objects)."""
    git = repo / ".git"
    return sum(p.stat().st_size for d in ("objects", "lfs", "theta-store") for p in (git / d).rglob("*") if p.is_file())


def sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            h.update(block)
    return h.hexdigest()


def one_tool(root: Path, name: str, env: dict[str, str], files: list[Path]) -> dict[str, Any]:
    repo = fresh_repo(root, name)
    if name == "lfs":
        subprocess.run(["git", "lfs", "track", "*.npz"], cwd=repo, env=env, check=True, capture_output=True)
    else:
        for args in (["install"], ["track", "*.npz"]):
            subprocess.run([sys.executable, "-m", "theta_store", *args], cwd=repo, env=env, check=True, capture_output=True)
    subprocess.run(["git", "add", ".gitattributes"], cwd=repo, env=env, check=True)
    subprocess.run(["git", "commit", "-qm", "attributes"], cwd=repo, env=env, check=True)
    out: dict[str, Any] = {}
    target = repo / "model.npz"
    for i, f in enumerate(files, 1):
        shutil.copyfile(f, target)
        before = stored(repo)
        t_add, rss_add, cpu_add = run(repo, env, "git", "add", "model.npz")
        t_commit, _, cpu_commit = run(repo, env, "git", "commit", "-qm", f"v{i}")
        out[f"v{i}"] = {
            "add_commit_s": t_add + t_commit,
            "add_commit_cpu_s": cpu_add + cpu_commit,
            "add_rss_mb": rss_add,
            "grew_bytes": stored(repo) - before,
        }
    target.unlink()
    t_co, rss_co, cpu_co = run(repo, env, "git", "checkout", "HEAD~1", "--", "model.npz")
    assert sha(target) == sha(files[0]), f"{name}: checkout is not byte-exact"
    out["checkout_v1"] = {"s": t_co, "cpu_s": cpu_co, "rss_mb": rss_co}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=50e6)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--baseline-python", type=Path, help="python/ of a theta-store checkout from before this change")
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one)")
    args = ap.parse_args()
    ensure_tools()
    root = Path(args.dir or tempfile.mkdtemp(prefix="bench-npz-"))
    root.mkdir(parents=True, exist_ok=True)
    w = bert_like(int(args.params))
    v1, v2 = root / "v1.npz", root / "v2.npz"
    t0 = time.perf_counter()
    np.savez_compressed(v1, **w)
    t_save = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    a = w[CHANGED]
    w[CHANGED] = (a + a * np.float32(1e-3) * rng.standard_normal(a.shape, dtype=np.float32)).astype(np.float32)
    np.savez_compressed(v2, **w)
    raw = sum(x.nbytes for x in w.values())
    print(f"model: {len(w)} arrays, {raw / 1e6:.0f} MB raw; savez_compressed {v1.stat().st_size / 1e6:.0f} MB in {t_save:.1f} s")
    print(f"v2 changes {CHANGED} ({w[CHANGED].nbytes / 1e6:.1f} MB raw)")

    here = str(Path(__file__).resolve().parent.parent / "python")
    tools: dict[str, dict[str, str]] = {"theta": dict(ENV, PYTHONPATH=here), "lfs": dict(ENV)}
    if args.baseline_python is not None:
        tools["before"] = dict(ENV, PYTHONPATH=str(args.baseline_python.resolve()))
    runs: dict[str, list[dict[str, Any]]] = {t: [] for t in tools}
    for _ in range(args.runs):
        for name, env in tools.items():
            runs[name].append(one_tool(root, name, env, [v1, v2]))
    zstd = [zstd1_bytes(v1), zstd1_bytes(v2)]

    def med(tool: str, *keys: str) -> float:
        vals = []
        for r in runs[tool]:
            v: Any = r
            for k in keys:
                v = v[k]
            vals.append(float(v))
        return median(vals)

    lfs = "lfs"
    print(f"\n{'step':34} " + " ".join(f"{t:>12}" for t in tools) + "   theta/lfs" + ("  theta/before" if "before" in tools else ""))
    rows = [
        ("v1 add+commit (s)", ("v1", "add_commit_s")),
        ("v1 add+commit (CPU s)", ("v1", "add_commit_cpu_s")),
        ("v1 add peak RSS (MB)", ("v1", "add_rss_mb")),
        ("v1 stored (MB)", ("v1", "grew_bytes")),
        ("v2 add+commit (s)", ("v2", "add_commit_s")),
        ("v2 add+commit (CPU s)", ("v2", "add_commit_cpu_s")),
        ("v2 add peak RSS (MB)", ("v2", "add_rss_mb")),
        ("v2 stored (MB)", ("v2", "grew_bytes")),
        ("checkout v1 (s)", ("checkout_v1", "s")),
        ("checkout v1 (CPU s)", ("checkout_v1", "cpu_s")),
        ("checkout peak RSS (MB)", ("checkout_v1", "rss_mb")),
    ]
    summary: dict[str, Any] = {"params": args.params, "file_bytes": v1.stat().st_size, "zstd1": zstd, "runs": runs}
    for label, keys in rows:
        scale = 1e6 if "stored" in label else 1.0
        vals = {t: med(t, *keys) / scale for t in tools}
        line = f"{label:34} " + " ".join(f"{vals[t]:12.2f}" for t in tools) + f"   {vals['theta'] / vals[lfs]:9.3f}"
        if "before" in tools:
            line += f"  {vals['theta'] / vals['before']:12.3f}"
        print(line)
    print(f"{'zstd-1 full copy (MB)':34} v1 {zstd[0] / 1e6:.2f}, v2 {zstd[1] / 1e6:.2f}")
    write_json("npz_deflated", summary)
    if args.dir is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
