"""Corruption and repair: a damaged or unreachable checkpoint version met by git checkout, stash
and rebase (with `thetastore.skipDownloadErrors` on and off), found by `theta-store fsck`, and
repaired by `theta-store fsck --repair` from a remote that has an intact copy (git daemon)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from servers import Remote
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
    rc, r = _fsck(a)
    assert rc == 1 and [d["version"] for d in r["damaged"]] == [ver1]
