"""Issue 11, items 7, 8 and 12: progress on a terminal, -q/--json after the verb, diffs of history
(cached textconv, `__metadata__`), and merges that honour -X ours/theirs or thetastore.merge.strategy."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

import theta_store
from servers import Remote
from test_git_e2e import clean_status, clone, commit, g, model_bytes, new_repo, ts, write
from test_git_e2e import file_remote as file_remote  # fixtures: the autouse one, and one asked for by name
from test_git_e2e import global_config as global_config


def run_tty(cwd: Path, *argv: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run a command with stdin, stdout and stderr on a pseudo-terminal; (exit status, all it wrote)."""
    master, slave = pty.openpty()
    p = subprocess.Popen(argv, cwd=cwd, stdin=slave, stdout=slave, stderr=slave, env=None if env is None else {**os.environ, **env})
    os.close(slave)
    chunks = []
    while True:
        try:
            block = os.read(master, 65536)
        except OSError:  # EIO: every process holding the terminal is gone
            break
        if not block:
            break
        chunks.append(block)
    os.close(master)
    return p.wait(timeout=300), b"".join(chunks).decode(errors="replace")


PROGRESS = re.compile(r"Filtering content: \d+(/\d+)? checkpoints?, [\d.]+(/[\d.]+)? (B|kB|MB|GB)")


def _cleared(out: str) -> bool:
    """Our last progress line drawn was cleared ("\\r" + erase line) before anything else was written.
    (git draws its own "Filtering content: 100% (3/3)" when a checkout takes over 2 s: not ours.)"""
    last = max((m.start() for m in PROGRESS.finditer(out)), default=-1)
    end = out.find("\x1b[K", last)
    return out.startswith("\r\x1b[K", end + len("\x1b[K"))


# ---------------------------------------------------------------- item 7: progress, -q/--json anywhere


def test_checkout_and_clone_show_progress_on_a_terminal_only(tmp_path: Path, file_remote: Remote) -> None:
    a = new_repo(tmp_path / "a")
    for i in range(3):
        write(a / f"m{i}.safetensors", model_bytes(i, layers=1))
    v1 = commit(a, "v1")
    for i in range(3):
        write(a / f"m{i}.safetensors", model_bytes(i, bias=1.0, layers=1))
    commit(a, "v2")
    g(a, "push", "-q", file_remote.url, "main")

    rc, out = run_tty(a, "git", "checkout", v1)
    assert rc == 0 and PROGRESS.search(out), out  # versions here: no fetch, no total known
    assert _cleared(out), out
    assert "HEAD is now at" in out and not re.search(r"Filtering content[^\r]*HEAD is now", out), out  # git's own lines stay whole
    rc, out = run_tty(a, "git", "checkout", "-q", "main")  # git told to be quiet: so are we
    assert rc == 0 and "Filtering content" not in out, out
    r = g(a, "checkout", v1)  # no terminal
    assert "Filtering content" not in r.stderr and "\x1b" not in r.stderr, r.stderr

    # a clone fetches the versions (delayed smudges): git's fetch progress, then the totals
    rc, out = run_tty(tmp_path, "git", "clone", "-b", "main", file_remote.url, str(tmp_path / "b"))
    assert rc == 0, out
    assert "fetching 3 checkpoint version(s)" in out, out
    assert re.search(r"Filtering content: [0-3]/3 checkpoints, [\d.]+/[\d.]+ MB", out), out
    assert _cleared(out), out
    assert (tmp_path / "b" / "m2.safetensors").read_bytes() == model_bytes(2, bias=1.0, layers=1)
    r = clone(file_remote.url, tmp_path / "c", "-b", "main")
    assert "Filtering content" not in r.stderr and "fetching" not in r.stderr, r.stderr
    # THETA_STORE_PROGRESS=0 (what theta-store -q sets for the git commands it runs) silences ours
    # (git's own "Filtering content: N% (k/n)" still shows when the checkout takes over 2 s)
    rc, out = run_tty(tmp_path, "git", "clone", "-b", "main", file_remote.url, str(tmp_path / "d"), env={"THETA_STORE_PROGRESS": "0"})
    assert rc == 0 and not PROGRESS.search(out) and "fetching" not in out, out


# Arguments each verb needs to parse (a verb another change adds parses with none, or is listed here)
VERB_ARGS = {"add": ["m.safetensors"], "restore": ["m.safetensors"], "show": ["m.safetensors"], "track": ["*.bin"], "untrack": ["*.bin"]}
VERB_ARGS.update({"delta": ["v1", "v2"], "extract-lora": ["m.safetensors", "--base", "v1", "-o", "adapter"]})
VERB_ARGS.update({"merge": ["m.safetensors"]})


@pytest.mark.parametrize(
    ("before", "after", "want"),
    [
        (["-q", "--json"], [], (True, True, False)),
        ([], ["-q", "--json"], (True, True, False)),
        (["--json"], ["-q"], (True, True, False)),
        (["--progress"], [], (False, False, True)),
        ([], ["--no-progress"], (False, False, False)),
        (["--no-progress"], ["--progress"], (False, False, True)),  # the later one wins, as git's do
        ([], [], (False, False, None)),
    ],
)
def test_output_options_before_and_after_every_verb(before: list[str], after: list[str], want: tuple[bool, bool, bool | None]) -> None:
    from theta_store.cli import VERBS, _verb_of, build_parser

    for verb in VERBS:
        argv = [*before, verb, *after, *VERB_ARGS.get(verb, [])]
        for parser in (build_parser(), build_parser(_verb_of(argv))):
            ns = parser.parse_args(argv)
            progress = False if ns.quiet else ns.progress  # as main() sees it
            assert (ns.quiet, ns.json, progress) == want, (argv, vars(ns))


def test_quiet_and_json_after_the_verb_run(tmp_path: Path) -> None:
    a = new_repo(tmp_path / "a")
    write(a / "m.safetensors", model_bytes(0, layers=1))
    r = ts(a, "add", "-q", "m.safetensors")
    assert r.stdout == "" and r.stderr == "", r
    write(a / "n.safetensors", model_bytes(1, layers=1))
    r = ts(a, "-q", "add", "n.safetensors")
    assert r.stdout == "", r
    for args in (["stats", "--json", "-q"], ["--json", "stats"], ["-q", "stats", "--json"], ["show", "m.safetensors", "--json"]):
        json.loads(ts(a, *args).stdout)
    r = ts(a, "stats", "--bogus", ok=False)
    assert r.returncode == 2 and "unrecognized arguments: --bogus" in r.stderr


# ---------------------------------------------------------------- item 8: diffs of history


def _model_with_metadata(path: Path, meta: dict[str, str]) -> None:
    rng = np.random.default_rng(0)
    theta_store.save_safetensors(str(path), {"w": rng.standard_normal((256, 256)).astype(np.float32)}, metadata=meta)


def test_diff_shows_metadata_and_log_caches_textconv(tmp_path: Path) -> None:
    assert g(tmp_path, "config", "--global", "diff.thetastore.cachetextconv").stdout.strip() == "true"
    a = new_repo(tmp_path / "a")
    assert g(a, "config", "--local", "--get", "diff.thetastore.cachetextconv", ok=False).returncode == 1
    ts(a, "install")
    assert g(a, "config", "--local", "diff.thetastore.cachetextconv").stdout.strip() == "true"
    m = a / "m.safetensors"
    _model_with_metadata(m, {"step": "100", "lr": "3e-4", "note": "line one\nline two"})
    commit(a, "step 100")
    _model_with_metadata(m, {"step": "200", "lr": "3e-4", "note": "line one\nline two"})
    commit(a, "step 200")

    def changed(text: str) -> list[str]:
        return [ln for ln in text.splitlines() if ln[:1] in "+-" and ln[:3] not in ("+++", "---")]

    # git log -p: git keeps the textconv output of each blob in notes (no rebuild next time)
    assert g(a, "rev-parse", "--verify", "-q", "refs/notes/textconv/thetastore", ok=False).returncode == 1
    log = g(a, "log", "-p").stdout
    assert '+__metadata__\tstep\t"200"' in log and '+__metadata__\tstep\t"100"' in log, log
    assert g(a, "rev-parse", "--verify", "-q", "refs/notes/textconv/thetastore").returncode == 0
    assert len(g(a, "notes", "--ref=textconv/thetastore", "list").stdout.splitlines()) == 2  # the two blobs
    assert g(a, "log", "-p").stdout == log
    lines = changed(g(a, "diff", "HEAD~1", "HEAD").stdout)
    assert '-__metadata__\tstep\t"100"' in lines and '+__metadata__\tstep\t"200"' in lines, lines
    assert not [ln for ln in lines if "lr" in ln or ln[1:2] == "w"], lines  # the rest is unchanged
    assert '__metadata__\tnote\t"line one\\nline two"' in g(a, "show", "HEAD").stdout  # one line whatever the value holds
    # the pointer path (a pointer in the work tree, as with THETA_STORE_SKIP_SMUDGE) reads the manifest's
    out = ts(a, "textconv", "m.safetensors").stdout
    (a / "ptr").write_bytes(subprocess.run(["git", "show", "HEAD:m.safetensors"], cwd=a, capture_output=True, check=True).stdout)
    from_pointer = ts(a, "textconv", "ptr").stdout
    assert '__metadata__\tstep\t"200"' in out and '__metadata__\tstep\t"200"' in from_pointer, from_pointer
    assert [ln for ln in out.splitlines() if ln.startswith("__metadata__")] == [
        ln for ln in from_pointer.splitlines() if ln.startswith("__metadata__")
    ]


# ---------------------------------------------------------------- item 12: merges


def _diverged(tmp_path: Path) -> tuple[Path, bytes, bytes, bytes]:
    """A repository whose main and `other` both changed the checkpoint since their base."""
    a = new_repo(tmp_path / "a")
    m = a / "model.safetensors"
    base = model_bytes(0, layers=1)
    write(m, base)
    commit(a, "base")
    g(a, "switch", "-q", "-c", "other")
    theirs = model_bytes(0, bias=1.0, layers=1)
    write(m, theirs)
    write(a / "notes.txt", b"from other\n")
    commit(a, "theirs")
    g(a, "switch", "-q", "main")
    ours = model_bytes(0, bias=2.0, layers=1)
    write(m, ours)
    commit(a, "ours")
    return a, base, ours, theirs


def test_plain_merge_of_two_changed_checkpoints_fails_and_leaves_ours(tmp_path: Path) -> None:
    a, _, ours, _ = _diverged(tmp_path)
    r = g(a, "merge", "--no-edit", "other", ok=False)
    assert "CONFLICT" in r.stdout and "both sides changed the checkpoint" in r.stderr, r
    assert "thetastore.merge.strategy" in r.stderr
    assert (a / "model.safetensors").read_bytes() == ours
    assert "model.safetensors" in g(a, "diff", "--name-only", "--diff-filter=U").stdout


@pytest.mark.parametrize("favor", ["ours", "theirs"])
def test_merge_x_ours_and_theirs(tmp_path: Path, favor: str) -> None:
    a, _, ours, theirs = _diverged(tmp_path)
    r = g(a, "merge", "--no-edit", "-X", favor, "other")
    assert f"kept {favor} (git merge -X {favor})" in r.stderr, r.stderr
    assert (a / "model.safetensors").read_bytes() == (ours if favor == "ours" else theirs)
    assert (a / "notes.txt").read_bytes() == b"from other\n"  # a real merge: the rest came in
    assert len(g(a, "rev-list", "--parents", "-n1", "HEAD").stdout.split()) == 3
    clean_status(a)


def test_merge_strategy_option_spellings(tmp_path: Path) -> None:
    a, _, _, theirs = _diverged(tmp_path)
    g(a, "-c", "core.abbrev=12", "merge", "--no-edit", "--strategy-option=theirs", "other")
    assert (a / "model.safetensors").read_bytes() == theirs
    clean_status(a)


@pytest.mark.parametrize("favor", ["ours", "theirs"])
def test_rebase_x_ours_and_theirs(tmp_path: Path, favor: str) -> None:
    a, _, ours, theirs = _diverged(tmp_path)
    # other onto main: "ours" is main (the upstream), "theirs" the commit replayed from other
    g(a, "switch", "-q", "other")
    r = g(a, "rebase", "-X", favor, "main")
    assert f"kept {favor} (git rebase -X {favor})" in r.stderr, r.stderr
    assert (a / "model.safetensors").read_bytes() == (ours if favor == "ours" else theirs)
    assert g(a, "rev-parse", "HEAD~1").stdout == g(a, "rev-parse", "main").stdout
    assert (a / "notes.txt").read_bytes() == b"from other\n"
    clean_status(a)


def test_merge_strategy_setting_and_env(tmp_path: Path) -> None:
    a, _, ours, theirs = _diverged(tmp_path)
    g(a, "config", "thetastore.merge.strategy", "theirs")
    r = g(a, "merge", "--no-edit", "other")
    assert "kept theirs (git config thetastore.merge.strategy)" in r.stderr, r.stderr
    assert (a / "model.safetensors").read_bytes() == theirs
    g(a, "reset", "-q", "--hard", "HEAD~1")
    # -X on the command line comes first, then THETA_STORE_MERGE, then the config
    g(a, "merge", "--no-edit", "-X", "ours", "other")
    assert (a / "model.safetensors").read_bytes() == ours
    g(a, "reset", "-q", "--hard", "HEAD~1")
    r = g(a, "merge", "--no-edit", "other", env={"THETA_STORE_MERGE": "ours"})
    assert "kept ours (THETA_STORE_MERGE)" in r.stderr and (a / "model.safetensors").read_bytes() == ours
    g(a, "reset", "-q", "--hard", "HEAD~1")
    g(a, "config", "thetastore.merge.strategy", "fail")
    g(a, "merge", "--no-edit", "other", ok=False)
    assert (a / "model.safetensors").read_bytes() == ours
    g(a, "merge", "--abort")
    g(a, "config", "thetastore.merge.strategy", "newest")
    r = g(a, "merge", "--no-edit", "other", ok=False)
    assert "thetastore.merge.strategy is 'newest', not one of ours, theirs, fail" in r.stderr, r.stderr
    assert (a / "model.safetensors").read_bytes() == ours
