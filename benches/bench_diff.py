"""Issue 14 benchmark: `theta-store diff` of two versions of the ~400 MB model where one tensor
changed, beside `git diff` of the same two commits under Git LFS (which prints only the pointer
change: an oid and a size). Goal: theta-store diff < 0.5 s, peak memory about two tensors.

Also timed, for reference: `git diff` through theta-store's textconv, uncached (git smudges
both versions into temporary files before it calls textconv) and cached (git keeps the
textconv output per pointer blob: cachetextconv, set by theta-store install).

    python benches/bench_diff.py [--params 100e6] [--runs 5] [--tensor NAME]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np

import theta_store
from common import bert_like, ensure_tools, median, peak_rss_mb, sh, timed, write_json


def repo_with_two_versions(root: Path, tool: str, v1: Path, v2: Path) -> Path:
    work = root / f"{tool}-work"
    sh(root, "git", "init", "-q", "-b", "main", str(work))
    if tool == "theta":
        sh(work, "theta-store", "install")
        sh(work, "theta-store", "track", "*.safetensors")
    else:
        sh(work, "git", "lfs", "track", "*.safetensors")
    for i, v in enumerate((v1, v2), 1):
        shutil.copy(v, work / "model.safetensors")
        sh(work, "git", "add", ".gitattributes", "model.safetensors")
        sh(work, "git", "commit", "-q", "-m", f"v{i}")
    return work


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=float, default=100e6)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tensor", default="encoder.layer.5.attention.self.query.weight", help="the one tensor v2 changes")
    a = ap.parse_args()
    ensure_tools()
    root = Path(tempfile.mkdtemp(prefix="bench-diff-"))
    try:
        m = bert_like(int(a.params))
        v1 = root / "v1.safetensors"
        theta_store.save_safetensors(str(v1), m)
        rng = np.random.default_rng(1)
        m[a.tensor] = m[a.tensor] + (rng.standard_normal(m[a.tensor].shape) * 1e-3).astype(np.float32)  # a fine-tuned matrix
        v2 = root / "v2.safetensors"
        theta_store.save_safetensors(str(v2), m)
        size = v1.stat().st_size
        theta = repo_with_two_versions(root, "theta", v1, v2)
        lfs = repo_with_two_versions(root, "lfs", v1, v2)

        out = sh(theta, "theta-store", "diff", "HEAD~1", "HEAD", "--no-strip")
        assert a.tensor in out and out.startswith("model.safetensors: 1 of "), out
        r: dict[str, float] = {"model_mb": size / 1e6}
        r["theta_diff_s"] = median([timed(lambda: sh(theta, "theta-store", "diff", "HEAD~1", "HEAD", "--no-strip")) for _ in range(a.runs)])
        r["theta_diff_json_s"] = median(
            [timed(lambda: sh(theta, "theta-store", "diff", "HEAD~1", "HEAD", "--json")) for _ in range(a.runs)]
        )
        r["theta_diff_peak_mb"] = peak_rss_mb(theta, "theta-store", "diff", "HEAD~1", "HEAD", "--no-strip")
        r["theta_log_s"] = median([timed(lambda: sh(theta, "theta-store", "log")) for _ in range(a.runs)])
        r["lfs_git_diff_s"] = median([timed(lambda: sh(lfs, "git", "diff", "HEAD~1", "HEAD")) for _ in range(a.runs)])
        lfs_out = sh(lfs, "git", "diff", "HEAD~1", "HEAD")
        r["theta_git_diff_uncached_s"] = timed(lambda: sh(theta, "git", "diff", "HEAD~1", "HEAD"))
        r["theta_git_diff_cached_s"] = median([timed(lambda: sh(theta, "git", "diff", "HEAD~1", "HEAD")) for _ in range(a.runs)])
        git_out = sh(theta, "git", "diff", "HEAD~1", "HEAD")
        assert a.tensor in git_out, git_out
        print(f"model {size / 1e6:.0f} MB, one tensor changed ({a.tensor}), medians of {a.runs}:")
        peak = r["theta_diff_peak_mb"]
        print(f"  theta-store diff            {r['theta_diff_s']:.3f} s  (--json {r['theta_diff_json_s']:.3f} s), peak {peak:.0f} MB")
        print(f"  theta-store log             {r['theta_log_s']:.3f} s")
        print(f"  git diff, Git LFS           {r['lfs_git_diff_s']:.3f} s, says only:")
        print("\n".join("      " + ln for ln in lfs_out.splitlines() if ln[:1] in "+-" and ln[:3] not in ("+++", "---")))
        print(f"  git diff, theta textconv    {r['theta_git_diff_uncached_s']:.3f} s uncached, {r['theta_git_diff_cached_s']:.3f} s cached")
        print("  theta-store diff says:")
        print("\n".join("      " + ln for ln in out.splitlines()))
        write_json("bench_diff", r)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
