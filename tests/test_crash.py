"""Crash safety (README "Reliability" -> "Crash safety"): commands SIGKILLed at seeded points by
benches/crash_harness.py lose nothing and run again; a full disk (a small tmpfs) gives a clear
error, leaves nothing half-written, and the command succeeds once there is room.

The seeded runs here are a few of the bench script's 1,000 (`python benches/crash_harness.py
--replay SEED` runs one again, verbosely)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import theta_store
from test_git_e2e import commit, g, global_config, new_repo, ts
from theta_store.pointer import Pointer

__all__ = ["global_config"]  # autouse fixture: theta-store installed in a private global config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benches"))
import crash_harness

CI_SEED = 7
CI_RUNS = 24  # three or four per command


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[crash_harness.Harness]:
    with crash_harness.Harness(tmp_path_factory.mktemp("crash"), all_variants=False) as h:
        yield h


def test_harness_runs_the_package_under_test(harness: crash_harness.Harness) -> None:
    """The commands the harness starts (and git's filter and hooks, installed by it) import the
    package this test imports, not another copy."""
    here = str(Path(theta_store.__file__).resolve().parents[1])
    assert harness.env["PYTHONPATH"].split(os.pathsep)[0] == here
    config = subprocess.run(["git", "config", "--get", "filter.thetastore.process"], env=harness.env, capture_output=True, text=True)
    assert str(Path(here) / "theta_store" / "_launch.py") in config.stdout


@pytest.mark.parametrize("seed", [CI_SEED * crash_harness.SEED_STRIDE + i for i in range(CI_RUNS)])
def test_killed_command_loses_nothing(harness: crash_harness.Harness, seed: int) -> None:
    run = harness.run(seed)
    print(f"seed {seed}: {run.command} ({run.variant}), killed after {run.delay:.3f} s, mid-run {run.mid_run}, git's steps {run.git_steps}")
    assert run.ok, f"seed {seed} ({run.command}, {run.variant}): {run.failures}"


# ---------------------------------------------------------------- faults the harness found


def _model(path: Path, seed: int, rows: int = 256, scale: float = 0.02) -> bytes:
    rng = np.random.default_rng(seed)
    theta_store.save_safetensors(str(path), {"w": (rng.standard_normal((rows, 1024)) * scale).astype(np.float32)})
    return path.read_bytes()


def test_fetch_after_one_killed_in_the_transport_repository(tmp_path: Path) -> None:
    """A fetch killed while git held the transport repository's shallow.lock made every later
    fetch of a version fail ("Unable to create .../shallow.lock: File exists")."""
    a = new_repo(tmp_path / "a")
    v1 = _model(a / "m.safetensors", 0)
    commit(a, "v1")
    g(a, "branch", "old")
    v2 = _model(a / "m.safetensors", 1)
    commit(a, "v2")
    remote = tmp_path / "remote.git"
    g(tmp_path, "init", "-q", "--bare", str(remote))
    g(a, "push", "-q", remote.as_uri(), "main", "old")
    b = tmp_path / "b"
    g(tmp_path, "clone", "-q", "-b", "old", remote.as_uri(), str(b))
    assert (b / "m.safetensors").read_bytes() == v1
    transport = b / ".git" / "theta-store" / "transport"
    assert (transport / "shallow").exists()  # the clone's checkout used it
    (transport / "shallow.lock").write_text("left by a git fetch that was killed\n")
    g(b, "checkout", "-q", "main")  # fetches v2 through the transport repository
    assert (b / "m.safetensors").read_bytes() == v2
    assert not (transport / "shallow.lock").exists()


def test_pack_of_a_killed_add_is_swept_while_it_is_a_zombie(tmp_path: Path) -> None:
    """A killed add's half-written pack stayed while the killed process was a zombie (not yet
    reaped: for good under a container's PID 1 that never reaps): kill(pid, 0) calls it alive."""
    a = new_repo(tmp_path / "a")
    _model(a / "m.safetensors", 0)
    child = subprocess.Popen(["true"])  # never waited for until the end: a zombie
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    pack_dir = a / ".git" / "objects" / "pack"
    pack_dir.mkdir(parents=True, exist_ok=True)
    stale = pack_dir / f"tmp_pack_theta_{child.pid}_18ee83f87e8ccf95_1"
    stale.write_bytes(b"PACK\0\0\0\2\0\0\0\5half-written")
    try:
        ts(a, "add", "m.safetensors")
        assert not stale.exists()
    finally:
        child.wait()


def test_add_killed_before_each_rename(tmp_path: Path) -> None:
    """`theta-store add` SIGKILLed just before each of its renames in turn (strace injects the
    signal: the commit points a random delay rarely hits). Each left something (the ref's
    `.lock`, the keep file's or the plan's temporary file) that made the next add of the version
    fail (a traceback: "File exists: .../refs/theta/<id>.lock") or stayed for good."""
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed (.ci/run installs it)")
    a = new_repo(tmp_path / "a")
    _model(a / "m.safetensors", 0)
    c1 = commit(a, "v1")
    v1 = (a / "m.safetensors").read_bytes()
    v2 = _model(a / "m.safetensors", 1)
    template = tmp_path / "template"
    shutil.copytree(a, template, symlinks=True)
    trace = ["strace", "-f", "-qq", "-o", os.devnull, "-e", "signal=none", "-e", "trace=rename,renameat,renameat2"]
    killed = 0
    for n in range(1, 30):
        shutil.rmtree(a)
        shutil.copytree(template, a, symlinks=True)
        inject = ["-e", f"inject=rename,renameat,renameat2:signal=KILL:when={n}"]
        r = subprocess.run([*trace, *inject, "theta-store", "add", "m.safetensors"], cwd=a, capture_output=True, text=True)
        if r.returncode == 0:
            break  # fewer renames than n: every point was tried
        assert r.returncode in (-9, 137), r.stderr
        killed += 1
        (a / ".git" / "index.lock").unlink(missing_ok=True)  # git's lock (our index write is git's format): git asks the user to remove it
        r = subprocess.run(["theta-store", "add", "m.safetensors"], cwd=a, capture_output=True, text=True)
        assert r.returncode == 0, f"killed before rename {n}, the next add: {r.stderr}"
        assert _ours_left(a) == [], f"killed before rename {n}"
        _intact(a, {c1: v1})
        with theta_store.Repo(a, hooks=False) as repo, tempfile.TemporaryDirectory() as scratch:
            theta_store.checkpoint.restore_to(repo.store, repo.pointer(str(a / "m.safetensors")), f"{scratch}/m")
            assert Path(f"{scratch}/m").read_bytes() == v2
    assert killed >= 5


def test_gc_after_one_killed_while_removing_a_pack(tmp_path: Path) -> None:
    """A gc killed after removing a rolled-up pack's index, before its keep file, left a kept
    pack without an index, and every later `theta-store gc --prune` failed on it ("No such file
    or directory: .../pack-<id>.idx"): found by the crash harness (seed 1600493)."""
    a = new_repo(tmp_path / "a")
    v1 = _model(a / "m.safetensors", 0)
    c1 = commit(a, "v1")
    pack_dir = a / ".git" / "objects" / "pack"
    kept = sorted(pack_dir.glob("pack-*.keep"))
    assert kept, "an add keeps its pack"
    half = pack_dir / ("pack-" + "0" * 40)  # what _remove leaves when killed after the index went
    shutil.copy(kept[0].with_suffix(".pack"), half.with_suffix(".pack"))
    shutil.copy(kept[0], half.with_suffix(".keep"))
    ts(a, "gc", "--prune")
    assert not half.with_suffix(".pack").exists() and not half.with_suffix(".keep").exists()
    _intact(a, {c1: v1})


# ---------------------------------------------------------------- a full disk


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MB tmpfs at tmp_path/disk (skipped where mounting is not permitted)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {r.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(disk: Path, leave_kib: int) -> Path:
    """Fill the disk but `leave_kib` KiB with a file; returns it (delete it to free the space)."""
    filler = disk / "filler"
    free = shutil.disk_usage(disk).free // 1024
    with open(filler, "wb") as f:
        f.write(b"\xff" * max(0, free - leave_kib) * 1024)
    return filler


def _ours_left(repo: Path) -> list[str]:
    """Temporary files (theta-store's and git's) and lock files left in the repository."""
    temp = ("tmp_pack", ".theta-tmp.", "tmp_obj", "theta-incoming-")
    out = []
    for f in repo.rglob("*"):
        n = f.name
        if any(t in n for t in temp) or n.startswith("clean-") or n.endswith(".tmp") or (n.endswith(".lock") and f.stat().st_size > 0):
            out.append(str(f.relative_to(repo)))
    return out


def _packs(repo: Path) -> set[str]:
    return {p.name for p in (repo / ".git" / "objects" / "pack").iterdir()}


def _intact(repo: Path, committed: dict[str, bytes]) -> None:
    """git fsck --full and theta-store fsck pass; each commit's checkpoint restores byte-exactly."""
    g(repo, "fsck", "--full", "--no-progress")
    assert "ok" in ts(repo, "fsck").stdout
    with theta_store.Repo(repo, hooks=False) as r, tempfile.TemporaryDirectory() as scratch:  # off the small disk
        for rev, data in committed.items():
            ptr = Pointer.parse(r.store.read_path("m.safetensors", rev))
            out = Path(scratch) / "restored.safetensors"
            theta_store.checkpoint.restore_to(r.store, ptr, str(out))
            assert out.read_bytes() == data, rev


@pytest.mark.parametrize("how", ["theta-store add", "git add"])
def test_add_on_a_full_disk(small_disk: Path, how: str) -> None:
    a = new_repo(small_disk / "a")
    v1 = _model(a / "m.safetensors", 0)
    c1 = commit(a, "v1")
    big = _model(a / "m.safetensors", 1, rows=1536, scale=1.0)  # 6.3 MB, ~5.2 MB stored
    filler = _fill(small_disk, 2048)
    before = _packs(a)
    argv = ["theta-store", "add", "m.safetensors"] if how == "theta-store add" else ["git", "add", "m.safetensors"]
    r = subprocess.run(argv, cwd=a, capture_output=True, text=True)
    print(r.stderr)
    assert r.returncode != 0
    assert "m.safetensors: the disk is full (ENOSPC: no space left on device) writing its frames" in r.stderr, r.stderr
    assert "nothing was stored" in r.stderr and str(a / ".git" / "objects" / "pack") in r.stderr
    assert _packs(a) == before and _ours_left(a) == []
    assert g(a, "diff", "--cached", "--name-only").stdout == ""  # nothing staged
    _intact(a, {c1: v1})
    filler.unlink()
    subprocess.run(argv, cwd=a, check=True, capture_output=True)
    c2 = commit(a, "v2")
    _intact(a, {c1: v1, c2: big})
    assert _ours_left(a) == []


def test_restore_on_a_full_disk(small_disk: Path) -> None:
    a = new_repo(small_disk / "a")
    _model(a / "m.safetensors", 0)
    c1 = commit(a, "v1")
    big = _model(a / "m.safetensors", 1, rows=1536, scale=1.0)
    c2 = commit(a, "v2")
    g(a, "checkout", "-q", c1)
    small = (a / "m.safetensors").read_bytes()
    filler = _fill(small_disk, 2048)
    r = ts(a, "restore", "--source", c2, "m.safetensors", ok=False)
    print(r.stderr)
    assert r.returncode != 0
    assert f"{a / 'm.safetensors'}: the disk is full (ENOSPC: no space left on device) restoring it" in r.stderr, r.stderr
    assert "the file was left as it was" in r.stderr
    assert (a / "m.safetensors").read_bytes() == small and _ours_left(a) == []
    _intact(a, {c1: small, c2: big})
    filler.unlink()
    ts(a, "restore", "--source", c2, "m.safetensors")
    assert (a / "m.safetensors").read_bytes() == big


def test_fetch_on_a_full_disk(small_disk: Path, tmp_path: Path) -> None:
    """A checkout that fetches a version that does not fit says the disk is full (it said the
    version was on no remote, and to push it from a clone that has it)."""
    a = new_repo(tmp_path / "a")
    v1 = _model(a / "m.safetensors", 0)
    c1 = commit(a, "v1")
    g(a, "branch", "old")
    big = _model(a / "m.safetensors", 1, rows=1536, scale=1.0)
    c2 = commit(a, "v2")
    remote = tmp_path / "remote.git"
    g(tmp_path, "init", "-q", "--bare", str(remote))
    g(a, "push", "-q", remote.as_uri(), "main", "old")
    b = small_disk / "b"
    g(small_disk, "clone", "-q", "-b", "old", remote.as_uri(), str(b))
    filler = _fill(small_disk, 2048)
    before = _packs(b)
    r = g(b, "checkout", "-q", "main", ok=False)
    assert "fetching 1 checkpoint version(s) from origin: the disk is full (ENOSPC: no space left on device)" in r.stderr, r.stderr
    assert "not on origin" not in r.stderr
    assert g(b, "rev-parse", "HEAD").stdout.strip() == c1
    assert _packs(b) == before and _ours_left(b) == []
    _intact(b, {c1: v1})
    r = ts(b, "fetch", "--all", "origin", ok=False)
    assert "the disk is full" in r.stderr, r.stderr
    filler.unlink()
    g(b, "checkout", "-q", "main")
    assert (b / "m.safetensors").read_bytes() == big
    _intact(b, {c1: v1, c2: big})
    assert _ours_left(b) == []


def test_checkout_on_a_full_disk(small_disk: Path) -> None:
    """git writes the checked-out file itself: its error names the file, our side leaves
    nothing, and the checkout works once there is room."""
    a = new_repo(small_disk / "a")
    v1 = _model(a / "m.safetensors", 0)
    c1 = commit(a, "v1")
    big = _model(a / "m.safetensors", 1, rows=1536, scale=1.0)
    c2 = commit(a, "v2")
    g(a, "checkout", "-q", c1)
    filler = _fill(small_disk, 2048)
    r = g(a, "checkout", "-q", c2, ok=False)
    assert "unable to write file m.safetensors" in r.stderr, r.stderr
    assert _ours_left(a) == []
    # git writes a checked-out file in place, not through a temporary file: what it wrote is a
    # prefix of the version, and git said which file (our filter sent every byte)
    left = (a / "m.safetensors").read_bytes() if (a / "m.safetensors").exists() else b""
    assert big.startswith(left) and len(left) < len(big)
    _intact(a, {c1: v1, c2: big})
    filler.unlink()
    g(a, "checkout", "-q", "-f", c2)
    assert (a / "m.safetensors").read_bytes() == big
    assert g(a, "status", "--porcelain").stdout == ""


def test_full_disk_is_a_disk_full_error() -> None:
    import errno

    from theta_store.errors import DiskFull, ThetaStoreError, disk_full

    e = disk_full(OSError(errno.ENOSPC, "No space left on device"), "m.safetensors", "/x/objects/pack", "writing", "nothing was stored")
    assert isinstance(e, DiskFull) and isinstance(e, OSError) and isinstance(e, ThetaStoreError) and e.errno == errno.ENOSPC
    assert disk_full(OSError(errno.EACCES, "Permission denied"), "m", "/x", "writing", "-") is None
    assert os.strerror(errno.ENOSPC) == "No space left on device"
