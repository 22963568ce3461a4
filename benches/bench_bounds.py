"""Issue 16 part 7: peak RSS and wall time of every step that moves a large checkpoint.

A seeded safetensors model of `--gb` GB (default 4) written tensor by tensor with numpy: fp32 and
bf16 matrices (randn * 0.02), fp32 norms and biases, and a few large tensors (an fp32 embedding of
1/8 of the file, a bf16 head of 1/16). v2 adds N(0, (1e-3 * 0.02)^2) to the embedding and to two
layer matrices (a fine-tune of part of the model: deltas against v1).

Each step runs under `/usr/bin/time -v`, whose peak RSS is the largest of the command and every
process it waited for (git, our filter or hook, the git processes we start). git itself holds a
smudge filter's whole output in memory (`git checkout`, `git clone`), so the filter processes run
under their own `/usr/bin/time` as well (filter.<driver>.process wrapped), and that figure is
printed as ours. Baselines from the same run: Git LFS doing the same step through plain git, and
`cp` / `sha256sum` of the file where LFS has no such step.

    python benches/bench_bounds.py [--gb 4] [--runs 1] [--dir /tmp] [--no-daemon]

One tool at a time (theta-store, then Git LFS), deleting as it goes: about 5 copies of the
checkpoint on disk at the most.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from common import ENV, ensure_tools, sh, to_bf16_bits, write_json

HERE = Path(__file__).resolve().parent
# The theta_store this script sits beside (a worktree's), for the CLI and for the filter git starts.
ENV["PYTHONPATH"] = str(HERE.parent / "python")
THETA = [sys.executable, "-m", "theta_store"]
LIMIT_MB = 400.0

# ------------------------------------------------------------------ the model


def model_spec(total: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """Tensors (name, dtype, shape) adding up to `total` bytes or a little more."""
    hidden, ffn = 2048, 5632
    spec: list[tuple[str, str, tuple[int, ...]]] = [
        ("model.embed_tokens.weight", "F32", (max(1, total // 8 // (4 * hidden)), hidden)),
        ("lm_head.weight", "BF16", (max(1, total // 16 // (2 * hidden)), hidden)),
        ("model.norm.weight", "F32", (hidden,)),
    ]
    used = sum(np.prod(s) * (4 if d == "F32" else 2) for _, d, s in spec)
    i = 0
    while True:
        dt = "F32" if i % 2 == 0 else "BF16"
        size = 4 if dt == "F32" else 2
        p = f"model.layers.{i}."
        layer = [
            *((p + f"self_attn.{n}_proj.weight", dt, (hidden, hidden)) for n in "qkvo"),
            (p + "mlp.gate_proj.weight", dt, (ffn, hidden)),
            (p + "mlp.up_proj.weight", dt, (ffn, hidden)),
            (p + "mlp.down_proj.weight", dt, (hidden, ffn)),
            (p + "input_layernorm.weight", "F32", (hidden,)),
            (p + "post_attention_layernorm.weight", "F32", (hidden,)),
            (p + "mlp.down_proj.bias", "F32", (hidden,)),
        ]
        if used >= total:
            break
        cost = sum(int(np.prod(s)) * (size if d == dt else 4) for _, d, s in layer)
        spec += layer
        used += cost
        i += 1
    return spec


def _values(rng: np.random.Generator, name: str, n: int) -> np.ndarray:
    if name.endswith("norm.weight"):
        return np.ones(n, np.float32)
    if name.endswith(".bias"):
        return np.zeros(n, np.float32)
    return rng.standard_normal(n, dtype=np.float32) * np.float32(0.02)


BLOCK = 1 << 24  # elements generated at a time: the bench itself stays small


def write_model(path: Path, spec: list[tuple[str, str, tuple[int, ...]]], seed: int = 0) -> None:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, dt, shape in spec:
        n = int(np.prod(shape)) * (4 if dt == "F32" else 2)
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h)
        for name, dt, shape in spec:
            left = int(np.prod(shape))
            while left:
                k = min(left, BLOCK)
                v = _values(rng, name, k)
                f.write((v if dt == "F32" else to_bf16_bits(v)).tobytes())
                left -= k


def fine_tune(path: Path, names: list[str], seed: int = 1) -> None:
    """Add small noise to the named tensors of a safetensors file, in place, block by block."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    rng = np.random.default_rng(seed)
    mm = np.memmap(path, np.uint8, "r+")
    for name in names:
        t = header[name]
        a, b = (8 + n + o for o in t["data_offsets"])
        size = 4 if t["dtype"] == "F32" else 2
        step = BLOCK * size
        for s in range(a, b, step):
            e = min(b, s + step)
            if size == 4:
                v = mm[s:e].view(np.float32)
                v += rng.standard_normal(len(v), dtype=np.float32) * np.float32(2e-5)
            else:
                bits = mm[s:e].view(np.uint16)
                f32 = (bits.astype(np.uint32) << 16).view(np.float32)
                bits[:] = to_bf16_bits(f32 + rng.standard_normal(len(f32), dtype=np.float32) * np.float32(2e-5))
    mm.flush()
    del mm


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(1 << 24):
            h.update(b)
    return h.hexdigest()


# ------------------------------------------------------------------ measuring


class Step:
    """Peak RSS (MB) and seconds of one command, and of the filter processes it started."""

    def __init__(self, rss: float, secs: float, filter_rss: float | None) -> None:
        self.rss, self.secs, self.filter_rss = rss, secs, filter_rss


def run_timed(cwd: Path, args: list[str], env: dict[str, str] | None = None, filter_log: Path | None = None) -> Step:
    """Run `args` under /usr/bin/time -v; the filter log collects the wrapped filters' peaks."""
    fd, name = tempfile.mkstemp(prefix="time-", dir=cwd.parent)
    os.close(fd)
    out = Path(name)
    if filter_log is not None:
        filter_log.write_text("")
    os.sync()  # the writeback of an earlier step is not this step's cost
    t0 = time.perf_counter()
    r = subprocess.run(
        ["/usr/bin/time", "-v", "-o", str(out), *args], cwd=cwd, env={**ENV, **(env or {})}, capture_output=True, check=False
    )
    secs = time.perf_counter() - t0
    text = out.read_text()
    out.unlink()
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {r.returncode} in {cwd}:\n{r.stderr.decode(errors='replace')[-3000:]}")
    rss = next(int(line.split(":")[1]) / 1024 for line in text.splitlines() if "Maximum resident set size" in line)
    frss = None
    if filter_log is not None:
        peaks = [int(x) / 1024 for x in filter_log.read_text().split() if x.isdigit()]
        frss = max(peaks) if peaks else None
    return Step(rss, secs, frss)


def wrap_filters(log: Path) -> None:
    """Run each filter process under its own /usr/bin/time, appending its peak RSS (KB) to `log`."""
    for driver in ("thetastore", "lfs"):
        key = f"filter.{driver}.process"
        cmd = sh(Path("/"), "git", "config", "--global", key).strip()
        if not cmd.startswith("/usr/bin/time"):
            sh(Path("/"), "git", "config", "--global", key, f"/usr/bin/time -f %M -a -o {log} {cmd}")


def free_gb(path: Path) -> float:
    return shutil.disk_usage(path).free / 1e9


def need_disk(path: Path, gb: float) -> None:
    if free_gb(path) < gb:
        raise SystemExit(f"bench_bounds: {free_gb(path):.1f} GB free under {path}, this phase needs about {gb:.0f} GB")


@contextmanager
def daemon(base: Path, enabled: bool) -> Iterator[str | None]:
    if not enabled:
        yield None
        return
    sys.path.insert(0, str(HERE.parent / "tests"))
    from servers import git_daemon

    base.mkdir(exist_ok=True)
    with git_daemon(base) as prefix:
        yield prefix


# ------------------------------------------------------------------ the two tools


def run_theta(root: Path, src: Path, v2_names: list[str], hashes: dict[str, str], flog: Path, use_daemon: bool) -> dict[str, Step]:
    out: dict[str, Step] = {}
    remote = root / "theta-remote.git"
    work = root / "theta-work"
    sh(root, "git", "init", "-q", "--bare", "-b", "main", str(remote))
    sh(root, "git", "init", "-q", "-b", "main", str(work))
    sh(work, "git", "remote", "add", "origin", f"file://{remote}")
    sh(work, *THETA, "track", "*.safetensors")
    sh(work, "git", "commit", "-q", "-m", "attributes")
    model = work / "model.safetensors"
    shutil.copyfile(src, model)
    out["add"] = run_timed(work, [*THETA, "add", "model.safetensors"])
    sh(work, "git", "commit", "-q", "-m", "v1")
    sh(work, "git", "tag", "v1")
    fine_tune(model, v2_names)
    assert digest(model) == hashes["v2"]
    out["git_add"] = run_timed(work, ["git", "add", "model.safetensors"], filter_log=flog)
    sh(work, "git", "commit", "-q", "-m", "v2")
    model.unlink()
    out["restore"] = run_timed(work, [*THETA, "restore", "model.safetensors"])
    assert digest(model) == hashes["v2"]
    out["checkout_old"] = run_timed(work, ["git", "checkout", "-q", "v1"], filter_log=flog)
    assert digest(model) == hashes["v1"]
    out["checkout_back"] = run_timed(work, ["git", "checkout", "-q", "main"], filter_log=flog)
    assert digest(model) == hashes["v2"]
    out["git_push"] = run_timed(work, ["git", "push", "-q", "origin", "main", "v1"])
    other = root / "theta-remote2.git"
    sh(root, "git", "init", "-q", "--bare", "-b", "main", str(other))
    sh(work, "git", "remote", "add", "other", f"file://{other}")
    run_timed(work, ["git", "push", "-q", "other", "main", "v1"], env={"THETA_STORE_SKIP_PUSH": "1"})
    out["theta_push"] = run_timed(work, [*THETA, "push", "other", "--all"])
    shutil.rmtree(other)
    with daemon(root / "served", use_daemon) as prefix:
        if prefix is not None:
            served = root / "served" / "d.git"
            sh(root, "git", "init", "-q", "--bare", "-b", "main", str(served))
            sh(work, "git", "remote", "add", "daemon", f"{prefix}/d.git")
            out["git_push_daemon"] = run_timed(work, ["git", "push", "-q", "daemon", "main", "v1"])
            shutil.rmtree(served)
    shutil.rmtree(work)
    clone = root / "theta-clone"
    out["git_clone"] = run_timed(root, ["git", "clone", "-q", f"file://{remote}", str(clone)], filter_log=flog)
    assert digest(clone / "model.safetensors") == hashes["v2"]
    shutil.rmtree(clone)
    out["skip_clone"] = run_timed(root, ["git", "clone", "-q", f"file://{remote}", str(clone)], env={"THETA_STORE_SKIP_SMUDGE": "1"})
    out["pull"] = run_timed(clone, [*THETA, "pull"])
    assert digest(clone / "model.safetensors") == hashes["v2"]
    shutil.rmtree(clone)
    shutil.rmtree(remote)
    return out


def run_lfs(root: Path, src: Path, v2_names: list[str], hashes: dict[str, str], flog: Path) -> dict[str, Step]:
    out: dict[str, Step] = {}
    remote = root / "lfs-remote.git"
    work = root / "lfs-work"
    sh(root, "git", "init", "-q", "--bare", "-b", "main", str(remote))
    sh(root, "git", "init", "-q", "-b", "main", str(work))
    sh(work, "git", "remote", "add", "origin", f"file://{remote}")
    sh(work, "git", "lfs", "track", "*.safetensors")
    sh(work, "git", "add", ".gitattributes")
    sh(work, "git", "commit", "-q", "-m", "attributes")
    model = work / "model.safetensors"
    shutil.copyfile(src, model)
    out["git_add_v1"] = run_timed(work, ["git", "add", "model.safetensors"], filter_log=flog)
    sh(work, "git", "commit", "-q", "-m", "v1")
    sh(work, "git", "tag", "v1")
    fine_tune(model, v2_names)
    out["git_add"] = run_timed(work, ["git", "add", "model.safetensors"], filter_log=flog)
    sh(work, "git", "commit", "-q", "-m", "v2")
    out["checkout_old"] = run_timed(work, ["git", "checkout", "-q", "v1"], filter_log=flog)
    assert digest(model) == hashes["v1"]
    out["checkout_back"] = run_timed(work, ["git", "checkout", "-q", "main"], filter_log=flog)
    assert digest(model) == hashes["v2"]
    out["git_push"] = run_timed(work, ["git", "push", "-q", "origin", "main", "v1"])
    other = root / "lfs-remote2.git"
    sh(root, "git", "init", "-q", "--bare", "-b", "main", str(other))
    sh(work, "git", "remote", "add", "other", f"file://{other}")
    out["lfs_push"] = run_timed(work, ["git", "lfs", "push", "--all", "other"])
    shutil.rmtree(other)
    shutil.rmtree(work)
    clone = root / "lfs-clone"
    out["git_clone"] = run_timed(root, ["git", "clone", "-q", f"file://{remote}", str(clone)], filter_log=flog)
    assert digest(clone / "model.safetensors") == hashes["v2"]
    shutil.rmtree(clone)
    out["skip_clone"] = run_timed(root, ["git", "clone", "-q", f"file://{remote}", str(clone)], env={"GIT_LFS_SKIP_SMUDGE": "1"})
    out["pull"] = run_timed(clone, ["git", "lfs", "pull"])
    assert digest(clone / "model.safetensors") == hashes["v2"]
    shutil.rmtree(clone)
    shutil.rmtree(remote)
    return out


def run_plain(root: Path, src: Path) -> dict[str, Step]:
    dst = root / "copy.safetensors"
    out = {"cp": run_timed(root, ["cp", str(src), str(dst)]), "sha256sum": run_timed(root, ["sha256sum", str(src)])}
    dst.unlink()
    return out


# ------------------------------------------------------------------ report

# (label, our step, our figure: "tree" or "filter", baseline tool, baseline step)
ROWS = [
    ("theta-store add", "add", "tree", "plain", "sha256sum"),
    ("git add v2 (deltas), whole tree", "git_add", "tree", "lfs", "git_add"),
    ("git add v2, filter process", "git_add", "filter", "lfs", "git_add"),
    ("theta-store restore", "restore", "tree", "plain", "cp"),
    ("git checkout v1, whole tree", "checkout_old", "tree", "lfs", "checkout_old"),
    ("git checkout v1, filter process", "checkout_old", "filter", "lfs", "checkout_old"),
    ("git checkout main, filter process", "checkout_back", "filter", "lfs", "checkout_back"),
    ("git push (file://)", "git_push", "tree", "lfs", "git_push"),
    ("theta-store push --all / git lfs push --all", "theta_push", "tree", "lfs", "lfs_push"),
    ("git push (file://)", "git_push", "tree", "plain", "cp"),
    ("git push (git daemon)", "git_push_daemon", "tree", "plain", "cp"),
    ("git clone, whole tree", "git_clone", "tree", "lfs", "git_clone"),
    ("git clone, filter process", "git_clone", "filter", "lfs", "git_clone"),
    ("clone, smudge skipped", "skip_clone", "tree", "lfs", "skip_clone"),
    ("theta-store pull / git lfs pull", "pull", "tree", "lfs", "pull"),
]


# Steps where git itself keeps the smudged file in memory: the whole tree's figure is git's.
GIT_HOLDS_FILE = {"checkout_old", "checkout_back", "git_clone"}


def median_steps(runs: list[dict[str, Step]]) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    for k in runs[0]:
        fr = [r[k].filter_rss for r in runs if r[k].filter_rss is not None]
        out[k] = {
            "rss_mb": statistics.median(r[k].rss for r in runs),
            "secs": statistics.median(r[k].secs for r in runs),
            "filter_rss_mb": statistics.median(fr) if fr else None,
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=4.0)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--dir", default=None, help="where the copies go (default: $TMPDIR)")
    ap.add_argument("--no-daemon", action="store_true", help="skip the push to git daemon")
    args = ap.parse_args()
    ensure_tools()
    root = Path(tempfile.mkdtemp(prefix="theta-bounds-", dir=args.dir))
    cfg = root / "gitconfig"
    cfg.write_text("")
    ENV["GIT_CONFIG_GLOBAL"] = str(cfg)
    os.environ["GIT_CONFIG_GLOBAL"] = str(cfg)
    try:
        need_disk(root, args.gb * 5.5)
        sh(root, *THETA, "install", "--global")
        sh(root, "git", "lfs", "install")
        flog = root / "filter-rss.log"
        wrap_filters(flog)
        spec = model_spec(int(args.gb * 1e9))
        src = root / "v1.safetensors"
        write_model(src, spec)
        hashes = {"v1": digest(src)}
        v2_names = [spec[0][0], *[n for n, _, _ in spec if n.endswith(("up_proj.weight", "down_proj.weight"))][1:3]]
        tmp = root / "v2.safetensors"
        shutil.copyfile(src, tmp)
        fine_tune(tmp, v2_names)
        hashes["v2"] = digest(tmp)
        tmp.unlink()
        size = src.stat().st_size
        largest = max(int(np.prod(s)) * (4 if d == "F32" else 2) for _, d, s in spec)
        runs: dict[str, list[dict[str, Step]]] = {"theta": [], "lfs": [], "plain": []}
        for _ in range(args.runs):
            runs["plain"].append(run_plain(root, src))
            runs["theta"].append(run_theta(root, src, v2_names, hashes, flog, not args.no_daemon))
            runs["lfs"].append(run_lfs(root, src, v2_names, hashes, flog))
        res = {tool: median_steps(rs) for tool, rs in runs.items()}
        write_json("bounds", {"bytes": size, "largest_tensor": largest, "tensors": len(spec), "runs": args.runs, **res})
        print(
            f"\n== {size / 1e9:.2f} GB safetensors, {len(spec)} tensors, largest {largest / 1e6:.0f} MB; "
            f"{'one run' if args.runs == 1 else f'median of {args.runs}'}; peak RSS MB (target <= {LIMIT_MB:.0f} for ours)"
        )
        print(f"{'step':46} {'ours MB':>8} {'ours s':>7}  {'baseline':26} {'MB':>7} {'s':>7} {'RSS x':>7} {'time x':>7}")
        for label, key, what, btool, bkey in ROWS:
            if key not in res["theta"]:
                continue
            o = res["theta"][key]
            b = res[btool][bkey]
            om = o["rss_mb"] if what == "tree" else o["filter_rss_mb"]
            bm = b["rss_mb"] if what == "tree" else b["filter_rss_mb"]
            bname = {"plain": bkey, "lfs": "Git LFS, same step"}[btool]
            if btool == "lfs" and key in ("git_push", "theta_push"):
                bname = "Git LFS (hardlinks objects)"  # git-lfs links, not copies, into a local remote
            ours = what == "filter" or key not in GIT_HOLDS_FILE
            flag = " > limit" if ours and om is not None and om > LIMIT_MB else ""
            ratio = f"{om / bm:7.2f}" if om and bm else "      -"
            tratio = f"{o['secs'] / b['secs']:7.2f}" if b["secs"] else "      -"
            oms = f"{om:8.0f}" if om is not None else "       -"
            bms = f"{bm:7.0f}" if bm is not None else "      -"
            print(f"{label:46} {oms} {o['secs']:7.1f}  {bname:26} {bms} {b['secs']:7.1f} {ratio} {tratio}{flag}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
