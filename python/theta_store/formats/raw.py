"""The fallback: any file is one opaque region, cut by content-defined chunking."""

from __future__ import annotations

from typing import BinaryIO

from .base import Layout

NAME = "raw"


def parse(path: str, f: BinaryIO, size: int, note: str = "") -> Layout:
    # No tensor regions: the whole file is skeleton, which the core cuts with CDC.
    return Layout(NAME, size, [], note=note)
