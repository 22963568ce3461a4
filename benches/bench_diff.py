"""Issue 14 benchmark: `theta-store diff` of two versions of the ~400 MB model where one tensor
changed, beside `git diff` of the same two commits under Git LFS (which prints only the pointer
change: an oid and a size). Goal: theta-store diff < 0.5 s, peak memory about two tensors.

Also timed, for reference: `git diff` through theta-store's textconv, uncached (git smudges
both versions into temporary files before it calls textconv) and cached (git keeps the
textconv output per pointer blob: cachetextconv, set by theta-store install).

Memory: a third version where every tensor changed (each + N(0, (1e-3)^2)); its diff reads every
tensor of both versions, one pair at a time. Its peak RSS is printed beside the largest tensor's
size and beside the peak of the one-tensor diff (the constant: interpreter, libraries, manifests).
With --big-gb G, the same for a synthetic fp32 model of about G GB whose largest tensors are
512 MiB (two of them, one of 256 MiB, the rest 64 MiB), added with theta-store and diffed once:
peak minus the constant, in units of the largest tensor, is what a 7B model's diff costs per
its largest tensor (Llama-7B: the 32000x4096 bf16 embedding, 262 MB).

    python benches/bench_diff.py [--params 100e6] [--runs 5] [--tensor NAME] [--big-gb 2]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np

import theta_store
from common import bert_like, ensure_tools, median, peak_rss_mb, sh, timed, write_json

MIB = 1 << 20


def repo_with_versions(root: Path, tool: str, *versions: Path) -> Path:
    work = root / f"{tool}-work"
    sh(root, "git", "init", "-q", "-b", "main", str(work))
    if tool == "theta":
        sh(work, "theta-store", "install")
        sh(work, "theta-store", "track", "*.safetensors")
    else:
        sh(work, "git", "lfs", "track", "*.safetensors")
    for i, v in enumerate(versions, 1):
        shutil.copy(v, work / "model.safetensors")
        sh(work, "git", "add", ".gitattributes", "model.safetensors")
        sh(work, "git", "commit", "-q", "-m", f"v{i}")
    return work


def fine_tuned(m: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """Every tensor + N(0, (1e-3)^2): a full fine-tune step."""
    rng = np.random.default_rng(seed)
    return {k: w + rng.standard_normal(w.shape, dtype=np.float32) * np.float32(1e-3) for k, w in m.items()}


def big_model(gb: float) -> dict[str, np.ndarray]:
    """About `gb` GB of fp32: two 512 MiB tensors, one of 256 MiB, then 64 MiB ones."""
    rng = np.random.default_rng(5)
    shapes = {"embed.weight": (32768, 4096), "lm_head.weight": (32768, 4096), "proj.weight": (16384, 4096)}
    total = sum(r * c * 4 for r, c in shapes.values())
    i = 0
    while total + 64 * MIB <= gb * 1e9:
        shapes[f"layers.{i}.mlp.weight"] = (4096, 4096)
        total += 64 * MIB
        i += 1
    return {k: rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02) for k, shape in shapes.items()}


def big_diff(root: Path, gb: float) -> dict[str, float]:
    """Add two versions of big_model (every tensor changed) and diff them once: time, peak RSS."""
    m = big_model(gb)
    largest = max(w.nbytes for w in m.values())
    paths = [root / "big-v1.safetensors", root / "big-v2.safetensors"]
    theta_store.save_safetensors(str(paths[0]), m)
    theta_store.save_safetensors(str(paths[1]), fine_tuned(m, 7))
    del m
    work = repo_with_versions(root, "theta", *paths)
    size = paths[0].stat().st_size
    for p in paths:
        p.unlink()
    r = {"big_model_mb": size / 1e6, "big_largest_tensor_mb": largest / 1e6}
    r["big_diff_s"] = timed(lambda: sh(work, "theta-store", "diff", "HEAD~1", "HEAD", "--no-strip"))
    r["big_diff_peak_mb"] = peak_rss_mb(work, "theta-store", "diff", "HEAD~1", "HEAD", "--no-strip")
    shutil.rmtree(work)
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=float, default=100e6)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tensor", default="encoder.layer.5.attention.self.query.weight", help="the one tensor v2 changes")
    ap.add_argument("--big-gb", type=float, default=0, help="also diff a synthetic model of this many GB (0: not)")
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
        v3 = root / "v3.safetensors"
        theta_store.save_safetensors(str(v3), fine_tuned(m, 2))
        largest, count = max(w.nbytes for w in m.values()), len(m)
        del m
        size = v1.stat().st_size
        theta = repo_with_versions(root, "theta", v1, v2, v3)
        lfs = repo_with_versions(root, "lfs", v1, v2)

        one = ("diff", "HEAD~2", "HEAD~1", "--no-strip")  # v1 -> v2: one tensor
        every = ("diff", "HEAD~1", "HEAD", "--no-strip")  # v2 -> v3: every tensor
        out = sh(theta, "theta-store", *one)
        assert a.tensor in out and out.startswith("model.safetensors: 1 of "), out
        r: dict[str, float] = {"model_mb": size / 1e6, "largest_tensor_mb": largest / 1e6}
        r["theta_diff_s"] = median([timed(lambda: sh(theta, "theta-store", *one)) for _ in range(a.runs)])
        r["theta_diff_json_s"] = median([timed(lambda: sh(theta, "theta-store", *one[:3], "--json")) for _ in range(a.runs)])
        r["theta_diff_peak_mb"] = peak_rss_mb(theta, "theta-store", *one)
        r["theta_log_s"] = median([timed(lambda: sh(theta, "theta-store", "log")) for _ in range(a.runs)])
        r["lfs_git_diff_s"] = median([timed(lambda: sh(lfs, "git", "diff", "HEAD~1", "HEAD")) for _ in range(a.runs)])
        lfs_out = sh(lfs, "git", "diff", "HEAD~1", "HEAD")
        r["theta_git_diff_uncached_s"] = timed(lambda: sh(theta, "git", "diff", "HEAD~2", "HEAD~1"))
        r["theta_git_diff_cached_s"] = median([timed(lambda: sh(theta, "git", "diff", "HEAD~2", "HEAD~1")) for _ in range(a.runs)])
        git_out = sh(theta, "git", "diff", "HEAD~2", "HEAD~1")
        assert a.tensor in git_out, git_out
        all_out = sh(theta, "theta-store", *every)
        assert all_out.startswith(f"model.safetensors: {count} of {count} tensors changed"), all_out[:200]
        r["all_diff_s"] = median([timed(lambda: sh(theta, "theta-store", *every)) for _ in range(a.runs)])
        r["all_diff_peak_mb"] = median([peak_rss_mb(theta, "theta-store", *every) for _ in range(a.runs)])
        if a.big_gb:
            r.update(big_diff(root, a.big_gb))

        print(f"model {size / 1e6:.0f} MB, one tensor changed ({a.tensor}), medians of {a.runs}:")
        peak = r["theta_diff_peak_mb"]
        print(f"  theta-store diff            {r['theta_diff_s']:.3f} s  (--json {r['theta_diff_json_s']:.3f} s), peak {peak:.0f} MB")
        print(f"  theta-store log             {r['theta_log_s']:.3f} s")
        print(f"  git diff, Git LFS           {r['lfs_git_diff_s']:.3f} s, says only:")
        print("\n".join("      " + ln for ln in lfs_out.splitlines() if ln[:1] in "+-" and ln[:3] not in ("+++", "---")))
        print(f"  git diff, theta textconv    {r['theta_git_diff_uncached_s']:.3f} s uncached, {r['theta_git_diff_cached_s']:.3f} s cached")
        print("  theta-store diff says:")
        print("\n".join("      " + ln for ln in out.splitlines()))
        k = (r["all_diff_peak_mb"] - peak) / r["largest_tensor_mb"]
        print(f"every tensor changed: {all_out.splitlines()[0]}")
        print(f"  theta-store diff            {r['all_diff_s']:.3f} s, peak {r['all_diff_peak_mb']:.0f} MB")
        print(f"  = the one-tensor diff's peak ({peak:.0f} MB) + {k:.2f} x the largest tensor ({r['largest_tensor_mb']:.1f} MB)")
        if a.big_gb:
            kb = (r["big_diff_peak_mb"] - peak) / r["big_largest_tensor_mb"]
            print(f"synthetic {r['big_model_mb']:.0f} MB model, every tensor changed, largest tensor {r['big_largest_tensor_mb']:.0f} MB:")
            print(f"  theta-store diff            {r['big_diff_s']:.1f} s, peak {r['big_diff_peak_mb']:.0f} MB")
            print(f"  = {peak:.0f} MB + {kb:.2f} x the largest tensor; a Llama-7B (largest 262 MB): {peak + kb * 262:.0f} MB")
        write_json("bench_diff", r)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
