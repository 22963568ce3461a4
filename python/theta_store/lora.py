"""PEFT LoRA adapters, both ways.

Out of the history: `theta_store.extract_lora` writes what changed in the 2-D weights between
two revisions as a PEFT adapter folder (`adapter_model.safetensors` + `adapter_config.json`),
one tensor at a time. Into the store: `adapter_factors` reads an adapter as the low-rank
predictor of a change (`theta-store add --lora DIR`): the update PEFT folds into
`<module>.weight` is `scaling * B @ A`, scaling `lora_alpha / r` (or `/ sqrt(r)` under rsLoRA,
per-module values from rank_pattern / alpha_pattern), given to the core as `U = scaling * B`,
`V = A`; the residual keeps the stored version exact.

Each changed weight `<module>.weight` of shape (out, in), as torch's Linear stores it, becomes
`base_model.model.<module>.lora_A.weight` (r x in) and `...lora_B.weight` (out x r) with
B @ A ~ new - base; lora_alpha equals r for every module (alpha_pattern follows rank_pattern),
so PEFT's scaling lora_alpha / r is 1. The factors come from a truncated SVD of the difference
(randomized, with a fixed seed, for big matrices), balanced as B = U sqrt(S), A = sqrt(S) V^T.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from typing import Any

import numpy as np

from .checkpoint import Factors
from .deltas import Delta, delta
from .errors import InvalidArgument
from .formats.safetensors import save

DEFAULT_RANK = 16
ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
_PREFIX = "base_model.model."
_FULL_SVD_MAX = 1024  # a smaller side up to this gets an exact SVD, bigger ones a randomized one
_OVERSAMPLE = 10
_POWER_ITERATIONS = 3
_SEED = 0
_FLOATS = ("F64", "F32", "F16", "BF16")
_CHANGED = ("bits", "sparse", "low-rank", "dense")


def _svd(d: np.ndarray[Any, Any], k: int) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """The top-k (at least) singular triplets of d: exact when d is small, else randomized."""
    m, n = d.shape
    if min(m, n) <= _FULL_SVD_MAX or k + _OVERSAMPLE >= min(m, n):
        u, s, vt = np.linalg.svd(d, full_matrices=False)
        return u, s, vt
    rng = np.random.default_rng(_SEED)
    q, _ = np.linalg.qr(d @ rng.standard_normal((n, k + _OVERSAMPLE)).astype(d.dtype))
    for _ in range(_POWER_ITERATIONS):  # sharpen the spectrum: noise-level tails would blur the subspace
        z, _ = np.linalg.qr(d.T @ q)
        q, _ = np.linalg.qr(d @ z)
    ub, s, vt = np.linalg.svd(q.T @ d, full_matrices=False)
    return q @ ub, s, vt


def _tail_error(s: np.ndarray[Any, Any], total: float) -> np.ndarray[Any, Any]:
    """err[r] = relative Frobenius error of keeping the first r singular values (r = 0..len(s))."""
    kept = np.concatenate([[0.0], np.cumsum(s.astype(np.float64) ** 2)])
    return np.sqrt(np.maximum(total - kept, 0.0) / total)


def factorize(d: np.ndarray[Any, Any], rank: int | None, rtol: float | None) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], float]:
    """(B, A, relative error) with B @ A ~ d, B (out x r) and A (r x in) float32.

    rank alone: r = min(rank, out, in). rtol: the smallest r whose relative Frobenius error is at
    most rtol, up to `rank` (if given) or min(out, in). The error returned is measured on the
    float32 factors themselves, not estimated. A zero d gives r = 0.
    """
    m, n = d.shape
    total = float(np.sum(d.astype(np.float64) ** 2))
    cap = min(m, n) if rank is None else min(rank, m, n)
    if total == 0.0:
        return np.zeros((m, 0), np.float32), np.zeros((0, n), np.float32), 0.0
    if rtol is None:
        u, s, vt = _svd(d, cap)
        r = cap
    else:
        k = min(cap, 32)
        while True:
            u, s, vt = _svd(d, k)
            exact = s.size == min(m, n)  # a full SVD: every singular value is exact
            err = _tail_error(s[:cap] if exact else s[: min(k, cap)], total)
            hit = np.flatnonzero(err <= rtol)
            if hit.size or exact or k >= cap:
                r = int(hit[0]) if hit.size else min(cap, s.size)
                break
            k = min(2 * k, cap)
        r = max(r, 1)
    root = np.sqrt(s[:r])
    b = (u[:, :r] * root).astype(np.float32)
    a = (root[:, None] * vt[:r]).astype(np.float32)
    residual = d - (b.astype(d.dtype) @ a.astype(d.dtype))
    return b, a, math.sqrt(float(np.sum(residual.astype(np.float64) ** 2)) / total)


def _wanted(module: str, modules: list[str] | None) -> bool:
    """`modules` names modules as PEFT's target_modules does: a full name or a last part (suffix)."""
    return modules is None or any(module == m or module.endswith("." + m) for m in modules)


def _skip_reason(t: Delta) -> str | None:
    """Why a changed tensor gets no LoRA factors (None: it gets them)."""
    if t.kind in ("added", "removed", "reshaped"):
        return f"{t.kind}: a LoRA adapter only changes weights the base model has, at their shape"
    if not t.name.endswith(".weight"):
        return "not a .weight (changed biases: pass bias=True)" if t.name.endswith(".bias") else "not a .weight"
    if len(t.shape or ()) != 2:
        return f"{len(t.shape or ())}-D weight: LoRA factors are for 2-D (Linear) weights"
    if t.dtype not in _FLOATS:
        return f"{t.dtype} weight: LoRA factors are for float weights"
    return None


def extract_lora(
    path: str | os.PathLike[str],
    base: str,
    rev: str,
    *,
    rank: int | None = None,
    rtol: float | None = None,
    out: str | os.PathLike[str],
    repo: str | os.PathLike[str] | None = None,
    modules: list[str] | None = None,
    bias: bool = False,
) -> dict[str, Any]:
    """Write what changed in `path` from revision `base` to `rev` as a PEFT LoRA adapter in `out`.

    Every changed 2-D float `<module>.weight` (of `modules`, full names or last parts, if given)
    becomes lora_A / lora_B factors: `rank` fixed (default 16), or with `rtol` the smallest rank
    whose relative Frobenius error ||new - base - B A|| / ||new - base|| is at most rtol (`rank`
    then caps it). Differences are computed exactly (float64 for fp32, float32 for 16-bit floats)
    and factorized one tensor at a time: peak memory is about one tensor's two versions and its
    difference. Factors are written as float32. bias=True also writes the new values of changed
    biases (PEFT bias "all"); nothing else (no modules_to_save). 2-D weights are taken as Linear
    layers: leave embeddings out with `modules` (PEFT names their factors differently).

    Returns {"out", "adapter", "config", "r", "modules": [{"module", "tensor", "shape", "dtype",
    "kind", "rank", "rel_error", "norm_delta"}], "skipped": [{"tensor", "reason"}], "biases",
    "max_rel_error"}. A full fine-tune changes weights in every direction: its relative errors
    stay large at any useful rank, and they are reported as they are.

    Example:
        >>> import theta_store, tempfile, subprocess, json, pathlib, numpy as np
        >>> d = tempfile.mkdtemp(); git = lambda *a: subprocess.run(["git", "-C", d, *a], check=True, capture_output=True)
        >>> _ = git("init", "-q"); _ = git("config", "user.email", "a@b"); _ = git("config", "user.name", "a")
        >>> rng = np.random.default_rng(0); w = rng.standard_normal((32, 16)).astype(np.float32)
        >>> def commit(tensors, tag):
        ...     theta_store.save_safetensors(f"{d}/m.safetensors", tensors)
        ...     with theta_store.Repo(d) as r:
        ...         _ = r.add([f"{d}/m.safetensors"])
        ...     _ = git("commit", "-qm", tag); _ = git("tag", tag)
        >>> commit({"q.weight": w}, "v1")
        >>> commit({"q.weight": w + np.outer(rng.standard_normal(32), rng.standard_normal(16)).astype(np.float32)}, "v2")
        >>> r = theta_store.extract_lora(f"{d}/m.safetensors", "v1", "v2", rank=1, out=f"{d}/adapter")
        >>> [(m["module"], m["rank"], m["rel_error"] < 1e-6) for m in r["modules"]]
        [('q', 1, True)]
        >>> json.loads(pathlib.Path(d, "adapter", "adapter_config.json").read_text())["target_modules"]
        ['q']
    """
    if rank is not None and rank < 1:
        raise InvalidArgument(f"rank must be 1 or more, not {rank}", hint="or pass rtol= to choose the rank per module")
    if rtol is not None and not 0 < rtol < 1:
        raise InvalidArgument(f"rtol must be between 0 and 1, not {rtol}", hint="1e-3 keeps 99.9% of each change's Frobenius norm")
    if rank is None and rtol is None:
        rank = DEFAULT_RANK
    done: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    tensors: dict[str, np.ndarray[Any, Any]] = {}
    biases: list[str] = []
    with delta(path, base, rev, repo=repo) as deltas:
        for name, t in deltas.items():
            module = name.rsplit(".", 1)[0]
            if not _wanted(module, modules):
                continue
            if t.kind == "unchanged":
                continue
            if bias and name.endswith(".bias") and t.kind in _CHANGED:
                # PEFT saves a trained bias whole (it is trained in place), not as a difference.
                value = t.new()
                assert value is not None  # a changed tensor is in the new version
                tensors[f"{_PREFIX}{name}"] = value.astype(np.float32)
                biases.append(name)
                continue
            reason = _skip_reason(t)
            if reason is not None:
                skipped.append({"tensor": name, "reason": reason})
                continue
            d = t.dense()
            b, a, err = factorize(d, rank, rtol)
            norm = float(np.linalg.norm(d.astype(np.float64)))
            del d
            if b.shape[1] == 0:
                skipped.append({"tensor": name, "reason": "no numeric change (only bit patterns such as -0.0 vs 0.0)"})
                continue
            tensors[f"{_PREFIX}{module}.lora_A.weight"] = a
            tensors[f"{_PREFIX}{module}.lora_B.weight"] = b
            done.append(
                {
                    "module": module,
                    "tensor": name,
                    "shape": list(t.shape or ()),
                    "dtype": t.dtype,
                    "kind": t.kind,
                    "rank": int(b.shape[1]),
                    "rel_error": err,
                    "norm_delta": norm,
                }
            )
        provenance = {"theta_store.path": deltas.path, "theta_store.base": base, "theta_store.rev": rev}
        provenance["theta_store.base_version"] = deltas.base_version.hex()
        provenance["theta_store.version"] = deltas.version.hex()
    ranks = Counter(m["rank"] for m in done)
    r = max(ranks, key=lambda k: (ranks[k], k)) if ranks else rank or DEFAULT_RANK
    pattern = {m["module"]: m["rank"] for m in done if m["rank"] != r}
    config = {
        "alpha_pattern": dict(pattern),
        "auto_mapping": None,
        "base_model_name_or_path": None,
        "bias": "all" if biases else "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": r,
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": r,
        "rank_pattern": pattern,
        "revision": None,
        "target_modules": sorted({m["module"].rsplit(".", 1)[-1] for m in done}),
        "task_type": None,
        "use_dora": False,
        "use_rslora": False,
    }
    folder = os.fspath(out)
    os.makedirs(folder, exist_ok=True)
    adapter, cfg = os.path.join(folder, ADAPTER_FILE), os.path.join(folder, CONFIG_FILE)
    # Written beside, then renamed: a reader never sees a half-written adapter under its own name.
    save(adapter + ".tmp", tensors, {"format": "pt", **provenance})
    os.replace(adapter + ".tmp", adapter)
    with open(cfg + ".tmp", "w") as f:
        f.write(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(cfg + ".tmp", cfg)
    return {
        "out": folder,
        "adapter": adapter,
        "config": cfg,
        "r": r,
        "modules": done,
        "skipped": skipped,
        "biases": biases,
        "max_rel_error": max((m["rel_error"] for m in done), default=0.0),
    }


# ---- reading an adapter: `add --lora` ----
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rule for rank_pattern / alpha_pattern: a key applies to a module whose name it
    matches as a whole or as a dotted suffix."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _read_tensors(path: str) -> dict[str, np.ndarray[Any, Any]]:
    from .formats import detect
    from .reader import numpy_dtype

    layout = detect(path)
    out: dict[str, np.ndarray[Any, Any]] = {}
    with open(path, "rb") as f:
        for r in layout.regions:
            f.seek(r.offset)
            raw = f.read(r.length)
            out[r.name] = np.frombuffer(raw, dtype=numpy_dtype(r.dtype)).reshape(r.shape).astype(np.float32)
    return out


def adapter_factors(adapter: str | os.PathLike[str], targets: dict[str, tuple[int, ...]]) -> dict[str, Factors]:
    """The adapter's factors per tensor name of `targets` (name -> shape of the checkpoint's
    tensors). A module is matched to `<module>.weight`, or to the one tensor whose name ends
    with `.<module>.weight`. Raises InvalidArgument naming the adapter and the module when a
    file is missing or malformed, a module matches no tensor, or shapes disagree."""
    folder = os.fspath(adapter)
    cfg_path = os.path.join(folder, CONFIG_FILE)
    model_path = os.path.join(folder, ADAPTER_FILE)
    hint = "a PEFT adapter folder holds adapter_config.json and adapter_model.safetensors (model.save_pretrained(DIR))"
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
        if not isinstance(cfg, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        raise InvalidArgument(f"{cfg_path}: no such file", hint=hint) from None
    except (ValueError, OSError) as e:
        raise InvalidArgument(f"{cfg_path}: cannot read the adapter's config: {e}", hint=hint) from None
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise InvalidArgument(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not LORA", hint=hint)
    if not os.path.isfile(model_path):
        raise InvalidArgument(f"{model_path}: no such file", hint=hint)
    tensors = _read_tensors(model_path)
    pairs: dict[str, dict[str, np.ndarray[Any, Any]]] = {}
    for key, value in tensors.items():
        m = _KEY.match(key)
        if m is None:
            continue  # modules_to_save, embeddings' lora_embedding_*: not a low-rank pair
        pairs.setdefault(m["module"], {})[m["ab"]] = value
    if not pairs:
        raise InvalidArgument(f"{model_path}: no lora_A / lora_B weights in it", hint=hint)
    rslora = bool(cfg.get("use_rslora", False))
    fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False))
    alpha_default = cfg.get("lora_alpha", cfg.get("r", 8))
    out: dict[str, Factors] = {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise InvalidArgument(f"{model_path}: module {module} has lora_{next(iter(ab))} without its pair", hint=hint)
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise InvalidArgument(f"{model_path}: module {module}: lora_A {a.shape} and lora_B {b.shape} do not pair up", hint=hint)
        rank = a.shape[0]
        alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, module, alpha_default))
        scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
        name = _target(module, targets, model_path)
        u, v = (b * np.float32(scaling)).astype(np.float32), a
        if fan_in_fan_out:  # the weight is stored (in, out): the update is its transpose
            u, v = np.ascontiguousarray(a.T), np.ascontiguousarray((b * np.float32(scaling)).T.astype(np.float32))
        shape = targets[name]
        rows, cols = shape[0], math.prod(shape[1:])
        if (u.shape[0], v.shape[1]) != (rows, cols):
            raise InvalidArgument(
                f"{model_path}: module {module}: the update is {u.shape[0]}x{v.shape[1]} but {name} is {'x'.join(map(str, shape))}",
                hint="the adapter was trained for another model, or with fan_in_fan_out set otherwise",
            )
        out[name] = (rows, cols, rank, np.ascontiguousarray(u, dtype="<f4").tobytes(), np.ascontiguousarray(v, dtype="<f4").tobytes())
    return out


def _target(module: str, targets: dict[str, tuple[int, ...]], where: str) -> str:
    name = f"{module}.weight"
    if name in targets:
        return name
    found = [t for t in targets if t.endswith("." + name)]
    if len(found) != 1:
        what = "no tensor" if not found else f"{len(found)} tensors ({', '.join(sorted(found)[:3])}...)"
        raise InvalidArgument(
            f"{where}: module {module}: {what} of the checkpoint named {name}", hint="check that the adapter belongs to this model"
        )
    return found[0]
