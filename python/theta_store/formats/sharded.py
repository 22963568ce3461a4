"""Sharded checkpoints: the ``*.safetensors.index.json`` (or ``pytorch_model.bin.index.json``) index.

transformers' ``save_pretrained`` splits a large model into shards and writes an index::

    {"metadata": {"total_size": ..., ...}, "weight_map": {"tensor name": "model-00001-of-00002.safetensors", ...}}

The index itself is stored as an ordinary small file (it is not an adapter in ``ADAPTERS``);
:func:`read_index` lets show/diff/open see one model across its shards. Shard names are checked to
be relative paths that stay inside the index's directory.
"""

from __future__ import annotations

import json
import os
import posixpath
from typing import Any

from ..errors import FormatError

INDEX_SUFFIXES = (".safetensors.index.json", ".bin.index.json")
MAX_INDEX = 64 << 20


def is_index(path: str | os.PathLike[str]) -> bool:
    """Whether the file name is a sharded-checkpoint index name."""
    return os.fspath(path).lower().endswith(INDEX_SUFFIXES)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _Duplicate(k)
        out[k] = v
    return out


class _Duplicate(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def read_index(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse and validate a sharded-checkpoint index.

    Returns ``{"metadata": dict, "weight_map": {tensor: shard}, "shards": [shard, ...]}``: the
    weight map in file order, and the distinct shard names, sorted (``model-00001-of-0000N`` first).
    Raises FormatError on unreadable JSON or a wrong shape (naming the field).
    """
    p = os.fspath(path)
    with open(p, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_INDEX:
            raise FormatError(p, "index", f"is {size} bytes, above the {MAX_INDEX}-byte limit for an index")
        data = f.read()
    return parse_index(data, p)


def parse_index(data: bytes, p: str) -> dict[str, Any]:
    """:func:`read_index` of an index's bytes (``p`` names it in errors): a version stored in Git."""
    if len(data) > MAX_INDEX:
        raise FormatError(p, "index", f"is {len(data)} bytes, above the {MAX_INDEX}-byte limit for an index")
    try:
        doc = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except _Duplicate as e:
        raise FormatError(p, f"key {e.key!r}", "appears twice in one JSON object") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(p, "index", f"is not valid UTF-8 JSON: {e}") from None
    except RecursionError:
        raise FormatError(p, "index", "nests JSON too deeply") from None
    if not isinstance(doc, dict):
        raise FormatError(p, "index", "is not a JSON object")
    weight_map = doc.get("weight_map")
    if not isinstance(weight_map, dict):
        raise FormatError(
            p,
            "weight_map",
            "is missing or not an object of tensor name -> shard file",
            hint="is this a sharded-checkpoint index?",
        )
    metadata = doc.get("metadata", {})
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise FormatError(p, "metadata", "is not an object")
    total = metadata.get("total_size")
    if total is not None and (not isinstance(total, int) or isinstance(total, bool) or total < 0):
        raise FormatError(p, "metadata.total_size", f"is {total!r}, not a non-negative integer")
    shards: set[str] = set()
    for name, shard in weight_map.items():
        where = f"weight_map[{name!r}]"
        if not name:
            raise FormatError(p, where, "tensor name is empty")
        if not isinstance(shard, str) or not shard:
            raise FormatError(p, where, f"shard {shard!r} is not a file name")
        parts = shard.replace("\\", "/").split("/")
        if shard.startswith(("/", "\\")) or posixpath.isabs(shard) or ".." in parts or (len(shard) > 1 and shard[1] == ":"):
            raise FormatError(p, where, f"shard {shard!r} is not a relative path inside the index's directory")
        shards.add(shard)
    return {"metadata": metadata, "weight_map": dict(weight_map), "shards": sorted(shards)}


def shard_relpath(index_rel: str, shard: str) -> str:
    """A shard's path in the repository (``/``-separated), from the index's own path there."""
    return posixpath.join(posixpath.dirname(index_rel), *shard.replace("\\", "/").split("/"))


def shard_paths(path: str | os.PathLike[str], index: dict[str, Any]) -> list[str]:
    """The shard files of ``index`` (from :func:`read_index`) as paths next to the index file."""
    base = os.path.dirname(os.fspath(path))
    return [os.path.join(base, *s.replace("\\", "/").split("/")) for s in index["shards"]]
