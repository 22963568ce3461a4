"""The format adapter interface: a file = skeleton bytes + ordered tensor regions.

An adapter reads only the structure of a file (headers, pickles, zip directories) and returns a
:class:`Layout`: the tensor regions, sorted by offset, non-overlapping, inside the file. Every byte
not covered by a region is skeleton and is stored verbatim; rebuilding the file interleaves the two,
so any adapter is lossless by construction as long as its regions are in bounds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# dtype name -> element size in bytes, for the dtypes the Rust core has a float/int codec for.
# Names follow safetensors. Anything else is stored as opaque bytes aligned to `align`.
CODEC_DTYPES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


@dataclass(frozen=True)
class TensorRegion:
    """One tensor's bytes inside the file.

    Attributes:
        name: the tensor name as the user knows it (nested keys joined with ".").
        dtype: canonical dtype name (a key of CODEC_DTYPES, or a format-specific name
            such as "Q8_0" that is stored as opaque bytes).
        shape: logical shape, row-major.
        offset: absolute byte offset in the file.
        length: byte length.
        align: chunk boundaries fall on multiples of this many bytes (element or block size).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    length: int
    align: int = 1

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass
class Layout:
    """What an adapter found in a file."""

    format: str
    size: int
    regions: list[TensorRegion] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    note: str = ""

    def check(self, path: str) -> None:
        """Raise FormatError unless regions are sorted, disjoint and inside the file."""
        from ..errors import FormatError

        pos = 0
        for r in self.regions:
            if r.offset < pos:
                raise FormatError(path, f"tensor {r.name!r}", f"region at byte {r.offset} overlaps the previous one (ends at {pos})")
            if r.length < 0 or r.end > self.size:
                raise FormatError(path, f"tensor {r.name!r}", f"region [{r.offset}, {r.end}) is outside the {self.size}-byte file")
            pos = r.end


def element_size(dtype: str) -> int | None:
    """Element size of a codec dtype, or None for opaque dtypes."""
    return CODEC_DTYPES.get(dtype)
