"""Corruption and repair: a damaged or unreachable checkpoint version met by git checkout, stash
and rebase (with `thetastore.skipDownloadErrors` on and off), found by `theta-store fsck`, and
repaired by `theta-store fsck --repair` from a remote that has an intact copy (git daemon)."""

from __future__ import annotations

from pathlib import Path

import pytest

from test_filter_errors import _corrupt_largest_frame
from test_git_e2e import commit, g, global_config, model_bytes, new_repo, pointer_version, write
from theta_store.pointer import Pointer, looks_like_pointer

__all__ = ["global_config"]  # autouse fixture: theta-store installed in a private global config

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
