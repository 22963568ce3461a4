"""Property: whatever a tensor and its change, a version stored as deltas against the one before
restores to exactly its bytes (every float dtype, every kind of change, chunks of any size)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import theta_store
from theta_store.checkpoint import add_file, restore_to
from theta_store.gitstore import GitStore

DTYPES = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "I32": np.int32}
CHANGES = ("none", "sparse", "low-rank", "dense", "bits")


def _tensor(rng: np.random.Generator, dtype: str, shape: tuple[int, int]) -> np.ndarray[Any, Any]:
    if dtype == "I32":
        return rng.integers(-1000, 1000, shape, dtype=np.int32)
    return (rng.standard_normal(shape) * 0.02).astype(DTYPES[dtype])


def _change(rng: np.random.Generator, t: np.ndarray[Any, Any], kind: str) -> np.ndarray[Any, Any]:
    out = t.copy()
    if kind == "sparse":
        idx = rng.choice(t.size, max(1, t.size // 50), replace=False)
        out.reshape(-1)[idx] = _tensor(rng, "F32", (1, idx.size)).reshape(-1).astype(t.dtype) if t.dtype != np.int32 else 7
    elif kind == "low-rank" and t.dtype != np.int32:
        r = int(rng.integers(1, 4))
        upd = rng.standard_normal((t.shape[0], r)) @ rng.standard_normal((r, t.shape[1])) * 1e-3
        out = (t.astype(np.float32) + upd.astype(np.float32)).astype(t.dtype)
    elif kind == "dense" and t.dtype != np.int32:
        out = (t.astype(np.float32) + rng.standard_normal(t.shape).astype(np.float32) * np.float32(1e-4)).astype(t.dtype)
    elif kind == "bits":  # arbitrary bit patterns: NaNs, infinities, subnormals
        raw = out.reshape(-1).view(f"u{t.dtype.itemsize}")
        idx = rng.choice(t.size, max(1, t.size // 3), replace=False)
        raw[idx] = rng.integers(0, 2 ** (8 * t.dtype.itemsize) - 1, idx.size, dtype=np.uint64).astype(raw.dtype)
    return out


def _save(path: Path, tensors: dict[str, np.ndarray[Any, Any]]) -> bytes:
    theta_store.save_safetensors(
        str(path), {k: (v.view(np.uint16), "BF16") if v.dtype == ml_dtypes.bfloat16 else v for k, v in tensors.items()}
    )
    return path.read_bytes()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    dtype=st.sampled_from(sorted(DTYPES)),
    rows=st.integers(2, 96),
    cols=st.integers(2, 96),
    kinds=st.lists(st.sampled_from(CHANGES), min_size=1, max_size=3),
    chunk=st.sampled_from([256, 1024, 4096]),
    seed=st.integers(0, 2**32 - 1),
)
def test_every_delta_restores_exactly(
    tmp_path_factory: Any, dtype: str, rows: int, cols: int, kinds: list[str], chunk: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    repo = tmp_path_factory.mktemp("repo")
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    v1 = {f"t{i}": _tensor(rng, dtype, (rows, cols)) for i in range(len(kinds))}
    v2 = {name: _change(rng, t, kind) for (name, t), kind in zip(v1.items(), kinds, strict=True)}
    with GitStore(repo) as store:
        want1 = _save(repo / "m.safetensors", v1)
        first = add_file(store, str(repo / "m.safetensors"), chunk_bytes=chunk)
        want2 = _save(repo / "m.safetensors", v2)
        second = add_file(store, str(repo / "m.safetensors"), chunk_bytes=chunk, base=first.pointer, max_depth=1)
        for pointer, want in ((second.pointer, want2), (first.pointer, want1)):
            restore_to(store, pointer, str(repo / "out.safetensors"))
            assert (repo / "out.safetensors").read_bytes() == want
