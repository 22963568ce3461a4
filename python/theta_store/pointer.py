"""Pointers: what Git commits in place of a checkpoint, a few lines of UTF-8 text (README "Format").

Kept apart from manifest.py and free of heavy imports (dataclasses, re, typing): the filter
process parses pointers on every `git status` that re-cleans a checkpoint.
"""

from __future__ import annotations

from .errors import PointerError

POINTER_VERSION = "theta-store/v1"
POINTER_MAX = 1024
_HEX = "0123456789abcdef"


class Pointer:
    """The small text Git stores instead of the checkpoint. Immutable; equal when all fields are."""

    __slots__ = ("blake3", "format", "manifest_id", "size", "tensors")

    manifest_id: bytes
    size: int
    blake3: bytes
    tensors: int
    format: str

    def __init__(self, manifest_id: bytes, size: int, blake3: bytes, tensors: int, format: str) -> None:
        for name, value in (("manifest_id", manifest_id), ("size", size), ("blake3", blake3), ("tensors", tensors), ("format", format)):
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"Pointer is immutable: cannot set {name}")

    def _key(self) -> tuple[bytes, int, bytes, int, str]:
        return (self.manifest_id, self.size, self.blake3, self.tensors, self.format)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pointer) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (
            f"Pointer(manifest_id={self.manifest_id.hex()}, size={self.size}, blake3={self.blake3.hex()}, "
            f"tensors={self.tensors}, format={self.format!r})"
        )

    def to_bytes(self) -> bytes:
        return (
            f"version {POINTER_VERSION}\n"
            f"format {self.format}\n"
            f"manifest {self.manifest_id.hex()}\n"
            f"size {self.size}\n"
            f"blake3 {self.blake3.hex()}\n"
            f"tensors {self.tensors}\n"
        ).encode()

    @classmethod
    def parse(cls, data: bytes, where: str = "pointer") -> Pointer:
        if len(data) > POINTER_MAX:
            raise PointerError(f"{where}: {len(data)} bytes is too large to be a theta-store pointer")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise PointerError(f"{where}: not a theta-store pointer (not UTF-8 text)") from None
        fields: dict[str, str] = {}
        for n, line in enumerate(text.splitlines(), 1):
            key, sep, value = line.partition(" ")
            if not sep or key in fields:
                raise PointerError(f"{where}: line {n} {line[:60]!r} is not 'key value'", hint="restore the pointer with git checkout")
            fields[key] = value
        if fields.get("version") != POINTER_VERSION:
            raise PointerError(
                f"{where}: not a theta-store pointer (version line is {fields.get('version')!r}, expected {POINTER_VERSION!r})"
            )
        hexes = {k: fields.get(k, "") for k in ("manifest", "blake3")}
        for k, v in hexes.items():
            if len(v) != 64 or v.strip(_HEX):
                raise PointerError(f"{where}: field {k} {v[:70]!r} is not 64 hex digits")
        for k in ("size", "tensors"):
            v = fields.get(k, "")
            if not (0 < len(v) <= 20 and v.isascii() and v.isdigit()):
                raise PointerError(f"{where}: field {k} {v[:30]!r} is not a number")
        ptr = cls(
            bytes.fromhex(hexes["manifest"]),
            int(fields["size"]),
            bytes.fromhex(hexes["blake3"]),
            int(fields["tensors"]),
            fields.get("format", ""),
        )
        if data != ptr.to_bytes():
            raise PointerError(f"{where}: pointer is not in canonical form", hint="restore the pointer with git checkout")
        return ptr


def looks_like_pointer(data: bytes) -> bool:
    return len(data) <= POINTER_MAX and data.startswith(f"version {POINTER_VERSION}\n".encode())
