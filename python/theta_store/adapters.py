"""PEFT LoRA adapters read as low-rank predictors: `theta-store add --lora DIR`.

A PEFT adapter folder holds `adapter_config.json` (r, lora_alpha, use_rslora, rank_pattern,
alpha_pattern, fan_in_fan_out) and `adapter_model.safetensors` with, per adapted module,
`base_model.model.<module>.lora_A.weight` (r x in) and `lora_B.weight` (out x r). The update
folded into `<module>.weight` (out x in) is `scaling * B @ A`, scaling `alpha / r`, or
`alpha / sqrt(r)` under rsLoRA. Given as factors `U = scaling * B`, `V = A`, it lets the core
store a folded adapter as those factors plus an exact residual.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any

import numpy as np

from .checkpoint import Factors
from .errors import InvalidArgument

__all__ = ["adapter_factors"]

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
    cfg_path = os.path.join(folder, "adapter_config.json")
    model_path = os.path.join(folder, "adapter_model.safetensors")
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
