"""Opt-in lossy storage: `theta-store add --lossy low-rank:rtol=T` (or `:rank=R`).

Each 2-D float tensor that changed since the base version is replaced by the base plus a
low-rank approximation of the change (factors from the core, reconstructed there bit for bit),
in the working file too, so that what is stored is exactly what the user then has and
`git status` stays clean. The add then stores those tensors as the factors alone (their residual
is zero), and the manifest records which tensors are approximations and how close they are.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import _native
from .checkpoint import Factors, Scanned
from .errors import InvalidArgument
from .plan import load_manifest
from .reader import CheckpointReader

if TYPE_CHECKING:
    from .gitstore import GitStore
    from .pointer import Pointer

__all__ = ["LossySpec", "apply_lossy", "parse_spec"]

_FLOATS = {"F16", "BF16", "F32", "F64"}
# The most factors a lossy tensor may keep (beyond it the tensor stays exact).
MAX_RANK = 256


@dataclass(frozen=True)
class LossySpec:
    rank: int | None = None
    rtol: float | None = None

    def __str__(self) -> str:
        return "low-rank:" + (f"rank={self.rank}" if self.rank is not None else f"rtol={self.rtol:g}")


def parse_spec(spec: str) -> LossySpec:
    """`low-rank:rtol=T` or `low-rank:rank=R`."""
    m = re.fullmatch(r"low-rank:(rank|rtol)=([0-9.eE+-]+)", spec.strip())
    hint = "--lossy low-rank:rtol=1e-3 (relative error per tensor) or --lossy low-rank:rank=16"
    if m is None:
        raise InvalidArgument(f"--lossy {spec!r}: not a lossy method this version knows", hint=hint)
    try:
        if m[1] == "rank":
            rank = int(m[2])
            if not 1 <= rank <= MAX_RANK:
                raise ValueError
            return LossySpec(rank=rank)
        rtol = float(m[2])
        if not (0 < rtol < 1 and math.isfinite(rtol)):
            raise ValueError
        return LossySpec(rtol=rtol)
    except ValueError:
        raise InvalidArgument(f"--lossy {spec!r}: {m[1]} out of range", hint=hint) from None


def apply_lossy(store: GitStore, scanned: Scanned, base: Pointer, spec: LossySpec) -> tuple[dict[str, Factors], dict[str, dict[str, Any]]]:
    """Rewrite the changed 2-D float tensors of the file `scanned` describes as base + low-rank
    approximation (in place, atomically: a copy renamed over it). Returns the factors per tensor
    (for the add) and what the manifest records per tensor ({"method", "rank", "rel_err"}).
    A tensor whose approximation misses `rtol` at the largest rank stays exact."""
    bm = load_manifest(store, base.manifest_id)
    btensors = {s.name: s for s in bm.tensors}
    changed = []
    for span, chunks in zip(scanned.spans, scanned.chunked, strict=True):
        b = btensors.get(span.name)
        if span.opaque or b is None or span.dtype not in _FLOATS or len(span.shape) < 2:
            continue
        if b.dtype != span.dtype or b.shape != span.shape or [c[3] for c in chunks] == [c for c, _ in b.chunks]:
            continue
        changed.append(span)
    if not changed:
        return {}, {}
    reader = CheckpointReader(store, base.manifest_id, bm, scanned.path, base)
    factors: dict[str, Factors] = {}
    records: dict[str, dict[str, Any]] = {}
    path = scanned.path
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.theta-lossy.", dir=folder)
    try:
        with open(path, "rb") as src, os.fdopen(fd, "r+b") as out:
            while block := src.read(16 << 20):
                out.write(block)
            for span in changed:
                src.seek(span.offset)
                new = src.read(span.length)
                old = reader.raw_bytes(span.name)
                raw, recon, err = _native.lowrank_factors(new, old, span.dtype, list(span.shape), spec.rank, spec.rtol)
                rows, cols, rank, u, v = _native.parse_factors(raw)
                if spec.rtol is not None and err > spec.rtol:
                    continue  # not low-rank enough: stays exact
                out.seek(span.offset)
                out.write(recon)
                factors[span.name] = (rows, cols, rank, u, v)
                records[span.name] = {"method": "low-rank", "rank": rank, "rel_err": float(err)}
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, os.stat(path).st_mode & 0o7777)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return factors, records
