"""Issue 2 benchmark: first add and restore of a checkpoint, theta-store beside Git LFS and plain
BLAKE3 hashing; stored bytes beside zstd-1 and the order-0 entropy bound; peak RSS on 2 GB.

    python benches/bench_add_restore.py            # ~400 MB model + MiniLM + 2 GB RSS, 3 runs each
    python benches/bench_add_restore.py --quick    # smaller inputs, 1 run (smoke test)
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import blake3

from common import (
    bert_like,
    dir_bytes,
    ensure_tools,
    fresh_repo,
    median,
    minilm_variants,
    peak_rss_mb,
    sh,
    tensor_bytes_and_entropy,
    timed,
    write_json,
    zstd1_bytes,
)
from theta_store import save_safetensors


def bench_model(model: Path, work: Path, runs: int) -> dict[str, object]:
    raw = model.stat().st_size
    t_theta, t_lfs, t_hash, r_theta, r_lfs = [], [], [], [], []
    stored_theta = stored_lfs = 0
    for _ in range(runs):
        # theta-store: add + commit
        tr = fresh_repo(work, "theta")
        empty = dir_bytes(tr / ".git/objects")
        shutil.copy(model, tr / "model.safetensors")
        t_theta.append(
            timed(lambda tr=tr: (sh(tr, "theta-store", "-q", "add", "model.safetensors"), sh(tr, "git", "commit", "-q", "-m", "v1")))
        )
        stored_theta = dir_bytes(tr / ".git/objects") - empty
        # Git LFS: add + commit
        lr = fresh_repo(work, "lfs")
        sh(lr, "git", "lfs", "track", "*.safetensors")
        sh(lr, "git", "add", ".gitattributes")
        sh(lr, "git", "commit", "-q", "-m", "attrs")
        empty_lfs = dir_bytes(lr / ".git")
        shutil.copy(model, lr / "model.safetensors")
        t_lfs.append(timed(lambda lr=lr: (sh(lr, "git", "add", "model.safetensors"), sh(lr, "git", "commit", "-q", "-m", "v1"))))
        stored_lfs = dir_bytes(lr / ".git") - empty_lfs
        # plain BLAKE3 of the file, all cores (the floor for any content-addressed add)
        t_hash.append(timed(lambda: blake3.blake3(max_threads=blake3.blake3.AUTO).update_mmap(str(model)).digest()))
        # restore vs LFS checkout
        (tr / "model.safetensors").unlink()
        r_theta.append(timed(lambda tr=tr: sh(tr, "theta-store", "-q", "restore", "model.safetensors")))
        assert (tr / "model.safetensors").stat().st_size == raw
        (lr / "model.safetensors").unlink()
        r_lfs.append(timed(lambda lr=lr: sh(lr, "git", "checkout", "--", "model.safetensors")))
    rss_add = peak_rss_mb(tr, "theta-store", "-q", "add", "model.safetensors")
    (tr / "model.safetensors").unlink()
    rss_restore = peak_rss_mb(tr, "theta-store", "-q", "restore", "model.safetensors")
    _, bound, header = tensor_bytes_and_entropy(model)
    return {
        "raw_bytes": raw,
        "add_commit_s": {"theta": median(t_theta), "git_lfs": median(t_lfs), "blake3": median(t_hash)},
        "restore_s": {"theta": median(r_theta), "git_lfs": median(r_lfs)},
        "stored_bytes": {"theta": stored_theta, "git_lfs": stored_lfs, "zstd1": zstd1_bytes(model), "entropy_bound": int(bound + header)},
        "peak_rss_mb": {"add": rss_add, "restore": rss_restore},
        "runs": runs,
        "each_run_s": {"add_theta": t_theta, "add_git_lfs": t_lfs, "restore_theta": r_theta, "restore_git_lfs": r_lfs},
    }


def bench_minilm(work: Path) -> dict[str, dict[str, float]]:
    out = {}
    for name, path in minilm_variants(work / "minilm").items():
        repo = fresh_repo(work, f"minilm-{name}")
        shutil.copy(path, repo / "model.safetensors")
        report = json.loads(sh(repo, "theta-store", "-q", "add", "--json", "model.safetensors"))[0]
        raw = path.stat().st_size
        _, bound, header = tensor_bytes_and_entropy(path)
        out[name] = {
            "raw": raw,
            "theta": report["new_bytes"] / raw,
            "zstd1": zstd1_bytes(path) / raw,
            "entropy_bound": (bound + header) / raw,
        }
    return out


def bench_rss_big(work: Path, gb: float) -> dict[str, float]:
    repo = fresh_repo(work, "big")
    big = repo / "model.safetensors"
    save_safetensors(str(big), bert_like(int(gb * 1e9 / 4), seed=2))
    size = big.stat().st_size
    add = peak_rss_mb(repo, "theta-store", "-q", "add", "model.safetensors")
    big.unlink()
    restore = peak_rss_mb(repo, "theta-store", "-q", "restore", "model.safetensors")
    assert big.stat().st_size == size
    big.unlink()
    return {"bytes": size, "add_rss_mb": add, "restore_rss_mb": restore}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--params", type=float, default=100e6)
    ap.add_argument("--big-gb", type=float, default=2.0)
    ap.add_argument("--quick", action="store_true", help="20M params, 1 run, 0.25 GB RSS check")
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    if args.quick:
        args.runs, args.params, args.big_gb = 1, 20e6, 0.25
    ensure_tools()
    work = args.work or Path(tempfile.mkdtemp(prefix="theta-bench-"))
    model = work / "model.safetensors"
    save_safetensors(str(model), bert_like(int(args.params)))
    res = {"model": bench_model(model, work, args.runs), "minilm": bench_minilm(work), "big": bench_rss_big(work, args.big_gb)}
    write_json("add_restore", res)
    m = res["model"]
    mb = m["raw_bytes"] / 1e6
    a, r, s = m["add_commit_s"], m["restore_s"], m["stored_bytes"]
    print(f"\n== first add + commit of a {mb:.0f} MB fp32 safetensors model (median of {m['runs']})")
    print(
        f"theta-store {a['theta']:.2f} s | Git LFS {a['git_lfs']:.2f} s | plain BLAKE3 {a['blake3']:.2f} s"
        f" | theta vs LFS: {a['git_lfs'] / a['theta']:.2f}x faster, theta / BLAKE3: {a['theta'] / a['blake3']:.1f}x"
    )
    each = m["each_run_s"]
    print(
        "  each run, in order: "
        + ", ".join(f"{t:.2f}/{u:.2f}" for t, u in zip(each["add_theta"], each["add_git_lfs"], strict=True))
        + " (theta/LFS)"
    )
    print(f"restore: theta-store {r['theta']:.2f} s | Git LFS checkout {r['git_lfs']:.2f} s | {r['git_lfs'] / r['theta']:.2f}x faster")
    print(
        f"stored/raw: theta-store {s['theta'] / m['raw_bytes']:.3f} | Git LFS {s['git_lfs'] / m['raw_bytes']:.3f}"
        f" | zstd-1 {s['zstd1'] / m['raw_bytes']:.3f} | entropy bound {s['entropy_bound'] / m['raw_bytes']:.3f}"
    )
    print(f"peak RSS ({mb:.0f} MB): add {m['peak_rss_mb']['add']:.0f} MB, restore {m['peak_rss_mb']['restore']:.0f} MB")
    b = res["big"]
    print(f"peak RSS ({b['bytes'] / 1e9:.1f} GB): add {b['add_rss_mb']:.0f} MB, restore {b['restore_rss_mb']:.0f} MB")
    print("\n== MiniLM (real all-MiniLM-L6-v2 weights) stored/raw")
    print(f"{'dtype':6} {'theta-store':>12} {'zstd-1':>8} {'entropy bound':>14}")
    for name, v in res["minilm"].items():
        print(f"{name:6} {v['theta']:12.4f} {v['zstd1']:8.4f} {v['entropy_bound']:14.4f}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
