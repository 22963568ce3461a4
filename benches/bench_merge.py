"""Issue 14 benchmark: a three-way merge of two branches of the ~400 MB model that each changed every
tensor, blended by task-arithmetic, beside the floor any tool pays: a plain numpy script that loads
the three safetensors files whole and computes the same formula. Goal: memory about three copies of
the largest tensor (the base's, ours', theirs') plus a constant.

Model: the seeded BERT-like fp32 state dict (common.bert_like). Ours and theirs are the base with
every tensor + N(0, (1e-3)^2), each with its own seed. Timed, each under /usr/bin/time -v (peak
RSS: of the process and every child it waited for), medians of --runs:

- `theta-store merge main:model.safetensors other -o out.safetensors --strategy task-arithmetic`
- `theta-store merge-driver BASE OURS THEIRS model.safetensors` on the three pointers, as git runs
  it: the merged file is written, stored as a version (deltas against ours), its pointer returned.
- `git merge other` with THETA_STORE_MERGE=task-arithmetic: git runs that driver, then checks the
  merged file out. Reset to ours after each run (not timed).
- `git checkout other -- model.safetensors`, for what git itself holds when it checks a 400 MB
  file out through a filter (all of it).

Each run of the driver and of git merge uses its own lambda (1 - k/1000), so that every one stores
a new version, as a real merge does (a version already stored costs less to store again).
- numpy: `safetensors.numpy.load_file` of base, ours and theirs, then per tensor
  base + 1.0 * ((ours - base) + (theirs - base)) in float64, cast to float32, `save_file`.

Both theta-store results are checked tensor by tensor against numpy's (byte-exact), and the git
merge's file against the command's (byte-exact).

    python benches/bench_merge.py [--params 100e6] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import theta_store
from common import ENV, bert_like, ensure_tools, median, sh, write_json

STRATEGY = "task-arithmetic"


def timed_rss(cwd: Path, *args: str, env: dict[str, str] | None = None) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of a command under /usr/bin/time -v, after a sync."""
    os.sync()
    t0 = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-v", *args], cwd=cwd, env=env or ENV, capture_output=True, text=True, check=False)
    took = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed in {cwd}: {r.stderr}")
    rss = next(int(ln.split(":")[1]) for ln in r.stderr.splitlines() if "Maximum resident set size" in ln)
    return took, rss / 1024


def numpy_merge(base: str, ours: str, theirs: str, out: str) -> None:
    """The baseline, run as its own process: three files loaded whole, the formula, one file written."""
    from safetensors.numpy import load_file, save_file

    b, o, t = load_file(base), load_file(ours), load_file(theirs)
    merged = {}
    for name, w in b.items():
        w64 = w.astype(np.float64)
        merged[name] = (w64 + 1.0 * ((o[name].astype(np.float64) - w64) + (t[name].astype(np.float64) - w64))).astype(w.dtype)
    save_file(merged, out)


def same_tensors(a: Path, b: Path) -> bool:
    from safetensors import safe_open

    with safe_open(str(a), "np") as fa, safe_open(str(b), "np") as fb:
        if sorted(fa.keys()) != sorted(fb.keys()):
            return False
        return all(fa.get_tensor(k).tobytes() == fb.get_tensor(k).tobytes() for k in fa.keys())  # noqa: SIM118


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=float, default=100e6)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    ensure_tools()
    root = Path(tempfile.mkdtemp(prefix="bench-merge-"))
    try:
        m = bert_like(int(a.params))
        largest = max(w.nbytes for w in m.values())
        files = {}
        for side, seed in (("base", None), ("ours", 11), ("theirs", 12)):
            rng = np.random.default_rng(seed)
            t = m if seed is None else {k: w + (rng.standard_normal(w.shape, dtype=np.float32) * np.float32(1e-3)) for k, w in m.items()}
            files[side] = root / f"{side}.safetensors"
            theta_store.save_safetensors(str(files[side]), t)
        del m, t
        work = root / "work"
        sh(root, "git", "init", "-q", "-b", "main", str(work))
        sh(work, "theta-store", "install")
        sh(work, "theta-store", "track", "*.safetensors")
        for side, switch in (("base", []), ("theirs", ["-c", "other"]), ("ours", ["main"])):
            if switch:
                sh(work, "git", "switch", "-q", *switch)
            shutil.copy(files[side], work / "model.safetensors")
            sh(work, "git", "add", ".gitattributes", "model.safetensors")
            sh(work, "git", "commit", "-q", "-m", side)
        sh(work, "git", "switch", "-q", "main")
        ours_head = sh(work, "git", "rev-parse", "HEAD").strip()

        ptr = {}
        for side, rev in (("base", "main~1"), ("ours", "main"), ("theirs", "other")):
            ptr[side] = root / f"{side}.pointer"
            ptr[side].write_text(sh(work, "git", "cat-file", "blob", f"{rev}:model.safetensors"))
        driver_cmd = ["theta-store", "merge-driver", str(ptr["base"]), str(root / "ours.work"), str(ptr["theirs"]), "model.safetensors"]
        merge_cmd = ["theta-store", "merge", "main:model.safetensors", "other", "-o", str(root / "out.safetensors"), "--strategy", STRATEGY]
        inputs = [str(files[s]) for s in ("base", "ours", "theirs")]
        numpy_cmd = [sys.executable, __file__, "--numpy-baseline", *inputs, str(root / "np.safetensors")]
        runs: dict[str, list[tuple[float, float]]] = {k: [] for k in ("numpy", "theta", "driver", "git", "checkout")}
        for i in range(a.runs):  # interleaved: the machine's speed moves
            runs["numpy"].append(timed_rss(work, *numpy_cmd))
            runs["theta"].append(timed_rss(work, *merge_cmd))
            shutil.copy(ptr["ours"], root / "ours.work")
            env = dict(ENV, THETA_STORE_MERGE=f"{STRATEGY}:{1 - (2 * i + 1) / 1000}")
            runs["driver"].append(timed_rss(work, *driver_cmd, env=env))
            lam = 1 - (2 * i + 2) / 1000
            env = dict(ENV, THETA_STORE_MERGE=f"{STRATEGY}:{lam}")
            runs["git"].append(timed_rss(work, "git", "merge", "-q", "--no-edit", "other", env=env))
            merged = root / "git-merged.safetensors"
            shutil.copy(work / "model.safetensors", merged)
            sh(work, "git", "reset", "-q", "--hard", ours_head)
            runs["checkout"].append(timed_rss(work, "git", "checkout", "other", "--", "model.safetensors"))
            sh(work, "git", "reset", "-q", "--hard", ours_head)
        assert same_tensors(root / "out.safetensors", root / "np.safetensors"), "theta-store merge -o differs from numpy"
        sh(work, *merge_cmd[:5], str(root / "check.safetensors"), "--strategy", f"{STRATEGY}:{lam}")
        assert merged.read_bytes() == (root / "check.safetensors").read_bytes(), "git merge's file differs from theta-store merge -o"

        r: dict[str, float] = {"model_mb": files["base"].stat().st_size / 1e6, "largest_tensor_mb": largest / 1e6}
        for k, v in runs.items():
            r[f"{k}_s"] = median([x[0] for x in v])
            r[f"{k}_peak_mb"] = median([x[1] for x in v])
        print(f"model {r['model_mb']:.0f} MB, every tensor changed on both sides, largest tensor {r['largest_tensor_mb']:.1f} MB;")
        print(f"{STRATEGY}, medians of {a.runs} (time, peak RSS):")
        labels = {
            "numpy": "numpy, files loaded whole",
            "theta": "theta-store merge A B -o out",
            "driver": "merge driver (merge, store the result)",
            "git": "git merge (driver, then checkout)",
            "checkout": "git checkout of one version, for scale",
        }
        for k, label in labels.items():
            s, mb = r[k + "_s"], r[k + "_peak_mb"]
            ratio = "" if k == "numpy" else f"   {s / r['numpy_s']:.2f}x the time, {mb / r['numpy_peak_mb']:.2f}x the memory of numpy"
            print(f"  {label:40s} {s:6.2f} s  {mb:6.0f} MB{ratio}")
        three = 3 * largest / 1e6
        print(f"  3 x largest tensor = {three:.0f} MB; theta-store merge -o peak minus that = {r['theta_peak_mb'] - three:.0f} MB")
        write_json("bench_merge", r)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--numpy-baseline":
        numpy_merge(*sys.argv[2:])
    else:
        main()
