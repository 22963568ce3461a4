"""Temporary files are cleaned on every exit path: after add, restore, push, fetch and gc that
succeed, that fail (a truncated safetensors file, an unreachable remote), and after a SIGTERM or
SIGINT (Ctrl-C) in the middle of an add, nothing temporary is left in the repository (work tree,
.git/theta-store, .git/objects), in the remote, or in $TMPDIR (a fresh folder per test)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import theta_store
from test_git_e2e import commit, g, global_config, new_repo, ts

__all__ = ["global_config"]  # autouse fixture: theta-store installed in a private global config

M = "model.safetensors"
# What a temporary file is called here: git's (tmp_pack_*, tmp_idx_*, *.lock, incoming-* quarantine
# folders) and ours (tmp_pack_theta_*, *.tmp, .NAME.theta-tmp.*, clean-* spills, upload-* folders).
TEMP = re.compile(r"^tmp_|^tmp-|\.tmp|theta-tmp|theta-lossy|^clean-|^upload-|^incoming-|\.lock$")
# Lock files that stay by design: flock(2) targets, never renamed into place.
DURABLE = {"packs.lock", "versions.lock", "transport.lock"}


@pytest.fixture(autouse=True)
def tmpdir_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "tmpdir"
    d.mkdir()
    monkeypatch.setenv("TMPDIR", str(d))
    return d


def leftovers(*roots: Path) -> list[str]:
    """Temporary files under `roots`, and anything at all in $TMPDIR."""
    found = [str(p) for p in Path(os.environ["TMPDIR"]).rglob("*")]
    for root in roots:
        for p in root.rglob("*"):
            if TEMP.search(p.name) and p.name not in DURABLE:
                found.append(str(p))
    return sorted(found)


def model(path: Path, mb: float, seed: int = 0) -> bytes:
    n = int(mb * (1 << 20)) // 4 // 1024
    rng = np.random.default_rng(seed)
    tensors = {f"layers.{i}.weight": (rng.standard_normal((n // 4, 1024), dtype=np.float32) * np.float32(0.02)) for i in range(4)}
    tensors["bias"] = np.zeros(1024, np.float32)
    rewrite = path.exists()
    theta_store.save_safetensors(str(path), tensors)
    if not rewrite:  # settled: no racy-git wait in an add; a rewrite dated back could look unchanged to git
        t = time.time() - 2
        os.utime(path, (t, t))
    return path.read_bytes()


def run(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "theta_store", *args], cwd=cwd, capture_output=True, text=True)


def setup(tmp_path: Path, versions: int) -> tuple[Path, Path, bytes]:
    """A repository with `versions` committed versions of M, and a bare remote (file://) as origin."""
    remote = tmp_path / "remote.git"
    g(tmp_path, "init", "-q", "--bare", "-b", "main", str(remote))
    a = new_repo(tmp_path / "a")
    g(a, "remote", "add", "origin", f"file://{remote}")
    for seed in range(versions):
        data = model(a / M, 4, seed=seed)
        commit(a, f"v{seed}")
    return a, remote, data


def test_every_command_that_succeeds_leaves_nothing(tmp_path: Path) -> None:
    assert theta_store.__file__.startswith(str(Path(__file__).parent.parent)), theta_store.__file__
    a, remote, v2 = setup(tmp_path, 2)
    assert leftovers(a) == [], "git add / commit"
    model(a / "other.safetensors", 2, seed=5)
    ts(a, "add", "other.safetensors")
    assert leftovers(a) == [], "theta-store add"
    (a / M).unlink()
    ts(a, "restore", M)
    assert (a / M).read_bytes() == v2
    assert leftovers(a) == [], "theta-store restore"
    g(a, "commit", "-q", "-m", "other")
    g(a, "push", "-q", "origin", "main")
    assert leftovers(a, remote) == [], "git push"
    b = tmp_path / "b"
    g(tmp_path, "clone", "-q", f"file://{remote}", str(b), env={"THETA_STORE_SKIP_SMUDGE": "1"})
    ts(b, "fetch", "--all")
    assert leftovers(b, remote) == [], "theta-store fetch"
    ts(b, "pull")
    assert (b / M).read_bytes() == v2
    assert leftovers(b) == [], "theta-store pull"
    g(a, "reset", "-q", "--hard", "HEAD~2")
    g(a, "reflog", "expire", "--expire=now", "--all")
    ts(a, "gc", "--prune")
    assert leftovers(a) == [], "theta-store gc --prune"


def test_failing_commands_leave_nothing(tmp_path: Path) -> None:
    a, remote, v1 = setup(tmp_path, 1)
    bad = a / "bad.safetensors"
    data = model(bad, 4, seed=7)
    bad.write_bytes(data[: len(data) // 2])
    before = sorted(str(p) for p in (a / ".git").rglob("*"))
    r = run(a, "add", "bad.safetensors")
    assert r.returncode == 1 and "bad.safetensors" in r.stderr, r.stderr
    assert leftovers(a) == [], "a failed add"
    assert sorted(str(p) for p in (a / ".git").rglob("*")) == before, "a failed add wrote to .git"
    bad.unlink()

    g(a, "remote", "add", "gone", f"file://{tmp_path}/no-such-remote.git")
    r = run(a, "push", "gone", "--all")
    assert r.returncode == 1 and "gone" in r.stderr, r.stderr
    assert leftovers(a) == [], "a push to an unreachable remote"

    g(a, "push", "-q", "origin", "main", env={"THETA_STORE_SKIP_PUSH": "1"})  # the commit alone
    b = tmp_path / "b"
    g(tmp_path, "clone", "-q", f"file://{remote}", str(b), env={"THETA_STORE_SKIP_SMUDGE": "1"})
    g(b, "remote", "set-url", "origin", f"file://{tmp_path}/moved.git")
    r = run(b, "fetch")
    assert r.returncode == 1, r.stderr
    assert leftovers(b) == [], "a fetch from an unreachable remote"
    r = run(b, "restore", M)
    assert r.returncode == 1 and M in r.stderr, r.stderr
    assert leftovers(b) == [], "a restore whose version no reachable remote has"
    assert (b / M).read_bytes() != v1


ADDS = [
    ("theta-store add", signal.SIGTERM),
    ("theta-store add", signal.SIGINT),
    ("git add", signal.SIGINT),  # Ctrl-C at a terminal: git and its filter process both get it
]
# Open: run alone, the filter process ends within 3 s; after the rest of the suite it has been
# seen alive 60 s after git ended (cause not yet found).
LINGERS = pytest.mark.xfail(strict=False, reason="the filter process of a Ctrl-C'd git add can outlive git by over 60 s in a full run")


@pytest.mark.parametrize(
    ("command", "sig"),
    [pytest.param(c, s, marks=[LINGERS] if c == "git add" else []) for c, s in ADDS],
    ids=[f"{c} {s.name}" for c, s in ADDS],
)
def test_a_signal_in_the_middle_of_an_add_leaves_nothing(tmp_path: Path, command: str, sig: signal.Signals) -> None:
    a = new_repo(tmp_path / "a")
    model(a / M, 24)
    pack_dir = a / ".git" / "objects" / "pack"
    args = [sys.executable, "-m", "theta_store", "add", M] if command == "theta-store add" else ["git", "add", M]
    proc = subprocess.Popen(args, cwd=a, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 20
    while not (pack_dir.exists() and any(n.startswith("tmp_pack_theta_") for n in os.listdir(pack_dir))):
        assert proc.poll() is None, f"the add ended before its pack was begun: {proc.communicate()}"
        assert time.monotonic() < deadline
        time.sleep(0.002)
    if command == "git add":
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    # git does not wait for its filter process to end, and a core call the signal met finishes
    # first: a hang check, with a bound generous for a shared machine
    ended = time.monotonic() + 60
    while True:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < ended, "the filter process did not end"
        time.sleep(0.01)
    assert leftovers(a) == [], f"after {sig.name}: {err}"
    if command == "git add":
        assert proc.returncode != 0, (out, err)
    else:
        assert proc.returncode == 128 + sig, (out, err)
        assert "nothing was left half-written" in err, err
    r = subprocess.run(["git", "add", M], cwd=a, capture_output=True, text=True)  # and the next add stores the file
    assert r.returncode == 0, r.stderr
    assert leftovers(a) == []


def test_a_signal_in_the_middle_of_a_fetch_leaves_nothing(tmp_path: Path) -> None:
    """SIGTERM to `theta-store pull` alone (a service manager's stop) while git writes the fetched pack."""
    remote = tmp_path / "remote.git"
    g(tmp_path, "init", "-q", "--bare", "-b", "main", str(remote))
    a = new_repo(tmp_path / "a")
    g(a, "remote", "add", "origin", f"file://{remote}")
    data = model(a / M, 24)
    commit(a, "v1")
    g(a, "push", "-q", "origin", "main")
    b = tmp_path / "b"
    g(tmp_path, "clone", "-q", f"file://{remote}", str(b), env={"THETA_STORE_SKIP_SMUDGE": "1"})
    g(b, "config", "transfer.unpackLimit", "1")  # a pack even for few objects, as for a large version
    objects = b / ".git" / "objects"
    proc = subprocess.Popen([sys.executable, "-m", "theta_store", "pull"], cwd=b, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    # git writes the pack into the fetch's quarantine folder (objects/theta-incoming-*/pack)
    while not any(p.name.startswith("tmp_pack_") for p in objects.glob("*/pack/*")) and not any(
        p.name.startswith("tmp_pack_") for p in objects.glob("pack/*")
    ):
        assert proc.poll() is None, f"the pull ended before git began its pack: {proc.communicate()}"
        assert time.monotonic() < deadline
        time.sleep(0.001)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert leftovers(b) == [], f"after SIGTERM: {err}"
    assert proc.returncode == 128 + signal.SIGTERM, (out, err)
    ts(b, "pull")  # and the next pull fetches the version
    assert (b / M).read_bytes() == data
    assert leftovers(b) == []
