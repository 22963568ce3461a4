from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, final

from typing_extensions import Buffer

__all__ = [
    "FRAME_VERSION",
    "FRAME_VERSION_BASES",
    "Hasher",
    "PackBuilder",
    "WrittenFrame",
    "_raise_core_error",
    "blob_id",
    "chunk_id",
    "decode_frame",
    "encode_frame",
    "expand_file",
    "frame_info",
    "frame_kind",
    "lowrank_factors",
    "parse_factors",
    "read_chunks",
    "read_joined",
    "read_pack_blobs",
    "receive_content",
    "reflate_file",
    "restore_file",
    "scan_buffers",
    "scan_file",
    "send_file",
    "send_path",
    "tensor_chunk_len",
    "write_objects",
    "write_pack",
]

FRAME_VERSION: int
FRAME_VERSION_BASES: int

def chunk_id(data: Buffer) -> bytes: ...
def blob_id(data: Buffer) -> bytes: ...
def encode_frame(data: Buffer, dtype_name: str) -> bytes: ...
def decode_frame(data: Buffer) -> bytes: ...
def frame_info(data: Buffer) -> dict[str, Any]: ...
def scan_file(
    path: str,
    spans: list[tuple[int, int, str, int, bool]],
    chunk_bytes: int,
    progress: Callable[[int], object] | None = None,
) -> tuple[int, bytes, list[list[tuple[int, int, str, bytes]]], tuple[int, int, int, int, int] | None]: ...
def scan_buffers(
    buffers: list[Buffer],
    spans: list[tuple[int, int, str, int, bool]],
    chunk_bytes: int,
    progress: Callable[[int], object] | None = None,
) -> tuple[int, bytes, list[list[tuple[int, int, str, bytes]]], tuple[int, int, int, int, int] | None]: ...

@final
class WrittenFrame:
    """One frame written: its chunk, Git object, length, plane modes and byte offset in its pack."""

    @property
    def chunk_id(self) -> bytes: ...
    @property
    def object_id(self) -> bytes: ...
    @property
    def frame_len(self) -> int: ...
    @property
    def planes(self) -> str: ...
    @property
    def offset(self) -> int: ...
    @property
    def bases(self) -> list[bytes]: ...

@final
class PackBuilder:
    """One Git pack written by an add: frames, then objects, then finish (nothing left on error)."""

    def __new__(cls, pack_dir: str, objects: int = 0) -> PackBuilder: ...
    def write_file(
        self,
        path: str,
        chunks: list[tuple[int, int, str, bytes]],
        stamp: tuple[int, int, int, int, int] | None = None,
        progress: Callable[[int], object] | None = None,
    ) -> list[WrittenFrame]: ...
    def write_buffers(
        self,
        buffers: Sequence[Buffer],
        chunks: list[tuple[int, int, str, bytes]],
        progress: Callable[[int], object] | None = None,
    ) -> list[WrittenFrame]: ...
    def write_deltas(
        self,
        jobs: list[
            tuple[
                int,
                int,
                str,
                list[int],
                list[tuple[int, int, str, bytes]],
                list[tuple[int, int, bytes, bytes]],
                tuple[int, int, int, bytes, bytes] | None,
            ]
        ],
        packs: list[str],
        read_object: Callable[[bytes], bytes],
        bases: list[tuple[int, int, bytes, bytes]] = ...,
        max_depth: int = 1,
        path: str | None = None,
        stamp: tuple[int, int, int, int, int] | None = None,
        buffers: Sequence[Buffer] | None = None,
        progress: Callable[[int], object] | None = None,
    ) -> list[WrittenFrame]: ...
    def add_frames(self, frames: Sequence[Buffer]) -> list[tuple[bytes, int]]: ...
    def add_objects(self, objects: list[tuple[str, bytes]]) -> None: ...
    def count(self) -> int: ...
    def finish(self) -> Path | None: ...
    def abort(self) -> None: ...
    @property
    def recounted(self) -> bool: ...
    def __enter__(self) -> PackBuilder: ...
    def __exit__(self, t: object, v: object, tb: object) -> None: ...

def write_pack(
    path: str,
    chunks: list[tuple[int, int, str, bytes]],
    pack_dir: str,
    stamp: tuple[int, int, int, int, int] | None = None,
    progress: Callable[[int], object] | None = None,
) -> tuple[Path | None, list[WrittenFrame]]: ...
def restore_file(
    out_path: str,
    chunks: list[tuple[int, int, bytes, bytes]],
    packs: list[str],
    size: int,
    file_id: bytes,
    read_object: Callable[[bytes], bytes],
    progress: Callable[[int], object] | None = None,
    bases: list[tuple[int, int, bytes, bytes]] = ...,
) -> None: ...
def read_chunks(
    chunks: list[tuple[int, int, bytes, bytes]],
    packs: list[str],
    read_object: Callable[[bytes], bytes],
    bases: list[tuple[int, int, bytes, bytes]] = ...,
) -> list[bytes]: ...
def read_pack_blobs(pack: str, entries: list[tuple[int, int]]) -> list[bytes | None]: ...
def read_joined(
    chunks: list[tuple[int, int, bytes, bytes]],
    packs: list[str],
    read_object: Callable[[bytes], bytes],
    bases: list[tuple[int, int, bytes, bytes]] = ...,
) -> bytes: ...
def frame_kind(head: Buffer) -> str: ...
def tensor_chunk_len(chunk_bytes: int, align: int) -> int: ...

@final
class Hasher:
    """Incremental BLAKE3; safe to share between threads."""

    def __new__(cls) -> Hasher: ...
    def update(self, data: Buffer) -> None: ...
    def digest(self) -> bytes: ...

def send_file(
    out_path: str,
    chunks: list[tuple[int, int, bytes, bytes]],
    packs: list[str],
    size: int,
    file_id: bytes,
    read_object: Callable[[bytes], bytes],
    bases: list[tuple[int, int, bytes, bytes]] = ...,
) -> None: ...
def expand_file(
    src: str,
    dst: str,
    members: list[tuple[int, int, int, int, int]],
    known: list[tuple[bytes, tuple[int, int, int, int]]] = ...,
) -> list[tuple[tuple[int, int, int, int] | None, str, bytes]]: ...
def reflate_file(
    src: str,
    dst: str,
    members: list[tuple[tuple[int, int, int, int, int], tuple[int, int, int, int]]],
    size: int,
    file_id: bytes,
    progress: Callable[[int], object] | None = None,
) -> None: ...
def send_path(out_path: str, src: str) -> None: ...
def write_objects(objects: list[tuple[str, bytes]], pack_dir: str) -> str: ...
def receive_content(
    in_path: str, worktree: str | None, spill_dir: str | None, head_max: int = 1025, compare: bool = True
) -> tuple[int, bytes, bytes, str | None]: ...
def _raise_core_error(kind: str) -> None: ...
def lowrank_factors(
    new: Buffer,
    base: Buffer,
    dtype: str,
    shape: Sequence[int],
    rank: int | None = None,
    rtol: float | None = None,
) -> tuple[bytes, bytes, float]: ...
def parse_factors(raw: Buffer) -> tuple[int, int, int, bytes, bytes]: ...
