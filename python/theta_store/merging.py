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
  is 0, the linear (1 - t) * a + t * b. |a|, |b| and the dot product are sums over blocks of
  8,192 elements, each block's in the compute dtype, added in order in the compute dtype.

Every formula is computed block by block (`blend`), one block of each input at a time; all but
slerp's sums are elementwise, so the bytes are those of the formula over whole tensors.

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

from collections.abc import Callable, Iterator
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


BLOCK = 8192  # elements a step: dot products stay under OpenBLAS's 10,000, where it starts threads


def apply(strategy: Strategy, name: str, sides: list[NDArray], base: NDArray | None) -> NDArray:
    """The merged tensor (of the sides' dtype and shape) that `strategy` makes of `sides`."""
    out = np.empty(sides[0].size, sides[0].dtype)
    pos = 0
    for block in blend(strategy, name, [np.ascontiguousarray(s).reshape(-1) for s in sides], base):
        out[pos : pos + block.size] = block
        pos += block.size
    return out.reshape(sides[0].shape)


def blend(strategy: Strategy, name: str, sides: list[NDArray], base: NDArray | None) -> Iterator[NDArray]:
    """The merged tensor, flat in C order, BLOCK elements at a time in the sides' dtype.

    `sides` and `base` are flat arrays of one dtype and size (read-only ones will do). Each
    step converts one block of each input to the compute dtype, so a merge holds the inputs
    plus a few blocks; ties (the cut of each trim), slerp (the norms and the angle) first pass
    over the inputs for their scalars. Blockwise is elementwise: the bytes are those of the
    formula over whole tensors; slerp's sums add up block by block, in order.
    """
    dtype = sides[0].dtype
    ct = compute_dtype(dtype)
    if ct is None:
        raise TypeError(f"{dtype} tensors are not blended")
    size = sides[0].size
    if any(s.size != size for s in sides) or (base is not None and base.reshape(-1).size != size):
        raise ValueError(f"{name}: the inputs of a blend differ in size")
    flat = [s.reshape(-1) for s in sides]
    b_flat = base.reshape(-1) if base is not None else None
    p = strategy.param
    n = strategy.name
    if n == "linear" and len(sides) != 2 and strategy.given:
        raise ValueError(f"linear:w weights two sides (ours and theirs); {len(sides)} given: use `linear` for their mean")
    if n == "slerp" and len(sides) != 2:
        raise ValueError("slerp merges exactly two sides")
    if n not in ("linear", "slerp") and b_flat is None:
        raise ValueError(f"{n} needs a base version")

    def inputs(lo: int) -> tuple[list[NDArray], NDArray | None]:
        hi = min(lo + BLOCK, size)
        return [s[lo:hi].astype(ct) for s in flat], b_flat[lo:hi].astype(ct) if b_flat is not None else None

    mix: Callable[[list[NDArray], NDArray | None], NDArray]
    if n == "linear":
        w = p if strategy.given else None
        mix = lambda ms, b: linear(ms, w)  # noqa: E731
    elif n == "slerp":
        mix = _slerp_mix(flat, ct, 0.5 if p is None else p)
    elif n == "task-arithmetic":
        lam = 1.0 if p is None else p

        def mix(ms: list[NDArray], b: NDArray | None) -> NDArray:
            assert b is not None
            return b + lam * _sum([m - b for m in ms])

    elif n == "ties":
        assert b_flat is not None
        trims = [_Trim(side, b_flat, ct, 0.2 if p is None else p) for side in flat]

        def mix(ms: list[NDArray], b: NDArray | None) -> NDArray:
            assert b is not None
            return b + disjoint_mean([t.apply(m - b) for t, m in zip(trims, ms, strict=True)])

    else:
        d = 0.5 if p is None else p
        draws = [np.random.Generator(np.random.PCG64(dare_seed(name, i))) for i in range(len(flat))]

        def mix(ms: list[NDArray], b: NDArray | None) -> NDArray:
            assert b is not None
            dropped = [dare(m - b, d, g) for m, g in zip(ms, draws, strict=True)]
            return b + (_sum(dropped) if n == "dare-linear" else disjoint_mean(dropped))

    for lo in range(0, size, BLOCK):
        ms, b = inputs(lo)
        yield np.asarray(mix(ms, b)).astype(dtype)


def _sum(xs: list[NDArray]) -> NDArray:
    out = xs[0].copy()
    for x in xs[1:]:
        out += x
    return out


def linear(ms: list[NDArray], w: float | None) -> NDArray:
    """w * ms[0] + (1 - w) * ms[1]; n sides and no w: their mean, (1/n) * sum."""
    if w is None and len(ms) != 2:
        return _sum([m * (1.0 / len(ms)) for m in ms])
    w = 0.5 if w is None else w
    return w * ms[0] + (1.0 - w) * ms[1]


class _Trim:
    """TIES' trim of one side's task vector tau = side - base: keep its k = floor(density * N)
    largest magnitudes (ties at the cut: the lower flat indices), zero the rest. The cut (the
    k-th largest |tau|) is selected exactly, sixteen bits at a time over the bit patterns of
    |tau| (a non-negative float's bits order as its value), a pass per sixteen bits, so no
    whole-tensor array is made; `apply` then trims block after block, in order."""

    def __init__(self, side: NDArray, base: NDArray, ct: np.dtype[Any], density: float) -> None:
        n = side.size
        self.k = k = int(np.floor(density * n))
        self.cut: Any = None
        self.ties_kept = 0  # elements equal to the cut still to keep, in flat order
        if 0 < k < n:
            uint = np.dtype(f"u{ct.itemsize}")

            def bits() -> Iterator[NDArray]:
                for lo in range(0, n, BLOCK):
                    tau = side[lo : lo + BLOCK].astype(ct) - base[lo : lo + BLOCK].astype(ct)
                    yield np.abs(tau).view(uint)

            value, below, equal = _select(bits, n - k, 8 * ct.itemsize)
            self.cut = np.array([value], uint).view(ct)[0]
            self.ties_kept = k - (n - below - equal)

    def apply(self, tau: NDArray) -> NDArray:
        if self.cut is None:
            return tau.copy() if self.k > 0 else np.zeros_like(tau)
        mag = np.abs(tau)
        keep = mag > self.cut
        if self.ties_kept > 0:
            at = np.flatnonzero(mag == self.cut)[: self.ties_kept]
            keep[at] = True
            self.ties_kept -= at.size
        return np.where(keep, tau, tau.dtype.type(0))


def _select(blocks: Callable[[], Iterator[NDArray]], rank: int, nbits: int) -> tuple[int, int, int]:
    """(v, below, equal): v the value at 0-based position `rank` of the sorted unsigned integers
    that `blocks()` yields, with the counts of those below v and equal to it (a radix select:
    one pass over the blocks per sixteen bits)."""
    prefix = below = equal = 0
    for shift in range(nbits - 16, -1, -16):
        counts = np.zeros(1 << 16, np.int64)
        for u in blocks():
            if shift + 16 < nbits:
                u = u[(u >> (shift + 16)) == prefix]
            counts += np.bincount(((u >> shift) & 0xFFFF).astype(np.intp), minlength=1 << 16)
        cum = np.cumsum(counts)
        digit = int(np.searchsorted(cum, rank, side="right"))
        before = int(cum[digit - 1]) if digit else 0
        below += before
        rank -= before
        equal = int(counts[digit])
        prefix = (prefix << 16) | digit
    return prefix, below, equal


def dare_seed(name: str, side: int) -> int:
    import hashlib

    h = hashlib.blake2b(b"theta-store dare\0" + name.encode() + b"\0" + str(side).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little")


def dare(tau: NDArray, density: float, draw: np.random.Generator) -> NDArray:
    """Keep each element with probability `density` (the next uniform draws of `draw`, one per
    element), rescale by 1/density."""
    u = draw.random(tau.size)
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


def _slerp_mix(flat: list[NDArray], ct: np.dtype[Any], t: float) -> Callable[[list[NDArray], NDArray | None], NDArray]:
    """Spherical interpolation from ours (t = 0) to theirs (t = 1), linear when nearly colinear:
    its coefficients from a pass over both (sums in the compute dtype, block by block)."""
    a, b = flat
    zero = ct.type(0)
    saa, sbb = zero, zero
    for lo in range(0, a.size, BLOCK):
        x, y = a[lo : lo + BLOCK].astype(ct), b[lo : lo + BLOCK].astype(ct)
        saa += np.dot(x, x)
        sbb += np.dot(y, y)
    na, nb = float(np.sqrt(saa)), float(np.sqrt(sbb))
    if na == 0 or nb == 0:
        return lambda ms, _: (1 - t) * ms[0] + t * ms[1]
    sab = zero
    for lo in range(0, a.size, BLOCK):
        sab += np.dot(a[lo : lo + BLOCK].astype(ct) / na, b[lo : lo + BLOCK].astype(ct) / nb)
    c = float(np.clip(sab, -1.0, 1.0))
    if abs(c) > SLERP_COLINEAR:
        return lambda ms, _: (1 - t) * ms[0] + t * ms[1]
    theta = np.arccos(c)
    s = np.sin(theta)
    k = ct.type  # the coefficients in the compute dtype: a float64 scalar would widen float32 arrays
    ka, kb = k(np.sin((1 - t) * theta) / s), k(np.sin(t * theta) / s)
    return lambda ms, _: ka * ms[0] + kb * ms[1]
