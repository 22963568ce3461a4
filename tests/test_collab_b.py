"""End-to-end (issue 11, items 5 and 6): .gitattributes reaches the commits, pointers under untracked
names are flagged, and a clone made before theta-store was installed gets its checkpoints back."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from servers import Remote
from test_git_e2e import (
    _server,
    clean_status,
    clone,
    commit,
    g,
    global_config,  # noqa: F401  (the autouse fixture: theta-store installed globally)
    model_bytes,
    pointer_version,
    ts,
    versions,
    write,
)


@pytest.fixture
def bare(tmp_path: Path) -> Iterator[Remote]:
    """A bare repository over file://."""
    yield from _server("file", tmp_path)


def _pointer(repo: Path, rev_path: str) -> bytes:
    return g(repo, "cat-file", "blob", rev_path).stdout.encode()


def _without_theta_store(tmp_path: Path) -> dict[str, str]:
    """The environment of a user who has not installed theta-store: an empty ~/.gitconfig."""
    empty = tmp_path / "empty-gitconfig"
    empty.write_text("")
    return {"GIT_CONFIG_GLOBAL": str(empty)}


# ---------------------------------------------------------------- item 5: .gitattributes


def test_track_stages_gitattributes_so_a_clone_gets_real_files(tmp_path: Path, bare: Remote) -> None:
    a = tmp_path / "a"
    a.mkdir()
    g(a, "init", "-q", "-b", "main")
    out = ts(a, "track", "*.safetensors").stdout
    assert "staged .gitattributes" in out and "git commit" in out, out
    assert ".gitattributes" in g(a, "diff", "--cached", "--name-only").stdout
    assert json.loads(ts(a, "track", "--json", "*.ckpt").stdout)["staged"] == ".gitattributes"
    # the user adds only the model, as the README's flow does
    v1 = model_bytes(0, layers=2)
    write(a / "model.safetensors", v1)
    g(a, "add", "model.safetensors")
    g(a, "commit", "-q", "-m", "v1")
    assert "filter=thetastore" in g(a, "show", "HEAD:.gitattributes").stdout
    g(a, "push", "-q", bare.url, "main")

    b = tmp_path / "b"
    clone(bare.url, b)
    assert (b / "model.safetensors").read_bytes() == v1  # not the pointer
    clean_status(b)
    # nothing to stage a second time: no message, nothing staged
    assert "staged" not in ts(a, "track", "*.safetensors").stdout
    assert g(a, "diff", "--cached", "--name-only").stdout == ""


def test_status_flags_a_pointer_under_an_untracked_name(tmp_path: Path, bare: Remote) -> None:
    a = tmp_path / "a"
    a.mkdir()
    g(a, "init", "-q", "-b", "main")
    ts(a, "track", "*.safetensors")
    v1 = model_bytes(0, layers=2)
    write(a / "model.safetensors", v1)
    commit(a, "v1")
    s = json.loads(ts(a, "status", "--json").stdout)
    assert s["uncovered"] == [] and s["pointer_files"] == []
    [f] = s["files"]
    assert f["path"] == "model.safetensors" and f["worktree"] == "materialised" and f["tracked"] and f["committed"]

    g(a, "mv", "model.safetensors", "model.bin")
    r = ts(a, "status")
    assert r.returncode == 0
    assert "model.bin" in r.stdout and "NOT TRACKED" in r.stdout and "warning:" in r.stdout and "hint:" in r.stdout, r.stdout
    g(a, "commit", "-q", "-m", "rename")
    s = json.loads(ts(a, "ls-files", "--json").stdout)
    assert s["uncovered"] == ["model.bin"]
    assert [(f["path"], f["worktree"], f["tracked"]) for f in s["files"]] == [("model.bin", "materialised", False)]

    # what it means for a collaborator: the pointer file, and a clean git status
    g(a, "push", "-q", bare.url, "main")
    b = tmp_path / "b"
    clone(bare.url, b)
    assert (b / "model.bin").read_bytes() == _pointer(a, "HEAD:model.bin")
    clean_status(b)
    s = json.loads(ts(b, "status", "--json").stdout)
    assert s["uncovered"] == ["model.bin"] and s["pointer_files"] == ["model.bin"]

    # a .gitattributes that was never staged covers nothing a commit carries
    c = tmp_path / "c"
    c.mkdir()
    g(c, "init", "-q", "-b", "main")
    ts(c, "track", "*.safetensors")
    g(c, "rm", "-q", "--cached", ".gitattributes")
    write(c / "model.safetensors", v1)
    ts(c, "add", "model.safetensors")
    assert json.loads(ts(c, "status", "--json").stdout)["uncovered"] == ["model.safetensors"]


def test_status_tells_pointer_files_checkpoints_and_changes_apart(tmp_path: Path, bare: Remote) -> None:
    a = tmp_path / "a"
    a.mkdir()
    g(a, "init", "-q", "-b", "main")
    ts(a, "track", "*.safetensors")
    write(a / "one.safetensors", model_bytes(0, layers=2))
    write(a / "two.safetensors", model_bytes(1, layers=2))
    commit(a, "v1")
    g(a, "push", "-q", bare.url, "main")
    b = tmp_path / "b"
    clone(bare.url, b, env={"THETA_STORE_SKIP_SMUDGE": "1"})
    ts(b, "restore", "one.safetensors")

    def states() -> dict[str, str]:
        return {f["path"]: f["worktree"] for f in json.loads(ts(b, "status", "--json").stdout)["files"]}

    assert states() == {"one.safetensors": "materialised", "two.safetensors": "pointer"}
    # same size, other bytes, stat data git has not seen: hashed, and found modified
    data = bytearray((b / "one.safetensors").read_bytes())
    data[-1] ^= 1
    (b / "one.safetensors").write_bytes(bytes(data))
    assert states()["one.safetensors"] == "modified"
    data[-1] ^= 1
    (b / "one.safetensors").write_bytes(bytes(data))  # the same bytes again, newer stat data
    assert states()["one.safetensors"] == "materialised"
    (b / "two.safetensors").unlink()
    assert states()["two.safetensors"] == "missing"


# ---------------------------------------------------------------- item 6: pull, restore DIR, fetch


def _pushed(tmp_path: Path, remote: Remote) -> tuple[Path, dict[str, bytes]]:
    """Repo a with three checkpoints in two folders, committed and pushed."""
    a = tmp_path / "a"
    a.mkdir()
    g(a, "init", "-q", "-b", "main")
    ts(a, "track", "*.safetensors")
    files = {
        "model.safetensors": model_bytes(0, layers=2),
        "models/x.safetensors": model_bytes(1, layers=2),
        "models/y.safetensors": model_bytes(2, layers=2),
    }
    for name, data in files.items():
        write(a / name, data)
    commit(a, "v1")
    g(a, "push", "-q", remote.url, "main")
    return a, files


def _cloned_before_install(tmp_path: Path, remote: Remote) -> Path:
    b = tmp_path / "b"
    clone(remote.url, b, env=_without_theta_store(tmp_path))
    return b


def test_pull_after_a_late_install(tmp_path: Path, bare: Remote) -> None:
    a, files = _pushed(tmp_path, bare)
    b = _cloned_before_install(tmp_path, bare)
    for name in files:  # the clone holds pointer files, and git sees nothing wrong
        assert (b / name).read_bytes() == _pointer(a, f"HEAD:{name}")
    assert versions(b) == set()
    ts(b, "install")
    clean_status(b)
    # what a user tries first: git leaves the pointers (it sees the files as unchanged)
    g(b, "checkout", "--", ".")
    g(b, "reset", "-q", "--hard")
    for name in files:
        assert (b / name).read_bytes() == _pointer(a, f"HEAD:{name}")

    r = json.loads(ts(b, "pull", "--json").stdout)
    assert sorted(r["restored"]) == sorted(files) and r["skipped"] == []
    assert sorted(r["fetched"]) == sorted(versions(a))
    for name, data in files.items():
        assert (b / name).read_bytes() == data
    clean_status(b)
    assert versions(b) == versions(a)

    # again: nothing to do; a file with local changes is never overwritten, and it says so
    write(b / "models/x.safetensors", model_bytes(3, layers=2))
    (b / "model.safetensors").write_bytes(_pointer(a, "HEAD:model.safetensors"))
    r2 = ts(b, "pull")
    assert "models/x.safetensors" in r2.stderr and "local changes" in r2.stderr, r2.stderr
    assert (b / "models/x.safetensors").read_bytes() == model_bytes(3, layers=2)
    assert (b / "model.safetensors").read_bytes() == files["model.safetensors"]
    assert "restored model.safetensors" in r2.stdout and "models/y" not in r2.stdout


def test_pull_paths_and_restore_directories(tmp_path: Path, bare: Remote) -> None:
    a, files = _pushed(tmp_path, bare)
    b = _cloned_before_install(tmp_path, bare)
    ts(b, "install")

    # pull -- PATH: only what is under PATH is fetched and restored
    r = json.loads(ts(b, "pull", "--json", "origin", "--", "models/x.safetensors").stdout)
    assert r["restored"] == ["models/x.safetensors"]
    assert versions(b) == {pointer_version(a, "HEAD:models/x.safetensors")}
    assert (b / "models/x.safetensors").read_bytes() == files["models/x.safetensors"]
    assert (b / "models/y.safetensors").read_bytes() == _pointer(a, "HEAD:models/y.safetensors")
    clean_status(b)

    # restore DIR: every pointer under it, fetching what is missing; done files are left alone
    out = ts(b, "restore", "models").stdout
    assert "restored models/y.safetensors" in out and "models/x" not in out, out
    assert (b / "models/y.safetensors").read_bytes() == files["models/y.safetensors"]
    assert (b / "model.safetensors").read_bytes() == _pointer(a, "HEAD:model.safetensors")
    clean_status(b)
    # from a subfolder, `.` is that folder; from the top, everything
    ts(b / "models", "restore", ".")
    assert (b / "model.safetensors").read_bytes() == _pointer(a, "HEAD:model.safetensors")
    ts(b, "restore", ".")
    for name, data in files.items():
        assert (b / name).read_bytes() == data
    clean_status(b)
    assert versions(b) == versions(a)

    r = ts(b, "pull", "--", "nowhere", ok=False)
    assert r.returncode == 1 and "nowhere" in r.stderr and "hint:" in r.stderr


def test_fetch_reads_trees_not_history(tmp_path: Path, bare: Remote) -> None:
    a = tmp_path / "a"
    a.mkdir()
    g(a, "init", "-q", "-b", "main")
    ts(a, "track", "*.safetensors")
    write(a / "model.safetensors", model_bytes(0, layers=2))
    commit(a, "v1")
    old = pointer_version(a, "HEAD:model.safetensors")
    write(a / "model.safetensors", model_bytes(0, bias=1.0, layers=2))
    commit(a, "v2")
    new = pointer_version(a, "HEAD:model.safetensors")
    g(a, "push", "-q", bare.url, "main")

    b = tmp_path / "b"
    clone(bare.url, b, env={"THETA_STORE_SKIP_SMUDGE": "1"})
    assert versions(b) == set()
    r = json.loads(ts(b, "fetch", "--json").stdout)
    assert versions(b) == {new} and r["fetched"] == 1 and r["versions"] == [new]
    # a first argument that names no remote is a revision
    ts(b, "fetch", "HEAD~1")
    assert versions(b) == {new, old}

    c = tmp_path / "c"
    clone(bare.url, c, env={"THETA_STORE_SKIP_SMUDGE": "1"})
    ts(c, "fetch", "origin", "HEAD")
    assert versions(c) == {new}
    ts(c, "fetch", "--all")  # the whole history's
    assert versions(c) == {new, old}

    r = ts(c, "fetch", "no-such-thing", ok=False)
    assert r.returncode == 1 and "no-such-thing" in r.stderr and "hint:" in r.stderr and "Traceback" not in r.stderr
