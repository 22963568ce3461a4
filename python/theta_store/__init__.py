"""theta-store: version ML model checkpoints in ordinary Git.

Checkpoints are cut into content-addressed chunks (BLAKE3), compressed with float-aware codecs
(byte planes + rANS/zstd) by a Rust core, and stored as ordinary Git objects.

Example:
    >>> import theta_store
    >>> theta_store.__version__
    '0.1.0'
"""

from __future__ import annotations

# Not `from typing import TYPE_CHECKING`: typing costs 13-19 ms to import (hyperfine), on every start of the filter
# that git runs. Type checkers treat any TYPE_CHECKING as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .deltas import Delta, Deltas, delta
    from .errors import CorruptObject, FormatError, NotARepository, ObjectNotFound, PointerError, ThetaStoreError
    from .formats import Layout, TensorRegion, detect
    from .formats.safetensors import save as save_safetensors
    from .lora import extract_lora
    from .manifest import Manifest
    from .pointer import Pointer
    from .reader import CheckpointReader, ShardedReader, TensorSlice, open
    from .repo import AddReport, Repo

# Imported on first use (PEP 562): git runs `theta-store filter-process` for every command that
# needs it, and numpy / dulwich imports would add ~0.1 s to each.
_LAZY = {
    "Delta": "deltas",
    "Deltas": "deltas",
    "delta": "deltas",
    "extract_lora": "lora",
    "CorruptObject": "errors",
    "FormatError": "errors",
    "NotARepository": "errors",
    "ObjectNotFound": "errors",
    "PointerError": "errors",
    "ThetaStoreError": "errors",
    "Layout": "formats",
    "TensorRegion": "formats",
    "detect": "formats",
    "save_safetensors": "formats.safetensors:save",
    "Manifest": "manifest",
    "Pointer": "pointer",
    "CheckpointReader": "reader",
    "ShardedReader": "reader",
    "TensorSlice": "reader",
    "open": "reader",
    "AddReport": "repo",
    "Repo": "repo",
}


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'theta_store' has no attribute {name!r}")
    import importlib

    module, _, attr = target.partition(":")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), attr or name)
    globals()[name] = value
    return value


__version__ = "0.1.0"

__all__ = [
    "AddReport",
    "CheckpointReader",
    "CorruptObject",
    "Delta",
    "Deltas",
    "FormatError",
    "Layout",
    "Manifest",
    "NotARepository",
    "ObjectNotFound",
    "Pointer",
    "PointerError",
    "Repo",
    "ShardedReader",
    "TensorRegion",
    "TensorSlice",
    "ThetaStoreError",
    "__version__",
    "delta",
    "detect",
    "extract_lora",
    "open",
    "save_safetensors",
]
