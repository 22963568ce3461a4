"""The CLI as a user drives it: add, restore, show, stats, fsck (and corruption), demo."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import theta_store
from conftest import FIXTURES, git, theta


def write_model(path: Path, seed: int = 0, n: int = 4, size: int = 256) -> None:
    rng = np.random.default_rng(seed)
    theta_store.save_safetensors(
        str(path),
        {f"l{i}.w": (rng.standard_normal((size, size)) * 0.02).astype(np.float32) for i in range(n)} | {"bias": np.zeros(size, np.float32)},
    )


def test_add_commit_restore_show_stats(repo_dir: Path) -> None:
    m = repo_dir / "model.safetensors"
    write_model(m)
    original = m.read_bytes()
    out = json.loads(theta(repo_dir, "add", "--json", "model.safetensors").stdout)
    assert out[0]["path"] == "model.safetensors" and out[0]["tensors"] == 5 and out[0]["new_chunks"] > 0
    git(repo_dir, "commit", "-q", "-m", "v1")
    pointer = git(repo_dir, "show", "HEAD:model.safetensors").stdout
    assert pointer.startswith("version theta-store/v1\n") and len(pointer) < 300
    m.unlink()
    theta(repo_dir, "restore", "model.safetensors")
    assert m.read_bytes() == original
    show = json.loads(theta(repo_dir, "show", "--json", "model.safetensors").stdout)
    assert [r["name"] for r in show["rows"] if r["kind"] == "tensor"] == ["bias", "l0.w", "l1.w", "l2.w", "l3.w"]
    assert all(r["stored"] > 0 for r in show["rows"])
    text = theta(repo_dir, "show", "HEAD:model.safetensors").stdout
    assert "l0.w" in text and "F32" in text and "256x256" in text
    stats = json.loads(theta(repo_dir, "stats", "--json").stdout)
    assert stats["raw_bytes"] == len(original) and 0 < stats["stored_bytes"] < len(original)
    assert stats["checkpoints"][0]["path"] == "model.safetensors"
    assert git(repo_dir, "fsck", "--full", "--strict").returncode == 0
    assert json.loads(theta(repo_dir, "fsck", "--json").stdout)["ok"] is True


def test_restore_old_version_from_commit(repo_dir: Path) -> None:
    m = repo_dir / "model.safetensors"
    versions = []
    for seed in range(3):
        write_model(m, seed=seed, n=2)
        versions.append(m.read_bytes())
        theta(repo_dir, "add", "model.safetensors")
        git(repo_dir, "commit", "-q", "-m", f"v{seed}")
    for i, expected in enumerate(versions):
        theta(repo_dir, "restore", "--source", f"HEAD~{2 - i}", "model.safetensors")
        assert m.read_bytes() == expected


def test_fsck_reports_corrupt_and_missing_objects(repo_dir: Path) -> None:
    m = repo_dir / "model.safetensors"
    write_model(m)
    theta(repo_dir, "add", "model.safetensors")
    packs = sorted((repo_dir / ".git/objects/pack").glob("*.pack"), key=lambda p: p.stat().st_size)
    big = packs[-1]
    data = bytearray(big.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside a frame (stored, zlib level 0)
    os.chmod(big, 0o644)
    big.write_bytes(bytes(data))
    r = theta(repo_dir, "fsck", "--json", check=False)
    assert r.returncode == 1
    report = json.loads(r.stdout)
    assert not report["ok"] and report["problems"]
    # restore refuses and leaves no broken file behind
    m.unlink()
    r = theta(repo_dir, "restore", "model.safetensors", check=False)
    assert r.returncode == 1 and "error" in r.stderr
    assert not m.exists()
    assert not list(repo_dir.glob(".model.safetensors.*"))


def test_errors_are_one_line_with_hint(repo_dir: Path) -> None:
    shutil.copy(FIXTURES / "malformed/truncated.safetensors", repo_dir / "t.safetensors")
    r = theta(repo_dir, "add", "t.safetensors", check=False)
    assert r.returncode == 1
    assert r.stderr.startswith("theta-store: error: ") and "t.safetensors" in r.stderr and "hint:" in r.stderr
    r = theta(repo_dir, "restore", "nothing.safetensors", check=False)
    assert r.returncode == 1 and "nothing.safetensors" in r.stderr
    r = subprocess.run(["theta-store", "add"], capture_output=True, text=True, cwd=repo_dir)
    assert r.returncode == 2
    r = theta(repo_dir.parent, "stats", check=False)
    assert r.returncode == 1 and "not inside a Git repository" in r.stderr


def test_demo_runs(tmp_path: Path) -> None:
    r = theta(tmp_path, "demo", "--json", "--dir", str(tmp_path / "d"))
    out = json.loads(r.stdout)
    assert out["fsck_ok"] and out["clone_exact"]
    v = out["versions"]
    assert v[1]["stored"] < 50_000 and v[1]["pushed"] < 50_000  # one bias changed
    assert sum(x["stored"] for x in v) < 0.5 * sum(x["raw"] for x in v)
    updates = {x["change"]: x for x in v}
    for change in ("LoRA r=8 folded into 4 matrices", "1% of 3 matrices changed", "8 entries of one matrix changed"):
        assert 0 < updates[change]["stored"] < updates[change]["raw"]  # measured, and less than the whole file
    assert all(x["restores_exactly"] for x in v)
    assert out["merge"]["exact"] and out["chunk_store"]["exact"]
    assert out["repair"] == {"damaged_named": True, "repaired": True, "exact": True}
    assert r.returncode == 0


def test_git_theta_store_alias(repo_dir: Path) -> None:
    r = subprocess.run(["git", "theta-store", "stats", "--json"], cwd=repo_dir, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["versions"] == []


def test_sigkill_during_add_leaves_a_valid_repo(repo_dir: Path) -> None:
    """Kill `theta-store add` at random moments: the repo stays fsck-clean and a re-run succeeds."""
    m = repo_dir / "big.safetensors"
    rng = np.random.default_rng(7)
    theta_store.save_safetensors(str(m), {f"w{i}": (rng.standard_normal((1024, 1024)) * 0.02).astype(np.float32) for i in range(24)})
    original = m.read_bytes()
    delays = [0.05, 0.15, 0.3, 0.45, 0.6, 0.9]
    killed = 0
    for attempt, delay in enumerate(delays):
        if attempt % 2:  # vary the content so that later kills hit new writes too
            data = bytearray(m.read_bytes())
            data[-5000 * attempt] ^= 1
            m.write_bytes(bytes(data))
        p = subprocess.Popen([sys.executable, "-m", "theta_store", "-q", "add", "big.safetensors"], cwd=repo_dir)
        time.sleep(delay)
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            killed += 1
        p.wait()
        assert git(repo_dir, "fsck", "--full", "--strict").returncode == 0
        assert theta(repo_dir, "fsck").returncode == 0
    assert killed >= 2, "the add finished too fast to be killed: make the file bigger"
    m.write_bytes(original)
    theta(repo_dir, "add", "big.safetensors")
    assert not list((repo_dir / ".git/objects/pack").glob("tmp_pack_theta_*")), "stale packs of killed adds are removed"
    m.unlink()
    theta(repo_dir, "restore", "big.safetensors")
    assert m.read_bytes() == original
    assert git(repo_dir, "fsck", "--full", "--strict").returncode == 0
    assert theta(repo_dir, "fsck").returncode == 0


@pytest.mark.parametrize("flag", ["--json"])
def test_every_reporting_verb_has_json(repo_dir: Path, flag: str) -> None:
    m = repo_dir / "m.safetensors"
    write_model(m, n=1, size=16)
    for args in (["add", "m.safetensors"], ["show", "m.safetensors"], ["stats"], ["fsck"], ["restore", "m.safetensors"]):
        json.loads(theta(repo_dir, *args, flag).stdout)


def test_a_run_builds_only_its_command_and_parses_the_same() -> None:
    """A run that names its command builds that sub-parser alone: the same commands exist, and
    each parses and prints help as the full parser does."""
    from theta_store.cli import PLUMBING, VERBS, _verb_of, build_parser

    full = build_parser()
    sub = next(a for a in full._actions if a.dest == "command")
    assert set(sub.choices) == set(VERBS) | set(PLUMBING)  # type: ignore[arg-type]
    for name, argv in [
        ("add", ["-q", "add", "--json", "a.safetensors", "b"]),
        ("restore", ["-C", "gc", "restore", "-s", "HEAD~1", "x"]),  # -C's value is not the command
        ("push", ["--no-progress", "push", "origin", "--all"]),
        ("fetch", ["fetch", "--all"]),
        ("gc", ["gc", "-n"]),
        ("merge-driver", ["merge-driver", "b", "o", "t", "p"]),
    ]:
        assert _verb_of(argv) == name
        one, every = build_parser(name), build_parser()
        got, want = vars(one.parse_args(argv)), vars(every.parse_args(argv))
        assert got == want
        only = next(a for a in one._actions if a.dest == "command")
        assert list(only.choices) == [name]  # type: ignore[arg-type]
        assert only.choices[name].format_help() == sub.choices[name].format_help()  # type: ignore[index]
    for argv in (["--help"], ["-h", "add"], ["nonsense"], ["-q"], []):
        assert _verb_of(argv) is None


def test_unknown_command_lists_every_command(repo_dir: Path) -> None:
    r = theta(repo_dir, "frobnicate", check=False)
    assert r.returncode == 2 and "invalid choice" in r.stderr
    for name in ("add", "restore", "gc", "demo"):
        assert name in r.stderr
