"""Concurrency: theta-store commands and plain git commands run at once on one repository (or
two clones of one remote), as real processes with the real git binary and `git daemon` on
127.0.0.1.

Scenarios: two `theta-store add` of different checkpoints; `git add` of 100 checkpoints through
one filter process; a push while an add runs; `theta-store gc --prune` while a checkout runs;
two clones pushing new versions of one checkpoint to one remote at once. After each: `git fsck
--full`, `theta-store fsck`, every committed version restores byte-exactly (SHA-256 against what
was written), and no process hangs (each runs under a timeout; a timeout fails the test).

Each scenario is a plain function of (folder, random generator, round) so that
benches/bench_concurrency.py runs it many rounds; the racy ones run a few rounds here, each
with other random start delays.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

import theta_store
from servers import serve

# Seconds any one command may take before it counts as hung: far above what each takes here.
TIMEOUT = float(os.environ.get("THETA_CONC_TIMEOUT", "60"))
M = "model.safetensors"


class Hung(AssertionError):
    """A process did not finish within TIMEOUT (a deadlock or a livelock)."""


# ---------------------------------------------------------------- processes, each under a timeout


@dataclass
class Proc:
    args: list[str]
    cwd: Path
    popen: subprocess.Popen[bytes]
    started: float

    def wait(self) -> subprocess.CompletedProcess[bytes]:
        try:
            out, err = self.popen.communicate(timeout=max(0.1, TIMEOUT - (time.monotonic() - self.started)))
        except subprocess.TimeoutExpired:
            # the process group we started (git and the filters it runs): nothing else
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            out, err = self.popen.communicate()
            raise Hung(f"{' '.join(self.args)} in {self.cwd} did not finish in {TIMEOUT:.0f} s:\n{err.decode(errors='replace')}") from None
        return subprocess.CompletedProcess(self.args, self.popen.returncode, out, err)


def spawn(cwd: Path, *args: str) -> Proc:
    popen = subprocess.Popen(
        list(args), cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    return Proc(list(args), cwd, popen, time.monotonic())


def run(cwd: Path, *args: str, ok: bool | None = True) -> subprocess.CompletedProcess[bytes]:
    """Run a command under the timeout; `ok` True: must succeed, False: must fail, None: either."""
    r = spawn(cwd, *args).wait()
    return expect(r, ok)


def expect(r: subprocess.CompletedProcess[bytes], ok: bool | None) -> subprocess.CompletedProcess[bytes]:
    if ok is not None and (r.returncode == 0) != ok:
        raise AssertionError(
            f"{' '.join(r.args)} exited {r.returncode} (expected {'success' if ok else 'a failure'}):\n"
            f"{r.stdout.decode(errors='replace')}\n{r.stderr.decode(errors='replace')}"
        )
    return r


def git(cwd: Path, *args: str, ok: bool | None = True) -> str:
    return run(cwd, "git", *args, ok=ok).stdout.decode()


def ts(cwd: Path, *args: str, ok: bool | None = True) -> subprocess.CompletedProcess[bytes]:
    return run(cwd, "theta-store", *args, ok=ok)


def jitter(rng: random.Random, most: float = 0.15) -> None:
    """A short random pause: another order of events each round."""
    time.sleep(rng.uniform(0, most))


def at_once(
    rng: random.Random, one: tuple[Path, list[str]], other: tuple[Path, list[str]], most: float, together: bool = True
) -> list[subprocess.CompletedProcess[bytes]]:
    """Run two commands at once: either may start first, the other a random moment (at most
    `most` s, about the first one's run time) later. Returns their results in argument order.
    `together` False runs them one after the other (the bench's baseline)."""
    swap = rng.random() < 0.5
    first, second = (other, one) if swap else (one, other)
    p1 = spawn(first[0], *first[1])
    r1 = None if together else p1.wait()
    jitter(rng, most)
    p2 = spawn(second[0], *second[1])
    done = [r1 or p1.wait(), p2.wait()]
    return done[::-1] if swap else done


# ---------------------------------------------------------------- the setting: git config, files


def setup_git(home: Path) -> dict[str, str]:
    """A private global git config with theta-store installed in it (`install --global`); returns
    the environment changes, which the caller applies (pytest's monkeypatch, or the bench)."""
    home.mkdir(parents=True, exist_ok=True)
    cfg = home / "gitconfig"
    cfg.write_text("[init]\n\tdefaultBranch = main\n[advice]\n\tdetachedHead = false\n[gc]\n\tauto = 0\n")
    env = {"GIT_CONFIG_GLOBAL": str(cfg)}
    bindir = Path(sys.executable).parent
    if (bindir / "theta-store").exists():  # this interpreter's, not a version manager's shim
        env["PATH"] = f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"
    return env


def install(home: Path) -> None:
    run(home, "theta-store", "install", "--global")


def model(seed: int, tensors: int = 3, rows: int = 64, cols: int = 256, changed: Sequence[int] = (), step: int = 0) -> bytes:
    """A small safetensors model; seed fixes the weights, `changed` tensors are nudged by `step`."""
    rng = np.random.default_rng(seed)
    ws = {f"layers.{i}.weight": (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32) for i in range(tensors)}
    for i in changed:
        ws[f"layers.{i}.weight"] += np.float32(1e-3 * step)
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"theta-conc-{os.getpid()}-{seed}.safetensors"
    try:
        theta_store.save_safetensors(str(tmp), ws)
        return tmp.read_bytes()
    finally:
        tmp.unlink(missing_ok=True)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write(path: Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return sha(data)


def new_repo(path: Path) -> Path:
    path.mkdir(parents=True)
    git(path, "init", "-q", "-b", "main")
    ts(path, "track", "*.safetensors")
    git(path, "add", ".gitattributes")
    git(path, "commit", "-q", "-m", "track checkpoints")
    return path


def commit(repo: Path, message: str, *paths: str) -> str:
    git(repo, "add", *(paths or (".",)))
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD").strip()


@dataclass
class Ledger:
    """What was committed: commit -> {path: SHA-256 of the bytes written}."""

    commits: dict[str, dict[str, str]] = field(default_factory=dict)

    def record(self, repo: Path, files: dict[str, str]) -> str:
        head = git(repo, "rev-parse", "HEAD").strip()
        self.commits.setdefault(head, {}).update(files)
        return head


# ---------------------------------------------------------------- the checks after each scenario


def versions(repo: Path) -> set[str]:
    out = git(repo, "for-each-ref", "--format=%(refname)", "refs/theta/")
    return {line.rsplit("/", 1)[1] for line in out.split()}


def check_store(repo: Path) -> None:
    """git fsck --full and theta-store fsck pass."""
    r = run(repo, "git", "fsck", "--full", "--no-progress", ok=None)
    assert r.returncode == 0 and b"missing" not in r.stdout + r.stderr, r.stderr.decode(errors="replace")
    r = run(repo, "theta-store", "fsck", ok=None)
    assert r.returncode == 0, (r.stdout + r.stderr).decode(errors="replace")


def check_restores(repo: Path, ledger: Ledger) -> None:
    """Every committed version restores byte-exactly: each ledger commit checked out afresh (a
    new work tree, so through the smudge filter), each file's SHA-256 as written."""
    for i, (rev, files) in enumerate(sorted(ledger.commits.items())):
        wt = repo.parent / f"{repo.name}-check-{os.getpid()}-{i}"
        git(repo, "worktree", "add", "-q", "--detach", str(wt), rev)
        try:
            for path, want in sorted(files.items()):
                got = sha((wt / path).read_bytes())
                assert got == want, f"{path} at {rev[:10]} restores to other bytes (SHA-256 {got[:16]}, written {want[:16]})"
            assert git(wt, "status", "--porcelain") == "", f"checkout of {rev[:10]} is not clean"
        finally:
            git(repo, "worktree", "remove", "--force", str(wt))


def check_all(repo: Path, ledger: Ledger) -> None:
    check_store(repo)
    check_restores(repo, ledger)


# ---------------------------------------------------------------- scenarios


def two_adds(base: Path, rng: random.Random, rounds: int = 1, together: bool = True) -> None:
    """Two `theta-store add` of different checkpoints at once in one repository, `rounds` times:
    both pointers are staged (no lost index update), both versions stored."""
    repo = new_repo(base / "repo")
    ledger = Ledger()
    files = {"a.safetensors": write(repo / "a.safetensors", model(1)), "b.safetensors": write(repo / "b.safetensors", model(2))}
    commit(repo, "v0")
    ledger.record(repo, files)
    for r in range(1, rounds + 1):
        files = {
            "a.safetensors": write(repo / "a.safetensors", model(1, changed=[r % 3], step=r)),
            "b.safetensors": write(repo / "b.safetensors", model(2, changed=[(r + 1) % 3], step=r)),
        }
        for done in at_once(
            rng, (repo, ["theta-store", "add", "a.safetensors"]), (repo, ["theta-store", "add", "b.safetensors"]), 0.6, together
        ):
            expect(done, True)
        staged = git(repo, "status", "--porcelain")
        assert sorted(staged.split()) == ["M", "M", "a.safetensors", "b.safetensors"], f"round {r}: after both adds:\n{staged}"
        git(repo, "commit", "-q", "-m", f"v{r}")
        ledger.record(repo, files)
    check_all(repo, ledger)


def hundred_files(base: Path, rng: random.Random, n: int = 100, together: bool = True) -> None:
    """`git add` of `n` checkpoint files at once: one filter process cleans them all."""
    repo = new_repo(base / "repo")
    files = {
        f"ckpt/m{i:03d}.safetensors": write(repo / "ckpt" / f"m{i:03d}.safetensors", model(100 + i, tensors=2, rows=16, cols=64))
        for i in range(n)
    }
    jitter(rng)
    git(repo, "add", "ckpt")
    git(repo, "commit", "-q", "-m", f"{n} checkpoints")
    ledger = Ledger()
    ledger.record(repo, files)
    assert len(versions(repo)) == n
    check_all(repo, ledger)


@contextlib.contextmanager
def daemon(base: Path) -> Iterator[str]:
    with serve("daemon", base / "srv") as remote:
        yield remote.url


def push_during_add(base: Path, rng: random.Random, rounds: int = 1, together: bool = True) -> None:
    """`git push` (its pre-push hook sends the versions) while `theta-store add` stores another
    checkpoint; the pushed commit clones back byte-exactly, then so does the added one."""
    with daemon(base) as url:
        a = new_repo(base / "a")
        git(a, "remote", "add", "origin", url)
        ledger = Ledger()
        for r in range(rounds):
            files = {M: write(a / M, model(10 + r, changed=[0], step=r))}
            commit(a, f"model v{r}", M)
            ledger.record(a, files)
            other = {f"other{r}.safetensors": write(a / f"other{r}.safetensors", model(50 + r, tensors=4))}
            for done in at_once(
                rng, (a, ["git", "push", "-q", "origin", "main"]), (a, ["theta-store", "add", f"other{r}.safetensors"]), 0.8, together
            ):
                expect(done, True)
            git(a, "commit", "-q", "-m", f"other v{r}")
            ledger.record(a, {**files, **other})
        git(a, "push", "-q", "origin", "main")
        check_all(a, ledger)
        b = base / "b"
        git(base, "clone", "-q", url, str(b))
        check_all(b, ledger)


def pack_names(repo: Path) -> set[str]:
    return {p.name for p in (repo / ".git" / "objects" / "pack").glob("*.pack")}


def gc_during_checkout(base: Path, rng: random.Random, rounds: int = 1, together: bool = True, files: int = 4) -> None:
    """`theta-store gc --prune` while `git checkout` switches branches, the gc rewriting the pack
    the checkout reads from. Each round, a scratch branch and the branch to be checked out get
    `files` new versions each: 8 packs of a tier, which the last add rolls up into one. Then the
    scratch branch is deleted and, at once, the checkout switches to the other branch and gc drops
    the scratch versions, rewriting that pack without them."""
    repo = new_repo(base / "repo")
    ledger = Ledger()
    branches = ["one", "two"]
    for i, name in enumerate(branches):
        git(repo, "switch", "-q", "-c", name, "main")
        setup = {f"m{j}.safetensors": write(repo / f"m{j}.safetensors", model(200 + 10 * i + j, rows=32)) for j in range(files)}
        commit(repo, name)
        ledger.record(repo, setup)
    for r in range(rounds):
        target, other = branches[(r + 1) % 2], branches[r % 2]
        git(repo, "switch", "-q", "-c", "scratch", "main")
        for j in range(files):
            write(repo / f"s{j}.safetensors", model(900 + 10 * r + j, rows=32))
        commit(repo, f"scratch {r}")
        git(repo, "switch", "-q", target)
        new = {f"m{j}.safetensors": write(repo / f"m{j}.safetensors", model(500 + 10 * r + j, rows=32)) for j in range(files)}
        commit(repo, f"{target} round {r}")
        ledger.record(repo, new)
        git(repo, "switch", "-q", other)
        git(repo, "branch", "-q", "-D", "scratch")
        git(repo, "reflog", "expire", "--expire=now", "--all")
        before = pack_names(repo)
        for done in at_once(rng, (repo, ["git", "checkout", "-q", target]), (repo, ["theta-store", "gc", "--prune"]), 0.8, together):
            expect(done, True)
        assert before - pack_names(repo), f"round {r}: gc rewrote no pack (the scenario lost its point)"
        head = git(repo, "rev-parse", "HEAD").strip()
        for path, want in ledger.commits[head].items():
            assert sha((repo / path).read_bytes()) == want, f"round {r}: {path} checked out during gc is wrong"
        assert git(repo, "status", "--porcelain") == ""
    check_all(repo, ledger)


def two_pushers(base: Path, rng: random.Random, rounds: int = 1, together: bool = True) -> None:
    """Two clones push new versions of one checkpoint to one remote at once: one push wins, git
    rejects the other; the loser merges (or rebases), pushes, and every version of the remote's
    history clones back byte-exactly. B changes tensor 0 and C tensor 1, so the merge driver
    merges them without a conflict."""
    with daemon(base) as url:
        a = new_repo(base / "a")
        ledger = Ledger()
        files = {M: write(a / M, model(7))}
        commit(a, "v0")
        ledger.record(a, files)
        git(a, "remote", "add", "origin", url)
        git(a, "push", "-q", "origin", "main")
        b, c = base / "b", base / "c"
        replaced: set[str] = set()
        for d in (b, c):
            git(base, "clone", "-q", url, str(d))
        for r in range(1, rounds + 1):
            for d in (b, c):
                git(d, "pull", "-q", "--no-rebase", "origin", "main")
            mine = {}
            for d, t in ((b, 0), (c, 1)):
                mine[d] = write(d / M, _nudged(d / M, t, r))
                commit(d, f"{d.name} round {r}", M)
                ledger.record(d, {M: mine[d]})
            first, second = b, c
            r1, r2 = at_once(rng, (first, ["git", "push", "origin", "main"]), (second, ["git", "push", "origin", "main"]), 0.5, together)
            assert (r1.returncode == 0) != (r2.returncode == 0), f"round {r}: both pushes {'won' if r1.returncode == 0 else 'lost'}"
            loser, lost = (second, r2) if r1.returncode == 0 else (first, r1)
            assert b"rejected" in lost.stderr or b"failed to lock" in lost.stderr or b"cannot lock" in lost.stderr, lost.stderr.decode()
            if r % 2:
                git(loser, "pull", "-q", "--no-rebase", "--no-edit", "origin", "main")
            else:
                replaced.add(git(loser, "rev-parse", "HEAD").strip())
                git(loser, "pull", "-q", "--rebase", "origin", "main")
            ledger.record(loser, {M: sha((loser / M).read_bytes())})
            _check_merged(loser / M, r)
            git(loser, "push", "-q", "origin", "main")
        d = base / "d"
        git(base, "clone", "-q", url, str(d))
        history = git(d, "rev-list", "main").split()
        known = [h for h in history if h in ledger.commits]
        # every commit but the first (.gitattributes) was written here, and every one written is in
        # it but those a rebase replaced
        assert set(history) - set(known) == {git(d, "rev-list", "--max-parents=0", "main").strip()}, "a commit not written here"
        assert set(ledger.commits) - set(known) == replaced, "a version written and pushed is not in the remote's history"
        check_all(d, Ledger({h: ledger.commits[h] for h in known}))
        run(url_path(base), "git", "fsck", "--full", "--no-progress")


def url_path(base: Path) -> Path:
    return base / "srv" / "remote.git"


def _nudged(path: Path, tensor: int, step: int) -> bytes:
    """The checkpoint at `path` with one tensor nudged (the rest byte-identical)."""
    ws = _read(path)
    ws[f"layers.{tensor}.weight"] = ws[f"layers.{tensor}.weight"] + np.float32(1e-3 * step)
    tmp = path.with_suffix(".tmp.safetensors")
    try:
        theta_store.save_safetensors(str(tmp), ws)
        return tmp.read_bytes()
    finally:
        tmp.unlink(missing_ok=True)


def _read(path: Path) -> dict[str, np.ndarray]:
    import json
    import struct

    data = path.read_bytes()
    (n,) = struct.unpack_from("<Q", data)
    header = json.loads(data[8 : 8 + n])
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        lo, hi = meta["data_offsets"]
        out[name] = np.frombuffer(data[8 + n + lo : 8 + n + hi], np.float32).reshape(meta["shape"]).copy()
    return out


def _check_merged(path: Path, step: int) -> None:
    """After the loser's merge or rebase: both sides' changes are in the file."""
    ws = _read(path)
    v0 = _read_model0()
    for t in (0, 1):
        assert np.array_equal(ws[f"layers.{t}.weight"], _steps(v0[f"layers.{t}.weight"], step)), f"tensor {t} lost a side's change"


_V0: dict[str, np.ndarray] = {}


def _read_model0() -> dict[str, np.ndarray]:
    if not _V0:
        tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"theta-conc-v0-{os.getpid()}.safetensors"
        tmp.write_bytes(model(7))
        try:
            _V0.update(_read(tmp))
        finally:
            tmp.unlink()
    return _V0


def _steps(w: np.ndarray, step: int) -> np.ndarray:
    for s in range(1, step + 1):
        w = w + np.float32(1e-3 * s)
    return w


def gc_during_add(base: Path, rng: random.Random, together: bool = True, n: int = 20) -> None:
    """`theta-store gc` while `git add` of `n` checkpoints runs (beyond the issue's list: how the
    gc fault of versions dropped before git staged them was found)."""
    repo = new_repo(base / "repo")
    files = {f"c/m{i:02d}.safetensors": write(repo / "c" / f"m{i:02d}.safetensors", model(700 + i, rows=32)) for i in range(n)}
    for done in at_once(rng, (repo, ["git", "add", "c"]), (repo, ["theta-store", "gc"]), 1.0, together):
        expect(done, True)
    git(repo, "commit", "-q", "-m", "checkpoints")
    assert len(versions(repo)) == n
    ledger = Ledger()
    ledger.record(repo, files)
    check_all(repo, ledger)


SCENARIOS = {
    "two_adds": two_adds,
    "hundred_files": hundred_files,
    "push_during_add": push_during_add,
    "gc_during_checkout": gc_during_checkout,
    "two_pushers": two_pushers,
    "gc_during_add": gc_during_add,
}


# ---------------------------------------------------------------- the tests


@pytest.fixture(autouse=True)
def git_setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in setup_git(tmp_path / "home").items():
        monkeypatch.setenv(k, v)
    for var in ("THETA_STORE_SKIP_SMUDGE", "THETA_STORE_SKIP_PUSH", "THETA_STORE_REMOTE"):
        monkeypatch.delenv(var, raising=False)
    install(tmp_path / "home")


def _rng(name: str) -> random.Random:
    seed = int(os.environ.get("THETA_CONC_SEED", "0")) or random.randrange(1 << 30)
    print(f"{name}: THETA_CONC_SEED={seed}")  # shown on failure: rerun with it
    return random.Random(seed)


def test_two_adds_at_once(tmp_path: Path) -> None:
    two_adds(tmp_path, _rng("two_adds"), rounds=3)


def test_git_add_of_100_checkpoints(tmp_path: Path) -> None:
    hundred_files(tmp_path, _rng("hundred_files"))


def test_push_while_an_add_runs(tmp_path: Path) -> None:
    push_during_add(tmp_path, _rng("push_during_add"), rounds=2)


def test_gc_while_a_checkout_runs(tmp_path: Path) -> None:
    gc_during_checkout(tmp_path, _rng("gc_during_checkout"), rounds=2)


def test_two_clones_push_the_same_checkpoint(tmp_path: Path) -> None:
    two_pushers(tmp_path, _rng("two_pushers"), rounds=2)


# ---------------------------------------------------------------- regressions of the faults found


def _tracked_repo(base: Path) -> Path:
    repo = new_repo(base / "repo")
    write(repo / "a.safetensors", model(1))
    write(repo / "notes.txt", b"notes\n")
    return repo


def _staged(repo: Path) -> dict[str, str]:
    out = git(repo, "ls-files", "-s")
    return {line.split("\t")[1]: line.split()[1] for line in out.splitlines()}


def test_add_waits_for_index_lock_and_keeps_what_was_staged_meanwhile(tmp_path: Path) -> None:
    """`theta-store add` stages its pointer under git's index.lock: it waits while another process
    holds it (git would fail at once; an add that ran for minutes should not) and reads the index
    under it, so an entry that process staged is kept. Before: it failed with "index.lock: File
    exists", and two adds at once could each write back the index they had read before."""
    repo = _tracked_repo(tmp_path)
    lock = repo / ".git" / "index.lock"
    lock.write_bytes(b"")  # another git process starts writing the index
    add = spawn(repo, "theta-store", "add", "a.safetensors")
    deadline = time.monotonic() + TIMEOUT
    while not versions(repo) and add.popen.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # the version is stored; its pointer is staged next
    time.sleep(1.0)
    assert add.popen.poll() is None, expect(add.wait(), None).stderr.decode()  # waiting, not failed
    # ... and stages notes.txt, as git does: the new index written to index.lock, renamed onto index
    scratch = tmp_path / "scratch-index"
    env = {**os.environ, "GIT_INDEX_FILE": str(scratch)}
    subprocess.run(["cp", str(repo / ".git" / "index"), str(scratch)], check=True)
    subprocess.run(["git", "add", "notes.txt"], cwd=repo, env=env, check=True, timeout=TIMEOUT)
    lock.write_bytes(scratch.read_bytes())
    os.replace(lock, repo / ".git" / "index")
    expect(add.wait(), True)
    staged = _staged(repo)
    assert "notes.txt" in staged and "a.safetensors" in staged, staged
    git(repo, "commit", "-q", "-m", "both")
    ledger = Ledger()
    ledger.record(repo, {"a.safetensors": sha(model(1)), "notes.txt": sha(b"notes\n")})
    check_all(repo, ledger)


def test_add_gives_up_on_a_stuck_index_lock_with_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lock held past the bound: LockTimeout names index.lock and what to do, the lock (not
    ours) stays, and the version itself is stored (a second add finds it)."""
    from theta_store import gitstore
    from theta_store.errors import LockTimeout

    repo = _tracked_repo(tmp_path)
    lock = repo / ".git" / "index.lock"
    lock.write_bytes(b"")
    monkeypatch.setattr(gitstore, "INDEX_LOCK_WAIT", 0.3)
    with theta_store.Repo(repo) as r, pytest.raises(LockTimeout) as e:
        r.add([str(repo / "a.safetensors")])
    text = str(e.value)
    assert str(lock) in text and "another git process" in text and "remove the file" in text, text
    assert lock.exists()
    assert len(versions(repo)) == 1
    lock.unlink()
    with theta_store.Repo(repo) as r:
        report = r.add([str(repo / "a.safetensors")])[0]
    assert report.new_chunks == 0 and "a.safetensors" in _staged(repo)


def _rewrite_packs(repo: Path) -> tuple[set[str], set[str]]:
    """Roll every pack into one (as packs.consolidate does: the new pack first, then the old ones
    removed). Returns (old, new) pack names."""
    pack_dir = repo / ".git" / "objects" / "pack"
    old = pack_names(repo)
    names = "".join(n + "\n" for n in sorted(old)).encode()
    subprocess.run(
        ["git", "pack-objects", "-q", "--stdin-packs", str(pack_dir / "pack")], cwd=repo, input=names, check=True, capture_output=True
    )
    for n in old:
        for f in pack_dir.glob(n[: -len(".pack")] + ".*"):
            f.unlink()
    return old, pack_names(repo)


@pytest.mark.parametrize("read_before", [True, False], ids=["indexes-read", "packs-listed"])
def test_plans_made_after_a_pack_was_replaced_name_the_new_pack(tmp_path: Path, read_before: bool) -> None:
    """A store that saw the packs before a rollup replaced them (the filter process's, all through
    a checkout) places each object in the new pack. Before: a pack whose index had been read
    still answered, and the plan named a removed file; one only listed raised PackFileDisappeared
    out of locate. Either way the smudge called a sound version damaged."""
    from theta_store.gitstore import GitStore

    repo = _tracked_repo(tmp_path)
    write(repo / "b.safetensors", model(2))
    head = commit(repo, "two models")
    with GitStore(repo) as store:
        oids = [f.object_id for v in versions(repo) for f in store.version_frames(bytes.fromhex(v)).values()]
    with GitStore(repo) as store:
        if read_before:
            store.locate(oids)  # every pack index read
        else:
            assert len(store.repo.object_store.packs) >= 2  # listed, no index read yet
        _, new = _rewrite_packs(repo)
        paths, where = store.locate(oids)
        assert {os.path.basename(p) for p in paths} == new and None not in where, (paths, new)
    check_all(repo, Ledger({head: {"a.safetensors": sha(model(1)), "b.safetensors": sha(model(2))}}))


def test_gc_waits_for_a_reader_and_a_checkout_for_gc(tmp_path: Path) -> None:
    """The pack lock: gc rewrites packs only while no one reads them (a smudge, a restore, an add
    holds it shared from making a plan to opening the packs), and a checkout waits while gc
    rewrites. Before: gc removed a pack a checkout's plan named and the checkout failed calling
    the version damaged."""
    from theta_store.plan import pack_lock

    repo = _tracked_repo(tmp_path)
    commit(repo, "a")
    git(repo, "switch", "-q", "-c", "scratch")
    write(repo / "s.safetensors", model(3))
    commit(repo, "scratch")
    git(repo, "switch", "-q", "main")
    git(repo, "branch", "-q", "-D", "scratch")
    git(repo, "reflog", "expire", "--expire=now", "--all")
    state = repo / ".git" / "theta-store"
    before = pack_names(repo)
    with pack_lock(state, shared=True):
        gc = spawn(repo, "theta-store", "gc", "--prune")
        time.sleep(2.0)
        assert gc.popen.poll() is None, expect(gc.wait(), None).stderr.decode()
        assert pack_names(repo) == before  # nothing removed while read
    expect(gc.wait(), True)
    assert pack_names(repo) != before  # the scratch version's pack went once the reader was done
    (repo / "a.safetensors").unlink()
    with pack_lock(state, shared=False):
        co = spawn(repo, "git", "checkout", "--", "a.safetensors")
        time.sleep(1.5)
        assert co.popen.poll() is None, expect(co.wait(), None).stderr.decode()
    expect(co.wait(), True)
    assert sha((repo / "a.safetensors").read_bytes()) == sha(model(1))
    check_all(repo, Ledger({git(repo, "rev-parse", "HEAD").strip(): {"a.safetensors": sha(model(1))}}))


def test_gc_during_git_add_keeps_the_versions_being_staged(tmp_path: Path) -> None:
    """`theta-store gc` while `git add` cleans many checkpoints: the filter stores each version at
    once, git stages all the pointers at its end. gc waits for git's index.lock and keeps them.
    Before: gc dropped every version stored so far, and the commit named versions not here."""
    repo = new_repo(tmp_path / "repo")
    files = {f"ckpt/m{i:02d}.safetensors": write(repo / "ckpt" / f"m{i:02d}.safetensors", model(300 + i, rows=32)) for i in range(30)}
    add = spawn(repo, "git", "add", "ckpt")
    deadline = time.monotonic() + TIMEOUT
    while not versions(repo) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert add.popen.poll() is None, "git add finished before gc started: the test lost its point"
    gc = spawn(repo, "theta-store", "gc")
    expect(add.wait(), True)
    expect(gc.wait(), True)
    assert len(versions(repo)) == len(files)
    git(repo, "commit", "-q", "-m", "checkpoints")
    ledger = Ledger()
    ledger.record(repo, files)
    check_all(repo, ledger)


def test_gc_during_theta_store_add_keeps_the_version_being_staged(tmp_path: Path) -> None:
    """`theta-store gc` between an add writing its version and staging the pointer (held up here
    by another process's index.lock) waits for the add (versions.lock), and keeps the version.
    Before: gc dropped it, and the pointer staged next named a version not here."""
    repo = _tracked_repo(tmp_path)
    lock = repo / ".git" / "index.lock"
    lock.write_bytes(b"")
    add = spawn(repo, "theta-store", "add", "a.safetensors")
    deadline = time.monotonic() + TIMEOUT
    while not versions(repo) and add.popen.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    gc = spawn(repo, "theta-store", "gc")
    time.sleep(1.5)
    assert gc.popen.poll() is None, expect(gc.wait(), None).stdout.decode()  # waits for the add
    lock.unlink()
    expect(add.wait(), True)
    expect(gc.wait(), True)
    assert len(versions(repo)) == 1
    git(repo, "commit", "-q", "-m", "a")
    ledger = Ledger()
    ledger.record(repo, {"a.safetensors": sha(model(1))})
    check_all(repo, ledger)
