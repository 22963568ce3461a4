"""Merge strategies for one tensor: pure numpy functions, each formula stated exactly.

A strategy is named `NAME[:PARAM]` (`linear:0.7`, `ties:0.3`). The three-way merge (merge3.py)
calls one only for a tensor that both sides changed differently; `ours`, `theirs` and `fail`
need no arithmetic and are handled there.

Notation: B is the base tensor, M_1..M_n the sides (M_1 = ours, M_2 = theirs in a git merge),
tau_i = M_i - B the task vector of side i. All arithmetic is elementwise on flattened tensors.

Precision: 16-bit and 8-bit floats (F16, BF16, F8) are computed in float32, F32 in float64,
F64 in float64; the result is cast back to the tensor's dtype with IEEE round to nearest, ties to
even (numpy's and ml_dtypes' `astype`). Integer and bool tensors are not blended (a conflict).

- `linear[:w]` (w = 0.5): w * M_1 + (1 - w) * M_2. w weights *ours*. With n > 2 sides (outside a
  git merge) and no w: (1/n) * sum_i M_i.
- `task-arithmetic[:lambda]` (lambda = 1): B + lambda * sum_i tau_i.
- `ties[:density]` (density = 0.2), after Yadav et al. 2023 (TIES-Merging), all sides weighted 1:
  1. trim: per side keep the k = floor(density * N) elements of tau_i of largest |tau_i| (N the
     element count; among equal magnitudes at the cut the lower flat index is kept), zero the rest:
     t_i;
  2. elect: s = +1 where sum_i t_i >= 0, else -1 (a tie elects +1);
  3. disjoint mean: m = sum_i t_i * [sign(t_i) == s] / max(1, count_i [sign(t_i) == s]) (trimmed
     zeros have sign 0 and never count);
  result B + m.
- `dare-linear[:density]` / `dare-ties[:density]` (density = 0.5), after Yu et al. 2023 (DARE):
  per side keep each element of tau_i with probability density (u < density, u uniform in [0, 1)
  from numpy's PCG64 seeded with the first 8 bytes, little-endian, of
  BLAKE2b(b"theta-store dare\\0" + tensor name + b"\\0" + side number 0-based)), zero the rest, and
  rescale the kept ones by 1/density: d_i. dare-linear: B + sum_i d_i. dare-ties: B + the TIES
  elect and disjoint mean (steps 2-3) applied to d_i instead of t_i.
- `slerp[:t]` (t = 0.5; t = 0 is ours, 1 is theirs): with a = M_1, b = M_2 flattened,
  c = clip(<a/|a|, b/|b|>, -1, 1), theta = arccos(c):
  sin((1 - t) theta) / sin(theta) * a + sin(t theta) / sin(theta) * b; when |c| > 0.9995 or a norm
  is 0, the linear (1 - t) * a + t * b.

Conventions. Public tools give TIES and DARE different details: mergekit weights the task vectors
before electing signs, divides the disjoint sum by the sum of the agreeing weights and (in recent
versions) can rescale DARE's survivors to the task vector's norm; PEFT multiplies by weights
after pruning, elects on the weighted sum and rescales DARE by 1/density. Here every side weighs
1 (two branches of one model have no natural weights), so "before or after weighting" coincide:
the election is on the plain sum, the disjoint mean is a plain mean of the agreeing values, and
DARE rescales by 1/density as the DARE paper does: it keeps each element's expected value and,
unlike a norm match, does not make one element depend on the others. The seed makes a rerun give
byte-identical output; it depends on the tensor name and side only, so the same merge in another
clone gives the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

NDArray = np.ndarray[Any, Any]

# name -> (its parameter's name, default, whether it needs the base)
_STRATEGIES: dict[str, tuple[str, float | None, bool]] = {
    "fail": ("", None, False),
    "ours": ("", None, False),
    "theirs": ("", None, False),
    "linear": ("w", 0.5, False),
    "task-arithmetic": ("lambda", 1.0, True),
    "ties": ("density", 0.2, True),
    "dare-linear": ("density", 0.5, True),
    "dare-ties": ("density", 0.5, True),
    "slerp": ("t", 0.5, False),
}
NAMES = tuple(_STRATEGIES)
SLERP_COLINEAR = 0.9995


@dataclass(frozen=True)
class Strategy:
    """A parsed `NAME[:PARAM]`; `param` is None for a default that depends on the side count."""

    name: str
    param: float | None = None
    given: bool = False  # the parameter was written out

    @property
    def blends(self) -> bool:
        """Computes new values (not fail/ours/theirs)."""
        return self.name not in ("fail", "ours", "theirs")

    @property
    def needs_base(self) -> bool:
        return _STRATEGIES[self.name][2]

    def __str__(self) -> str:
        return f"{self.name}:{self.param:g}" if self.given and self.param is not None else self.name


def parse(spec: str) -> Strategy:
    """`linear:0.7` -> Strategy("linear", 0.7); raises ValueError with the accepted names."""
    name, sep, value = spec.strip().partition(":")
    if name not in _STRATEGIES:
        raise ValueError(f"{spec!r} is not a merge strategy (one of {', '.join(NAMES)})")
    pname, default, _ = _STRATEGIES[name]
    if not sep:
        return Strategy(name, default)
    if not pname:
        raise ValueError(f"merge strategy {name!r} takes no parameter (got {spec!r})")
    try:
        p = float(value)
    except ValueError:
        raise ValueError(f"merge strategy {spec!r}: {pname} must be a number") from None
    if not np.isfinite(p) or (name in ("ties", "dare-linear", "dare-ties") and not 0 < p <= 1):
        raise ValueError(f"merge strategy {spec!r}: {pname} must be {'in (0, 1]' if name != 'linear' else 'finite'}")
    return Strategy(name, p, True)


def compute_dtype(dtype: np.dtype[Any]) -> np.dtype[Any] | None:
    """The dtype a strategy computes in for tensors of `dtype`; None when it is not a float."""
    if dtype == np.float64 or dtype == np.float32:
        return np.dtype(np.float64)
    if dtype.kind == "f" or dtype.name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        return np.dtype(np.float32)
    return None


def apply(strategy: Strategy, name: str, sides: list[NDArray], base: NDArray | None) -> NDArray:
    """The merged tensor (of the sides' dtype and shape) that `strategy` makes of `sides`."""
    dtype, shape = sides[0].dtype, sides[0].shape
    ct = compute_dtype(dtype)
    if ct is None:
        raise TypeError(f"{dtype} tensors are not blended")
    ms = [s.astype(ct).ravel() for s in sides]
    b = base.astype(ct).ravel() if base is not None else None
    p = strategy.param
    n = strategy.name
    if n == "linear":
        out = linear(ms, p if strategy.given else None)
    elif n == "slerp":
        if len(ms) != 2:
            raise ValueError("slerp merges exactly two sides")
        out = slerp(ms[0], ms[1], 0.5 if p is None else p)
    else:
        if b is None:
            raise ValueError(f"{n} needs a base version")
        taus = [m - b for m in ms]
        if n == "task-arithmetic":
            out = b + (1.0 if p is None else p) * _sum(taus)
        elif n == "ties":
            out = b + disjoint_mean([trim(t, 0.2 if p is None else p) for t in taus])
        else:
            d = 0.5 if p is None else p
            dropped = [dare(t, d, name, i) for i, t in enumerate(taus)]
            out = b + (_sum(dropped) if n == "dare-linear" else disjoint_mean(dropped))
    return np.asarray(out).astype(dtype).reshape(shape)


def _sum(xs: list[NDArray]) -> NDArray:
    out = xs[0].copy()
    for x in xs[1:]:
        out += x
    return out


def linear(ms: list[NDArray], w: float | None) -> NDArray:
    """w * ms[0] + (1 - w) * ms[1]; n sides and no w: their mean, (1/n) * sum."""
    if w is None and len(ms) != 2:
        return _sum([m * (1.0 / len(ms)) for m in ms])
    if len(ms) != 2:
        raise ValueError(f"linear:w weights two sides (ours and theirs); {len(ms)} given: use `linear` for their mean")
    w = 0.5 if w is None else w
    return w * ms[0] + (1.0 - w) * ms[1]


def trim(tau: NDArray, density: float) -> NDArray:
    """tau with all but its k = floor(density * N) largest magnitudes zeroed (ties at the cut: the
    lower flat indices are kept), in O(N)."""
    n = tau.size
    k = int(np.floor(density * n))
    if k >= n:
        return tau.copy()
    out = np.zeros_like(tau)
    if k <= 0:
        return out
    mag = np.abs(tau)
    cut = np.partition(mag, n - k)[n - k]  # the k-th largest magnitude
    keep = mag > cut
    at = np.flatnonzero(mag == cut)[: k - int(keep.sum())]
    keep[at] = True
    out[keep] = tau[keep]
    return out


def dare_seed(name: str, side: int) -> int:
    import hashlib

    h = hashlib.blake2b(b"theta-store dare\0" + name.encode() + b"\0" + str(side).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little")


def dare(tau: NDArray, density: float, name: str, side: int) -> NDArray:
    """Keep each element with probability `density` (seeded by name and side), rescale by 1/density."""
    u = np.random.Generator(np.random.PCG64(dare_seed(name, side))).random(tau.size)
    out = np.where(u < density, tau, 0).astype(tau.dtype)
    scaled: NDArray = out * tau.dtype.type(1.0 / density)
    return scaled


def disjoint_mean(ts: list[NDArray]) -> NDArray:
    """TIES' elect and merge: the mean of the values whose sign is the sign of the sum (ties: +1)."""
    total = _sum(ts)
    elected = np.where(total >= 0, 1, -1).astype(ts[0].dtype)
    acc = np.zeros_like(ts[0])
    count = np.zeros_like(ts[0])
    for t in ts:
        agree = np.sign(t) == elected
        acc += np.where(agree, t, 0)
        count += agree
    return acc / np.maximum(count, 1)


def slerp(a: NDArray, b: NDArray, t: float) -> NDArray:
    """Spherical interpolation from a (t = 0) to b (t = 1); linear when nearly colinear."""
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0 or nb == 0:
        return (1 - t) * a + t * b
    c = float(np.clip(np.dot(a / na, b / nb), -1.0, 1.0))
    if abs(c) > SLERP_COLINEAR:
        return (1 - t) * a + t * b
    theta = np.arccos(c)
    s = np.sin(theta)
    k = a.dtype.type  # the coefficients in the compute dtype: a float64 scalar would widen float32 arrays
    mixed: NDArray = k(np.sin((1 - t) * theta) / s) * a + k(np.sin(t * theta) / s) * b
    return mixed
