from collections.abc import Callable
from typing import Any

from typing_extensions import Buffer

FRAME_VERSION: int

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
) -> tuple[int, bytes, list[list[tuple[int, int, str, bytes]]], tuple[int, int, int, int, int]]: ...
def write_pack(
    path: str,
    chunks: list[tuple[int, int, str, bytes]],
    pack_dir: str,
    stamp: tuple[int, int, int, int, int] | None = None,
    progress: Callable[[int], object] | None = None,
) -> tuple[list[str], list[tuple[bytes, bytes, int, str]]]: ...
def restore_file(
    out_path: str,
    chunks: list[tuple[int, int, bytes, bytes]],
    packs: list[str],
    size: int,
    file_id: bytes,
    read_object: Callable[[bytes], bytes],
    progress: Callable[[int], object] | None = None,
) -> None: ...
def read_chunks(
    chunks: list[tuple[int, int, bytes, bytes]],
    packs: list[str],
    read_object: Callable[[bytes], bytes],
) -> list[bytes]: ...
def tensor_chunk_len(chunk_bytes: int, align: int) -> int: ...

class Hasher:
    def __init__(self) -> None: ...
    def update(self, data: Buffer) -> None: ...
    def digest(self) -> bytes: ...

def send_file(
    out_path: str,
    chunks: list[tuple[int, int, bytes, bytes]],
    packs: list[str],
    size: int,
    file_id: bytes,
    read_object: Callable[[bytes], bytes],
) -> None: ...
def write_objects(objects: list[tuple[str, bytes]], pack_dir: str) -> str: ...
def receive_content(
    in_path: str, worktree: str | None, spill_dir: str | None, head_max: int = 1025, compare: bool = True
) -> tuple[int, bytes, bytes, str | None]: ...
