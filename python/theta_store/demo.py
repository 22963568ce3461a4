"""`theta-store demo`: a small model, several versions, restores, and the storage table."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from . import _native
from .formats.safetensors import save
from .repo import Repo

GIT_ENV = {
    "GIT_AUTHOR_NAME": "demo",
    "GIT_AUTHOR_EMAIL": "demo@example.com",
    "GIT_COMMITTER_NAME": "demo",
    "GIT_COMMITTER_EMAIL": "demo@example.com",
    "GIT_CONFIG_NOSYSTEM": "1",
}


def make_model(seed: int = 0, layers: int = 4, hidden: int = 256, vocab: int = 8000) -> dict[str, np.ndarray]:
    """A BERT-like state dict of float32 weights (randn * 0.02)."""
    rng = np.random.default_rng(seed)
    m: dict[str, np.ndarray] = {"embeddings.word.weight": (rng.standard_normal((vocab, hidden)) * 0.02).astype(np.float32)}
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for name in ("query", "key", "value", "output"):
            m[p + f"attention.{name}.weight"] = (rng.standard_normal((hidden, hidden)) * 0.02).astype(np.float32)
            m[p + f"attention.{name}.bias"] = np.zeros(hidden, np.float32)
        m[p + "ffn.in.weight"] = (rng.standard_normal((4 * hidden, hidden)) * 0.02).astype(np.float32)
        m[p + "ffn.out.weight"] = (rng.standard_normal((hidden, 4 * hidden)) * 0.02).astype(np.float32)
        m[p + "norm.weight"] = np.ones(hidden, np.float32)
        m[p + "norm.bias"] = np.zeros(hidden, np.float32)
    return m


def versions(base: dict[str, np.ndarray]) -> list[tuple[str, dict[str, np.ndarray]]]:
    rng = np.random.default_rng(1)
    v2 = dict(base)
    v2["encoder.layer.0.attention.output.bias"] = base["encoder.layer.0.attention.output.bias"] + np.float32(0.01)
    v3 = dict(v2)
    for name in (
        "encoder.layer.0.attention.query.weight",
        "encoder.layer.0.attention.value.weight",
        "encoder.layer.1.attention.query.weight",
        "encoder.layer.1.attention.value.weight",
    ):
        w = v3[name]
        a = (rng.standard_normal((w.shape[0], 8)) * 0.01).astype(np.float32)
        b = (rng.standard_normal((8, w.shape[1])) * 0.01).astype(np.float32)
        v3[name] = w + a @ b
    v4 = dict(v3)
    for name in ("encoder.layer.2.ffn.in.weight", "encoder.layer.2.ffn.out.weight", "encoder.layer.3.attention.key.weight"):
        w = v4[name].copy()
        idx = rng.choice(w.size, w.size // 100, replace=False)
        w.flat[idx] += np.float32(1e-3)
        v4[name] = w
    return [("initial weights", base), ("one bias changed", v2), ("LoRA r=8 folded into 4 matrices", v3), ("1% of 3 matrices changed", v4)]


def _git(cwd: str, *args: str) -> str:
    env = dict(os.environ, **GIT_ENV)
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout.strip()


def run_demo(directory: str | None = None, json_out: bool = False, quiet: bool = False) -> int:
    work = directory or tempfile.mkdtemp(prefix="theta-store-demo-")
    os.makedirs(work, exist_ok=True)
    say = (lambda *a: None) if (json_out or quiet) else print
    say(f"theta-store demo in {work}")
    _git(work, "init", "-q", "-b", "main")
    path = os.path.join(work, "model.safetensors")
    rows: list[dict[str, Any]] = []
    commits: list[tuple[str, bytes]] = []
    with Repo(work) as repo:
        for i, (what, tensors) in enumerate(versions(make_model()), 1):
            save(path, tensors, {"format": "pt"})
            added = repo.add([path], progress=False)[0]
            _git(work, "commit", "-q", "-m", f"v{i}: {what}")
            commits.append((_git(work, "rev-parse", "HEAD"), _native.chunk_id(Path(path).read_bytes())))
            rows.append(
                {
                    "version": f"v{i}",
                    "change": what,
                    "raw": added.size,
                    "new": added.new_bytes,
                    "new_chunks": added.new_chunks,
                    "reused_chunks": added.reused_chunks,
                }
            )
            say(
                f"  v{i} ({what}): {added.new_chunks} new chunks, {added.new_bytes / 1e6:.2f} MB stored; "
                f"{added.reused_chunks} chunks reused"
            )
        # Restore every version from its commit and check it byte for byte.
        for i, (commit, digest) in enumerate(commits, 1):
            os.unlink(path)
            repo.restore([path], rev=commit, progress=False)
            ok = _native.chunk_id(Path(path).read_bytes()) == digest
            rows[i - 1]["restored_exact"] = ok
            if not ok:
                raise SystemExit(f"demo: v{i} did not restore byte-exactly")
        say(f"  restored all {len(commits)} versions from their commits: byte-identical")
        fsck = repo.fsck(progress=False)
        stats = repo.stats()
    total_raw = sum(r["raw"] for r in rows)
    if json_out:
        print(
            json.dumps(
                {"dir": work, "versions": rows, "fsck_ok": fsck["ok"], "stored_bytes": stats["stored_bytes"], "raw_bytes": total_raw},
                indent=2,
            )
        )
        return 0 if fsck["ok"] else 1
    if not quiet:
        print("\nstorage (what each commit added to .git; Git LFS would store the whole file each time)")
        print(f"{'version':8} {'change':34} {'raw MB':>8} {'stored MB':>10} {'ratio':>7} {'Git LFS MB':>11}")
        for r in rows:
            print(
                f"{r['version']:8} {r['change']:34} {r['raw'] / 1e6:8.2f} {r['new'] / 1e6:10.3f} "
                f"{r['new'] / r['raw']:7.3f} {r['raw'] / 1e6:11.2f}"
            )
        print(
            f"{'total':8} {'':34} {total_raw / 1e6:8.2f} {stats['stored_bytes'] / 1e6:10.3f} "
            f"{stats['stored_bytes'] / total_raw:7.3f} {total_raw / 1e6:11.2f}"
        )
        print(f"\nfsck: {'ok' if fsck['ok'] else fsck['problems']}")
    return 0 if fsck["ok"] else 1
