"""theta-store: version ML model checkpoints in ordinary Git.

Checkpoints are cut into content-addressed chunks (BLAKE3), compressed with float-aware codecs
(byte planes + rANS/zstd) by a Rust core, and stored as ordinary Git objects.

Example:
    >>> import theta_store
    >>> theta_store.__version__
    '0.1.0'
"""

from __future__ import annotations

from .errors import CorruptObject, FormatError, NotARepository, ObjectNotFound, PointerError, ThetaStoreError
from .formats import Layout, TensorRegion, detect
from .formats.safetensors import save as save_safetensors
from .manifest import Manifest, Pointer
from .reader import CheckpointReader, TensorSlice, open
from .repo import AddReport, Repo

__version__ = "0.1.0"

__all__ = [
    "AddReport",
    "CheckpointReader",
    "CorruptObject",
    "FormatError",
    "Layout",
    "Manifest",
    "NotARepository",
    "ObjectNotFound",
    "Pointer",
    "PointerError",
    "Repo",
    "TensorRegion",
    "TensorSlice",
    "ThetaStoreError",
    "__version__",
    "detect",
    "open",
    "save_safetensors",
]
