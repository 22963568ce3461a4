"""What fuzzing found (benches/fuzz.sh; README "Reliability"), one test per fault, and every fuzz
target replayed over its seeds so the harness itself keeps working on every build."""

from __future__ import annotations

import io
import os
import struct
import sys
from pathlib import Path

import msgpack
import pytest

import theta_store
from test_git_e2e import commit, g, global_config, model_bytes, new_repo, write
from theta_store.errors import CorruptObject, ProtocolError
from theta_store.filterproc import PktIO
from theta_store.gitstore import GitStore
from theta_store.manifest import Manifest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benches"))
import fuzz_targets

__all__ = ["global_config"]  # autouse fixture: theta-store installed in a private global config


@pytest.mark.parametrize("name", sorted(fuzz_targets.TARGETS))
def test_fuzz_target_replays_its_seeds(name: str) -> None:
    """Each Python fuzz target runs its seeds (real files from tests/fixtures, and what is made
    from them) and the empty input without a fault: the seeds are well formed inputs."""
    seeds = fuzz_targets.seeds(name)
    assert seeds, f"target {name} has no seeds"
    for data in [*seeds, b""]:
        fuzz_targets.TARGETS[name](data)


def _manifest_obj() -> dict[str, object]:
    cid = b"\x01" * 32
    return {
        "type": "theta-store/manifest",
        "version": 1,
        "format": "safetensors",
        "file": {"size": 24, "blake3": b"\x02" * 32},
        "chunk_bytes": 1 << 20,
        "spans": [
            {"kind": "skeleton", "offset": 0, "length": 8, "chunks": [[cid, 8]]},
            {"kind": "tensor", "offset": 8, "length": 16, "chunks": [[cid, 16]], "name": "w", "dtype": "F32", "shape": [4]},
        ],
        "metadata": {},
        "note": "",
    }


def test_manifest_fields_are_checked() -> None:
    """Found by the `manifest` target: a span of kind "tensnr" (one flipped byte) was accepted and
    then neither a tensor nor skeleton; any field's type was taken on trust."""
    good = _manifest_obj()
    assert Manifest.from_bytes(msgpack.packb(good)).tensors[0].name == "w"
    spans = good["spans"]
    assert isinstance(spans, list)
    cases: list[tuple[str, object, str]] = [
        ("kind", "tensnr", r"spans\[1\]\.kind 'tensnr' is not 'tensor' or 'skeleton'"),
        ("shape", "ab", r"spans\[1\]\.shape is a str, not a list"),
        ("shape", [-1], r"spans\[1\]\.shape -1 is not a non-negative integer"),
        ("name", 7, r"spans\[1\]\.name is a int, not a str"),
        ("offset", 8.0, r"spans\[1\]\.offset 8\.0 is not a non-negative integer"),
        ("chunks", [[b"\x01" * 32, -16]], r"spans\[1\]\.chunks\[0\] length .* is not a non-negative integer"),
        ("chunks", [[2**40, 16]], r"spans\[1\]\.chunks\[0\] is not \[32-byte chunk id, length\]"),
    ]
    for key, value, message in cases:
        bad = {**spans[1], key: value}
        with pytest.raises(CorruptObject, match=f"manifest: cannot read manifest: {message}"):
            Manifest.from_bytes(msgpack.packb({**good, "spans": [spans[0], bad]}))
    with pytest.raises(CorruptObject, match="unhashable"):  # found after the first fix: a map used as a map key
        Manifest.from_bytes(b"\x81\x81\x01\x02\x03")


def test_filter_reads_non_utf8_path_names(tmp_path: Path) -> None:
    """Found by the `pktline` target: a header packet that is not UTF-8 (git sends path names as
    the bytes they are) raised UnicodeDecodeError and killed the filter process mid-`git add`."""
    path = tmp_path / "pkt"
    line = b"pathname=caf\xe9.bin\n"
    path.write_bytes(b"%04x" % (len(line) + 4) + line + b"0000")
    fd = os.open(path, os.O_RDONLY)
    try:
        assert PktIO(fd, io.BytesIO()).read_text_list() == [os.fsdecode(b"pathname=caf\xe9.bin")]
    finally:
        os.close(fd)
    repo = new_repo(tmp_path / "repo")
    name = os.fsdecode(b"caf\xe9.safetensors")
    data = model_bytes(rows=16, cols=32)
    write(repo / name, data)
    commit(repo, "latin-1 name")
    (repo / name).unlink()
    g(repo, "checkout", "--", name)
    assert (repo / name).read_bytes() == data
    assert g(repo, "cat-file", "-p", f"HEAD:{name}").stdout.startswith("version theta-store/v1\n")


@pytest.mark.parametrize("head", [b"+00a", b" 00a", b"0x0a", b"00_a", b"0003"])
def test_pkt_headers_are_four_hex_digits(tmp_path: Path, head: bytes) -> None:
    """Headers git never writes are a broken stream, not a length that int() happens to read."""
    path = tmp_path / "pkt"
    path.write_bytes(head + b"abcdef")
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(ProtocolError, match="bad pkt-line"):
            PktIO(fd, io.BytesIO()).read_pkt()
    finally:
        os.close(fd)


def test_damaged_chunk_index_records_are_dropped(tmp_path: Path) -> None:
    """Found by the `chunk_index` target: a record whose plane modes hold the unused code 3
    raised IndexError in every command that reads the chunk index (add, fetch, gc)."""
    repo = new_repo(tmp_path / "repo")
    write(repo / "m.safetensors", model_bytes(rows=16, cols=32))
    commit(repo, "one")
    store = GitStore(repo)
    try:
        good = store._index_path.read_bytes()
        bad = struct.pack("<32s20sQBH", b"\x09" * 32, b"\x08" * 20, 100, 2, 0b1111)
        store._index_path.write_bytes(good + bad)
        store._index = None
        index = store.chunk_index()
        assert b"\x09" * 32 not in index and len(index) == len(good) // 63
    finally:
        store.close()
    write(repo / "m.safetensors", model_bytes(rows=16, cols=32, bias=1.0))
    commit(repo, "two")  # an add reads the index
    with theta_store.Repo(repo) as r:
        assert r.fsck()["ok"]
