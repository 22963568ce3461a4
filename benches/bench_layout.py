"""Store layout over many versions: pack count, maintenance writes, .git size, commit times.

N versions of the ~400 MB model, each changing one bias, through plain `git add` + `git commit`
(theta-store installed in a private GIT_CONFIG_GLOBAL), with this tree's layout (our packs kept,
consolidated in tiers) beside the layout of `--baseline-rev` (git's default maintenance), same
run, same model, the two repositories taking turns version by version. Git's auto maintenance
runs in the foreground here (`gc.autoDetach=false`, `maintenance.autoDetach=false`), so that
each commit pays what it triggers.

After each commit: pack count, .git size, and the bytes of the packs that appeared. Packs written
by git (`pack-objects`: git gc, repack, our rollups) have a `.rev` file (`pack.writeReverseIndex`
is set); packs written by theta-store's core do not. Maintenance bytes = sizes of new packs with
a `.rev`; new data = sizes of new packs without. An add's own pack that its rollup swallowed at
once is not seen, and its bytes count as maintenance (a bias, against us).

    python benches/bench_layout.py [--versions 100] [--params 100e6] [--baseline-rev 474cbb2]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import theta_store
from common import ENV, bert_like, dir_bytes, write_json

REPO = Path(__file__).resolve().parent.parent
# The last commit before issue 12's store layout: one frames table per version, packs left to git.
BASELINE_REV = "474cbb2"


def package_at(rev: str, dest: Path) -> Path:
    """python/ of `rev` in `dest`, with this tree's native module (the layout is all Python)."""
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "python"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    native = Path(theta_store.__file__).parent / "_native.abi3.so"
    shutil.copy(native, dest / "python" / "theta_store" / native.name)
    return dest / "python"


def bias_regions(path: Path) -> list[tuple[int, int]]:
    """(offset, length) in the file of every bias tensor of a safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    out = []
    for name, info in sorted(header.items()):
        if name.endswith(".bias") and isinstance(info, dict):
            a, b = info["data_offsets"]
            out.append((8 + n + a, b - a))
    return out


def packs(pack_dir: Path) -> dict[str, tuple[int, bool]]:
    """pack name -> (size, written by git pack-objects)."""
    out = {}
    for p in pack_dir.glob("pack-*.pack"):
        try:
            out[p.name] = (p.stat().st_size, p.with_suffix(".rev").exists())
        except FileNotFoundError:
            continue
    return out


class Variant:
    """One repository committing the versions with one layout's theta-store."""

    def __init__(self, root: Path, name: str, pythonpath: Path, model: Path) -> None:
        self.name = name
        cfg = root / f"{name}.gitconfig"
        cfg.write_text(
            "[gc]\n\tautoDetach = false\n[maintenance]\n\tautoDetach = false\n[pack]\n\twriteReverseIndex = true\n"
            "[init]\n\tdefaultBranch = main\n"
        )
        self.env = dict(ENV, GIT_CONFIG_GLOBAL=str(cfg), PYTHONPATH=str(pythonpath))
        self.sh(root, sys.executable, "-m", "theta_store", "install", "--global")
        self.work = root / name
        self.sh(root, "git", "init", "-q", str(self.work))
        self.sh(self.work, sys.executable, "-m", "theta_store", "track", "*.safetensors")
        self.sh(self.work, "git", "add", ".gitattributes")
        self.sh(self.work, "git", "commit", "-q", "-m", "track")
        self.model = model
        self.target = self.work / "model.safetensors"
        shutil.copy(model, self.target)
        self.regions = bias_regions(self.target)
        self.pack_dir = self.work / ".git" / "objects" / "pack"
        self.seen = packs(self.pack_dir)
        self.rows: list[dict[str, float]] = []

    def sh(self, cwd: Path, *args: str) -> None:
        r = subprocess.run(list(args), cwd=cwd, env=self.env, capture_output=True, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"{self.name}: {' '.join(args)} failed: {r.stderr.decode(errors='replace')}")

    def step(self, v: int) -> None:
        if v > 1:  # change one bias in place: a new value for every element, never seen before
            off, length = self.regions[v % len(self.regions)]
            with open(self.target, "r+b") as f:
                f.seek(off)
                f.write(np.full(length // 4, v * 1e-3, np.float32).tobytes())
        os.sync()  # a commit must not pay for writing out the model file
        t0 = time.perf_counter()
        self.sh(self.work, "git", "add", "model.safetensors")
        t1 = time.perf_counter()
        self.sh(self.work, "git", "commit", "-q", "-m", f"v{v}")
        t2 = time.perf_counter()
        now = packs(self.pack_dir)
        new = {n: s for n, s in now.items() if n not in self.seen}
        self.seen = now
        r = {
            "version": v,
            "add_s": t1 - t0,
            "commit_s": t2 - t1,
            "packs": len(now),
            "new_data": sum(size for size, by_git in new.values() if not by_git),
            "maintenance": sum(size for size, by_git in new.values() if by_git),
            "git_bytes": dir_bytes(self.work / ".git"),
            "objects_bytes": dir_bytes(self.work / ".git" / "objects"),
        }
        self.rows.append(r)
        print(
            f"  {self.name} v{v}: {r['add_s'] + r['commit_s']:.2f} s, {r['packs']} packs, +{r['new_data'] / 1e3:.1f} KB new,"
            f" {r['maintenance'] / 1e6:.2f} MB maintenance, .git {r['git_bytes'] / 1e6:.1f} MB",
            flush=True,
        )

    def finish(self) -> dict[str, object]:
        """Check that the first version still checks out, byte for byte; drop the repository."""
        n = len(self.rows)
        self.sh(self.work, "git", "checkout", "-q", f"HEAD~{n - 1}", "--", "model.safetensors")
        assert self.target.read_bytes() == self.model.read_bytes(), f"{self.name}: v1 does not check out"
        shutil.rmtree(self.work)
        return {"rows": self.rows, **summary(self.rows)}


def summary(rows: list[dict[str, float]]) -> dict[str, float]:
    later = rows[1:] or rows  # versions after the first add
    times = [r["add_s"] + r["commit_s"] for r in later]
    med = statistics.median(times)
    new = sum(r["new_data"] for r in later)
    grow = [(b["git_bytes"] - a["git_bytes"]) for a, b in itertools.pairwise(rows)]
    grow_obj = [(b["objects_bytes"] - a["objects_bytes"]) for a, b in itertools.pairwise(rows)]
    return {
        "max_packs": max(r["packs"] for r in rows),
        "final_packs": rows[-1]["packs"],
        "new_data_bytes": new,
        "first_add_bytes": rows[0]["new_data"],
        "maintenance_bytes": sum(r["maintenance"] for r in rows),
        "maintenance_over_new": sum(r["maintenance"] for r in rows) / max(new, 1),
        "median_commit_s": med,
        "max_commit_s": max(times),
        "max_over_median": max(times) / med,
        "git_growth_per_version_mb": (rows[-1]["git_bytes"] - rows[0]["git_bytes"]) / max(len(rows) - 1, 1) / 1e6,
        "objects_growth_per_version_mb": (rows[-1]["objects_bytes"] - rows[0]["objects_bytes"]) / max(len(rows) - 1, 1) / 1e6,
        "median_git_growth_mb": statistics.median(grow) / 1e6 if grow else 0.0,
        "median_objects_growth_mb": statistics.median(grow_obj) / 1e6 if grow_obj else 0.0,
        "final_git_mb": rows[-1]["git_bytes"] / 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--versions", type=int, default=100)
    ap.add_argument("--params", type=float, default=100e6)
    ap.add_argument("--baseline-rev", default=BASELINE_REV, help="the commit whose layout is the baseline")
    ap.add_argument("--baseline-python", type=Path, default=None, help="a python/ folder to use as the baseline instead")
    ap.add_argument("--work", type=Path, default=None, help="temp folder (deleted at the end)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="theta-layout-", dir=args.work))
    try:
        model = root / "model.safetensors"
        theta_store.save_safetensors(str(model), bert_like(int(args.params)))
        base = args.baseline_python or package_at(args.baseline_rev, root / "baseline-src")
        ours = Path(theta_store.__file__).resolve().parent.parent
        variants = [Variant(root, "layout", ours, model), Variant(root, "baseline", base, model)]
        for v in range(1, args.versions + 1):  # interleaved: the machine's noise hits both alike
            for variant in variants:
                variant.step(v)
        res = {"versions": args.versions, "model_bytes": model.stat().st_size, **{x.name: x.finish() for x in variants}}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    write_json("layout", res)
    lay, bl = res["layout"], res["baseline"]
    assert isinstance(lay, dict) and isinstance(bl, dict)
    print(f"\n== {args.versions} versions of a {res['model_bytes'] / 1e6:.0f} MB model, one bias changed in each (this layout | baseline)")
    rows = [
        ("packs, most at any time", "max_packs", "{:.0f}"),
        ("packs at the end", "final_packs", "{:.0f}"),
        ("new data after v1, MB", "new_data_bytes", "{:.3f}"),
        ("maintenance writes, MB", "maintenance_bytes", "{:.3f}"),
        ("maintenance / new data (goal <= 2)", "maintenance_over_new", "{:.2f}"),
        ("median add+commit, s", "median_commit_s", "{:.2f}"),
        ("slowest add+commit, s", "max_commit_s", "{:.2f}"),
        ("slowest / median (goal <= 3)", "max_over_median", "{:.2f}"),
        (".git growth per version, MB (goal <= 0.05)", "git_growth_per_version_mb", "{:.4f}"),
        ("  of which objects, MB", "objects_growth_per_version_mb", "{:.4f}"),
        (".git at the end, MB", "final_git_mb", "{:.1f}"),
    ]
    for label, key, fmt in rows:
        a, b = lay[key], bl[key]
        if key.endswith("_bytes"):
            a, b = a / 1e6, b / 1e6
        print(f"{label:46s} {fmt.format(a):>10s} | {fmt.format(b):>10s}")


if __name__ == "__main__":
    main()
