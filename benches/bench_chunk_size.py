"""Chunk size: add / restore time, stored ratio and the cost of small changes for 1, 2 and 4 MiB
tensor chunks on the same ~400 MB model, beside plain BLAKE3 hashing of the file (the floor).

    python benches/bench_chunk_size.py [--params 100e6] [--runs 3]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import blake3
import numpy as np

import theta_store
from common import bert_like, fresh_repo, median, sh, timed, write_json


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=float, default=100e6)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="theta-chunks-"))
    model = bert_like(int(args.params))
    src = work / "v1.safetensors"
    theta_store.save_safetensors(str(src), model)
    bias = dict(model)
    bias["encoder.layer.3.output.dense.bias"] = bias["encoder.layer.3.output.dense.bias"] + np.float32(1e-3)
    sparse = dict(model)
    rng = np.random.default_rng(5)
    changed = [f"encoder.layer.{n}" for n in ("1.intermediate.dense.weight", "5.output.dense.weight", "9.attention.self.query.weight")]
    for name in changed:
        w = sparse[name].copy()
        w.flat[rng.choice(w.size, w.size // 100, replace=False)] += np.float32(1e-3)
        sparse[name] = w
    variants = {"one bias": work / "bias.safetensors", "1% of 3 matrices": work / "sparse.safetensors"}
    theta_store.save_safetensors(str(variants["one bias"]), bias)
    theta_store.save_safetensors(str(variants["1% of 3 matrices"]), sparse)
    raw = src.stat().st_size
    hash_s = median([timed(lambda: blake3.blake3(max_threads=blake3.blake3.AUTO).update_mmap(str(src)).digest()) for _ in range(args.runs)])
    res = {}
    for mib in (1, 2, 4):
        adds, restores = [], []
        for _ in range(args.runs):
            repo = fresh_repo(work, f"r{mib}")
            shutil.copy(src, repo / "model.safetensors")
            with theta_store.Repo(repo) as r:
                t = time.perf_counter()
                first = r.add([str(repo / "model.safetensors")], chunk_bytes=mib << 20, progress=False)[0]
                adds.append(time.perf_counter() - t)
                sh(repo, "git", "commit", "-q", "-m", "v1")
                (repo / "model.safetensors").unlink()
                restores.append(timed(lambda r=r, repo=repo: r.restore([str(repo / "model.safetensors")], progress=False)))
                changes = {}
                for label, path in variants.items():
                    shutil.copy(path, repo / "model.safetensors")
                    changes[label] = r.add([str(repo / "model.safetensors")], chunk_bytes=mib << 20, progress=False)[0].new_bytes
        res[f"{mib} MiB"] = {
            "add_s": median(adds),
            "restore_s": median(restores),
            "stored_ratio": first.new_bytes / raw,
            "chunks": first.new_chunks,
            **{f"new_bytes[{k}]": v for k, v in changes.items()},
        }
    write_json("chunk_size", {"raw_bytes": raw, "blake3_s": hash_s, "sizes": res})
    print(f"== chunk size on a {raw / 1e6:.0f} MB fp32 model (median of {args.runs}); plain BLAKE3 of the file: {hash_s:.3f} s")
    print(f"{'chunk':7} {'chunks':>7} {'add s':>7} {'add/BLAKE3':>10} {'restore s':>9} {'stored':>7}", end=" ")
    print(f"{'one bias MB':>12} {'1% of 3 MB':>11}")
    for k, v in res.items():
        print(
            f"{k:7} {v['chunks']:7} {v['add_s']:7.3f} {v['add_s'] / hash_s:10.1f} {v['restore_s']:9.3f} {v['stored_ratio']:7.3f} "
            f"{v['new_bytes[one bias]'] / 1e6:12.3f} {v['new_bytes[1% of 3 matrices]'] / 1e6:11.2f}"
        )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
