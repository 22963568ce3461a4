"""Issue 11, items 1-4: a push carries the checkpoint versions its commits need, or fails.

Each test drives the real `git` binary against a bare remote (file:// or git daemon), as a
collaborator would, with `theta-store install --global` in a private global config.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from servers import Remote, serve
from test_git_e2e import (
    clone,
    commit,
    daemon_remote,
    file_remote,
    g,
    global_config,
    model_bytes,
    new_repo,
    pointer_version,
    ts,
    versions,
    write,
)

__all__ = ["daemon_remote", "file_remote", "global_config"]  # fixtures; global_config is autouse


def version_of(repo: Path, rev: str = "HEAD", path: str = "model.safetensors") -> str:
    return pointer_version(repo, f"{rev}:{path}")


# ---------------------------------------------------------------- 1. no hook, no data


def test_add_without_track_then_push_carries_the_version(tmp_path: Path, file_remote: Remote) -> None:
    """`git init; theta-store add; git commit; git push` with a global install only."""
    a = tmp_path / "a"
    a.mkdir()
    g(a, "init", "-q", "-b", "main")
    write(a / "model.safetensors", model_bytes(0, layers=1))
    r = ts(a, "add", "model.safetensors")
    assert "not tracked" in r.stderr  # the add says collaborators would get a pointer file
    g(a, "commit", "-q", "-m", "v1")
    g(a, "remote", "add", "origin", file_remote.url)
    g(a, "push", "-q", "origin", "main")
    assert version_of(a) in versions(file_remote.path)


def test_clone_with_attributes_only_then_add_and_push(tmp_path: Path, file_remote: Remote) -> None:
    """A clone whose HEAD has only .gitattributes runs no filter: `theta-store add` must set the hook."""
    a = new_repo(tmp_path / "a")
    g(a, "push", "-q", file_remote.url, "main")
    b = tmp_path / "b"
    clone(file_remote.url, b)
    assert not (b / ".git/hooks/pre-push").exists()  # no filter ran: nothing installed the hook
    write(b / "model.safetensors", model_bytes(1, layers=1))
    ts(b, "add", "model.safetensors")
    g(b, "commit", "-q", "-m", "v1")
    g(b, "push", "-q", "origin", "main")
    assert version_of(b) in versions(file_remote.path)
    c = tmp_path / "c"
    clone(file_remote.url, c)
    assert (c / "model.safetensors").read_bytes() == model_bytes(1, layers=1)


def test_push_check_and_fsck_remote_list_commits_the_remote_lacks(tmp_path: Path, file_remote: Remote) -> None:
    a = new_repo(tmp_path / "a")
    g(a, "remote", "add", "origin", file_remote.url)
    write(a / "model.safetensors", model_bytes(0, layers=1))
    c1 = commit(a, "v1")
    g(a, "push", "-q", "origin", "main")
    assert ts(a, "push", "--check").returncode == 0
    write(a / "model.safetensors", model_bytes(0, bias=1.0, layers=1))
    c2 = commit(a, "v2")
    g(a, "push", "-q", "origin", "main", env={"THETA_STORE_SKIP_PUSH": "1"})  # commits without their data

    r = ts(a, "push", "--check", ok=False)
    assert r.returncode == 1
    assert c2[:12] in r.stdout and "model.safetensors" in r.stdout and c1[:12] not in r.stdout
    assert version_of(a)[:16] in r.stdout
    r = ts(a, "fsck", "--remote", "origin", ok=False)  # what the remote's branches need
    assert r.returncode == 1 and c2[:12] in r.stdout
    import json

    report = json.loads(ts(a, "push", "--check", "--json", ok=False).stdout)
    assert [m["commit"] for m in report["missing"]] == [c2] and report["ok"] is False

    ts(a, "push")
    assert ts(a, "push", "--check").returncode == 0
    assert ts(a, "fsck", "--remote", "origin").returncode == 0


# ---------------------------------------------------------------- 2. another tool's hook update


@pytest.mark.skipif(shutil.which("git-lfs") is None, reason="git-lfs is not installed (.ci/run installs it)")
def test_git_lfs_update_force_is_undone_by_the_next_command(tmp_path: Path, file_remote: Remote) -> None:
    a = new_repo(tmp_path / "a")
    g(a, "remote", "add", "origin", file_remote.url)
    write(a / "model.safetensors", model_bytes(0, layers=1))
    commit(a, "v1")
    hook = a / ".git/hooks/pre-push"
    assert "theta-store" in hook.read_text()
    g(tmp_path, "lfs", "install", "--skip-repo")  # LFS's filter config in the (private) global config
    g(a, "lfs", "update", "--force")  # what Git LFS's own message tells users to run
    assert "theta-store" not in hook.read_text()

    # a new version: git's clean filter runs us, which sees the hook and restores the chain
    write(a / "model.safetensors", model_bytes(0, bias=1.0, layers=1))
    r = g(a, "add", "model.safetensors")
    assert "restored" in r.stderr and "pre-push" in r.stderr
    assert "theta-store" in hook.read_text()
    assert "git lfs pre-push" in (a / ".git/hooks/pre-push.before-theta-store").read_text()
    g(a, "commit", "-q", "-m", "v2")
    g(a, "push", "-q", "origin", "main")
    assert {version_of(a, "HEAD~1"), version_of(a)} <= versions(file_remote.path)

    # the same, noticed by a theta-store command with no checkpoint changed
    g(a, "lfs", "update", "--force")
    r = ts(a, "stats")
    assert "restored" in r.stderr and "theta-store" in hook.read_text()


def test_touch_and_status_restore_a_replaced_hook(tmp_path: Path) -> None:
    """The filter's hot path (an unchanged file re-cleaned from the cache) checks the hook too."""
    a = new_repo(tmp_path / "a")
    write(a / "model.safetensors", model_bytes(0, layers=1))
    commit(a, "v1")
    hook = a / ".git/hooks/pre-push"
    hook.write_text("#!/bin/sh\necho another tool\n")
    (a / "model.safetensors").touch()
    r = g(a, "status", "--porcelain")
    assert r.stdout == "" and "restored" in r.stderr
    assert "theta-store" in hook.read_text()
    assert (a / ".git/hooks/pre-push.before-theta-store").read_text() == "#!/bin/sh\necho another tool\n"


# ---------------------------------------------------------------- 3. incomplete pushes


def test_push_to_a_new_remote_fetches_older_versions_first(tmp_path: Path, file_remote: Remote) -> None:
    a = new_repo(tmp_path / "a")
    g(a, "remote", "add", "origin", file_remote.url)
    for i in range(3):
        write(a / "model.safetensors", model_bytes(0, bias=float(i), layers=1))
        commit(a, f"v{i}")
    g(a, "push", "-q", "origin", "main")
    b = tmp_path / "b"
    clone(file_remote.url, b)
    assert len(versions(b)) == 1  # the clone holds HEAD's version only
    with serve("file", tmp_path / "srv2") as new:
        g(b, "remote", "add", "new", new.url)
        r = g(b, "push", "new", "main")
        assert versions(new.path) == versions(a)  # every version the history needs
        assert "fetched 2" in r.stderr
        c = tmp_path / "c"
        clone(new.url, c)
        g(c, "checkout", "-q", "HEAD~2")
        assert (c / "model.safetensors").read_bytes() == model_bytes(0, bias=0.0, layers=1)


def test_push_refuses_when_a_version_is_nowhere(tmp_path: Path, file_remote: Remote) -> None:
    a = new_repo(tmp_path / "a")
    g(a, "remote", "add", "origin", file_remote.url)
    write(a / "model.safetensors", model_bytes(0, layers=1))
    commit(a, "v1")
    write(a / "model.safetensors", model_bytes(0, bias=1.0, layers=1))
    commit(a, "v2")
    g(a, "push", "-q", "origin", "main", env={"THETA_STORE_SKIP_PUSH": "1"})  # origin has no version at all
    b = tmp_path / "b"
    clone(file_remote.url, b, env={"THETA_STORE_SKIP_SMUDGE": "1"})
    with serve("file", tmp_path / "srv2") as new:
        g(b, "remote", "add", "new", new.url)
        r = g(b, "push", "new", "main", ok=False)
        assert "not in this repository" in r.stderr and "allowIncompletePush" in r.stderr
        assert "refs/heads/main" not in new.refs()  # refused: the commits did not go either
        g(b, "config", "thetastore.allowIncompletePush", "true")
        r = g(b, "push", "new", "main")
        assert "incomplete" in r.stderr
        assert "refs/heads/main" in new.refs()


# ---------------------------------------------------------------- 4. dry runs and rejected pushes


def test_dry_run_sends_nothing(tmp_path: Path, file_remote: Remote) -> None:
    a = new_repo(tmp_path / "a")
    g(a, "remote", "add", "origin", file_remote.url)
    write(a / "model.safetensors", model_bytes(0, layers=1))
    commit(a, "v1")
    for args in (["--dry-run"], ["-n"], ["-nv"]):
        r = g(a, "push", *args, "origin", "main")
        assert versions(file_remote.path) == set(), args
        assert "would push 1 checkpoint version" in r.stderr
    g(a, "push", "-q", "origin", "main")
    assert versions(file_remote.path) == versions(a)


def test_rejected_push_uploads_no_version(tmp_path: Path, daemon_remote: Remote) -> None:
    a = new_repo(tmp_path / "a")
    g(a, "push", "-q", daemon_remote.url, "main")
    b = tmp_path / "b"
    clone(daemon_remote.url, b)
    write(b / "other.safetensors", model_bytes(2, layers=1))
    commit(b, "b's model")
    g(b, "push", "-q", "origin", "main")
    g(a, "remote", "add", "origin", daemon_remote.url)
    write(a / "model.safetensors", model_bytes(3, layers=1))
    commit(a, "a's model")
    before = versions(daemon_remote.path)
    r = g(a, "push", "origin", "main", ok=False)  # not a fast-forward: git refuses it before our hook
    assert "rejected" in r.stderr
    assert versions(daemon_remote.path) == before


# ---------------------------------------------------------------- 7. the upload shows progress on a terminal


def test_push_shows_upload_progress_on_a_terminal_only(tmp_path: Path, file_remote: Remote) -> None:
    from test_collab_d import run_tty

    a = new_repo(tmp_path / "a")
    g(a, "remote", "add", "origin", file_remote.url)
    write(a / "model.safetensors", model_bytes(0, layers=1))
    commit(a, "v1")
    rc, out = run_tty(a, "git", "push", "origin", "main")
    assert rc == 0 and "pushing 1 checkpoint version(s) to origin" in out and "Writing objects" in out, out
    write(a / "model.safetensors", model_bytes(0, bias=1.0, layers=1))
    commit(a, "v2")
    rc, out = run_tty(a, "git", "push", "-q", "origin", "main")  # git's -q silences ours too
    assert rc == 0 and "pushing" not in out and "Writing objects" not in out, out
    write(a / "model.safetensors", model_bytes(0, bias=2.0, layers=1))
    commit(a, "v3")
    r = g(a, "push", "origin", "main")  # no terminal: the one summary line, no progress
    assert "pushed 1 checkpoint version(s)" in r.stderr and "Writing objects" not in r.stderr
    assert versions(file_remote.path) == versions(a)
