from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"

# Reproducible git, whatever the machine's config.
os.environ.update(
    {
        "GIT_AUTHOR_NAME": "Test",
        "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "Test",
        "GIT_COMMITTER_EMAIL": "test@example.com",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
    }
)


def git(cwd: str | Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=check)


def theta(cwd: str | Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["theta-store", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if check and r.returncode != 0:
        raise AssertionError(f"theta-store {' '.join(args)} exited {r.returncode}: {r.stderr}")
    return r


@pytest.fixture
def repo_dir(tmp_path: Path) -> Path:
    d = tmp_path / "repo"
    d.mkdir()
    git(d, "init", "-q", "-b", "main")
    return d


@pytest.fixture
def repo(repo_dir: Path) -> Iterator[object]:
    import theta_store

    with theta_store.Repo(repo_dir) as r:
        yield r


def manifest() -> dict[str, object]:
    return json.loads((FIXTURES / "MANIFEST.json").read_text())  # type: ignore[no-any-return]


def settled(path: Path) -> None:
    """Date a file just written two seconds back: an add of it then need not wait out git's racy
    second (GitStore.stage_blob), which property tests with many examples would pay each time."""
    import time

    t = time.time() - 2
    os.utime(path, (t, t))


def fixture_entries(prefix: str = "", valid: bool | None = None) -> list[dict[str, object]]:
    out = []
    for e in manifest()["files"]:  # type: ignore[index]
        if e["name"].startswith(prefix) and (valid is None or e["valid"] == valid):
            out.append(e)
    return out
