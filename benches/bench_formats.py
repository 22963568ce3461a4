"""Issue 4 benchmark: add + commit and restore throughput per checkpoint format, beside Git LFS.

The same seeded BERT-like fp32 weights (randn * 0.02, ~400 MB) are written as safetensors, a
torch.save zip (by torch if it is importable, else by hand the way torch lays it out), an .npz
(stored), one .npy (all weights concatenated), a Flax msgpack file and a GGUF file. For each file, in
the same run: `theta-store add` + `git commit`, `theta-store restore` of the deleted file, and Git LFS
`git add` + `git commit` and `git checkout` of the same file; also the adapter's parse time alone.
Figure of the issue: no format more than 1.5x slower (per byte) than safetensors.

    python benches/bench_formats.py             # ~400 MB model, 3 runs (medians)
    python benches/bench_formats.py --quick     # 20M params, 1 run (smoke test)
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import shutil
import struct
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import blake3
import msgpack
import numpy as np

from common import bert_like, dir_bytes, fresh_repo, median, sh, timed, write_json
from theta_store import detect, save_safetensors

Weights = dict[str, np.ndarray]
LIMIT = 1.5
TORCH_BY_HAND = False


# ----------------------------------------------------------------------------- writers (one per format)
def write_safetensors(path: Path, w: Weights) -> None:
    save_safetensors(str(path), w)


def _pickle_state_dict(w: Weights) -> bytes:
    """The data.pkl torch.save writes for a state_dict of contiguous fp32 tensors (protocol 2)."""

    def s(x: str) -> bytes:
        b = x.encode()
        return b"X" + struct.pack("<I", len(b)) + b

    def i(n: int) -> bytes:
        return b"K" + bytes([n]) if 0 <= n < 256 else b"M" + struct.pack("<H", n) if n < 65536 else b"J" + struct.pack("<i", n)

    def tup(xs: list[bytes]) -> bytes:
        return b"(" + b"".join(xs) + b"t" if xs else b")"

    def glob(module: str, name: str) -> bytes:
        return b"c" + f"{module}\n{name}\n".encode()

    body = b""
    for key, (name, a) in enumerate(w.items()):
        shape = a.shape
        stride = tuple(int(np.prod(shape[j + 1 :])) for j in range(len(shape)))
        pid = tup([s("storage"), glob("torch", "FloatStorage"), s(str(key)), s("cpu"), i(a.size)])
        body += (
            s(name)
            + glob("torch._utils", "_rebuild_tensor_v2")
            + b"("
            + pid
            + b"Q"
            + i(0)
            + tup([i(x) for x in shape])
            + tup([i(x) for x in stride])
            + b"\x89"
            + glob("collections", "OrderedDict")
            + b")R"
            + b"tR"
        )
    return b"\x80\x02" + glob("collections", "OrderedDict") + b")R(" + body + b"u."


def _aligned_member(z: zipfile.ZipFile, name: str, data: bytes | memoryview, align: int = 64) -> None:
    """A stored member whose data starts on an `align`-byte boundary, as torch's writer pads them."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    header = 30 + len(name.encode())
    pad = -(z.fp.tell() + header + 4) % align  # type: ignore[union-attr]
    info.extra = struct.pack("<HH", 0x4246, pad) + bytes(pad)  # "FB" padding field, as torch writes
    with z.open(info, "w") as f:
        f.write(data)


def torch_module() -> Any:
    """The torch package if it is importable and not turned off by --torch-by-hand, else None."""
    if TORCH_BY_HAND:
        return None
    try:
        import torch
    except ImportError:
        return None
    return torch


def write_torch(path: Path, w: Weights) -> None:
    torch = torch_module()
    if torch is not None:
        torch.save({k: torch.from_numpy(v) for k, v in w.items()}, str(path))
        return
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        _aligned_member(z, "model/data.pkl", _pickle_state_dict(w))
        _aligned_member(z, "model/byteorder", b"little")
        for key, a in enumerate(w.values()):
            _aligned_member(z, f"model/data/{key}", np.ascontiguousarray(a).data.cast("B"))
        _aligned_member(z, "model/version", b"3\n")


def write_npz(path: Path, w: Weights) -> None:
    savez: Any = np.savez
    savez(path, **w)  # ZIP_STORED members


def write_npy(path: Path, w: Weights) -> None:
    np.save(path, np.concatenate([a.ravel() for a in w.values()]))


def write_flax(path: Path, w: Weights) -> None:
    """flax.serialization.to_bytes of the nested params dict: ndarrays as msgpack ext type 1."""
    tree: dict[str, Any] = {}
    for name, a in w.items():
        *parents, leaf = name.split(".")
        node = tree
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = a
    packer = msgpack.Packer(use_bin_type=True)
    with open(path, "wb") as f:

        def emit(node: Any) -> None:
            if isinstance(node, dict):
                f.write(packer.pack_map_header(len(node)))
                for k, v in node.items():
                    f.write(packer.pack(k))
                    emit(v)
            else:
                payload = packer.pack([list(node.shape), node.dtype.name, node.tobytes()])
                f.write(packer.pack(msgpack.ExtType(1, payload)))

        f.write(packer.pack_map_header(1))
        f.write(packer.pack("params"))
        emit(tree)


def write_gguf(path: Path, w: Weights, align: int = 32) -> None:
    def s(x: str) -> bytes:
        return struct.pack("<Q", len(x.encode())) + x.encode()

    kv = s("general.architecture") + struct.pack("<I", 8) + s("bert") + s("general.alignment") + struct.pack("<II", 4, align)
    infos, offsets, pos = b"", [], 0
    for name, a in w.items():
        pos += -pos % align
        ne = list(reversed(a.shape))
        infos += s(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", d) for d in ne) + struct.pack("<IQ", 0, pos)
        offsets.append(pos)
        pos += a.nbytes
    head = b"GGUF" + struct.pack("<IQQ", 3, len(w), 2) + kv + infos
    with open(path, "wb") as f:
        f.write(head + bytes(-len(head) % align))
        written = 0
        for off, a in zip(offsets, w.values(), strict=True):
            f.write(bytes(off - written))
            f.write(np.ascontiguousarray(a).data.cast("B"))
            written = off + a.nbytes


def model_weights(n_params: int) -> Weights:
    """bert_like's seeded weights; below its smallest size (~86M params), its first tensors up to n_params."""
    full = bert_like(max(n_params, 1))
    out: Weights = {}
    total = 0
    for name, a in full.items():
        if total and total + a.size > n_params:
            break
        out[name] = a
        total += a.size
    return out


FORMATS: dict[str, tuple[str, Callable[[Path, Weights], None]]] = {
    "safetensors": (".safetensors", write_safetensors),
    "torch": (".pt", write_torch),
    "npz": (".npz", write_npz),
    "npy": (".npy", write_npy),
    "flax": (".msgpack", write_flax),
    "gguf": (".gguf", write_gguf),
}


# ----------------------------------------------------------------------------- one round per format
def digest(path: Path) -> bytes:
    return blake3.blake3(max_threads=blake3.blake3.AUTO).update_mmap(str(path)).digest()


CPU: dict[str, float] = {}  # CPU seconds (user + sys) of the child processes of the last settled() call


def settled(fn: Callable[[], object]) -> float:
    """Wall time of `fn` after flushing dirty pages, so one step does not pay for the previous one's
    writeback; its children's CPU time goes to CPU["last"] (robust to other load on the machine)."""
    os.sync()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = timed(fn)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU["last"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall


def place(model: Path, repo: Path) -> Path:
    """Copy the checkpoint into the work tree, dated a minute ago as a checkpoint saved earlier would be.

    A file modified in the same second as the index is written is "racily clean" to git (second
    granularity): the next `git commit` re-hashes all of it (0.7 s per 70 MB), for LFS and theta-store alike.
    """
    dest = repo / model.name
    shutil.copy(model, dest)
    old = time.time() - 60
    os.utime(dest, (old, old))
    return dest


def run_theta(model: Path, work: Path) -> dict[str, float]:
    repo = fresh_repo(work, "theta")
    empty = dir_bytes(repo / ".git/objects")
    dest = place(model, repo)
    add = settled(lambda: (sh(repo, "theta-store", "-q", "add", dest.name), sh(repo, "git", "commit", "-q", "-m", "v1")))
    add_cpu = CPU["last"]
    stored = dir_bytes(repo / ".git/objects") - empty
    want = digest(dest)
    dest.unlink()
    restore = settled(lambda: sh(repo, "theta-store", "-q", "restore", dest.name))
    restore_cpu = CPU["last"]
    if digest(dest) != want:
        raise AssertionError(f"{dest.name}: restored bytes differ from the original")
    shutil.rmtree(repo)
    return {"add": add, "restore": restore, "add_cpu": add_cpu, "restore_cpu": restore_cpu, "stored": stored}


def run_lfs(model: Path, work: Path) -> dict[str, float]:
    repo = fresh_repo(work, "lfs")
    sh(repo, "git", "lfs", "track", model.name)
    sh(repo, "git", "add", ".gitattributes")
    sh(repo, "git", "commit", "-q", "-m", "attrs")
    dest = place(model, repo)
    add = settled(lambda: (sh(repo, "git", "add", dest.name), sh(repo, "git", "commit", "-q", "-m", "v1")))
    dest.unlink()
    restore = settled(lambda: sh(repo, "git", "checkout", "--", dest.name))
    if dest.stat().st_size != model.stat().st_size:
        raise AssertionError(f"{dest.name}: LFS checkout has the wrong size")
    shutil.rmtree(repo)
    return {"add": add, "restore": restore}


def bench(models: dict[str, Path], work: Path, runs: int) -> dict[str, dict[str, Any]]:
    steps = ("parse", "theta_add", "theta_restore", "theta_add_cpu", "theta_restore_cpu", "lfs_add", "lfs_restore")
    times: dict[str, dict[str, list[float]]] = {f: {k: [] for k in steps} for f in models}
    stored: dict[str, float] = {}
    for run in range(runs):
        for fmt, model in models.items():  # formats interleaved within a run: noise spreads over all of them
            t = times[fmt]
            t["parse"].append(timed(functools.partial(detect, model)))
            theta = run_theta(model, work)
            lfs = run_lfs(model, work)
            t["theta_add"].append(theta["add"])
            t["theta_restore"].append(theta["restore"])
            t["theta_add_cpu"].append(theta["add_cpu"])
            t["theta_restore_cpu"].append(theta["restore_cpu"])
            t["lfs_add"].append(lfs["add"])
            t["lfs_restore"].append(lfs["restore"])
            stored[fmt] = theta["stored"]
            print(
                f"run {run + 1}/{runs} {fmt:12} theta add {theta['add']:.2f} s, restore {theta['restore']:.2f} s"
                f" | LFS add {lfs['add']:.2f} s, checkout {lfs['restore']:.2f} s",
                flush=True,
            )
    out: dict[str, dict[str, Any]] = {}
    for fmt, model in models.items():
        layout = detect(model)
        size = model.stat().st_size
        med = {k: median(v) for k, v in times[fmt].items()}
        out[fmt] = {
            "file": model.name,
            "bytes": size,
            "tensors": len(layout.regions),
            "tensor_bytes": sum(r.length for r in layout.regions),
            "format_detected": layout.format,
            "stored_bytes": stored[fmt],
            "seconds": med,
            "all_seconds": times[fmt],
            "add_mb_s": size / 1e6 / med["theta_add"],
            "restore_mb_s": size / 1e6 / med["theta_restore"],
        }
    base = out["safetensors"]
    for v in out.values():
        # slowdown per byte relative to safetensors (files differ by their skeletons only)
        v["add_vs_safetensors"] = base["add_mb_s"] / v["add_mb_s"]
        v["restore_vs_safetensors"] = base["restore_mb_s"] / v["restore_mb_s"]
        for step in ("add", "restore"):  # the same per byte of CPU time: what the machine's other load does not change
            per_byte = v["seconds"][f"theta_{step}_cpu"] / v["bytes"]
            v[f"{step}_cpu_vs_safetensors"] = per_byte / (base["seconds"][f"theta_{step}_cpu"] / base["bytes"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--params", type=float, default=100e6, help="parameters of the BERT-like model (100e6 -> ~400 MB fp32)")
    ap.add_argument("--formats", default=",".join(FORMATS), help="comma-separated subset of " + ",".join(FORMATS))
    ap.add_argument("--quick", action="store_true", help="20M params, 1 run (smoke test)")
    ap.add_argument("--torch-by-hand", action="store_true", help="write the .pt file by hand even if torch is importable")
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    global TORCH_BY_HAND
    TORCH_BY_HAND = args.torch_by_hand
    if args.quick:
        args.runs, args.params = 1, 20e6
    formats = args.formats.split(",")
    if "safetensors" not in formats:
        formats.insert(0, "safetensors")
    if not shutil.which("git-lfs"):
        raise SystemExit("git-lfs is not installed (apt-get install git-lfs)")
    sh(Path.cwd(), "git", "lfs", "install", "--skip-repo")
    work = args.work or Path(tempfile.mkdtemp(prefix="theta-bench-formats-"))
    work.mkdir(parents=True, exist_ok=True)
    weights = model_weights(int(args.params))
    models: dict[str, Path] = {}
    for fmt in formats:
        suffix, write = FORMATS[fmt]
        models[fmt] = work / f"model{suffix}"
        write(models[fmt], weights)
    del weights
    res = bench(models, work, args.runs)
    torch_writer = "by torch.save" if torch_module() is not None else "by hand (as torch.save lays it out)"
    write_json("formats", {"runs": args.runs, "params": args.params, "torch_writer": torch_writer, "formats": res, "limit": LIMIT})

    mb = res["safetensors"]["bytes"] / 1e6
    print(f"\n== add + commit and restore per format, {mb:.0f} MB fp32 model (median of {args.runs}); torch file written {torch_writer}")
    head = (
        f"{'format':12} {'MB':>6} {'tensors':>7} {'parse s':>7} | {'add s':>5} {'MB/s':>5} {'vs st':>6} {'cpu s':>5} {'vs st':>6}"
        f" {'LFS add':>7} | {'restore':>7} {'MB/s':>5} {'vs st':>6} {'cpu s':>5} {'vs st':>6} {'LFS co':>6} | {'stored/raw':>10}"
    )
    print(head)
    worst = 0.0
    for fmt, v in res.items():
        s = v["seconds"]
        worst = max(worst, v["add_vs_safetensors"], v["restore_vs_safetensors"])
        print(
            f"{fmt:12} {v['bytes'] / 1e6:6.1f} {v['tensors']:7d} {s['parse']:7.3f} |"
            f" {s['theta_add']:5.2f} {v['add_mb_s']:5.0f} {v['add_vs_safetensors']:5.2f}x"
            f" {s['theta_add_cpu']:5.2f} {v['add_cpu_vs_safetensors']:5.2f}x {s['lfs_add']:7.2f} |"
            f" {s['theta_restore']:7.2f} {v['restore_mb_s']:5.0f} {v['restore_vs_safetensors']:5.2f}x"
            f" {s['theta_restore_cpu']:5.2f} {v['restore_cpu_vs_safetensors']:5.2f}x {s['lfs_restore']:6.2f} |"
            f" {v['stored_bytes'] / v['bytes']:10.3f}"
        )
    print("add = theta-store add + git commit; restore = theta-store restore of the deleted file; vs st = per byte, vs safetensors;")
    print("cpu s = user + sys of the commands; LFS add = git add + git commit, LFS co = git checkout, with git-lfs")
    verdict = "ok" if worst <= LIMIT else "OVER"
    print(f"slowest format vs safetensors (wall time per byte): {worst:.2f}x (limit {LIMIT}x): {verdict}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
