"""Crash safety: SIGKILL a command at a seeded random point, then check nothing was lost.

Each run copies a prepared set of repositories, starts one command in its own process group
(`theta-store add`, `git add` and `git checkout` through the filter process, `git push` over
file:// or git://, `git pull` / `theta-store fetch`, `git clone`, `theta-store gc --prune`), and
SIGKILLs the whole group (git, the filter process, hooks, a local receive-pack) after a delay
drawn uniformly from the command's measured duration. Then:

1. `git fsck --full` passes in every repository the command touched (the remote included);
2. `theta-store fsck` passes;
3. every committed version restores byte-exactly (sha256 of the rebuilt file = that of the file
   that was committed), the remote's versions too;
4. running the command again succeeds, and then its result is right (the staged pointer, the
   work-tree file, the remote's refs and versions, the versions gc keeps and drops), the checks
   above pass again, and no temporary file of ours is left.

Where git's own message after a kill asks the user to do something (a stale `index.lock` of a
killed git: "remove the file manually"; a half-made clone: "destination path already exists"),
the harness does that before the second attempt and counts it; a lock or a temporary file of
theta-store's own is a failure.

    python benches/crash_harness.py --runs 1000 --seed 1     # the table README "Crash safety" quotes
    python benches/crash_harness.py --replay 100017          # one run again, verbosely, kept on disk

tests/test_crash.py runs a few dozen seeds of the same harness.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402

import theta_store  # noqa: E402
from servers import git_daemon  # noqa: E402
from theta_store.checkpoint import restore_to  # noqa: E402
from theta_store.gitstore import GitStore  # noqa: E402
from theta_store.pointer import Pointer  # noqa: E402
from theta_store.remote import ensure_versions  # noqa: E402

COMMANDS = ("add", "git-add", "checkout", "push", "fetch", "clone", "gc")
M = "model.safetensors"
X = "extra.safetensors"
SEED_STRIDE = 100_003  # run i of seed S has seed S * SEED_STRIDE + i: its command is COMMANDS[seed % 7]

BASE_ENV = {
    "GIT_AUTHOR_NAME": "crash",
    "GIT_AUTHOR_EMAIL": "crash@example.com",
    "GIT_COMMITTER_NAME": "crash",
    "GIT_COMMITTER_EMAIL": "crash@example.com",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_TERMINAL_PROMPT": "0",
}
for var in ("THETA_STORE_SKIP_SMUDGE", "THETA_STORE_SKIP_PUSH", "THETA_STORE_REMOTE", "GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE"):
    os.environ.pop(var, None)

# Temporary files theta-store writes (a file name pattern), and where: any one left after the
# second, successful attempt is a failure.
OUR_TEMPS = (
    re.compile(r"tmp_pack_theta_"),  # objects/pack: a pack being written
    re.compile(r"\.theta-tmp\."),  # the work tree: a file being restored
    re.compile(r"^clean-"),  # theta-store/: a copy of what git streamed
    re.compile(r"\.tmp$"),  # theta-store/, objects/pack: plans, keep files, caches being replaced
    re.compile(r"^theta-incoming-"),  # objects: what a fetch is receiving
)
GIT_LOCK = re.compile(r"Unable to create '([^']+\.lock)': File exists")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def model(seed: int, change: int = 0) -> bytes:
    """A 3 MB safetensors file: three fp32 256x1024 matrices and a bias. `change` > 0 makes a new
    version of the same model: the bias moves, and for change >= 2 one matrix is nudged (a delta)."""
    rng = np.random.default_rng(seed)
    tensors = {f"layers.{i}.weight": (rng.standard_normal((256, 1024)) * 0.02).astype(np.float32) for i in range(3)}
    tensors["layers.0.bias"] = np.full(1024, float(change), np.float32)
    if change >= 2:
        w = tensors[f"layers.{change % 3}.weight"]
        w += np.random.default_rng(seed + change).standard_normal(w.shape).astype(np.float32) * 1e-3
    fd, tmp = tempfile.mkstemp(suffix=".safetensors")
    os.close(fd)
    try:
        theta_store.save_safetensors(tmp, tensors)
        return Path(tmp).read_bytes()
    finally:
        os.unlink(tmp)


@dataclass
class Run:
    """What one seeded run did and found."""

    seed: int
    command: str
    variant: str = ""
    delay: float = 0.0
    mid_run: bool = False  # the command was still running when it was killed
    exit_status: int | None = None  # of the command, had it finished before the kill
    failures: list[str] = field(default_factory=list)
    git_steps: list[str] = field(default_factory=list)  # what git's messages asked for before the second attempt
    temps_after_kill: list[str] = field(default_factory=list)  # ours, before the second attempt (which must remove them)
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)  # seconds: copy, command, checks, again, final

    @property
    def ok(self) -> bool:
        return not self.failures


class Harness:
    """Prepared repositories (one set per command, copied for each run), a git daemon, and the
    checks. `work` is a scratch folder; everything happens under it."""

    def __init__(self, work: Path, verbose: bool = False, commands: tuple[str, ...] = COMMANDS, all_variants: bool = True) -> None:
        self.work = work.resolve()
        self.verbose = verbose
        self.commands = commands
        self.all_variants = all_variants  # time (and check) every variant unkilled, or only the first
        self.run_dir = self.work / "run"  # every run at the same path: saved plans and remote URLs stay valid
        self.templates = self.work / "templates"
        self.scratch = self.work / "scratch"
        self.env = dict(os.environ, **BASE_ENV)
        self.env["GIT_CONFIG_GLOBAL"] = str(self.work / "gitconfig")
        self.env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "python"), self.env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        self.env["TMPDIR"] = str(self.work / "tmp")
        self.durations: dict[str, float] = {}
        self.data: dict[str, bytes] = {}
        self.expected: dict[str, dict[str, str]] = {}  # commit -> {path: sha256 of the file committed}
        self.version_sha: dict[str, str] = {}  # manifest id hex -> sha256 of its file
        self._daemon: contextlib.ExitStack | None = None
        self.daemon_url = ""

    # ---------------------------------------------------------------- setup
    def __enter__(self) -> Harness:
        _become_subreaper()
        for d in (self.work, self.templates, self.scratch, self.work / "tmp"):
            d.mkdir(parents=True, exist_ok=True)
        (self.work / "gitconfig").write_text("[init]\n\tdefaultBranch = main\n[advice]\n\tdetachedHead = false\n[gc]\n\tauto = 0\n")
        self.theta(self.work, "install", "--global")
        self._daemon = contextlib.ExitStack()
        self.daemon_url = self._daemon.enter_context(git_daemon(self.work))
        self.data = {"v1": model(0), "v2": model(0, 1), "v3": model(0, 2), "v4": model(0, 3), "x": model(7)}
        self._base()
        for c in self.commands:
            self._template(c)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._daemon is not None:
            self._daemon.close()

    def git(self, cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(["git", *args], cwd=cwd, env=self.env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if check and r.returncode != 0:
            raise RuntimeError(f"git {' '.join(args)} in {cwd} exited {r.returncode}: {r.stderr}")
        return r

    def theta_argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "theta_store", *args]

    def theta(self, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(self.theta_argv(*args), cwd=cwd, env=self.env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            raise RuntimeError(f"theta-store {' '.join(args)} in {cwd} exited {r.returncode}: {r.stderr}")
        return r

    def url(self, kind: str) -> str:
        return (self.run_dir / "remote.git").as_uri() if kind == "file" else f"{self.daemon_url}/run/remote.git"

    def _commit(self, repo: Path, name: str, message: str) -> str:
        (repo / M).write_bytes(self.data[name])
        self.git(repo, "add", M)
        self.git(repo, "commit", "-q", "-m", message)
        c = self.git(repo, "rev-parse", "HEAD").stdout.strip()
        self.expected[c] = {M: sha256(self.data[name])}
        ptr = Pointer.parse(self.git(repo, "cat-file", "blob", f"{c}:{M}").stdout.encode())
        self.version_sha[ptr.manifest_id.hex()] = sha256(self.data[name])
        return c

    def _base(self) -> None:
        """Repository a: main = c1 (v1), c2 (v2), c3 (v3); branch `old` at c1. Made once, the
        start of every command's set: the same commits everywhere."""
        shutil.rmtree(self.run_dir, ignore_errors=True)
        a = self.run_dir / "a"
        a.mkdir(parents=True)
        self.git(a, "init", "-q", "-b", "main")
        self.theta(a, "track", "*.safetensors")
        self.git(a, "commit", "-q", "-m", "track")
        self._commit(a, "v1", "v1")
        self.git(a, "branch", "old")
        self._commit(a, "v2", "v2")
        self._commit(a, "v3", "v3")
        shutil.rmtree(self.templates / "base", ignore_errors=True)
        shutil.move(str(self.run_dir), self.templates / "base")

    def _template(self, command: str) -> None:
        """Build the repositories `command` runs in at run_dir, time one run of it on a copy
        (the delays are drawn from that duration, and the copy's final checks must pass), keep them."""
        self._restore_template("base")
        a = self.run_dir / "a"
        if command in ("add", "git-add"):
            (a / M).write_bytes(self.data["v4"])
            if command == "git-add":
                (a / X).write_bytes(self.data["x"])
        elif command in ("push", "fetch", "clone"):
            remote = self.run_dir / "remote.git"
            self.git(self.run_dir, "init", "-q", "--bare", "-b", "main", str(remote))
            self.git(a, "remote", "add", "origin", self.url("file"))
            if command == "push":
                self.git(a, "push", "-q", "origin", "old:main")
            else:
                self.git(a, "push", "-q", "origin", "old:main")
                self.git(self.run_dir, "clone", "-q", self.url("file"), "b")
                self.git(a, "push", "-q", "origin", "main")
                if command == "fetch":
                    self.git(self.run_dir / "b", "fetch", "-q", "origin")
                else:
                    shutil.rmtree(self.run_dir / "b")
        elif command == "gc":
            self.git(a, "checkout", "-q", "-b", "tmp")
            c4 = self._commit(a, "v4", "v4, dropped")
            self.dropped = Pointer.parse(self.git(a, "cat-file", "blob", f"{c4}:{M}").stdout.encode()).manifest_id.hex()
            del self.expected[c4]
            del self.version_sha[self.dropped]
            self.git(a, "checkout", "-q", "main")
            self.git(a, "branch", "-q", "-D", "tmp")
            self.git(a, "reflog", "expire", "--expire=now", "--all")
        dest = self.templates / command
        shutil.rmtree(dest, ignore_errors=True)
        shutil.move(str(self.run_dir), dest)
        # The control run: unkilled, timed, checked like a second attempt.
        durations = []
        for variant in self.variants(command)[: None if self.all_variants else 1]:
            self._restore_template(command)
            argv, cwd = self.argv(command, variant)
            t0 = time.monotonic()
            r = subprocess.run(argv, cwd=cwd, env=self.env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
            durations.append(time.monotonic() - t0)
            if r.returncode != 0:
                raise RuntimeError(f"{command} ({variant}) failed unkilled: {r.stderr}")
            problems = self.final_checks(command, variant)
            if problems:
                raise RuntimeError(f"{command} ({variant}) unkilled fails its checks: {problems}")
        self.durations[command] = max(durations)

    def _restore_template(self, command: str) -> None:
        shutil.rmtree(self.run_dir, ignore_errors=True)
        shutil.copytree(self.templates / command, self.run_dir, symlinks=True)

    # ---------------------------------------------------------------- the commands
    @staticmethod
    def variants(command: str) -> list[str]:
        if command == "checkout":
            return ["plan", "no-plan"]  # a saved read plan (no dulwich), or none (the store opens)
        if command == "push":
            return ["file", "daemon"]
        if command == "fetch":
            return ["pull-file", "pull-daemon", "ts-fetch-file", "ts-fetch-daemon"]
        if command == "clone":
            return ["file", "daemon"]
        return [""]

    def argv(self, command: str, variant: str) -> tuple[list[str], Path]:
        a, b = self.run_dir / "a", self.run_dir / "b"
        kind = "daemon" if variant.endswith("daemon") else "file"
        if command == "add":
            return self.theta_argv("add", M), a
        if command == "git-add":
            return ["git", "add", M, X], a
        if command == "checkout":
            if variant == "no-plan":
                shutil.rmtree(a / ".git" / "theta-store" / "plans", ignore_errors=True)
            return ["git", "checkout", "-q", "old"], a
        if command == "push":
            self.git(a, "remote", "set-url", "origin", self.url(kind))
            return ["git", "push", "-q", "origin", "main"], a
        if command == "fetch":
            self.git(b, "remote", "set-url", "origin", self.url(kind))
            if variant.startswith("pull"):
                return ["git", "pull", "-q", "--ff-only", "origin", "main"], b
            return self.theta_argv("fetch", "--all", "origin"), b
        if command == "clone":
            return ["git", "clone", "-q", self.url(kind), "b"], self.run_dir
        if command == "gc":
            return self.theta_argv("gc", "--prune"), a
        raise ValueError(command)

    # ---------------------------------------------------------------- checks
    def repos(self, command: str) -> list[Path]:
        """The repositories of this run the command writes to that exist (a clone killed before
        it made .git is none). A fetch or clone only reads the remote and repository a."""
        if command not in ("fetch", "clone"):
            return [self.run_dir / "a"]
        b = self.run_dir / "b"
        if (b / ".git" / "HEAD").exists() and self.git(b, "rev-parse", "-q", "--verify", "HEAD", check=False).returncode == 0:
            return [b]
        return []

    def invariants(self, command: str, fetch: bool) -> list[str]:
        """`git fsck --full` and `theta-store fsck` pass; every committed version restores
        byte-exactly (`fetch`: versions not here are fetched first, as a checkout would)."""
        problems = []
        remote = self.run_dir / "remote.git"
        pushed = command == "push"
        for repo in [*self.repos(command), *([remote] if pushed else [])]:
            r = self.git(repo, "fsck", "--full", "--no-progress", check=False)
            if r.returncode != 0:
                problems.append(f"git fsck --full in {repo.name}: exit {r.returncode}: {(r.stdout + r.stderr).strip()[:500]}")
        for repo in self.repos(command):
            try:
                with theta_store.Repo(repo, hooks=False) as tr:
                    report = tr.fsck()
                if not report["ok"]:
                    problems.append(f"theta-store fsck in {repo.name}: {report['problems'][:3]}")
            except Exception as e:
                problems.append(f"theta-store fsck in {repo.name} raised {type(e).__name__}: {e}")
            problems += self.restore_commits(repo, fetch=fetch and repo.name == "b")
        if pushed:
            problems += self.restore_remote(remote)
        return problems

    def restore_commits(self, repo: Path, fetch: bool) -> list[str]:
        problems = []
        dest = self.scratch / "restored.safetensors"
        with GitStore(repo) as store:
            for commit, files in self.expected.items():
                if not store.has_revision(commit):
                    continue  # a clone that has not fetched it yet
                for path, want in files.items():
                    try:
                        ptr = Pointer.parse(store.read_path(path, commit), path)
                        if store.version_commit(ptr.manifest_id) is None:
                            if not fetch and repo.name == "b":
                                continue  # not fetched yet: a checkout would fetch it
                            ensure_versions(store, {ptr.manifest_id}, quiet=True)
                        restore_to(store, ptr, str(dest), progress=False)
                        got = sha256(dest.read_bytes())
                        if got != want:
                            problems.append(f"{repo.name}: {commit[:10]}:{path} restores to other bytes ({got[:12]}, not {want[:12]})")
                    except Exception as e:
                        problems.append(f"{repo.name}: {commit[:10]}:{path} does not restore: {type(e).__name__}: {e}")
        return problems

    def restore_remote(self, remote: Path) -> list[str]:
        """Every version the remote holds rebuilds to the bytes of the file it was made from."""
        problems = []
        dest = self.scratch / "remote.safetensors"
        with GitStore(remote) as store:
            for v in store.versions():
                want = self.version_sha.get(v.hex())
                try:
                    m = theta_store.checkpoint.load_manifest(store, v)
                    restore_to(store, Pointer(v, m.size, m.blake3, len(m.tensors), m.format), str(dest), progress=False)
                    if want is not None and sha256(dest.read_bytes()) != want:
                        problems.append(f"remote: version {v.hex()[:16]} restores to other bytes")
                except Exception as e:
                    problems.append(f"remote: version {v.hex()[:16]} does not restore: {type(e).__name__}: {e}")
        return problems

    def file_is(self, path: Path, name: str) -> str | None:
        try:
            got = sha256(path.read_bytes())
        except FileNotFoundError:
            return f"{path.relative_to(self.run_dir)} is missing"
        return None if got == sha256(self.data[name]) else f"{path.relative_to(self.run_dir)} holds other bytes than {name}"

    def staged_is(self, repo: Path, path: str, name: str) -> str | None:
        dest = self.scratch / "staged.safetensors"
        try:
            with GitStore(repo) as store:
                ptr = Pointer.parse(store.read_path(path, None), path)
                restore_to(store, ptr, str(dest), progress=False)
        except Exception as e:
            return f"the staged {path} does not restore: {type(e).__name__}: {e}"
        return None if sha256(dest.read_bytes()) == sha256(self.data[name]) else f"the staged {path} is not {name}"

    def status_clean(self, repo: Path) -> str | None:
        out = self.git(repo, "status", "--porcelain", check=False)
        if out.returncode == 0 and out.stdout == "":
            return None
        return f"git status in {repo.name}: {out.stdout.strip()[:300]} {out.stderr.strip()[:300]}"

    def final_checks(self, command: str, variant: str) -> list[str]:
        """After a successful (second) attempt: the invariants, the command's result, no temporary file of ours."""
        a, b, remote = self.run_dir / "a", self.run_dir / "b", self.run_dir / "remote.git"
        problems = self.invariants(command, fetch=True)
        result: list[str | None] = []
        if command == "add":
            result += [self.staged_is(a, M, "v4"), self.file_is(a / M, "v4")]
        elif command == "git-add":
            result += [self.staged_is(a, M, "v4"), self.staged_is(a, X, "x")]
            out = self.git(a, "status", "--porcelain").stdout.splitlines()
            if sorted(out) != sorted([f"M  {M}", f"A  {X}"]):
                result.append(f"git status after git add: {out}")
        elif command == "checkout":
            head = self.git(a, "symbolic-ref", "HEAD").stdout.strip()
            result += [self.file_is(a / M, "v1"), self.status_clean(a), None if head == "refs/heads/old" else f"HEAD is {head}"]
        elif command == "push":
            main = self.git(remote, "rev-parse", "main").stdout.strip()
            have = set(self.git(remote, "for-each-ref", "--format=%(refname:lstrip=2)", "refs/theta/").stdout.split())
            want = {v for v in self.version_sha if v != getattr(self, "dropped", None)}
            result.append(None if main == self.git(a, "rev-parse", "main").stdout.strip() else "the remote's main is not a's")
            result.append(None if want <= have else f"the remote lacks versions {sorted(want - have)}")
        elif command in ("fetch", "clone"):
            if command == "clone" or variant.startswith("pull"):
                result += [self.file_is(b / M, "v3"), self.status_clean(b)]
            else:
                with GitStore(b) as store:
                    missing = [v for v in self.version_sha if store.version_commit(bytes.fromhex(v)) is None]
                result.append(f"theta-store fetch --all left versions unfetched: {missing}" if missing else None)
        elif command == "gc":
            with GitStore(a) as store:
                left = store.version_commit(bytes.fromhex(self.dropped))
            result.append(None if left is None else "gc kept the version no commit needs")
        problems += [r for r in result if r]
        problems += [f"left behind: {p}" for p in self.our_temps()]
        return problems

    def our_temps(self) -> list[str]:
        """Temporary files of theta-store's (and lock files in its folders) under the run's repositories."""
        out = []
        for repo in (self.run_dir / "a", self.run_dir / "b", self.run_dir / "remote.git"):
            if not repo.exists():
                continue
            git_dir = repo / ".git" if (repo / ".git").is_dir() else repo
            places = [git_dir / "objects", git_dir / "objects" / "pack", git_dir / "theta-store", repo]
            for place in places:
                if not place.is_dir():
                    continue
                walk = place.rglob("*") if place.name == "theta-store" else place.iterdir()
                for f in walk:
                    lock = place.name == "theta-store" and f.name.endswith(".lock") and f.stat().st_size > 0
                    if lock or any(p.search(f.name) for p in OUR_TEMPS):
                        out.append(str(f.relative_to(self.run_dir)))
            for lock in (git_dir / "refs" / "theta").rglob("*.lock") if (git_dir / "refs" / "theta").is_dir() else []:
                out.append(str(lock.relative_to(self.run_dir)))
        return out

    # ---------------------------------------------------------------- one run
    def run(self, seed: int) -> Run:
        """One seeded run: the command, its variant and the delay come from `seed`."""
        rng = random.Random(seed)
        command = COMMANDS[seed % len(COMMANDS)]
        if command not in self.commands:
            raise ValueError(f"seed {seed} runs {command}, which this harness was not set up for")
        variant = rng.choice(self.variants(command))
        run = Run(seed, command, variant)
        t0 = time.monotonic()
        self._restore_template(command)
        shutil.rmtree(self.scratch, ignore_errors=True)
        self.scratch.mkdir()
        argv, cwd = self.argv(command, variant)
        run.phases["copy"] = time.monotonic() - t0
        run.delay = rng.uniform(0.0, self.durations[command])
        with open(self.work / "killed.out", "wb") as out:
            p = subprocess.Popen(
                argv, cwd=cwd, env=self.env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
            try:
                p.wait(run.delay)
                run.exit_status = p.returncode
            except subprocess.TimeoutExpired:
                run.mid_run = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        self._settle(p.pid)
        run.phases["command"] = time.monotonic() - t0 - run.phases["copy"]
        if run.exit_status not in (None, 0):
            run.failures.append(f"the command failed before the kill: {(self.work / 'killed.out').read_text(errors='replace')[-500:]}")
        run.failures += [f"after the kill: {p}" for p in self.invariants(command, fetch=False)]
        run.temps_after_kill = self.our_temps()
        t1 = time.monotonic()
        run.phases["checks"] = t1 - t0 - run.phases["copy"] - run.phases["command"]
        run.failures += self._again(run, argv, cwd, command, variant)
        t2 = time.monotonic()
        run.phases["again"] = t2 - t1
        if not run.failures:
            run.failures += self.final_checks(command, variant)
        run.seconds = time.monotonic() - t0
        run.phases["final"] = run.seconds - (t2 - t0)
        return run

    def _settle(self, pgid: int) -> None:
        """Wait until no process of the killed group is left, nor a server-side one of the
        daemon's (its upload-pack or receive-pack finishes on its own once the client is gone).

        The killed group's orphans are reparented to us (a child subreaper) and reaped at once,
        as a usual init does: this machine's init reaps lazily, and a zombie still counts as a
        running process for git's gc.pid check and for our sweep of temporary files."""
        deadline = time.monotonic() + 20
        me = os.getpid()
        while time.monotonic() < deadline:
            procs = list(_procs())
            group = [(pid, state, ppid) for pid, _, state, ppid, pgrp in procs if pgrp == pgid]
            for pid, state, ppid in group:
                if state == "Z" and ppid == me:
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(pid, os.WNOHANG)
            if not group and not _daemon_busy(procs):
                return
            time.sleep(0.01)

    def _again(self, run: Run, argv: list[str], cwd: Path, command: str, variant: str) -> list[str]:
        """The second attempt, after doing what git's messages ask for (at most a few times)."""
        for _ in range(4):
            if command == "clone" and (self.run_dir / "b").exists():
                run.git_steps.append("rm -rf the half-made clone")
                shutil.rmtree(self.run_dir / "b")
            if command == "checkout" and variant == "no-plan":
                pass  # the plans the killed checkout saved are used, as a user's next checkout would
            r = subprocess.run(argv, cwd=cwd, env=self.env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
            if r.returncode == 0:
                return []
            if "would be overwritten by" in r.stderr and command in ("checkout", "fetch"):
                # git writes work-tree files before its index: the file must hold a committed version
                repo = self.run_dir / ("a" if command == "checkout" else "b")
                have = sha256((repo / M).read_bytes()) if (repo / M).exists() else None
                if have is not None and have not in {sha256(d) for d in self.data.values()}:
                    return [f"the killed command left {M} holding bytes of no version: {r.stderr.strip()[:300]}"]
                run.git_steps.append("git reset --hard (git had written the work tree, not yet its index)")
                self.git(repo, "reset", "-q", "--hard")
                continue
            m = GIT_LOCK.search(r.stderr)
            if m is not None:
                lock = Path(m.group(1))
                if "theta-store" in lock.parts or "theta" in lock.parts:
                    return [f"running it again fails on a lock of ours: {r.stderr.strip()[:500]}"]
                run.git_steps.append(f"rm {lock.relative_to(self.run_dir) if lock.is_relative_to(self.run_dir) else lock}")
                with contextlib.suppress(FileNotFoundError):
                    lock.unlink()
                continue
            return [f"running it again exits {r.returncode}: {r.stderr.strip()[-800:]}"]
        return ["running it again kept failing on stale locks"]


def _become_subreaper() -> None:
    """prctl(PR_SET_CHILD_SUBREAPER): orphans of the commands we kill become our children."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)


def _procs() -> Iterator[tuple[int, str, str, int, int]]:
    """(pid, comm, state, ppid, pgrp) of every process."""
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                s = f.read()
        except OSError:
            continue
        comm = s[s.index("(") : s.rindex(")") + 1]
        rest = s[s.rindex(")") + 2 :].split()
        yield int(d), comm, rest[0], int(rest[1]), int(rest[2])


def _daemon_busy(procs: list[tuple[int, str, str, int, int]]) -> bool:
    """Whether a process serving a connection of a git daemon we started is running."""
    parent = {pid: ppid for pid, _, _, ppid, _ in procs}
    comm = {pid: c for pid, c, _, _, _ in procs}

    def ancestors(pid: int) -> list[int]:
        out: list[int] = []
        while (pid := parent.get(pid, 0)) and len(out) < 32:
            out.append(pid)
        return out

    me = os.getpid()
    listeners = {pid for pid, c, _, ppid, _ in procs if c == "(git-daemon)" and comm.get(ppid) != "(git-daemon)" and me in ancestors(pid)}
    return any(state != "Z" and pid not in listeners and listeners & set(ancestors(pid)) for pid, _, state, _, _ in procs)


def table(runs: list[Run]) -> str:
    rows = []
    for c in COMMANDS:
        mine = [r for r in runs if r.command == c]
        if not mine:
            continue
        rows.append(
            (
                c,
                len(mine),
                sum(r.mid_run for r in mine),
                sum(bool(r.git_steps) for r in mine),
                sum(not r.ok for r in mine),
                " ".join(str(r.seed) for r in mine if not r.ok)[:60],
            )
        )
    total = ("total", len(runs), sum(r.mid_run for r in runs), sum(bool(r.git_steps) for r in runs), sum(not r.ok for r in runs), "")
    head = ("command", "runs", "killed mid-run", "git's steps", "failures", "failing seeds (--replay)")
    lines = [f"| {' | '.join(head)} |", "|" + "|".join("---" for _ in head) + "|"]
    lines += [f"| {' | '.join(str(x) for x in row)} |" for row in [*rows, total]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=70)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--replay", type=int, metavar="SEED", help="run this one seed again, verbosely; its folder is kept")
    ap.add_argument("--commands", default=",".join(COMMANDS), help="only these (comma-separated)")
    ap.add_argument("--work", type=Path, help="scratch folder (default: a new temporary one)")
    ap.add_argument("--json", type=Path, help="write every run's record here")
    args = ap.parse_args(argv)
    wanted = set(args.commands.split(","))
    work = args.work or Path(tempfile.mkdtemp(prefix="theta-crash-"))
    seeds = [args.replay] if args.replay is not None else [args.seed * SEED_STRIDE + i for i in range(args.runs)]
    seeds = [s for s in seeds if COMMANDS[s % len(COMMANDS)] in wanted]
    runs: list[Run] = []
    t0 = time.monotonic()
    print(f"theta_store from {theta_store.__file__}; work folder {work}", flush=True)
    try:
        used = tuple(c for c in COMMANDS if any(COMMANDS[s % len(COMMANDS)] == c for s in seeds))
        with Harness(work, verbose=args.replay is not None, commands=used) as h:
            print("measured durations: " + ", ".join(f"{c} {d:.2f} s" for c, d in h.durations.items()), flush=True)
            for i, s in enumerate(seeds):
                r = h.run(s)
                runs.append(r)
                if args.replay is not None or not r.ok:
                    print(json.dumps(r.__dict__, indent=2), flush=True)
                if (i + 1) % 50 == 0:
                    print(f"{i + 1} runs, {sum(not x.ok for x in runs)} failures, {time.monotonic() - t0:.0f} s", flush=True)
                if args.json:
                    args.json.write_text(json.dumps([x.__dict__ for x in runs], indent=1))
    finally:
        if args.replay is None and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{len(runs)} runs in {time.monotonic() - t0:.0f} s (seed {args.seed})\n")
    print(table(runs))
    return 1 if any(not r.ok for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
