"""Arrays of deflated .npz members (np.savez_compressed) stored as tensors: the file is stored
expanded when the core's pinned zlib re-deflates every member byte-exactly, and rebuilt so on
checkout; otherwise the members stay opaque, their arrays still listed and readable."""

from __future__ import annotations

import copy
import io
import json
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

import theta_store
from conftest import git
from theta_store import deflated
from theta_store.errors import CorruptObject, ThetaStoreError
from theta_store.formats import detect
from theta_store.manifest import Manifest


def cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "theta_store", *args], cwd=cwd, capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    return r


def setup_repo(d: Path) -> None:
    cli(d, "install")
    cli(d, "track", "*.npz")


def model(seed: int = 3) -> dict[str, np.ndarray[Any, Any]]:
    rng = np.random.default_rng(seed)
    return {
        "embed": (rng.standard_normal((512, 512)) * 0.02).astype(np.float32),  # 1 MiB
        "proj": (rng.standard_normal((512, 512)) * 0.02).astype(np.float32),
        "bias": np.zeros(512, np.float32),
        "steps": np.arange(12, dtype=np.int64).reshape(3, 4),
        "fortran": np.asfortranarray(rng.standard_normal((5, 3))),
    }


def rows(repo_dir: Path, name: str, rev: str | None = None) -> dict[str, Any]:
    spec = f"{rev}:{name}" if rev else name
    return json.loads(cli(repo_dir, "show", "--json", spec).stdout)  # type: ignore[no-any-return]


def kinds(info: dict[str, Any]) -> dict[str, str]:
    return {r["name"]: r["kind"] for r in info["rows"] if r["kind"] != "skeleton"}


def test_savez_compressed_arrays_stored_as_tensors(repo_dir: Path) -> None:
    assert theta_store.__file__.startswith(str(Path(__file__).parent.parent / "python"))
    setup_repo(repo_dir)
    path = repo_dir / "model.npz"
    arrays = model()
    np.savez_compressed(path, **arrays)
    v1 = path.read_bytes()
    git(repo_dir, "add", "-A")
    git(repo_dir, "commit", "-qm", "one")

    info = rows(repo_dir, "model.npz", "HEAD")
    assert kinds(info) == dict.fromkeys(arrays, "tensor")
    assert info["size"] == len(v1) and "stored inflated" in info["note"]
    text = cli(repo_dir, "show", "model.npz").stdout
    assert "member" not in text.replace("members", "")
    with theta_store.Repo(repo_dir) as r:
        m = r.store.read_manifest_bytes(bytes.fromhex(info["manifest"]))
        mf = Manifest.from_bytes(m)
        assert mf.deflated is not None and [x.name for x in mf.deflated.members] == [f"{k}.npy" for k in arrays]
        assert {x.params for x in mf.deflated.members} == {(6, -15, 8, 0)}
        assert mf.file_size == len(v1) and mf.size > len(v1)

    # A change inside one array costs about that change (a delta), not the whole member.
    arrays["proj"][100] += 0.5
    np.savez_compressed(path, **arrays)
    v2 = path.read_bytes()
    with theta_store.Repo(repo_dir) as r:
        (rep,) = r.add([str(path)])
        m2 = Manifest.from_bytes(r.store.read_manifest_bytes(bytes.fromhex(rep.manifest)))
    assert rep.new_bytes < 0.05 * len(v2), rep
    assert m2.deflated is not None
    same = {a.name for a, b in zip(mf.deflated.members, m2.deflated.members, strict=True) if a.packed_blake3 == b.packed_blake3}
    assert same == {f"{k}.npy" for k in arrays} - {"proj.npy"}
    # A whole array replaced costs about that array.
    arrays["embed"] = (np.random.default_rng(9).standard_normal((512, 512)) * 0.02).astype(np.float32)
    np.savez_compressed(path, **arrays)
    v3 = path.read_bytes()
    with theta_store.Repo(repo_dir) as r:
        (rep,) = r.add([str(path)])
    assert 0.5 * arrays["embed"].nbytes < rep.new_bytes < 1.1 * arrays["embed"].nbytes, rep
    git(repo_dir, "commit", "-qm", "three")

    # Byte-exact through git checkout (the filter's smudge) and restore.
    path.unlink()
    git(repo_dir, "checkout", "--", "model.npz")
    assert path.read_bytes() == v3
    git(repo_dir, "checkout", "HEAD~1", "--", "model.npz")
    assert path.read_bytes() == v1
    git(repo_dir, "checkout", "HEAD", "--", "model.npz")
    assert path.read_bytes() == v3
    assert git(repo_dir, "status", "--porcelain").stdout == ""

    # open, diff and delta see the arrays as tensors.
    with theta_store.open(path, rev="HEAD") as f:
        assert f.keys() == list(arrays)
        for k, a in arrays.items():
            got = f.get_tensor(k)
            assert got.dtype == a.dtype
            np.testing.assert_array_equal(got, a)
        np.testing.assert_array_equal(f.get_slice("proj")[99:102], arrays["proj"][99:102])
    diff = json.loads(cli(repo_dir, "diff", "--json", "HEAD~1", "HEAD", "--", "model.npz").stdout)
    files = diff if isinstance(diff, list) else diff["files"]
    changed = {t["name"] for f in files for t in f["tensors"] if t["kind"] != "unchanged"}
    assert changed == {"embed", "proj"}
    with theta_store.delta(path, "HEAD~1", "HEAD") as d:
        assert sorted(k for k, v in d.items() if v.kind != "unchanged") == ["embed", "proj"]
        assert set(np.nonzero(d["proj"].dense())[0]) == {100}


def test_level_9_is_found_and_recorded(tmp_path: Path) -> None:
    """zipfile's compresslevel=9 is reproduced too (numpy's default is 6): the level is recorded."""
    path = tmp_path / "nine.npz"
    ints = np.random.default_rng(1).integers(0, 50, 30_000).astype(np.int64)  # levels 6 and 9 differ on these
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z, z.open("ints.npy", "w") as fh:
        np.lib.format.write_array(fh, ints)
    expanded, layout = deflated.expand(str(path), detect(str(path)))
    assert expanded is not None
    try:
        assert [m.params for m in expanded.deflated.members] == [(9, -15, 8, 0)]
        assert [r.name for r in layout.regions] == ["ints"]
    finally:
        expanded.close()


def other_encoder(monkeypatch: pytest.MonkeyPatch) -> None:
    """np.savez_compressed deflates as another encoder from now on (same inflated bytes, other
    compressed bytes)."""
    monkeypatch.setattr(zipfile, "_get_compressor", lambda kind, level=None: SyncFlushing())


class SyncFlushing:
    """zlib level 6 with a sync flush after every write: a valid stream that no plain run of
    zlib gives (numpy writes the .npy header and the data apart)."""

    def __init__(self) -> None:
        self.z = zlib.compressobj(6, zlib.DEFLATED, -15)

    def compress(self, data: bytes) -> bytes:
        return self.z.compress(data) + self.z.flush(zlib.Z_SYNC_FLUSH)

    def flush(self) -> bytes:
        return self.z.flush()


def test_other_encoder_kept_opaque_listed_and_exact(repo_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    setup_repo(repo_dir)
    path = repo_dir / "other.npz"
    arrays = model()
    other_encoder(monkeypatch)
    np.savez_compressed(path, **arrays)
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as z:  # really another stream than numpy's own
        assert all(i.compress_type == zipfile.ZIP_DEFLATED for i in z.infolist())
    git(repo_dir, "add", "-A")
    git(repo_dir, "commit", "-qm", "other")
    info = rows(repo_dir, "other.npz", "HEAD")
    assert kinds(info) == dict.fromkeys(arrays, "member")
    assert "kept compressed" in info["note"] and "reproduces" in info["note"]
    with theta_store.open(path, rev="HEAD") as f:
        assert f.keys() == list(arrays)
        for k, a in arrays.items():
            np.testing.assert_array_equal(f.get_tensor(k), a)
    path.unlink()
    git(repo_dir, "checkout", "--", "other.npz")
    assert path.read_bytes() == raw


def patch_member(data: bytearray, name: str, *, crc: int | None = None, size: int | None = None) -> None:
    """Rewrite a member's CRC-32 or uncompressed size in its local header and central directory
    entry (a zip64 size in the extra fields is what numpy's force_zip64 writes)."""
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as z:
        local = z.getinfo(name).header_offset
    for sig, crc_at in ((b"PK\x03\x04", 14), (b"PK\x01\x02", 16)):
        pos = local if sig == b"PK\x03\x04" else _central(data, name)
        assert data[pos : pos + 4] == sig
        if crc is not None:
            struct.pack_into("<I", data, pos + crc_at, crc)
        if size is not None:
            usize_at = crc_at + 8
            if struct.unpack_from("<I", data, pos + usize_at)[0] == 0xFFFFFFFF:
                n_len, _ = struct.unpack_from("<HH", data, pos + (26 if sig == b"PK\x03\x04" else 28))
                extra = pos + (30 if sig == b"PK\x03\x04" else 46) + n_len
                assert struct.unpack_from("<HH", data, extra)[0] == 1
                struct.pack_into("<Q", data, extra + 4, size)
            else:
                struct.pack_into("<I", data, pos + usize_at, size)


def _central(data: bytearray, name: str) -> int:
    pos = 0
    while True:
        pos = bytes(data).index(b"PK\x01\x02", pos)
        n_len = struct.unpack_from("<H", data, pos + 28)[0]
        if bytes(data[pos + 46 : pos + 46 + n_len]) == name.encode():
            return pos
        pos += 4


@pytest.mark.parametrize("damage", ["crc", "size"])
def test_lying_member_kept_opaque(repo_dir: Path, damage: str) -> None:
    """A member whose CRC-32 or claimed size is a lie is kept compressed (the file is stored as it
    is, byte-exact); reading an array whose CRC-32 fails is a clear error, the others read."""
    setup_repo(repo_dir)
    path = repo_dir / "lying.npz"
    arrays = model()
    np.savez_compressed(path, **arrays)
    data = bytearray(path.read_bytes())
    if damage == "crc":
        patch_member(data, "proj.npy", crc=0x12345678)
    else:
        patch_member(data, "proj.npy", size=arrays["proj"].nbytes + 128 + 1000)
    path.write_bytes(bytes(data))
    git(repo_dir, "add", "-A")
    git(repo_dir, "commit", "-qm", "lying")
    info = rows(repo_dir, "lying.npz", "HEAD")
    assert "proj.npy" in info["note"] and "kept compressed" in info["note"]
    assert ("CRC-32" in info["note"]) if damage == "crc" else ("claims" in info["note"])
    assert kinds(info)["embed"] == "member"
    with theta_store.open(path, rev="HEAD") as f:
        np.testing.assert_array_equal(f.get_tensor("embed"), arrays["embed"])
        if damage == "crc":
            with pytest.raises(ThetaStoreError, match=r"proj\.npy"):
                f.get_tensor("proj")
        else:  # the array's bytes are intact: only the size after them is a lie
            np.testing.assert_array_equal(f.get_tensor("proj"), arrays["proj"])
    path.unlink()
    git(repo_dir, "checkout", "--", "lying.npz")
    assert path.read_bytes() == bytes(data)


def test_zip_bomb_ratio_kept_opaque(tmp_path: Path) -> None:
    """Members that would expand the file far beyond its size stay compressed: nothing is inflated."""
    path = tmp_path / "bomb.npz"
    np.savez_compressed(path, zeros=np.zeros(96 << 20, np.uint8))  # 96 MiB in ~100 kB
    layout = detect(str(path))
    expanded, kept = deflated.expand(str(path), layout)
    assert expanded is None and "zip bomb" in kept.note
    assert [a["name"] for a in kept.metadata["arrays"]] == ["zeros"]


def test_rebuild_with_other_parameters_is_an_error(tmp_path: Path) -> None:
    """A rebuild that does not give the file back (here: another level than the one recorded, as
    a different zlib would) is a clear error, never wrong bytes."""
    path = tmp_path / "m.npz"
    np.savez_compressed(path, **model())
    expanded, _ = deflated.expand(str(path), detect(str(path)))
    assert expanded is not None
    try:
        d = expanded.deflated
        wrong = deflated.Deflated(d.size, d.blake3, tuple(m.__class__(**{**m.__dict__, "params": (1, -15, 8, 0)}) for m in d.members))
        out = tmp_path / "out"
        with pytest.raises(CorruptObject, match=r"deflates to|longer than"):
            deflated.rebuild(expanded.path, str(out), wrong)
        deflated.rebuild(expanded.path, str(out), d)
        assert out.read_bytes() == path.read_bytes()
    finally:
        expanded.close()


def test_hostile_deflated_map_in_manifest(tmp_path: Path) -> None:
    """A manifest whose members overlap or do not add up is refused as corrupt."""
    path = tmp_path / "m.npz"
    np.savez_compressed(path, **model())
    expanded, layout = deflated.expand(str(path), detect(str(path)))
    assert expanded is not None
    expanded.close()
    d = expanded.deflated
    spans = [{"kind": "skeleton", "offset": 0, "length": layout.size, "chunks": [[b"\0" * 32, layout.size]]}]
    good = {"type": "theta-store/manifest", "version": 2, "format": "numpy", "chunk_bytes": 1 << 21, "spans": spans}
    good |= {"file": {"size": layout.size, "blake3": b"\1" * 32}, "metadata": {}, "note": "", "deflated": d.to_obj()}
    assert Manifest.from_bytes(msgpack.packb(good)).deflated == d
    overlap = copy.deepcopy(d.to_obj())
    overlap["members"][1]["offset"] = overlap["members"][0]["offset"]
    for bad, match in (
        (good | {"deflated": overlap}, "overlaps"),
        (good | {"version": 1}, "has a 'deflated' map"),
        ({k: v for k, v in good.items() if k != "deflated"}, "lacks"),
        (good | {"file": {"size": layout.size + 1, "blake3": b"\1" * 32}}, "spans cover|expand"),
    ):
        with pytest.raises(CorruptObject, match=match):
            Manifest.from_bytes(msgpack.packb(bad))
