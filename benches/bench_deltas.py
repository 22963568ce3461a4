"""Issue 13 benchmark: what a new version costs through plain `git add` + `git commit`, theta-store
beside Git LFS on the same files, same run.

Model: the seeded 100M-parameter fp32 BERT-like state dict (common.bert_like, 402 MB .safetensors).
Each tool gets fresh repositories (`theta-store install` + `track`, or `git lfs track`), then only
plain `git add model.safetensors` + `git commit`, no flags. Scenarios, each a commit whose parent is
v1 (a branch per scenario, so the previous version is always v1):

- S1  v1 itself, the first add.
- S2  a rank-8 LoRA folded into 4 of the 768x768 matrices (query and value of layers 0 and 1):
      W += A @ B in numpy fp32, A (768x8) and B (8x768) seeded N(0, 1) scaled by one common
      factor so that ||A @ B||_F = 1e-2 * ||W||_F for each matrix.
- S3  1% of the entries of 3 matrices (layer 2's intermediate and output dense, layer 3's key)
      set to new values drawn from the weights' own distribution, N(0, 0.02^2).
- S4  one bias vector changed (layer 0's output dense bias + 1e-3).
- S2 again through `theta-store add --lora ADAPTER` with S2's true factors as a PEFT adapter, and
      `theta_store.extract_lora` of S2 at rank 8 (the largest relative error of the 4 modules).
- MiniLM fine-tune: v1 = the real all-MiniLM-L6-v2 weights (fp32, and converted to bf16), v2 =
      every float tensor perturbed by N(0, (1e-3 std)^2), std being that tensor's (bf16: both
      versions are the fp32 ones rounded, as from fp32 master weights); growth of v2 / raw
      float tensor bytes, beside XOR with v1 + zstd-1 computed here (whole XOR, and per byte plane).
- chain: 20 successive versions, each the previous one with every float tensor perturbed by
      N(0, (1e-3 std)^2) (std of the tensor in v1; constant tensors stay unchanged). Per-version
      growth, add+commit of a delta version against the first add, and the restore of the newest
      version against the restore of v1: `rm model.safetensors; git checkout vN -- model.safetensors`
      for both tools, after one untimed restore of each, median of --runs.

`.git` growth is the change of the apparent size of every file under `.git` (like `du -sb`),
measured after the commit, with no gc or repack for either tool: Git LFS's copy under .git/lfs,
theta-store's packs, and the loose pointer, tree and commit objects of both count the same way.
Each version checks out byte-exactly (BLAKE3 of the file) with `git status` clean. Peak RSS is
that of `git add` under /usr/bin/time -v (git and the filter process it waits for). The JSON also
has `object_bytes`, the growth of .git/objects and .git/lfs/objects alone.

    python benches/bench_deltas.py                 # 100M model, 3 runs; ~10 min on 2 cores
    python benches/bench_deltas.py --quick         # 20M model, 1 run (smoke test)
    python benches/bench_deltas.py --only S2,S4,minilm,chain
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import blake3
import numpy as np

from common import ENV, bert_like, dir_bytes, ensure_tools, median, minilm_path, sh, timed, to_bf16_bits, write_json
from theta_store import save_safetensors

TOOLS = ("theta", "lfs")
SCENARIOS = ("S1", "S2", "S3", "S4")
FILE = "model.safetensors"


def new_repo(root: Path, name: str, tool: str) -> Path:
    repo = root / f"{name}-{tool}"
    if repo.exists():
        shutil.rmtree(repo)
    repo.mkdir(parents=True)
    sh(repo, "git", "init", "-q", "-b", "main")
    if tool == "theta":
        sh(repo, "theta-store", "track", "*.safetensors")
    else:
        sh(repo, "git", "lfs", "track", "*.safetensors")
    sh(repo, "git", "add", ".gitattributes")
    sh(repo, "git", "commit", "-q", "-m", "attributes")
    return repo


def add_rss_mb(repo: Path) -> float:
    """`git add` under /usr/bin/time -v: the peak RSS of git or of the filter process it waited for."""
    r = subprocess.run(["/usr/bin/time", "-v", "git", "add", FILE], cwd=repo, env=ENV, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"git add failed in {repo}: {r.stderr}")
    line = next(ln for ln in r.stderr.splitlines() if "Maximum resident set size" in ln)
    return int(line.split(":")[1]) / 1024


def commit_version(repo: Path, src: Path, message: str) -> dict[str, float]:
    """Copy `src` in, `git add` + `git commit`: the .git growth, the wall time and the peak RSS."""
    shutil.copy(src, repo / FILE)
    before, objects = dir_bytes(repo / ".git"), object_bytes(repo)
    os.sync()  # the copy's writeback would otherwise land in the timed add (as in bench_add_restore)
    rss: list[float] = []
    seconds = timed(lambda: (rss.append(add_rss_mb(repo)), sh(repo, "git", "commit", "-q", "-m", message)))
    return {
        "bytes": dir_bytes(repo / ".git") - before,
        "object_bytes": object_bytes(repo) - objects,
        "add_commit_s": seconds,
        "peak_rss_mb": rss[0],
    }


def object_bytes(repo: Path) -> int:
    """The part of .git that is stored versions (git's objects, Git LFS's copies), without caches."""
    return sum(dir_bytes(repo / ".git" / d) for d in ("objects", "lfs/objects") if (repo / ".git" / d).exists())


def digest(path: Path) -> str:
    return blake3.blake3(max_threads=blake3.blake3.AUTO).update_mmap(str(path)).hexdigest()


def check_out_exactly(repo: Path, rev: str, want: str) -> None:
    sh(repo, "git", "checkout", "-q", rev)
    got = digest(repo / FILE)
    if got != want:
        raise SystemExit(f"{repo.name}: {rev} checked out with BLAKE3 {got[:16]}, committed {want[:16]}")
    status = sh(repo, "git", "status", "--porcelain")
    if status.strip():
        raise SystemExit(f"{repo.name}: git status not clean after checking out {rev}:\n{status}")


# --- inputs -------------------------------------------------------------------------------------


# The S2 updates as a PEFT adapter would hold them: module -> (lora_A (r x in), lora_B (out x r)).
S2_ADAPTER: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def write_adapter(folder: Path) -> None:
    """S2's updates as a PEFT adapter folder (scaling 1: lora_alpha = r), for `add --lora`."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, (a, b) in S2_ADAPTER.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = a
        tensors[f"base_model.model.{module}.lora_B.weight"] = b
    save_safetensors(str(folder / "adapter_model.safetensors"), tensors)
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 8, "target_modules": sorted({m.rsplit(".", 1)[1] for m in S2_ADAPTER})}
    (folder / "adapter_config.json").write_text(json.dumps(config))


def scenario_models(m: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """S2, S3 and S4 as changes to v1 (arrays not changed are shared with v1)."""
    layers = sum(1 for k in m if k.endswith("attention.self.query.weight"))
    lo, hi = 0, min(1, layers - 1)
    rng = np.random.default_rng(13)
    s2 = dict(m)
    lora = [f"encoder.layer.{i}.attention.self.{n}.weight" for i in dict.fromkeys((lo, hi)) for n in ("query", "value")]
    lora += [f"encoder.layer.{lo}.attention.self.key.weight", f"encoder.layer.{lo}.attention.output.dense.weight"]
    for name in lora[:4]:
        w = m[name]
        a = rng.standard_normal((w.shape[0], 8), dtype=np.float32)
        b = rng.standard_normal((8, w.shape[1]), dtype=np.float32)
        scale = np.float32(np.sqrt(1e-2 * np.linalg.norm(w) / np.linalg.norm(a @ b)))
        a, b = a * scale, b * scale
        s2[name] = w + a @ b
        S2_ADAPTER[name.removesuffix(".weight")] = (b, a)
    s3 = dict(m)
    two, three = min(2, layers - 1), min(3, layers - 1)
    for name in (
        f"encoder.layer.{two}.intermediate.dense.weight",
        f"encoder.layer.{two}.output.dense.weight",
        f"encoder.layer.{three}.attention.self.key.weight",
    ):
        w = m[name].copy()
        idx = rng.choice(w.size, w.size // 100, replace=False)
        w.flat[idx] = rng.standard_normal(idx.size, dtype=np.float32) * np.float32(0.02)
        s3[name] = w
    s4 = dict(m)
    bias = "encoder.layer.0.output.dense.bias"
    s4[bias] = m[bias] + np.float32(1e-3)
    return {"S2": s2, "S3": s3, "S4": s4}


def fine_tune(m: dict[str, np.ndarray], stds: dict[str, float], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Every float tensor moved by N(0, (1e-3 std)^2) in fp32; tensors with std 0 stay as they are."""
    out = {}
    for k, v in m.items():
        s = stds.get(k, 0.0)
        out[k] = v + rng.standard_normal(v.shape, dtype=np.float32) * np.float32(1e-3 * s) if s > 0 else v
    return out


def minilm_inputs(root: Path) -> dict[str, tuple[Path, Path, dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """{dtype: (v1 file, v2 file, v1 bit patterns, v2 bit patterns)} of the real MiniLM weights."""
    from safetensors.numpy import load_file

    real = load_file(str(minilm_path()))
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    floats = {k: v for k, v in real.items() if v.dtype == np.float32}
    noise = {k: rng.standard_normal(v.shape) * (1e-3 * float(v.std())) for k, v in floats.items()}
    out = {}
    for dtype in ("fp32", "bf16"):
        v1: dict[str, Any] = {}
        v2: dict[str, Any] = {}
        b1: dict[str, np.ndarray] = {}
        b2: dict[str, np.ndarray] = {}
        for k, v in real.items():
            if k not in floats:
                v1[k] = v2[k] = v
                continue
            if dtype == "fp32":
                new = (v.astype(np.float64) + noise[k]).astype(np.float32)
                v1[k], v2[k], b1[k], b2[k] = v, new, v.view(np.uint32), new.view(np.uint32)
            else:
                # bf16 checkpoints of fp32 master weights: v2 is the perturbed master rounded
                old = to_bf16_bits(v)
                new_bits = to_bf16_bits((v.astype(np.float64) + noise[k]).astype(np.float32))
                v1[k], v2[k], b1[k], b2[k] = (old, "BF16"), (new_bits, "BF16"), old, new_bits
        p1, p2 = root / f"minilm-{dtype}-v1.safetensors", root / f"minilm-{dtype}-v2.safetensors"
        save_safetensors(str(p1), v1)
        save_safetensors(str(p2), v2)
        out[dtype] = (p1, p2, b1, b2)
    return out


def xor_zstd1(b1: dict[str, np.ndarray], b2: dict[str, np.ndarray]) -> tuple[int, int, int]:
    """(raw float tensor bytes, zstd-1 of v1 XOR v2, zstd-1 of the XOR's byte planes), per tensor."""
    import zstandard

    z = zstandard.ZstdCompressor(level=1)
    raw = whole = planes = 0
    for k, a in b1.items():
        x = np.ascontiguousarray(a ^ b2[k]).reshape(-1)
        raw += x.nbytes
        whole += len(z.compress(x.tobytes()))
        for plane in x.view(np.uint8).reshape(-1, x.itemsize).T:
            planes += len(z.compress(np.ascontiguousarray(plane).tobytes()))
    return raw, whole, planes


# --- the three parts ----------------------------------------------------------------------------


def run_scenarios(root: Path, files: dict[str, Path], digests: dict[str, str], only: list[str]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for tool in TOOLS:
        repo = new_repo(root, "scenarios", tool)
        out[f"S1/{tool}"] = commit_version(repo, files["S1"], "v1")
        sh(repo, "git", "tag", "v1")
        for s in only:
            if s == "S1":
                continue
            sh(repo, "git", "checkout", "-q", "-b", s.lower(), "v1")
            out[f"{s}/{tool}"] = commit_version(repo, files[s], s)
        if tool == "theta" and "S2" in only:
            out["S2-extract/theta"] = extract_errors(repo, root)
            out["S2-lora/theta"] = add_with_lora(root, files, digests)
        for s in ["S1", *[s for s in only if s != "S1"]]:
            check_out_exactly(repo, "v1" if s == "S1" else s.lower(), digests[s])
        shutil.rmtree(repo)
    return out


def add_with_lora(root: Path, files: dict[str, Path], digests: dict[str, str]) -> dict[str, float]:
    """S2 again, in a repository of its own (v1, then S2 through `theta-store add --lora` with the
    true factors): what S2 costs when the user hands over the adapter."""
    adapter = root / "s2-adapter"
    write_adapter(adapter)
    repo = new_repo(root, "s2-lora", "theta")
    commit_version(repo, files["S1"], "v1")
    shutil.copy(files["S2"], repo / FILE)
    before, objects = dir_bytes(repo / ".git"), object_bytes(repo)
    seconds = timed(
        lambda: (sh(repo, "theta-store", "-q", "add", "--lora", str(adapter), FILE), sh(repo, "git", "commit", "-q", "-m", "S2 lora"))
    )
    out = {
        "bytes": dir_bytes(repo / ".git") - before,
        "object_bytes": object_bytes(repo) - objects,
        "add_commit_s": seconds,
        "peak_rss_mb": 0.0,
    }
    check_out_exactly(repo, "HEAD~1", digests["S1"])
    check_out_exactly(repo, "main", digests["S2"])
    shutil.rmtree(repo)
    return out


def extract_errors(repo: Path, root: Path) -> dict[str, float]:
    """extract_lora of S2 at rank 8: per module, the error against the update that was folded in
    (||B'A' - A@B|| / ||A@B||, A@B in f64) and the error extract_lora reports (against the stored
    change new - base, which also holds the fp32 rounding of the fold); the largest of each."""
    from safetensors.numpy import load_file

    import theta_store

    out = root / "s2-extracted"
    seconds = timed(lambda: theta_store.extract_lora(str(repo / FILE), base="v1", rev="s2", rank=8, out=str(out), repo=str(repo)))
    report = theta_store.extract_lora(str(repo / FILE), base="v1", rev="s2", rank=8, out=str(out), repo=str(repo))
    got = load_file(str(out / "adapter_model.safetensors"))
    true_errors = []
    for module, (a, b) in S2_ADAPTER.items():
        want = b.astype(np.float64) @ a.astype(np.float64)
        lb, la = got[f"base_model.model.{module}.lora_B.weight"], got[f"base_model.model.{module}.lora_A.weight"]
        true_errors.append(float(np.linalg.norm(lb.astype(np.float64) @ la.astype(np.float64) - want) / np.linalg.norm(want)))
    reported = [m["rel_error"] for m in report["modules"]]
    shutil.rmtree(out, ignore_errors=True)
    return {
        "modules": float(len(reported)),
        "max_error_vs_update": max(true_errors),
        "max_rel_error": max(reported) if reported else float("nan"),
        "seconds": seconds,
    }


def run_minilm(root: Path) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for dtype, (p1, p2, b1, b2) in minilm_inputs(root / "minilm").items():
        raw, xor_whole, xor_planes = xor_zstd1(b1, b2)
        row: dict[str, float] = {"raw_float_bytes": raw, "file_bytes": p2.stat().st_size}
        row["xor_zstd1"] = xor_whole / raw
        row["xor_planes_zstd1"] = xor_planes / raw
        for tool in TOOLS:
            repo = new_repo(root, f"minilm-{dtype}", tool)
            first = commit_version(repo, p1, "v1")
            sh(repo, "git", "tag", "v1")
            second = commit_version(repo, p2, "v2")
            check_out_exactly(repo, "v1", digest(p1))
            check_out_exactly(repo, "main", digest(p2))
            row[f"{tool}_v1_bytes"] = first["bytes"]
            row[f"{tool}_v2_bytes"] = second["bytes"]
            row[f"{tool}_v2_object_bytes"] = second["object_bytes"]
            row[f"{tool}_v2_ratio"] = second["bytes"] / raw
            row[f"{tool}_v2_add_commit_s"] = second["add_commit_s"]
            row[f"{tool}_v2_peak_rss_mb"] = second["peak_rss_mb"]
            shutil.rmtree(repo)
        out[dtype] = row
    return out


def run_chain(root: Path, v1: dict[str, np.ndarray], n: int, runs: int) -> dict[str, Any]:
    repos = {tool: new_repo(root, "chain", tool) for tool in TOOLS}
    stds = {k: float(v.std()) for k, v in v1.items() if v.dtype == np.float32}
    src = root / "chain-version.safetensors"
    per: dict[str, list[dict[str, float]]] = {tool: [] for tool in TOOLS}
    digests = []
    cur = v1
    for i in range(1, n + 1):
        if i > 1:
            cur = fine_tune(cur, stds, np.random.default_rng(1000 + i))
        save_safetensors(str(src), cur)
        digests.append(digest(src))
        for tool, repo in repos.items():
            per[tool].append(commit_version(repo, src, f"v{i}"))
            sh(repo, "git", "tag", f"v{i}")
        print(f"  chain v{i}: " + ", ".join(f"{t} {per[t][-1]['bytes'] / 1e6:.2f} MB in {per[t][-1]['add_commit_s']:.2f} s" for t in TOOLS))
    src.unlink()
    out: dict[str, Any] = {"versions": n, "file_bytes": (repos["theta"] / FILE).stat().st_size}
    for tool, repo in repos.items():
        restore: dict[str, list[float]] = {"v1": [], "newest": []}
        for rev in ("v1", f"v{n}"):  # untimed: both versions' stored bytes in the page cache alike
            (repo / FILE).unlink()
            sh(repo, "git", "checkout", "-q", rev, "--", FILE)
        for _ in range(runs):
            for label, rev, want in (("v1", "v1", digests[0]), ("newest", f"v{n}", digests[-1])):
                (repo / FILE).unlink()
                os.sync()
                restore[label].append(timed(lambda rev=rev, repo=repo: sh(repo, "git", "checkout", "-q", rev, "--", FILE)))
                if digest(repo / FILE) != want:
                    raise SystemExit(f"chain-{tool}: {rev} restored with the wrong bytes")
        sh(repo, "git", "checkout", "-q", "HEAD", "--", FILE)
        if sh(repo, "git", "status", "--porcelain").strip():
            raise SystemExit(f"chain-{tool}: git status not clean at the end")
        rows = per[tool]
        delta_add = median([r["add_commit_s"] for r in rows[1:]]) if n > 1 else float("nan")
        out[tool] = {
            "bytes_per_version": [r["bytes"] for r in rows],
            "object_bytes_per_version": [r["object_bytes"] for r in rows],
            "add_commit_s_per_version": [r["add_commit_s"] for r in rows],
            "total_bytes": sum(r["bytes"] for r in rows),
            "first_add_commit_s": rows[0]["add_commit_s"],
            "delta_add_commit_s": delta_add,
            "throughput_delta_vs_first": rows[0]["add_commit_s"] / delta_add,
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rows),
            "restore_v1_s": median(restore["v1"]),
            "restore_newest_s": median(restore["newest"]),
            "restore_newest_vs_v1": median(restore["newest"]) / median(restore["v1"]),
            "restore_each_run_s": restore,
        }
        shutil.rmtree(repo)
    return out


# --- report -------------------------------------------------------------------------------------


def print_table(res: dict[str, Any], runs: int) -> None:
    mb = lambda b: f"{b / 1e6:.3f} MB"  # noqa: E731
    print(f"\n== .git growth per version through plain git add + commit (median of {runs} run(s); ratio = LFS / theta)")
    print(f"{'scenario':34} {'theta bytes':>13} {'LFS bytes':>13} {'ratio':>8} {'add s (theta/LFS)':>18} {'peak RSS MB (theta/LFS)':>24}")

    def row(label: str, t: dict[str, float], lfs: dict[str, float]) -> None:
        ratio = lfs["bytes"] / t["bytes"] if t["bytes"] else float("inf")
        add = f"{t['add_commit_s']:.2f}/{lfs['add_commit_s']:.2f}"
        rss = f"{t['peak_rss_mb']:.0f}/{lfs['peak_rss_mb']:.0f}"
        print(f"{label:34} {mb(t['bytes']):>13} {mb(lfs['bytes']):>13} {ratio:8.1f} {add:>18} {rss:>24}")

    labels = {
        "S1": "S1 first add (v1)",
        "S2": "S2 LoRA r=8 into 4 matrices",
        "S3": "S3 1% of 3 matrices",
        "S4": "S4 one bias",
    }
    sc = res.get("scenarios", {})
    for s, label in labels.items():
        if f"{s}/theta" in sc:
            row(label, sc[f"{s}/theta"], sc[f"{s}/lfs"])
        if s == "S2" and "S2-lora/theta" in sc:
            row("S2 with add --lora (true factors)", sc["S2-lora/theta"], sc["S2/lfs"])
    for dtype, m in res.get("minilm", {}).items():
        row(
            f"MiniLM {dtype} fine-tune (v2)",
            {"bytes": m["theta_v2_bytes"], "add_commit_s": m["theta_v2_add_commit_s"], "peak_rss_mb": m["theta_v2_peak_rss_mb"]},
            {"bytes": m["lfs_v2_bytes"], "add_commit_s": m["lfs_v2_add_commit_s"], "peak_rss_mb": m["lfs_v2_peak_rss_mb"]},
        )
    ch = res.get("chain")
    if ch:
        t, lfs = ch["theta"], ch["lfs"]

        def chain_row(c: dict[str, Any], total: bool) -> dict[str, float]:
            if total:
                return {"bytes": c["total_bytes"], "add_commit_s": sum(c["add_commit_s_per_version"]), "peak_rss_mb": c["peak_rss_mb"]}
            deltas = c["bytes_per_version"][1:] or [float("nan")]
            return {"bytes": statistics.median(deltas), "add_commit_s": c["delta_add_commit_s"], "peak_rss_mb": c["peak_rss_mb"]}

        row("chain: median delta version", chain_row(t, False), chain_row(lfs, False))
        row(f"chain: total of {ch['versions']} versions", chain_row(t, True), chain_row(lfs, True))
    if "S2-extract/theta" in sc:
        e = sc["S2-extract/theta"]
        print(
            f"\nextract_lora of S2 at rank 8: {e['modules']:.0f} modules; largest relative error against the update folded in"
            f" {e['max_error_vs_update']:.1e}, against the stored change (fp32 rounding of the fold included) {e['max_rel_error']:.1e}"
            f" ({e['seconds']:.2f} s)"
        )
    for dtype, m in res.get("minilm", {}).items():
        print(
            f"\nMiniLM {dtype}: v2 growth / raw float bytes ({m['raw_float_bytes'] / 1e6:.1f} MB): theta-store {m['theta_v2_ratio']:.3f}"
            f" | Git LFS {m['lfs_v2_ratio']:.3f} | XOR with v1 + zstd-1 {m['xor_zstd1']:.3f}"
            f" | XOR byte planes + zstd-1 {m['xor_planes_zstd1']:.3f}"
        )
    if ch:
        print(f"\nchain of {ch['versions']} fine-tune steps on a {ch['file_bytes'] / 1e6:.0f} MB file:")
        for tool in TOOLS:
            c = ch[tool]
            print(
                f"  {tool:5}: total {c['total_bytes'] / 1e6:.1f} MB; add+commit first {c['first_add_commit_s']:.2f} s, delta version"
                f" {c['delta_add_commit_s']:.2f} s (throughput {c['throughput_delta_vs_first']:.2f} of the first add);"
                f" restore v1 {c['restore_v1_s']:.2f} s, newest {c['restore_newest_s']:.2f} s ({c['restore_newest_vs_v1']:.2f}x)"
            )
            print("         per version MB: " + " ".join(f"{b / 1e6:.1f}" for b in c["bytes_per_version"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="runs of S1-S4 and of the chain's restores (medians)")
    ap.add_argument("--params", type=float, default=100e6)
    ap.add_argument("--chain", type=int, default=20, help="versions in the fine-tune chain")
    ap.add_argument("--quick", action="store_true", help="20M params, 1 run (smoke test)")
    ap.add_argument("--only", default="S1,S2,S3,S4,minilm,chain", help="comma-separated subset of S1,S2,S3,S4,minilm,chain")
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (default: a new temporary one)")
    args = ap.parse_args()
    if args.quick:
        args.runs, args.params = 1, 20e6
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(only) - {*SCENARIOS, "minilm", "chain"}
    if unknown:
        ap.error(f"--only: unknown part(s) {', '.join(sorted(unknown))}")
    root = args.work or Path(tempfile.mkdtemp(prefix="theta-deltas-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    cfg = root / "gitconfig"
    cfg.write_text("")
    ENV["GIT_CONFIG_GLOBAL"] = str(cfg)  # a private global config: the user's is left alone
    ensure_tools()
    sh(root, "theta-store", "install", "--global")
    sh(root, "git", "lfs", "install")
    m = bert_like(int(args.params))
    res: dict[str, Any] = {"params": args.params, "runs": args.runs}
    scen = [s for s in SCENARIOS if s in only]
    if scen:
        files = {"S1": root / "S1.safetensors"}
        save_safetensors(str(files["S1"]), m)
        for s, tensors in scenario_models(m).items():
            if s in scen:
                files[s] = root / f"{s}.safetensors"
                save_safetensors(str(files[s]), tensors)
        digests = {s: digest(p) for s, p in files.items()}
        res["file_bytes"] = files["S1"].stat().st_size
        runs = [run_scenarios(root, files, digests, scen) for _ in range(args.runs)]
        res["scenarios"] = {k: {f: median([r[k][f] for r in runs]) for f in runs[0][k]} for k in runs[0]}
        res["scenarios_each_run"] = runs
        for p in files.values():
            p.unlink()
    if "minilm" in only:
        res["minilm"] = run_minilm(root)
    if "chain" in only:
        res["chain"] = run_chain(root, m, args.chain, args.runs)
    write_json("deltas", res)
    print_table(res, args.runs)
    if not args.work:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
