"""Corruption and repair: a damaged or unreachable checkpoint version met by git checkout, stash
and rebase (with `thetastore.skipDownloadErrors` on and off), found by `theta-store fsck`, and
repaired by `theta-store fsck --repair` from a remote that has an intact copy (git daemon)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

import theta_store
from servers import Remote
from test_collab_c import _corrupt_loose, _make_loose
from test_filter_errors import _corrupt_largest_frame
from test_git_e2e import commit, daemon_remote, g, global_config, model_bytes, new_repo, pointer_version, ts, versions, write
from theta_store.pointer import Pointer, looks_like_pointer

__all__ = ["daemon_remote", "global_config"]  # autouse fixture: theta-store installed in a private global config

M = "model.safetensors"


SETTINGS = ["env", "config", "off"]


def _setting(repo: Path, how: str) -> dict[str, str]:
    """Turn thetastore.skipDownloadErrors on by environment or git config, or leave it off (the default)."""
    if how == "config":
        g(repo, "config", "thetastore.skipDownloadErrors", "true")
    return {"THETA_STORE_SKIP_DOWNLOAD_ERRORS": "1"} if how == "env" else {}


def _damaged_head(tmp_path: Path) -> tuple[Path, bytes, str]:
    """A repository whose HEAD (main) holds v1 of the model, with a byte of v1 flipped in its pack;
    branch `v2` holds v2 (intact, no chunk in common)."""
    a = new_repo(tmp_path / "a")
    v1, v2 = model_bytes(0), model_bytes(3)
    write(a / M, v1)
    commit(a, "v1")
    g(a, "checkout", "-q", "-b", "v2")
    write(a / M, v2)
    commit(a, "v2")
    g(a, "checkout", "-q", "main")
    assert (a / M).read_bytes() == v1
    version = pointer_version(a, "main:" + M)
    _corrupt_largest_frame(a, version)
    return a, v2, version


def _is_pointer_to(path: Path, version: str) -> bool:
    data = path.read_bytes()
    return looks_like_pointer(data) and Pointer.parse(data).manifest_id.hex() == version


@pytest.mark.parametrize("how", SETTINGS)
def test_stash_over_a_damaged_version(tmp_path: Path, how: str) -> None:
    a, _, version = _damaged_head(tmp_path)
    env, skip = _setting(a, how), how != "off"
    (a / M).unlink()  # a change in the work tree (not a new version: clean would read v1 as a delta base); stash puts v1 back
    r = g(a, "stash", env=env, ok=skip)
    assert M in r.stderr and version[:16] in r.stderr and "damaged" in r.stderr, r.stderr
    if skip:
        assert "left as its pointer" in r.stderr, r.stderr
        assert _is_pointer_to(a / M, version)
        assert g(a, "status", "--porcelain", env=env).stdout == ""
        g(a, "stash", "pop", env=env)
        assert not (a / M).exists()
    else:
        assert "left as its pointer" not in r.stderr and "smudge filter thetastore failed" in r.stderr, r.stderr
        # nothing lost: git saved the change (the deletion) before it failed to put v1 back
        assert "stash@{0}" in g(a, "stash", "list").stdout
        assert g(a, "stash", "show", "--name-status").stdout.split() == ["D", M]


def _fine_tune_of_v1(path: Path, changed: range) -> bytes:
    """v1 of `_damaged_head` with the matrices `changed` nudged: a new version whose delta base is v1."""
    rng = np.random.default_rng(0)  # as model_bytes(0)
    tensors = {f"layers.{i}.weight": (rng.standard_normal((512, 1024)) * 0.02).astype(np.float32) for i in range(3)}
    for i in changed:
        tensors[f"layers.{i}.weight"] += np.float32(1e-4)
    tensors["layers.0.bias"] = np.zeros(1024, np.float32)
    theta_store.save_safetensors(str(path), tensors)
    return path.read_bytes()


@pytest.mark.parametrize("how", SETTINGS)
def test_stash_of_a_new_version_over_a_damaged_base(tmp_path: Path, how: str) -> None:
    """The usual stash: a fine-tune written over the checkpoint. Its add must not need the damaged
    v1 (its delta base), and the stash gives back the fine-tune byte for byte."""
    a, _, version = _damaged_head(tmp_path)
    env, skip = _setting(a, how), how != "off"
    tuned = _fine_tune_of_v1(a / M, range(3))
    r = g(a, "stash", env=env, ok=skip)
    assert f"version {version[:16]} (the delta base) is damaged, storing whole frames" in r.stderr, r.stderr
    assert "stash@{0}" in g(a, "stash", "list").stdout
    if skip:
        assert "left as its pointer" in r.stderr and _is_pointer_to(a / M, version)
    else:
        assert "smudge filter thetastore failed" in r.stderr, r.stderr
    g(a, "stash", "pop", env=env)
    assert (a / M).read_bytes() == tuned
    assert g(a, "status", "--porcelain", env=env).stdout.split() == ["M", M]
    # The new version holds no frame of the damage: fsck names v1 alone.
    code, report = _fsck(a)
    assert code == 1 and [d["version"] for d in report["damaged"]] == [version], report


@pytest.mark.parametrize("how", SETTINGS)
def test_rebase_over_a_damaged_version(tmp_path: Path, how: str) -> None:
    a, v2, version = _damaged_head(tmp_path)
    env, skip = _setting(a, how), how != "off"
    write(a / "notes.txt", b"a note\n")
    commit(a, "notes", "notes.txt")  # main moves on: rebasing v2 onto it checks out main's damaged v1
    g(a, "checkout", "-q", "v2")
    assert (a / M).read_bytes() == v2
    r = g(a, "rebase", "main", env=env, ok=skip)
    assert M in r.stderr and version[:16] in r.stderr and "damaged" in r.stderr, r.stderr
    if skip:
        assert "left as its pointer" in r.stderr, r.stderr
        assert (a / M).read_bytes() == v2 and (a / "notes.txt").is_file()
        assert g(a, "rev-parse", "HEAD~1").stdout == g(a, "rev-parse", "main").stdout
    else:
        assert "left as its pointer" not in r.stderr, r.stderr
        g(a, "rebase", "--abort")
        assert (a / M).read_bytes() == v2
        assert g(a, "status", "--porcelain").stdout == ""


def _fsck(repo: Path, *args: str) -> tuple[int, dict[str, Any]]:
    r = ts(repo, "fsck", "--json", *args, ok=False)
    assert r.returncode in (0, 1), r.stderr
    return r.returncode, json.loads(r.stdout)


def test_fsck_lists_and_repair_fetches_from_git_daemon(tmp_path: Path, daemon_remote: Remote) -> None:
    """A flipped byte in a frame two versions share: fsck names both versions with their paths and
    commits; fsck --repair sets the pack aside, keeps its intact objects, fetches the damaged
    versions from git daemon; every version then restores byte-exactly and git fsck passes."""
    a = new_repo(tmp_path / "a")
    v1, v2, w = model_bytes(0), model_bytes(0, bias=1.0), model_bytes(3)  # v2 shares v1's matrices
    write(a / M, v1)
    c1 = commit(a, "v1")
    write(a / M, v2)
    write(a / "other.safetensors", w)
    c2 = commit(a, "v2")
    g(a, "remote", "add", "origin", daemon_remote.url)
    g(a, "push", "-q", "origin", "main")
    ver1, ver2 = pointer_version(a, f"{c1}:{M}"), pointer_version(a, f"{c2}:{M}")
    ver_w = pointer_version(a, f"{c2}:other.safetensors")
    _corrupt_largest_frame(a, ver1)

    rc, r = _fsck(a)
    assert rc == 1 and not r["ok"]
    listed = {d["version"]: d for d in r["damaged"]}
    assert set(listed) == {ver1, ver2}, listed
    assert listed[ver1]["paths"] == [M] and [c["commit"] for c in listed[ver1]["commits"]] == [c1]
    assert [c["commit"] for c in listed[ver2]["commits"]] == [c2]
    assert all("chunk " in p for d in listed.values() for p in d["problems"]), listed
    text = ts(a, "fsck", ok=False).stdout
    assert f"damaged version {ver1[:16]}: {M}" in text and c1[:7] in text, text

    rc, rep = _fsck(a, "--repair")
    assert rc == 0 and rep["ok"], rep
    assert set(rep["repaired"]) == {ver1, ver2} and rep["not_repaired"] == []
    assert any(f.endswith(".pack") for f in rep["moved_aside"])
    assert all("/theta-store/damaged/" in f for f in rep["moved_aside"])
    rc, r = _fsck(a)
    assert rc == 0 and r["ok"] and r["damaged"] == [], r

    g(a, "fsck", "--full")
    for rev, want in ((c1, {M: v1}), (c2, {M: v2, "other.safetensors": w})):
        g(a, "checkout", "-q", "-f", rev)
        for path, data in want.items():
            assert (a / path).read_bytes() == data, (rev, path)
    for path in (M, "other.safetensors"):
        (a / path).unlink()
    ts(a, "restore", M, "other.safetensors")
    assert (a / M).read_bytes() == v2 and (a / "other.safetensors").read_bytes() == w
    assert ver_w not in rep["repaired"]  # intact, in its own pack: never fetched again


def test_repair_without_an_intact_copy_keeps_the_version(tmp_path: Path, daemon_remote: Remote) -> None:
    """The remote lacks the version: fsck --repair says so, exits 1, and the version stays listed (not dropped)."""
    a = new_repo(tmp_path / "a")
    write(a / M, model_bytes(0))
    c1 = commit(a, "v1")
    g(a, "remote", "add", "origin", daemon_remote.url)
    g(a, "push", "-q", "origin", "main", env={"THETA_STORE_SKIP_PUSH": "1"})
    ver1 = pointer_version(a, f"{c1}:{M}")
    _corrupt_largest_frame(a, ver1)
    rc, rep = _fsck(a, "--repair")
    assert rc == 1 and rep["not_repaired"] == [ver1] and rep["repaired"] == [], rep
    assert ver1 in versions(a)
    r = ts(a, "fsck", "--repair", ok=False)
    assert r.returncode == 1 and f"not repaired: version {ver1[:16]}" in r.stdout and f"damaged version {ver1[:16]}: {M}" in r.stdout, r
    rc, r = _fsck(a)
    assert rc == 1 and [d["version"] for d in r["damaged"]] == [ver1]


def _largest_frame(repo: Path, version: str) -> tuple[Path, int]:
    """The pack holding the largest frame of `version`, and the frame's offset in it."""
    with theta_store.Repo(repo) as r:
        frames = r.store.version_frames(bytes.fromhex(version))
        paths, where = r.store.locate([max(frames.values(), key=lambda f: f.frame_len).object_id])
    assert where[0] is not None
    return Path(paths[where[0].pack]), where[0].offset


def _damage(repo: Path, version: str, kind: str) -> None:
    pack, offset = _largest_frame(repo, version)
    state = repo / ".git" / "theta-store"
    if kind == "flipped-bit":
        _corrupt_largest_frame(repo, version)
    elif kind == "truncated-pack":
        os.chmod(pack, 0o644)
        pack.write_bytes(pack.read_bytes()[: offset + 100])
    elif kind == "missing-object":
        for f in (pack, pack.with_suffix(".idx"), pack.with_suffix(".keep")):
            os.chmod(f, 0o644)
            f.unlink(missing_ok=True)
    elif kind == "damaged-plan":  # its chunks swapped: each verifies, the file does not
        plan = state / "plans" / version
        v, size, blake3, packs, tuples, bases = msgpack.unpackb(plan.read_bytes())
        tuples[0], tuples[1] = tuples[1], tuples[0]
        plan.write_bytes(msgpack.packb([v, size, blake3, packs, tuples, bases]))
    elif kind == "damaged-chunk-index":
        index = state / "chunks2.idx"
        data = bytearray(index.read_bytes())
        for i in range(0, len(data), 7):
            data[i] ^= 0xA5
        index.write_bytes(bytes(data[:-3]))  # and a partial last record
    elif kind == "corrupt-loose-object":  # as in a repository that received its objects one by one
        _make_loose(repo)
        with theta_store.Repo(repo) as r:
            frames = r.store.version_frames(bytes.fromhex(version))
        _corrupt_loose(repo, max(frames.values(), key=lambda f: f.frame_len).object_id.hex())
    else:
        raise AssertionError(kind)


DAMAGE = ["flipped-bit", "truncated-pack", "missing-object", "corrupt-loose-object", "damaged-plan", "damaged-chunk-index"]


@pytest.mark.parametrize("kind", DAMAGE)
def test_damage_restore_fsck_repair(tmp_path: Path, daemon_remote: Remote, kind: str) -> None:
    """Each kind of damage: restore and checkout give the exact checkpoint or refuse naming the
    file and version (and the chunk, where one chunk is bad), never a wrong file; `fsck --repair`
    against git daemon leaves a repository whose every version restores and that git fsck passes."""
    a = new_repo(tmp_path / "a")
    v1, v2 = model_bytes(0), model_bytes(0, bias=1.0)
    write(a / M, v1)
    c1 = commit(a, "v1")
    g(a, "remote", "add", "origin", daemon_remote.url)
    g(a, "push", "-q", "origin", "main")
    ver = pointer_version(a, f"{c1}:{M}")
    _damage(a, ver, kind)
    cache_only = kind in ("damaged-plan", "damaged-chunk-index")

    for how in ("restore", "checkout"):
        (a / M).unlink(missing_ok=True)
        cmd = ["theta-store", "restore", M] if how == "restore" else ["git", "checkout", "-f", "HEAD", "--", M]
        r = subprocess.run(cmd, cwd=a, capture_output=True, text=True)
        if r.returncode == 0:
            assert (a / M).read_bytes() == v1, (how, kind)
            continue
        assert M in r.stderr and ver[:16] in r.stderr, (how, kind, r.stderr)
        if kind == "flipped-bit":
            assert "chunk " in r.stderr, r.stderr
        assert not (a / M).exists() or (a / M).read_bytes() == v1, (how, kind)
        if cache_only:  # a cache is dropped once found wrong: the same command then succeeds
            subprocess.run(cmd, cwd=a, check=True, capture_output=True)
            assert (a / M).read_bytes() == v1, (how, kind)
        else:
            assert "damaged" in r.stderr or "cannot be read" in r.stderr, r.stderr

    rc, r = _fsck(a)
    assert (rc == 0) == cache_only, r
    if not cache_only:
        assert [d["version"] for d in r["damaged"]] == [ver] and r["damaged"][0]["paths"] == [M], r
    rc, rep = _fsck(a, "--repair")
    assert rc == 0 and rep["ok"], rep
    assert rep["repaired"] == ([] if cache_only else [ver]), rep
    g(a, "fsck", "--full")
    (a / M).unlink(missing_ok=True)
    ts(a, "restore", M)
    assert (a / M).read_bytes() == v1
    # the rebuilt chunk index is right: a new version sharing v1's matrices is stored and restored exactly
    write(a / M, v2)
    commit(a, "v2")
    g(a, "checkout", "-q", "-f", c1)
    assert (a / M).read_bytes() == v1
    g(a, "checkout", "-q", "-f", "main")
    assert (a / M).read_bytes() == v2
    assert _fsck(a)[0] == 0


@pytest.mark.parametrize("how", SETTINGS)
def test_clone_with_an_unreachable_version(tmp_path: Path, daemon_remote: Remote, how: str) -> None:
    """The remote lacks one version (its push was skipped): with the setting on, the clone goes on
    (git delays the smudge, the batch fetch fails), that file stays its pointer, the other is
    checked out; with it off, the clone's checkout fails naming the file and the version."""
    a = new_repo(tmp_path / "a")
    w = model_bytes(3)
    write(a / "other.safetensors", w)
    commit(a, "other")
    g(a, "push", "-q", daemon_remote.url, "main")
    write(a / M, model_bytes(0))
    c = commit(a, "model")
    g(a, "push", "-q", daemon_remote.url, "main", env={"THETA_STORE_SKIP_PUSH": "1"})
    ver = pointer_version(a, f"{c}:{M}")
    if how == "config":
        g(tmp_path, "config", "--global", "thetastore.skipDownloadErrors", "true")
    env = {"THETA_STORE_SKIP_DOWNLOAD_ERRORS": "1"} if how == "env" else {}
    b = tmp_path / "b"
    r = g(tmp_path, "clone", "-q", daemon_remote.url, str(b), env=env, ok=how != "off")
    assert M in r.stderr and ver[:16] in r.stderr, r.stderr
    if how == "off":
        assert "left as its pointer" not in r.stderr, r.stderr
        return
    assert "left as its pointer" in r.stderr, r.stderr
    assert _is_pointer_to(b / M, ver)
    assert (b / "other.safetensors").read_bytes() == w
    assert g(b, "status", "--porcelain", env=env).stdout == ""


@pytest.mark.parametrize("wrong", ["other-version", "file-hash", "size"])
def test_a_wrong_pointer_never_gives_wrong_weights(tmp_path: Path, wrong: str) -> None:
    """A pointer that parses but lies (another version's id, a wrong file hash, a wrong size),
    staged: restore and checkout refuse naming the file and the version; nothing is written."""
    a = new_repo(tmp_path / "a")
    v1, v2 = model_bytes(0), model_bytes(0, bias=1.0)
    write(a / M, v2)
    c2 = commit(a, "v2")
    write(a / M, v1)
    c1 = commit(a, "v1")
    p1 = Pointer.parse(g(a, "cat-file", "blob", f"{c1}:{M}").stdout.encode())
    p2 = Pointer.parse(g(a, "cat-file", "blob", f"{c2}:{M}").stdout.encode())
    mid, size, blake3 = p1.manifest_id, p1.size, p1.blake3
    if wrong == "other-version":
        mid = p2.manifest_id
    elif wrong == "file-hash":
        blake3 = bytes(x ^ 1 for x in blake3)
    else:
        size += 4
    bad = Pointer(mid, size, blake3, p1.tensors, p1.format).to_bytes()
    blob = subprocess.run(["git", "hash-object", "-w", "--no-filters", "--stdin"], cwd=a, input=bad, capture_output=True, check=True)
    g(a, "update-index", "--cacheinfo", f"100644,{blob.stdout.decode().strip()},{M}")
    (a / M).unlink()
    for cmd in (["theta-store", "restore", M], ["git", "checkout", "--", M]):
        r = subprocess.run(cmd, cwd=a, capture_output=True, text=True)
        assert r.returncode != 0, (cmd, r.stderr)
        assert M in r.stderr and mid.hex()[:16] in r.stderr, (cmd, r.stderr)
        assert not (a / M).exists(), cmd


def test_add_over_a_chunk_index_with_swapped_records(tmp_path: Path) -> None:
    """Two records of the chunk index with their objects swapped (each object exists): a new version
    sharing those chunks must still be stored right (each record's checksum fails: the chunks are
    stored again), never as a tree naming the wrong objects."""
    from theta_store.gitstore import _RECORD

    a = new_repo(tmp_path / "a")
    write(a / M, model_bytes(0))
    commit(a, "v1")
    index = a / ".git" / "theta-store" / "chunks2.idx"
    records = [list(r) for r in _RECORD.iter_unpack(index.read_bytes())]
    records[0][1:3], records[1][1:3] = records[1][1:3], records[0][1:3]
    index.write_bytes(b"".join(_RECORD.pack(*r) for r in records))
    v2 = model_bytes(0, bias=1.0)
    write(a / M, v2)
    commit(a, "v2")
    (a / M).unlink()
    ts(a, "restore", M)
    assert (a / M).read_bytes() == v2


def test_chunk_index_of_an_earlier_release_is_rebuilt(tmp_path: Path) -> None:
    """A chunk index written before records carried a checksum is rebuilt from the versions once,
    so the next add still finds the chunks it shares with them."""
    from theta_store.gitstore import _RECORD

    a = new_repo(tmp_path / "a")
    write(a / M, model_bytes(0))
    commit(a, "v1")
    state = a / ".git" / "theta-store"
    new = (state / "chunks2.idx").read_bytes()
    (state / "chunks.idx").write_bytes(b"".join(new[i : i + _RECORD.size - 4] for i in range(0, len(new), _RECORD.size)))
    (state / "chunks2.idx").unlink()
    (state / "chunk-bases2.idx").unlink(missing_ok=True)
    (state / "chunk-bases.idx").write_bytes(b"")
    with theta_store.Repo(a) as r:
        known = r.store.chunk_index()
    assert len(known) == len(new) // _RECORD.size > 0
    assert (state / "chunks2.idx").read_bytes() == new
    assert not (state / "chunks.idx").exists() and not (state / "chunk-bases.idx").exists()
