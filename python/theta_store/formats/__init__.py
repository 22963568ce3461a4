"""Format adapters, detected from a file's content (magic bytes, structure), never from a flag.

Each adapter module has NAME, EXTENSIONS, ``sniff(head, size) -> bool`` and
``parse(path, f, size) -> Layout``. Detection tries every sniff on the first bytes; the first
that claims the file parses it. A file no adapter claims is stored raw (content-defined chunks),
unless its extension names a format, in which case that format's parser runs to report the fault:
a corrupt ``model.safetensors`` should be an error, not silently opaque bytes.
"""

from __future__ import annotations

import os
import stat
from types import ModuleType

from ..errors import FormatError
from . import raw, safetensors
from .base import CODEC_DTYPES, Layout, TensorRegion, element_size

HEAD_BYTES = 4096

ADAPTERS: list[ModuleType] = [safetensors]


def _register_optional() -> None:
    # Adapters of other formats register here as they are added (see the formats issue).
    import importlib

    for mod in ("gguf", "torch", "numpy", "flax"):
        try:
            ADAPTERS.append(importlib.import_module(f"{__name__}.{mod}"))
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{mod}":
                raise


_register_optional()


def file_kind(mode: int) -> str:
    """What a non-regular file is, for an error message ("a FIFO", "a character device", ...)."""
    for test, kind in (
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return "not a regular file"


def detect(path: str | os.PathLike[str]) -> Layout:
    """Parse the structure of the file at ``path`` into a Layout (never reads tensor data)."""
    p = os.fspath(path)
    # Opened without blocking and checked before any read: a FIFO would wait for a writer forever,
    # a device would never end.
    fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise FormatError(p, "", f"is {file_kind(st.st_mode)}, not a regular file: refusing to read it as a checkpoint")
    os.set_blocking(fd, True)
    with open(fd, "rb") as f:
        size = st.st_size
        head = f.read(HEAD_BYTES)
        claimed = [a for a in ADAPTERS if p.lower().endswith(tuple(a.EXTENSIONS))]
        for adapter in ADAPTERS:
            if adapter.sniff(head, size):
                try:
                    layout: Layout = adapter.parse(p, f, size)
                    layout.check(p)
                except FormatError as e:
                    if adapter in claimed:
                        raise
                    # Looks like the format but is not, and the name does not claim it: keep it
                    # losslessly as opaque bytes rather than refuse it.
                    return raw.parse(p, f, size, note=f"looked like {adapter.NAME} but is not ({e.problem}); stored as opaque bytes")
                return layout
        for adapter in claimed:
            layout = adapter.parse(p, f, size)  # raises the precise FormatError
            layout.check(p)
            return layout
        return raw.parse(p, f, size)


__all__ = ["ADAPTERS", "CODEC_DTYPES", "FormatError", "Layout", "TensorRegion", "detect", "element_size", "file_kind"]
