"""Bounded readers shared by the binary adapters: a buffered file window and a ZIP directory reader.

Nothing here trusts a length, count or offset found in a file: each one is checked against the file
size (or the enclosing structure) before it is used to seek, read or allocate, and every fault is a
:class:`FormatError` naming the file, the place and the problem.

The ZIP reader is used by the torch (``torch.save``) and numpy (``.npz``) adapters. It reads the
central directory (ZIP64 included) and each entry's local header, so it knows the absolute byte
range of every entry's data. Members are decompressed only on request, only for small structural
entries (a pickle, an ``.npy`` header), never by a size the archive claims without checking it.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Any, BinaryIO

from ..errors import FormatError

LOCAL_SIG = b"PK\x03\x04"
CENTRAL_SIG = b"PK\x01\x02"
EOCD_SIG = b"PK\x05\x06"
ZIP64_LOCATOR_SIG = b"PK\x06\x07"
ZIP64_EOCD_SIG = b"PK\x06\x06"

STORED = 0
DEFLATED = 8

# A central directory above this is refused (a 100k-tensor checkpoint has a ~10 MB one).
MAX_DIRECTORY = 256 << 20
# Deflate cannot expand input more than ~1032:1; a claim above this is a lie (zip bomb or corruption).
DEFLATE_MAX_RATIO = 1032

_EOCD = struct.Struct("<4s4H2IH")
_ZIP64_LOCATOR = struct.Struct("<4sIQI")
_ZIP64_EOCD = struct.Struct("<4sQ2H2I4Q")
_CENTRAL = struct.Struct("<4s6H3I5H2I")
_LOCAL = struct.Struct("<4s5H3I2H")


class BoundedReader:
    """Sequential reads of ``f`` between ``pos`` and ``end`` that never read or skip past ``end``.

    Reads are buffered so walking many small fields costs few system calls: the window starts at
    4 KiB and doubles (up to 1 MiB) while reads stay sequential. Skipping a payload only moves the
    position, and the next window after a skip is small again, so walking past tensor data reads
    at most a few KiB of it.
    """

    MIN_CHUNK = 1 << 12
    MAX_CHUNK = 1 << 20

    def __init__(self, path: str, f: BinaryIO, end: int, pos: int = 0) -> None:
        self.path = path
        self.f = f
        self.pos = pos
        self.end = end
        self._buf = b""
        self._buf_start = 0
        self._chunk = self.MIN_CHUNK
        self._structs: dict[str, struct.Struct] = {}

    def remaining(self) -> int:
        return self.end - self.pos

    def need(self, n: int, where: str) -> None:
        if n < 0 or n > self.end - self.pos:
            raise FormatError(
                self.path,
                where,
                f"needs {n} bytes at offset {self.pos} but only {max(0, self.end - self.pos)} remain (structure ends at byte {self.end})",
                hint="the file is truncated or corrupt",
            )

    def read(self, n: int, where: str) -> bytes:
        self.need(n, where)
        off = self.pos - self._buf_start
        if off >= 0 and off + n <= len(self._buf):
            out = self._buf[off : off + n]
        else:
            sequential = self._buf_start <= self.pos <= self._buf_start + len(self._buf) + self._chunk
            self._chunk = min(self._chunk * 2, self.MAX_CHUNK) if sequential else self.MIN_CHUNK
            self.f.seek(self.pos)
            self._buf = self.f.read(min(max(n, self._chunk), self.end - self.pos))
            self._buf_start = self.pos
            if len(self._buf) < n:
                raise FormatError(self.path, where, f"file ended at byte {self.pos + len(self._buf)} while reading {n} bytes at {self.pos}")
            out = self._buf[:n]
        self.pos += n
        return out

    def skip(self, n: int, where: str) -> None:
        self.need(n, where)
        self.pos += n

    def skip_prefixed(self, count: int, fmt: str, where: str) -> None:
        """Skip ``count`` items, each a length (struct ``fmt``) followed by that many bytes (e.g. a GGUF string array)."""
        s = self._structs.get(fmt)
        if s is None:
            s = self._structs[fmt] = struct.Struct(fmt)
        w = s.size
        for _ in range(count):
            off = self.pos - self._buf_start
            if off >= 0 and off + w <= len(self._buf):
                (n,) = s.unpack_from(self._buf, off)
                self.pos += w
            else:
                (n,) = s.unpack(self.read(w, where))
            self.skip(n, where)

    def unpack(self, fmt: str, where: str) -> tuple[Any, ...]:
        s = self._structs.get(fmt)
        if s is None:
            s = self._structs[fmt] = struct.Struct(fmt)
        return s.unpack(self.read(s.size, where))


@dataclass(frozen=True)
class ZipEntry:
    """One archive member: where its data lies in the file and how it is encoded."""

    name: str
    method: int
    flags: int
    crc: int
    compressed_size: int
    size: int
    header_offset: int
    data_offset: int

    @property
    def data_end(self) -> int:
        return self.data_offset + self.compressed_size

    @property
    def encrypted(self) -> bool:
        return bool(self.flags & 1)

    @property
    def stored(self) -> bool:
        """Stored verbatim (no compression, no encryption): its data bytes are the member's bytes."""
        return self.method == STORED and not self.encrypted


def first_local_name(head: bytes) -> str | None:
    """The member name of the local header at the start of ``head``, or None if there is none."""
    if len(head) < _LOCAL.size or head[:4] != LOCAL_SIG:
        return None
    fields = _LOCAL.unpack_from(head)
    flags, n_len = fields[2], fields[9]
    raw = head[_LOCAL.size : _LOCAL.size + n_len]
    if len(raw) < n_len:
        return None
    return _decode_name(raw, flags)


def _decode_name(raw: bytes, flags: int) -> str | None:
    if flags & 0x800:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return raw.decode("cp437")


def _find_eocd(path: str, f: BinaryIO, size: int) -> tuple[int, bytes]:
    if size < _EOCD.size:
        raise FormatError(path, "zip end record", f"file is {size} bytes, shorter than a ZIP end-of-central-directory record (22)")
    tail_len = min(size, _EOCD.size + 0xFFFF)
    f.seek(size - tail_len)
    tail = f.read(tail_len)
    i = tail.rfind(EOCD_SIG)
    while i >= 0:
        if i + _EOCD.size <= len(tail):
            (comment_len,) = struct.unpack_from("<H", tail, i + 20)
            if i + _EOCD.size + comment_len <= len(tail):
                return size - tail_len + i, tail[i : i + _EOCD.size]
        i = tail.rfind(EOCD_SIG, 0, i)
    raise FormatError(path, "zip end record", "no end-of-central-directory record in the last 64 KiB: not a ZIP archive or truncated")


def read_directory(path: str, f: BinaryIO, size: int) -> list[ZipEntry]:
    """Every member of the archive, in central-directory order, with validated data ranges."""
    eocd_pos, eocd = _find_eocd(path, f, size)
    _, disk, cd_disk, n_disk, n_total, cd_size, cd_off, _ = _EOCD.unpack(eocd)
    dir_end = eocd_pos
    if eocd_pos >= _ZIP64_LOCATOR.size:
        f.seek(eocd_pos - _ZIP64_LOCATOR.size)
        loc = f.read(_ZIP64_LOCATOR.size)
        if loc[:4] == ZIP64_LOCATOR_SIG:
            _, _, z64_off, _ = _ZIP64_LOCATOR.unpack(loc)
            if z64_off + _ZIP64_EOCD.size > eocd_pos - _ZIP64_LOCATOR.size:
                raise FormatError(path, "zip64 end record locator", f"points at byte {z64_off}, not before the locator at {eocd_pos - 20}")
            f.seek(z64_off)
            rec = f.read(_ZIP64_EOCD.size)
            if len(rec) < _ZIP64_EOCD.size or rec[:4] != ZIP64_EOCD_SIG:
                raise FormatError(path, f"zip64 end record (byte {z64_off})", "has no zip64 end-of-central-directory signature")
            _, _, _, _, disk, cd_disk, n_disk, n_total, cd_size, cd_off = _ZIP64_EOCD.unpack(rec)
            dir_end = z64_off
    if disk != 0 or cd_disk != 0 or n_disk != n_total:
        raise FormatError(path, "zip end record", "describes a multi-disk (split) archive, which is not supported")
    if cd_off + cd_size > dir_end:
        raise FormatError(
            path,
            "zip end record",
            f"central directory [{cd_off}, {cd_off + cd_size}) runs past its end record at byte {dir_end}",
        )
    if cd_size > MAX_DIRECTORY:
        raise FormatError(path, "zip end record", f"central directory of {cd_size} bytes is above the {MAX_DIRECTORY}-byte limit")
    if n_total * _CENTRAL.size > cd_size:
        raise FormatError(
            path,
            "zip end record",
            f"claims {n_total} entries but a {cd_size}-byte central directory holds at most {cd_size // _CENTRAL.size}",
        )
    f.seek(cd_off)
    cd = f.read(cd_size)
    if len(cd) < cd_size:
        raise FormatError(path, "zip central directory", f"file ends inside the central directory at byte {cd_off + len(cd)}")

    entries: list[ZipEntry] = []
    names: set[str] = set()
    pos = 0
    for i in range(n_total):
        where = f"zip central directory entry {i} (byte {cd_off + pos})"
        if pos + _CENTRAL.size > cd_size:
            raise FormatError(path, where, "runs past the end of the central directory")
        (sig, _, _, flags, method, _, _, crc, csize, usize, n_len, e_len, c_len, _, _, _, hdr_off) = _CENTRAL.unpack_from(cd, pos)
        if sig != CENTRAL_SIG:
            raise FormatError(path, where, "has no central directory signature")
        name_start = pos + _CENTRAL.size
        end = name_start + n_len + e_len + c_len
        if end > cd_size:
            raise FormatError(path, where, "name/extra/comment fields run past the end of the central directory")
        raw_name = cd[name_start : name_start + n_len]
        name = _decode_name(raw_name, flags)
        if name is None:
            raise FormatError(path, where, "member name is flagged UTF-8 but is not valid UTF-8")
        where = f"zip entry {name!r}"
        usize, csize, hdr_off = _zip64_extra(path, where, cd[name_start + n_len : name_start + n_len + e_len], usize, csize, hdr_off)
        pos = end
        if name in names:
            raise FormatError(path, where, "appears twice in the central directory")
        names.add(name)
        entries.append(_local_entry(path, f, where, name, raw_name, flags, method, crc, csize, usize, hdr_off, cd_off))

    prev: ZipEntry | None = None
    for e in sorted(entries, key=lambda e: e.header_offset):
        if prev is not None and e.header_offset < prev.data_end:
            raise FormatError(path, f"zip entries {prev.name!r} and {e.name!r}", f"overlap (byte {e.header_offset} < {prev.data_end})")
        prev = e
    return entries


def _zip64_extra(path: str, where: str, extra: bytes, usize: int, csize: int, hdr_off: int) -> tuple[int, int, int]:
    pos = 0
    while pos + 4 <= len(extra):
        tag, n = struct.unpack_from("<HH", extra, pos)
        body = extra[pos + 4 : pos + 4 + n]
        pos += 4 + n
        if tag != 0x0001:
            continue
        vals = [v for v in (usize, csize, hdr_off) if v == 0xFFFFFFFF]
        if len(body) < 8 * len(vals):
            raise FormatError(path, where, f"zip64 extra field has {len(body)} bytes, needs {8 * len(vals)}")
        k = 0
        if usize == 0xFFFFFFFF:
            (usize,) = struct.unpack_from("<Q", body, 8 * k)
            k += 1
        if csize == 0xFFFFFFFF:
            (csize,) = struct.unpack_from("<Q", body, 8 * k)
            k += 1
        if hdr_off == 0xFFFFFFFF:
            (hdr_off,) = struct.unpack_from("<Q", body, 8 * k)
        break
    return usize, csize, hdr_off


def _local_entry(
    path: str,
    f: BinaryIO,
    where: str,
    name: str,
    raw_name: bytes,
    flags: int,
    method: int,
    crc: int,
    csize: int,
    usize: int,
    hdr_off: int,
    cd_off: int,
) -> ZipEntry:
    if hdr_off + _LOCAL.size > cd_off:
        raise FormatError(path, where, f"local header offset {hdr_off} is not before the central directory (byte {cd_off})")
    f.seek(hdr_off)
    local = f.read(_LOCAL.size + len(raw_name))
    if len(local) < _LOCAL.size or local[:4] != LOCAL_SIG:
        raise FormatError(path, f"{where} local header (byte {hdr_off})", "has no local file header signature")
    fields = _LOCAL.unpack_from(local)
    l_name_len, l_extra_len = fields[9], fields[10]
    if local[_LOCAL.size :] != raw_name or l_name_len != len(raw_name):
        raise FormatError(path, f"{where} local header (byte {hdr_off})", "names a different member than the central directory")
    data_offset = hdr_off + _LOCAL.size + l_name_len + l_extra_len
    if data_offset + csize > cd_off:
        raise FormatError(
            path,
            where,
            f"data [{data_offset}, {data_offset + csize}) runs into the central directory at byte {cd_off}",
            hint="the archive is truncated or its sizes are corrupt",
        )
    if method == STORED and not flags & 1 and csize != usize:
        raise FormatError(path, where, f"is stored uncompressed but claims {usize} bytes of content in {csize} bytes of data")
    if method == DEFLATED and usize > csize * DEFLATE_MAX_RATIO + 1024:
        raise FormatError(
            path,
            where,
            f"claims {usize} uncompressed bytes from {csize} deflated bytes, more than deflate can expand (~{DEFLATE_MAX_RATIO}x)",
            hint="the archive's size fields are corrupt or hostile (zip bomb)",
        )
    return ZipEntry(name, method, flags, crc, csize, usize, hdr_off, data_offset)


def read_member(path: str, f: BinaryIO, entry: ZipEntry, limit: int) -> bytes:
    """The whole content of a small member (a pickle, a version file), CRC-checked, at most ``limit`` bytes."""
    where = f"zip entry {entry.name!r}"
    if entry.encrypted:
        raise FormatError(path, where, "is encrypted")
    if entry.size > limit:
        raise FormatError(path, where, f"is {entry.size} bytes, above the {limit}-byte limit for a structural member")
    if entry.method == STORED:
        f.seek(entry.data_offset)
        out = f.read(entry.compressed_size)
    elif entry.method == DEFLATED:
        out = _inflate(path, where, f, entry, entry.size + 1)
    else:
        raise FormatError(path, where, f"uses ZIP compression method {entry.method}; only stored (0) and deflate (8) are supported")
    if len(out) != entry.size:
        raise FormatError(path, where, f"holds {len(out)} bytes of content but its header claims {entry.size}")
    if zlib.crc32(out) != entry.crc:
        raise FormatError(
            path,
            where,
            f"CRC-32 mismatch (content {zlib.crc32(out):08x}, header {entry.crc:08x})",
            hint="the file is corrupt",
        )
    return out


def read_member_prefix(path: str, f: BinaryIO, entry: ZipEntry, n: int) -> bytes:
    """Up to the first ``n`` bytes of a member's content (no CRC check: the rest is not read)."""
    where = f"zip entry {entry.name!r}"
    if entry.encrypted:
        raise FormatError(path, where, "is encrypted")
    if entry.method == STORED:
        f.seek(entry.data_offset)
        return f.read(min(n, entry.compressed_size))
    if entry.method == DEFLATED:
        return _inflate(path, where, f, entry, n, partial=True)
    raise FormatError(path, where, f"uses ZIP compression method {entry.method}; only stored (0) and deflate (8) are supported")


def _inflate(path: str, where: str, f: BinaryIO, entry: ZipEntry, cap: int, partial: bool = False) -> bytes:
    """Inflate a raw-deflate member producing at most ``cap`` bytes, reading the input in chunks."""
    d = zlib.decompressobj(-15)
    out = bytearray()
    pos, end = entry.data_offset, entry.data_end
    pending = b""
    try:
        while len(out) < cap:
            if not pending:
                if pos >= end:
                    break
                f.seek(pos)
                pending = f.read(min(1 << 20, end - pos))
                if not pending:
                    raise FormatError(path, where, f"file ended at byte {pos} inside the deflated data")
                pos += len(pending)
            out += d.decompress(pending, cap - len(out))
            pending = d.unconsumed_tail
            if d.eof:
                break
    except zlib.error as e:
        raise FormatError(path, where, f"deflate stream is corrupt: {e}") from None
    if not partial and not d.eof and len(out) < cap:
        raise FormatError(path, where, "deflate stream ends before its end-of-stream marker")
    return bytes(out[:cap])
