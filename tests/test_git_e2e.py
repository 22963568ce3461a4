"""End-to-end: plain git commands with theta-store installed, against real servers on 127.0.0.1.

A user runs `theta-store install --global` and `theta-store track` once; after that every command
here is ordinary git. Each test works in its own tmp_path, with its own global git config
(GIT_CONFIG_GLOBAL) and its own servers.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import theta_store
from servers import KINDS, Remote, free_port, lighttpd_binary, serve

# ---------------------------------------------------------------- helpers


def g(cwd: Path, *args: str, env: dict[str, str] | None = None, ok: bool = True) -> subprocess.CompletedProcess[str]:
    """Run git; on an unexpected exit status fail with its stderr."""
    t0 = time.monotonic()
    r = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, env=None if env is None else {**os.environ, **env})
    if os.environ.get("E2E_TIMING"):  # E2E_TIMING=1 pytest -s: what each git command costs
        print(f"{time.monotonic() - t0:.2f} s  git {' '.join(args)[:100]}")
    if ok and r.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
    if not ok and r.returncode == 0:
        raise AssertionError(f"git {' '.join(args)} succeeded, expected a failure:\n{r.stdout}\n{r.stderr}")
    if not ok:
        print(f"$ git {' '.join(args)}  (exit {r.returncode}, as expected)\n{r.stderr}")  # shown by pytest -s or on failure
    return r


def ts(cwd: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["theta-store", *args], cwd=cwd, capture_output=True, text=True)
    if ok and r.returncode != 0:
        raise AssertionError(f"theta-store {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
    return r


def clean_status(cwd: Path) -> None:
    out = g(cwd, "status", "--porcelain").stdout
    assert out == "", f"git status is not clean in {cwd}:\n{out}"


@functools.lru_cache(maxsize=16)
def model_bytes(seed: int = 0, bias: float = 0.0, layers: int = 3, rows: int = 512, cols: int = 1024) -> bytes:
    """A safetensors model: `layers` fp32 matrices of rows x cols (2 MiB each by default) and a bias.

    Same seed = same matrices; `bias` only changes the small bias vector.
    """
    rng = np.random.default_rng(seed)
    tensors = {f"layers.{i}.weight": (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32) for i in range(layers)}
    tensors["layers.0.bias"] = np.full(cols, bias, np.float32)
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"theta-e2e-{os.getpid()}-{seed}-{bias}-{layers}-{rows}.safetensors"
    try:
        theta_store.save_safetensors(str(tmp), tensors)
        return tmp.read_bytes()
    finally:
        tmp.unlink(missing_ok=True)


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def commit(repo: Path, message: str, *paths: str) -> str:
    g(repo, "add", *(paths or (".",)))
    g(repo, "commit", "-q", "-m", message)
    return g(repo, "rev-parse", "HEAD").stdout.strip()


def versions(repo: Path) -> set[str]:
    """The checkpoint versions stored in a (bare or not) repository."""
    out = g(repo, "for-each-ref", "--format=%(refname)", "refs/theta/").stdout
    return {line.rsplit("/", 1)[1] for line in out.splitlines()}


def pointer_version(repo: Path, rev_path: str) -> str:
    text = g(repo, "cat-file", "blob", rev_path).stdout
    fields = dict(line.split(" ", 1) for line in text.splitlines())
    return fields["manifest"]


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def new_repo(path: Path, *patterns: str) -> Path:
    path.mkdir(parents=True)
    g(path, "init", "-q", "-b", "main")
    ts(path, "track", *(patterns or ("*.safetensors",)))
    g(path, "add", ".gitattributes")
    g(path, "commit", "-q", "-m", "track checkpoints")
    return path


def clone(url: str, dest: Path, *args: str, env: dict[str, str] | None = None, ok: bool = True) -> subprocess.CompletedProcess[str]:
    return g(dest.parent, "clone", "-q", *args, url, str(dest), env=env, ok=ok)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def global_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private ~/.gitconfig with theta-store installed in it, as `theta-store install --global` does."""
    cfg = tmp_path / "gitconfig"
    cfg.write_text("[init]\n\tdefaultBranch = main\n[advice]\n\tdetachedHead = false\n")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(cfg))
    # git runs `theta-store` for every filter, hook and driver call: take this interpreter's, not a
    # version manager's shim (pyenv's costs ~0.1 s a call)
    bindir = Path(sys.executable).parent
    if (bindir / "theta-store").exists():
        monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    for var in ("THETA_STORE_SKIP_SMUDGE", "THETA_STORE_SKIP_PUSH", "THETA_STORE_REMOTE"):
        monkeypatch.delenv(var, raising=False)
    ts(tmp_path, "install", "--global")
    return cfg


def _server(kind: str, tmp_path: Path) -> Iterator[Remote]:
    if kind == "http" and lighttpd_binary() is None:
        pytest.skip("lighttpd is not installed (.ci/run installs it)")
    with serve(kind, tmp_path / "srv") as remote:
        yield remote


@pytest.fixture(params=KINDS)
def remote(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Remote]:
    """The bare repository behind each kind of server in turn."""
    yield from _server(request.param, tmp_path)


@pytest.fixture
def file_remote(tmp_path: Path) -> Iterator[Remote]:
    yield from _server("file", tmp_path)


@pytest.fixture
def daemon_remote(tmp_path: Path) -> Iterator[Remote]:
    yield from _server("daemon", tmp_path)


# ---------------------------------------------------------------- the core scenario, over every server


def test_commit_push_clone_checkout_every_version(tmp_path: Path, remote: Remote) -> None:
    a = new_repo(tmp_path / "a")
    m = a / "model.safetensors"
    history = []
    for i, data in enumerate([model_bytes(0), model_bytes(0, bias=1.0), model_bytes(1)]):
        write(m, data)
        history.append((commit(a, f"v{i}"), data))
        clean_status(a)
    g(a, "remote", "add", "origin", remote.url)
    push = g(a, "push", "-u", "origin", "main")
    assert "checkpoint version" in push.stderr, push.stderr
    assert versions(remote.path) == versions(a) and len(versions(a)) == 3

    b = tmp_path / "b"
    clone(remote.url, b)
    assert (b / "model.safetensors").read_bytes() == history[-1][1]
    clean_status(b)
    for sha, data in history:
        g(b, "checkout", "-q", sha)
        assert (b / "model.safetensors").read_bytes() == data
        clean_status(b)
    g(b, "checkout", "-q", "main")
    assert (b / "model.safetensors").read_bytes() == history[-1][1]
    # only the versions that were checked out came over
    assert versions(b) == versions(a)
    ts(b, "fsck")


def test_fresh_clone_pushes_new_branch(tmp_path: Path, remote: Remote) -> None:
    a = new_repo(tmp_path / "a")
    write(a / "model.safetensors", model_bytes(0))
    commit(a, "v1")
    g(a, "push", "-q", remote.url, "main")

    b = tmp_path / "b"
    clone(remote.url, b)
    g(b, "switch", "-q", "-c", "finetune")
    v2 = model_bytes(0, bias=0.5)
    write(b / "model.safetensors", v2)
    commit(b, "fine-tuned")
    g(b, "push", "-q", "-u", "origin", "finetune")
    assert pointer_version(b, "HEAD:model.safetensors") in versions(remote.path)

    c = tmp_path / "c"
    clone(remote.url, c, "-b", "finetune")
    assert (c / "model.safetensors").read_bytes() == v2
    clean_status(c)


# ---------------------------------------------------------------- history-shaped scenarios (file:// and git daemon)


def test_merge_commit_then_push(tmp_path: Path, daemon_remote: Remote) -> None:
    a = new_repo(tmp_path / "a")
    write(a / "enc.safetensors", model_bytes(0, layers=2))
    write(a / "dec.safetensors", model_bytes(1, layers=2))
    commit(a, "base")
    g(a, "remote", "add", "origin", daemon_remote.url)
    g(a, "push", "-q", "origin", "main")
    g(a, "switch", "-q", "-c", "enc-work")
    enc2 = model_bytes(0, bias=2.0, layers=2)
    write(a / "enc.safetensors", enc2)
    commit(a, "enc v2")
    g(a, "switch", "-q", "main")
    dec2 = model_bytes(1, bias=3.0, layers=2)
    write(a / "dec.safetensors", dec2)
    commit(a, "dec v2")
    g(a, "merge", "-q", "--no-edit", "enc-work")
    assert len(g(a, "rev-list", "--parents", "-n1", "HEAD").stdout.split()) == 3, "not a merge commit"
    assert (a / "enc.safetensors").read_bytes() == enc2 and (a / "dec.safetensors").read_bytes() == dec2
    clean_status(a)
    # only main is pushed: the side branch's version must go too
    g(a, "push", "-q", "origin", "main")

    b = tmp_path / "b"
    clone(daemon_remote.url, b)
    assert (b / "enc.safetensors").read_bytes() == enc2 and (b / "dec.safetensors").read_bytes() == dec2
    clean_status(b)
    g(b, "checkout", "-q", "HEAD^2")
    assert (b / "enc.safetensors").read_bytes() == enc2 and (b / "dec.safetensors").read_bytes() == model_bytes(1, layers=2)
    clean_status(b)


def test_merge_conflict_on_a_checkpoint(tmp_path: Path) -> None:
    a = new_repo(tmp_path / "a")
    m = a / "model.safetensors"
    write(m, model_bytes(0, layers=2))
    commit(a, "base")
    g(a, "switch", "-q", "-c", "other")
    theirs = model_bytes(0, bias=1.0, layers=2)
    write(m, theirs)
    commit(a, "theirs")
    g(a, "switch", "-q", "main")
    ours = model_bytes(0, bias=2.0, layers=2)
    write(m, ours)
    commit(a, "ours")
    r = g(a, "merge", "--no-edit", "other", ok=False)
    assert "CONFLICT" in r.stdout and "model.safetensors" in r.stdout
    assert m.read_bytes() == ours  # the working file is our side, whole and unbroken
    g(a, "checkout", "--theirs", "model.safetensors")
    assert m.read_bytes() == theirs
    g(a, "add", "model.safetensors")
    g(a, "commit", "-q", "--no-edit")
    clean_status(a)
    assert m.read_bytes() == theirs


def test_renamed_checkpoint(tmp_path: Path, file_remote: Remote) -> None:
    a = new_repo(tmp_path / "a")
    v1 = model_bytes(0)
    write(a / "model.safetensors", v1)
    commit(a, "v1")
    (a / "ckpt").mkdir()
    g(a, "mv", "model.safetensors", "ckpt/final.safetensors")
    commit(a, "rename")
    clean_status(a)
    # the pointer moved unchanged: git sees an exact rename and stores nothing new
    assert g(a, "diff", "--name-status", "-M", "HEAD~1", "HEAD").stdout.split() == ["R100", "model.safetensors", "ckpt/final.safetensors"]
    assert len(versions(a)) == 1
    g(a, "mv", "ckpt/final.safetensors", "ckpt/best.safetensors")
    v2 = model_bytes(0, bias=1.0)
    write(a / "ckpt/best.safetensors", v2)
    commit(a, "rename and change")
    g(a, "push", "-q", file_remote.url, "main")

    b = tmp_path / "b"
    clone(file_remote.url, b)
    assert (b / "ckpt/best.safetensors").read_bytes() == v2 and not (b / "model.safetensors").exists()
    clean_status(b)
    g(b, "checkout", "-q", "HEAD~1")
    assert (b / "ckpt/final.safetensors").read_bytes() == v1
    clean_status(b)
    g(b, "checkout", "-q", "HEAD~1")
    assert (b / "model.safetensors").read_bytes() == v1 and not (b / "ckpt").exists()
    clean_status(b)


def test_sharded_hf_checkpoint(tmp_path: Path, file_remote: Remote) -> None:
    a = new_repo(tmp_path / "a")
    shards = 3
    weight_map: dict[str, str] = {}
    files: dict[str, bytes] = {}

    def write_shards(changed_bias: float) -> None:
        for k in range(shards):
            name = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            r = np.random.default_rng(100 + k)
            tensors = {f"model.layers.{2 * k + j}.mlp.weight": (r.standard_normal((512, 1024)) * 0.02).astype(np.float32) for j in range(2)}
            if k == shards - 1:
                tensors["lm_head.bias"] = np.full(1024, changed_bias, np.float32)
            theta_store.save_safetensors(str(a / name), tensors, metadata={"format": "pt"})
            files[name] = (a / name).read_bytes()
            weight_map.update(dict.fromkeys(tensors, name))

    write_shards(0.0)
    index = {"metadata": {"total_size": sum(len(v) for v in files.values())}, "weight_map": dict(sorted(weight_map.items()))}
    (a / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    commit(a, "sharded v1")
    v1 = dict(files)
    assert len(versions(a)) == shards
    write_shards(1.0)  # one tensor of the last shard changes
    commit(a, "sharded v2")
    assert len(versions(a)) == shards + 1
    g(a, "push", "-q", file_remote.url, "main")

    b = tmp_path / "b"
    clone(file_remote.url, b)
    for name, data in files.items():
        assert (b / name).read_bytes() == data, name
    assert json.loads((b / "model.safetensors.index.json").read_text()) == index
    assert g(b, "cat-file", "-p", "HEAD:model.safetensors.index.json").stdout.startswith("{"), "the index json is a plain git file"
    clean_status(b)
    g(b, "checkout", "-q", "HEAD~1")
    for name, data in v1.items():
        assert (b / name).read_bytes() == data, name
    clean_status(b)


def _lfs_objects(bare: Path) -> set[str]:
    return {p.name for p in (bare / "lfs" / "objects").rglob("*") if p.is_file()}


def test_git_lfs_alongside(tmp_path: Path, file_remote: Remote) -> None:
    """A repository that also tracks *.bin with Git LFS: both filters work, both pre-push hooks run,
    whichever tool put its hook in first."""
    if shutil.which("git-lfs") is None:
        pytest.skip("git-lfs is not installed")
    g(tmp_path, "lfs", "install", "--skip-repo")  # LFS's filter config in the (private) global config
    a = tmp_path / "a"
    a.mkdir()
    g(a, "init", "-q", "-b", "main")
    g(a, "lfs", "install", "--local")  # LFS's hooks come first ...
    g(a, "lfs", "track", "*.bin")
    ts(a, "install")  # ... then ours, chained to LFS's pre-push
    ts(a, "track", "*.safetensors")
    hooks = a / ".git" / "hooks"
    assert "git lfs pre-push" in (hooks / "pre-push.before-theta-store").read_text()
    assert "theta-store" in (hooks / "pre-push").read_text()
    attrs = (a / ".gitattributes").read_text()
    assert "*.bin filter=lfs diff=lfs merge=lfs -text" in attrs and "*.safetensors filter=thetastore" in attrs

    blob = os.urandom(300_000)
    write(a / "weights.bin", blob)
    model = model_bytes(0)
    write(a / "model.safetensors", model)
    commit(a, "lfs and theta-store")
    clean_status(a)
    assert g(a, "lfs", "ls-files").stdout.split()[-1] == "weights.bin"
    assert g(a, "cat-file", "blob", "HEAD:weights.bin").stdout.startswith("version https://git-lfs.github.com/spec/v1")
    assert g(a, "cat-file", "blob", "HEAD:model.safetensors").stdout.startswith("version theta-store/v1")
    g(a, "remote", "add", "origin", file_remote.url)
    push = g(a, "push", "origin", "main")
    assert "checkpoint version" in push.stderr  # our hook ran
    assert len(_lfs_objects(file_remote.path)) == 1  # and LFS's: its object reached the remote
    assert versions(file_remote.path) == versions(a)

    b = tmp_path / "b"
    clone(file_remote.url, b)
    assert (b / "weights.bin").read_bytes() == blob
    assert (b / "model.safetensors").read_bytes() == model
    clean_status(b)
    # Both filters install hooks lazily and may race in a clone: either LFS's hook is chained, or
    # ours runs `git lfs pre-push` itself (the push below checks that LFS's objects go)
    chained = b / ".git/hooks/pre-push.before-theta-store"
    assert not chained.exists() or "git lfs pre-push" in chained.read_text()
    blob2 = os.urandom(200_000)
    write(b / "weights.bin", blob2)
    model2 = model_bytes(0, bias=1.0)
    write(b / "model.safetensors", model2)
    commit(b, "both change")
    g(b, "push", "-q", "origin", "main")
    assert len(_lfs_objects(file_remote.path)) == 2, "the LFS object of the clone's push did not reach the remote"
    assert pointer_version(b, "HEAD:model.safetensors") in versions(file_remote.path)
    g(a, "pull", "-q", "origin", "main")
    assert (a / "weights.bin").read_bytes() == blob2 and (a / "model.safetensors").read_bytes() == model2
    clean_status(a)

    # LFS told to take over the hook; ours chains it back
    g(b, "lfs", "update", "--force")
    ts(b, "install")
    assert "git lfs pre-push" in (b / ".git/hooks/pre-push.before-theta-store").read_text()
    write(b / "weights.bin", os.urandom(100_000))
    write(b / "model.safetensors", model_bytes(0, bias=2.0))
    commit(b, "third")
    g(b, "push", "-q", "origin", "main")
    assert len(_lfs_objects(file_remote.path)) == 3
    assert pointer_version(b, "HEAD:model.safetensors") in versions(file_remote.path)
    # and the same again (the hook LFS writes is the one already chained): no error, chain restored
    g(b, "lfs", "update", "--force")
    ts(b, "install")
    assert "theta-store" in (b / ".git/hooks/pre-push").read_text()


def test_stash_reset_rebase_cherry_pick(tmp_path: Path) -> None:
    a = new_repo(tmp_path / "a")
    m = a / "model.safetensors"
    other = a / "other.safetensors"
    v1, v2, v3 = model_bytes(0), model_bytes(0, bias=1.0), model_bytes(0, bias=2.0)
    write(m, v1)
    write(other, model_bytes(5, layers=1))
    commit(a, "v1")

    # stash: the working change goes away and comes back, byte for byte
    write(m, v2)
    assert g(a, "status", "--porcelain").stdout.strip() == "M model.safetensors"
    g(a, "stash", "-q")
    assert m.read_bytes() == v1
    clean_status(a)
    g(a, "stash", "pop", "-q")
    assert m.read_bytes() == v2
    commit(a, "v2")
    clean_status(a)

    # reset --hard back and forth
    g(a, "reset", "-q", "--hard", "HEAD~1")
    assert m.read_bytes() == v1
    clean_status(a)
    g(a, "reset", "-q", "--hard", "ORIG_HEAD")
    assert m.read_bytes() == v2
    clean_status(a)
    write(m, v3)
    g(a, "reset", "-q", "--hard")
    assert m.read_bytes() == v2
    clean_status(a)

    # rebase a branch that changes the checkpoint onto one that changes another file
    g(a, "switch", "-q", "-c", "feature")
    write(m, v3)
    commit(a, "v3 on feature")
    g(a, "switch", "-q", "main")
    other2 = model_bytes(6, layers=1)
    write(other, other2)
    commit(a, "other changes")
    g(a, "rebase", "-q", "main", "feature")
    assert m.read_bytes() == v3 and other.read_bytes() == other2
    clean_status(a)

    # cherry-pick the checkpoint change onto a branch from before it
    g(a, "switch", "-q", "-c", "picked", "main~1")
    assert m.read_bytes() == v2
    g(a, "cherry-pick", "feature")
    assert m.read_bytes() == v3 and other.read_bytes() == model_bytes(5, layers=1)
    clean_status(a)
    assert pointer_version(a, "picked:model.safetensors") == pointer_version(a, "feature:model.safetensors")


def test_force_push_tags_and_several_branches(tmp_path: Path, daemon_remote: Remote) -> None:
    url = daemon_remote.url
    a = new_repo(tmp_path / "a")
    m = a / "model.safetensors"
    write(m, model_bytes(0))
    commit(a, "v1")
    g(a, "remote", "add", "origin", url)
    g(a, "push", "-q", "origin", "main")

    # several branches, each with its own version, pushed at once
    branches = {}
    for i, name in enumerate(["exp-a", "exp-b", "exp-c"]):
        g(a, "switch", "-q", "-c", name, "main")
        data = model_bytes(0, bias=10.0 + i)
        write(m, data)
        commit(a, name)
        branches[name] = data
    g(a, "push", "-q", "origin", *branches)
    for name in branches:
        assert pointer_version(a, f"{name}:model.safetensors") in versions(daemon_remote.path), name

    # tags: an annotated tag on a commit no pushed branch contains
    g(a, "switch", "-q", "--detach", "main")
    tagged = model_bytes(0, bias=20.0)
    write(m, tagged)
    commit(a, "release")
    g(a, "tag", "-a", "-m", "release 1", "rel-1")
    g(a, "tag", "light", "exp-a")
    g(a, "push", "-q", "origin", "rel-1", "light")
    assert pointer_version(a, "rel-1:model.safetensors") in versions(daemon_remote.path)

    # force push: main rewritten, from a repository that never saw the remote's new tip
    c = tmp_path / "c"
    clone(url, c)
    write(c / "model.safetensors", model_bytes(0, bias=30.0))
    commit(c, "pushed by someone else")
    g(c, "push", "-q", "origin", "main")
    g(a, "switch", "-q", "main")
    forced = model_bytes(0, bias=40.0)
    write(m, forced)
    commit(a, "rewritten")
    g(a, "push", "origin", "main", ok=False)  # not a fast-forward
    g(a, "push", "-q", "--force", "origin", "main")

    b = tmp_path / "b"
    clone(url, b)
    assert (b / "model.safetensors").read_bytes() == forced
    clean_status(b)
    for name, data in branches.items():
        g(b, "checkout", "-q", name)
        assert (b / "model.safetensors").read_bytes() == data, name
        clean_status(b)
    g(b, "checkout", "-q", "rel-1")
    assert (b / "model.safetensors").read_bytes() == tagged
    g(b, "checkout", "-q", "light")
    assert (b / "model.safetensors").read_bytes() == branches["exp-a"]
    clean_status(b)


def test_two_collaborators_push_new_versions_at_once(tmp_path: Path, daemon_remote: Remote) -> None:
    a = new_repo(tmp_path / "a")
    write(a / "model.safetensors", model_bytes(0, layers=2))
    commit(a, "v1")
    g(a, "push", "-q", daemon_remote.url, "main")
    clones = {}
    for name, bias in (("alice", 1.0), ("bob", 2.0)):
        d = tmp_path / name
        clone(daemon_remote.url, d)
        g(d, "switch", "-q", "-c", name)
        write(d / "model.safetensors", model_bytes(0, bias=bias, layers=2))
        commit(d, f"{name}'s fine-tune")
        clones[name] = d
    procs = [subprocess.Popen(["git", "push", "-q", "origin", name], cwd=d, stderr=subprocess.PIPE) for name, d in clones.items()]
    results = [(p.wait(120), p.stderr.read().decode() if p.stderr else "") for p in procs]
    for p in procs:
        if p.stderr:
            p.stderr.close()
    assert all(rc == 0 for rc, _ in results), results
    for name, d in clones.items():
        assert pointer_version(d, "HEAD:model.safetensors") in versions(daemon_remote.path), name
    c = tmp_path / "c"
    clone(daemon_remote.url, c)
    for name, bias in (("alice", 1.0), ("bob", 2.0)):
        g(c, "checkout", "-q", name)
        assert (c / "model.safetensors").read_bytes() == model_bytes(0, bias=bias, layers=2)


# ---------------------------------------------------------------- dedup on the wire


def test_dedup_on_the_wire(tmp_path: Path, daemon_remote: Remote) -> None:
    """A ~40 MB model: v2 changes one bias. The push of v2 and the fetch of v2 move < 1 MB."""
    v1 = model_bytes(0, layers=10, rows=1024)
    v2 = model_bytes(0, bias=0.25, layers=10, rows=1024)
    assert len(v1) > 40_000_000
    a = new_repo(tmp_path / "a")
    m = a / "model.safetensors"
    write(m, v1)
    commit(a, "v1")
    g(a, "remote", "add", "origin", daemon_remote.url)
    g(a, "push", "-q", "origin", "main")
    after_v1 = daemon_remote.object_bytes()
    assert after_v1 > 20_000_000  # the first push did carry the model

    b = tmp_path / "b"
    clone(daemon_remote.url, b)  # b has v1
    assert (b / "model.safetensors").read_bytes() == v1

    write(m, v2)
    commit(a, "v2: one bias changed")
    push = g(a, "push", "origin", "main")
    grew = daemon_remote.object_bytes() - after_v1
    print(f"push of v2 added {grew} bytes to the server; ", end="")
    assert grew < 1_000_000, f"pushing a one-bias change added {grew} bytes to the server"
    assert re.search(r"pushed 1 checkpoint version\(s\) to origin: [\d.]+ k?B new", push.stderr), push.stderr

    before = dir_bytes(b / ".git" / "objects")
    g(b, "pull", "-q", "--ff-only")
    assert (b / "model.safetensors").read_bytes() == v2
    fetched = dir_bytes(b / ".git" / "objects") - before
    print(f"pull of v2 added {fetched} bytes to the clone (the model: {len(v2)} bytes)")
    assert fetched < 1_000_000, f"fetching the one-bias change added {fetched} bytes to the clone"
    clean_status(b)


# ---------------------------------------------------------------- hostile cases


def pushed_and_cloned_as_pointer(tmp_path: Path, remote: Remote) -> tuple[Path, bytes, Path]:
    """Repo a commits and pushes a model; b clones it with THETA_STORE_SKIP_SMUDGE (pointers)."""
    a = new_repo(tmp_path / "a")
    v1 = model_bytes(0, layers=2)
    write(a / "model.safetensors", v1)
    commit(a, "v1")
    g(a, "push", "-q", remote.url, "main")
    b = tmp_path / "b"
    clone(remote.url, b, env={"THETA_STORE_SKIP_SMUDGE": "1"})
    return a, v1, b


def test_pointer_edited_to_garbage(tmp_path: Path, file_remote: Remote) -> None:
    _, v1, b = pushed_and_cloned_as_pointer(tmp_path, file_remote)
    p = b / "model.safetensors"
    pointer = p.read_bytes()
    assert pointer.startswith(b"version theta-store/v1\n")
    # a broken pointer (still looks like one) is refused by `git add`, with a clear message
    p.write_bytes(pointer.replace(b"manifest ", b"manifest zz"))
    r = g(b, "add", "model.safetensors", ok=False)
    assert "model.safetensors" in r.stderr and "pointer" in r.stderr, r.stderr
    assert g(b, "diff", "--cached", "--name-only").stdout == ""
    # and checkout puts the real checkpoint back
    g(b, "checkout", "--", "model.safetensors")
    assert p.read_bytes() == v1
    clean_status(b)
    # plain garbage under a checkpoint's name: refused with the format's reason, like a corrupt checkpoint
    p.write_bytes(b"not a model at all\n")
    r = g(b, "add", "model.safetensors", ok=False)
    assert "model.safetensors" in r.stderr and "safetensors" in r.stderr.split("model.safetensors", 2)[-1], r.stderr
    r = subprocess.run(["git", "hash-object", "--stdin", "--path=model.safetensors"], cwd=b, input=b"garbage\n", capture_output=True)
    assert r.returncode != 0 and b"safetensors" in r.stderr  # the same verdict when git streams other content
    assert p.read_bytes() == b"not a model at all\n"  # the working file is left as the user wrote it
    g(b, "checkout", "--", "model.safetensors")
    assert p.read_bytes() == v1
    clean_status(b)
    # under a name no format claims it is just bytes: stored, committed, restored byte for byte
    notes = b / "notes.safetensors.txt"
    ts(b, "track", "*.txt")
    notes.write_bytes(b"not a model at all\n")
    commit(b, "notes")
    assert g(b, "cat-file", "blob", "HEAD:notes.safetensors.txt").stdout.startswith("version theta-store/v1\nformat raw\n")
    notes.unlink()
    g(b, "checkout", "--", "notes.safetensors.txt")
    assert notes.read_bytes() == b"not a model at all\n"
    clean_status(b)

    # a garbage pointer that reached a commit anyway (written around the filter): checkout fails cleanly
    garbage = pointer.replace(b"size ", b"size 1")
    oid = (
        subprocess.run(["git", "hash-object", "-w", "--stdin"], cwd=b, input=garbage, capture_output=True, check=True)
        .stdout.decode()
        .strip()
    )
    g(b, "update-index", "--cacheinfo", f"100644,{oid},model.safetensors")
    g(b, "commit", "-q", "-m", "broken pointer")
    p.unlink()
    r = g(b, "checkout", "--", "model.safetensors", ok=False)
    assert "model.safetensors" in r.stderr and "pointer" in r.stderr, r.stderr
    assert not p.exists()
    g(b, "checkout", "-q", "HEAD~1", "--", "model.safetensors")
    assert p.read_bytes() == v1


def _assert_no_broken_file(path: Path, *valid: bytes) -> None:
    if path.exists():
        assert path.read_bytes() in valid, f"{path} was left with {path.stat().st_size} bytes that are no version of it"
    leftovers = [f.name for f in path.parent.iterdir() if f.name.startswith(f".{path.name}") or f.name.endswith(".theta-tmp")]
    assert not leftovers, leftovers


def test_missing_remote_and_missing_version(tmp_path: Path, file_remote: Remote) -> None:
    a = new_repo(tmp_path / "a")
    v1 = model_bytes(0, layers=2)
    write(a / "model.safetensors", v1)
    commit(a, "v1")
    # the commits reach the remote, the version does not (the user skipped it)
    r = g(a, "push", file_remote.url, "main", env={"THETA_STORE_SKIP_PUSH": "1"})
    assert "checkpoint version" not in r.stderr
    assert versions(file_remote.path) == set()

    b = tmp_path / "b"
    r = clone(file_remote.url, b, ok=False)
    err = r.stderr
    version = pointer_version(a, "HEAD:model.safetensors")
    assert "model.safetensors" in err and version[:16] in err and "origin" in err, err
    assert "hint" in err
    _assert_no_broken_file(b / "model.safetensors")

    # no remote at all
    g(b, "remote", "remove", "origin")
    r = g(b, "checkout", "HEAD", "--", "model.safetensors", ok=False)
    assert "model.safetensors" in r.stderr and "none configured" in r.stderr, r.stderr
    _assert_no_broken_file(b / "model.safetensors")

    # a remote that does not answer: named, with git's reason
    g(b, "remote", "add", "origin", f"git://127.0.0.1:{free_port()}/remote.git")
    r = g(b, "checkout", "HEAD", "--", "model.safetensors", ok=False)
    assert "not on origin (unreachable: fatal: unable to connect" in r.stderr, r.stderr
    _assert_no_broken_file(b / "model.safetensors")
    g(b, "remote", "remove", "origin")

    # once the version is pushed, the same clone recovers with plain git
    assert "pushed 1 checkpoint version(s)" in ts(a, "push", file_remote.url).stderr
    g(b, "remote", "add", "origin", file_remote.url)
    g(b, "reset", "-q", "--hard")
    assert (b / "model.safetensors").read_bytes() == v1
    clean_status(b)


def test_corrupt_object_in_pack(tmp_path: Path) -> None:
    a = new_repo(tmp_path / "a")
    m = a / "model.safetensors"
    v1, v2 = model_bytes(0), model_bytes(3)
    write(m, v1)
    commit(a, "v1")
    write(m, v2)
    commit(a, "v2")
    packs = sorted((a / ".git/objects/pack").glob("*.pack"), key=lambda p: p.stat().st_size)
    # v1 and v2 share no chunk: corrupt one of v1's frames (frames are stored, zlib level 0)
    v1_version = pointer_version(a, "HEAD~1:model.safetensors")
    with theta_store.Repo(a) as repo:
        frames = repo.store.version_frames(bytes.fromhex(v1_version))
        pack_paths, where = repo.store.locate([max(frames.values(), key=lambda f: f.frame_len).object_id])
    assert packs and where[0] is not None
    pack = Path(pack_paths[where[0].pack])
    offset = where[0].offset
    data = bytearray(pack.read_bytes())
    data[offset + 5000] ^= 0x55
    os.chmod(pack, 0o644)
    pack.write_bytes(bytes(data))

    r = g(a, "checkout", "HEAD~1", ok=False)
    assert "model.safetensors" in r.stderr, r.stderr
    _assert_no_broken_file(m, v1, v2)
    r = g(a, "checkout", "-f", "HEAD~1", "--", "model.safetensors", ok=False)
    assert "model.safetensors" in r.stderr and f"version {v1_version[:16]} is damaged" in r.stderr, r.stderr
    _assert_no_broken_file(m, v1, v2)


# ---------------------------------------------------------------- checkout plans, the filter's fast paths


def _plan(repo: Path, version: str) -> Path:
    return repo / ".git" / "theta-store" / "plans" / version


def test_checkout_plans_survive_repack_and_damage(tmp_path: Path) -> None:
    """An add keeps where each chunk went (a plan), so a later checkout of that version needs no
    lookups. Plans are a cache: a repack that replaces the packs, a damaged plan file, a plan that
    lists the right chunks in the wrong order: none of them may give a wrong file."""
    a = new_repo(tmp_path / "a")
    m = a / "model.safetensors"
    v1, v2 = model_bytes(0), model_bytes(0, bias=1.0)
    write(m, v1)
    commit(a, "v1")
    write(m, v2)
    commit(a, "v2")
    ver1 = pointer_version(a, "HEAD~1:model.safetensors")
    assert _plan(a, ver1).is_file()  # written by the add, before any checkout

    g(a, "checkout", "HEAD~1", "--", "model.safetensors")
    assert m.read_bytes() == v1
    g(a, "diff", "--quiet")  # the work tree matches the index (`checkout REV -- path` stages it)

    # git gc / repack: the packs the plan names are gone; the checkout finds the chunks again
    g(a, "checkout", "HEAD", "--", "model.safetensors")
    old = _plan(a, ver1).read_bytes()
    for keep in (a / ".git" / "objects" / "pack").glob("*.keep"):
        keep.unlink()  # git repacks our packs only once they are no longer kept
    g(a, "repack", "-a", "-d", "-q")
    g(a, "checkout", "HEAD~1", "--", "model.safetensors")
    assert m.read_bytes() == v1
    assert _plan(a, ver1).read_bytes() != old  # rewritten with the new pack's name and offsets
    g(a, "diff", "--quiet")  # the work tree matches the index (`checkout REV -- path` stages it)

    # a damaged plan file is ignored
    g(a, "checkout", "HEAD", "--", "model.safetensors")
    _plan(a, ver1).write_bytes(b"\x93garbage")
    g(a, "checkout", "HEAD~1", "--", "model.safetensors")
    assert m.read_bytes() == v1

    # a plan whose chunks are intact but out of order: each chunk verifies, the file does not.
    # git gets an error (the work-tree file is left as it was), the plan is dropped, the next
    # checkout is right.
    import msgpack

    g(a, "checkout", "HEAD", "--", "model.safetensors")
    version, size, blake3, packs, tuples, bases = msgpack.unpackb(_plan(a, ver1).read_bytes())
    assert len(tuples) >= 2
    tuples[0], tuples[1] = tuples[1], tuples[0]
    _plan(a, ver1).write_bytes(msgpack.packb([version, size, blake3, packs, tuples, bases]))
    r = g(a, "checkout", "HEAD~1", "--", "model.safetensors", ok=False)
    assert "model.safetensors" in r.stderr and "damaged" in r.stderr, r.stderr
    _assert_no_broken_file(m, v1, v2)
    assert not _plan(a, ver1).exists()
    g(a, "checkout", "HEAD~1", "--", "model.safetensors")
    assert m.read_bytes() == v1
    g(a, "diff", "--quiet")  # the work tree matches the index (`checkout REV -- path` stages it)


def test_clean_cache_and_plans_without_the_object_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`touch; git status` and the checkout of a stored version read plain files in .git: the
    object store (dulwich) stays closed. Version refs count in packed-refs too, and a version that
    gc dropped is not answered from the cache."""
    from theta_store.filterproc import Repository, load_plan
    from theta_store.pointer import Pointer

    a = new_repo(tmp_path / "a")
    m = a / "model.safetensors"
    write(m, model_bytes(0, layers=1))
    commit(a, "v1")
    ptr = Pointer.parse(g(a, "cat-file", "blob", "HEAD:model.safetensors").stdout.encode())
    g(a, "pack-refs", "--all")
    assert not (a / ".git" / "refs" / "theta" / ptr.manifest_id.hex()).exists()
    monkeypatch.chdir(a)  # git runs filters at the top of the work tree
    repo = Repository()
    assert repo.has_version(ptr.manifest_id)
    assert load_plan(repo.state_dir, ptr) is not None
    digest = next(h for h, p in repo.cache.entries.items() if p == ptr.to_bytes())
    assert repo.cache.get(repo, digest) == ptr.to_bytes()
    assert repo.cache.may_hold(ptr.size) and not repo.cache.may_hold(ptr.size + 1)
    assert repo._thread is None  # nothing above opened the object store
    repo.close()

    # linked work trees find the same git directory
    g(a, "worktree", "add", "-q", str(tmp_path / "wt"))
    monkeypatch.chdir(tmp_path / "wt")
    wt = Repository()
    assert wt.common_dir == str((a / ".git").resolve())
    assert wt.has_version(ptr.manifest_id) and wt._thread is None
    wt.close()
    monkeypatch.chdir(a)

    # after gc dropped the version (the commit is gone), the cached pointer must not be reused
    g(a, "update-ref", "-d", "refs/theta/" + ptr.manifest_id.hex())
    repo = Repository()
    assert not repo.has_version(ptr.manifest_id)
    assert repo.cache.get(repo, digest) is None
    repo.close()


def test_git_starts_us_without_site(tmp_path: Path) -> None:
    """git runs `python -S -P .../_launch.py`: no .pth file runs, yet every dependency imports."""
    from theta_store.install import command, launcher

    cfg = g(tmp_path, "config", "--global", "filter.thetastore.process").stdout.strip()
    assert cfg == f"{command()} filter-process"
    # sh -c CHECK PYTHON LAUNCHER ARGS: the interpreter of the `theta-store` that ran install
    sh, _, check, python, launch, verb = shlex.split(cfg)
    assert (sh, launch, verb) == ("sh", launcher(), "filter-process") and os.access(python, os.X_OK), cfg
    assert check.endswith('exec "$0" -S -P "$l" "$@"'), check
    r = subprocess.run([sys.executable, "-S", "-P", launcher(), "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and "theta-store" in r.stdout, r.stderr
    # the dependencies are found without site.main() (it would have defined builtins.help)
    probe = (
        "import builtins, runpy, sys; "
        f"runpy.run_path({launcher()!r}, run_name='probe')['_paths'](); "
        "import dulwich, msgpack, numpy, theta_store.cli; print(hasattr(builtins, 'help'))"
    )
    r = subprocess.run([sys.executable, "-S", "-P", "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stdout + r.stderr


# ---------------------------------------------------------------- switches


def test_skip_smudge_and_skip_push(tmp_path: Path, file_remote: Remote) -> None:
    a, v1, b = pushed_and_cloned_as_pointer(tmp_path, file_remote)
    pointer = (b / "model.safetensors").read_bytes()
    assert pointer == g(a, "cat-file", "blob", "HEAD:model.safetensors").stdout.encode()
    assert versions(b) == set()  # nothing was fetched
    clean_status(b)
    # later: fetch and restore the real file
    ts(b, "fetch")
    assert versions(b) == versions(a)
    ts(b, "restore", "model.safetensors")
    assert (b / "model.safetensors").read_bytes() == v1
    clean_status(b)

    # THETA_STORE_SKIP_PUSH: commits go, versions do not
    write(b / "model.safetensors", model_bytes(0, bias=1.0, layers=2))
    commit(b, "v2")
    before = versions(file_remote.path)
    r = g(b, "push", "origin", "main", env={"THETA_STORE_SKIP_PUSH": "1"})
    assert versions(file_remote.path) == before
    assert "checkpoint version" not in r.stderr
    assert file_remote.refs("refs/heads/")["refs/heads/main"] == g(b, "rev-parse", "HEAD").stdout.strip()
    # git now says "Everything up-to-date" and runs no hook: `theta-store push` sends what was skipped
    assert "up-to-date" in g(b, "push", "origin", "main").stderr
    ts(b, "push")
    assert pointer_version(b, "HEAD:model.safetensors") in versions(file_remote.path)
    c = tmp_path / "c"
    clone(file_remote.url, c)
    assert (c / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


# ---------------------------------------------------------------- gc


def test_gc_drops_unneeded_versions_only(tmp_path: Path, file_remote: Remote) -> None:
    a = new_repo(tmp_path / "a")
    m = a / "model.safetensors"

    def model(bias: float) -> bytes:
        return model_bytes(0, bias=bias, layers=2)

    write(m, model(0))
    commit(a, "v1")
    write(m, model(1))
    commit(a, "v2")
    g(a, "tag", "v2")
    g(a, "remote", "add", "origin", file_remote.url)
    g(a, "push", "-q", "origin", "main", "v2")
    # a version only a remote-tracking ref needs
    g(a, "switch", "-q", "-c", "remote-only")
    write(m, model(2))
    commit(a, "v3")
    g(a, "push", "-q", "origin", "remote-only")
    g(a, "switch", "-q", "main")
    g(a, "branch", "-q", "-D", "remote-only")
    # two stashes: the older one lives in the stash's reflog only
    for bias in (6, 7):
        write(m, model(bias))
        g(a, "stash", "-q")
    # versions nothing needs: added then abandoned, and a deleted branch (needed until its reflog expires)
    write(m, model(4))
    g(a, "add", "model.safetensors")
    g(a, "reset", "-q", "--hard")
    g(a, "switch", "-q", "-c", "dead")
    write(m, model(5))
    commit(a, "dead end")
    dead = pointer_version(a, "HEAD:model.safetensors")
    g(a, "switch", "-q", "main")
    g(a, "branch", "-q", "-D", "dead")
    # a staged, never committed version
    write(m, model(8))
    g(a, "add", "model.safetensors")
    staged = pointer_version(a, ":model.safetensors")
    needed = {
        pointer_version(a, "main~1:model.safetensors"),
        pointer_version(a, "v2:model.safetensors"),
        pointer_version(a, "origin/remote-only:model.safetensors"),
        pointer_version(a, "stash@{0}:model.safetensors"),
        pointer_version(a, "stash@{1}:model.safetensors"),
        staged,
    }
    before = versions(a)
    assert len(before) == 8 and needed < before

    dry = json.loads(ts(a, "gc", "--dry-run", "--json").stdout)
    assert set(dry["dropped"]) == before - needed - {dead} and dry["dry_run"]
    assert versions(a) == before
    g(a, "reflog", "expire", "--expire=now", "refs/heads/main", "HEAD")
    text = ts(a, "gc", "--dry-run").stdout
    assert f"would drop {dead}" in text
    assert versions(a) == before

    ts(a, "gc", "--prune")
    assert versions(a) == needed
    ts(a, "fsck")
    assert m.read_bytes() == model(8)
    g(a, "commit", "-q", "-m", "v8")
    for n, bias in ((0, 7), (1, 6)):
        g(a, "checkout", f"stash@{{{n}}}", "--", "model.safetensors")
        assert m.read_bytes() == model(bias)
    g(a, "reset", "-q", "--hard")
    g(a, "checkout", "-q", "origin/remote-only")
    assert m.read_bytes() == model(2)
    g(a, "checkout", "-q", "main~2")
    assert m.read_bytes() == model(0)
    clean_status(a)


def test_gc_before_the_first_commit(tmp_path: Path) -> None:
    a = tmp_path / "a"
    a.mkdir()
    g(a, "init", "-q")
    ts(a, "track", "*.safetensors")
    write(a / "model.safetensors", model_bytes(0, layers=1))
    g(a, "add", ".")
    out = json.loads(ts(a, "gc", "--json").stdout)
    assert out["dropped"] == [] and out["kept"] == 1


# ---------------------------------------------------------------- install


def test_install_is_idempotent_and_chains_to_an_existing_hook(tmp_path: Path, file_remote: Remote) -> None:
    a = tmp_path / "a"
    a.mkdir()
    g(a, "init", "-q", "-b", "main")
    hooks = a / ".git" / "hooks"
    marker = tmp_path / "marker"
    hook = hooks / "pre-push"
    hook.write_text(f'#!/bin/sh\necho "$1 $2" >> {marker}\ncat >> {marker}\n')
    hook.chmod(0o755)
    first = ts(a, "install").stdout
    assert "kept the existing pre-push hook" in first
    config = (a / ".git" / "config").read_text()
    script = hook.read_text()
    second = ts(a, "install").stdout
    assert "pre-push" not in second  # nothing to do the second time
    assert (a / ".git" / "config").read_text() == config and hook.read_text() == script
    assert (hooks / "pre-push.before-theta-store").read_text().startswith("#!/bin/sh\necho")
    ts(a, "track", "*.safetensors")
    ts(a, "track", "*.safetensors")
    assert (a / ".gitattributes").read_text().count("*.safetensors") == 1

    write(a / "model.safetensors", model_bytes(0, layers=1))
    commit(a, "v1")
    g(a, "push", "-q", file_remote.url, "main")
    assert versions(file_remote.path) == versions(a)  # ours ran
    lines = marker.read_text().splitlines()  # and the old hook, with git's arguments and stdin
    assert lines[0] == f"{file_remote.url} {file_remote.url}" and lines[1].startswith("refs/heads/main ")

    # a failing old hook still stops the push
    hook_old = hooks / "pre-push.before-theta-store"
    hook_old.write_text("#!/bin/sh\necho no pushing today >&2\nexit 1\n")
    write(a / "model.safetensors", model_bytes(0, bias=1.0, layers=1))
    commit(a, "v2")
    r = g(a, "push", file_remote.url, "main", ok=False)
    assert "no pushing today" in r.stderr


def test_global_install_chains_hooks_on_first_use(tmp_path: Path, global_config: Path, file_remote: Remote) -> None:
    """With `install --global` only, the hook goes in the first time git runs our filter in a repo."""
    text = global_config.read_text()
    ts(tmp_path, "install", "--global")
    assert global_config.read_text() == text  # idempotent
    a = tmp_path / "a"
    a.mkdir()
    g(a, "init", "-q", "-b", "main")
    marker = tmp_path / "marker"
    hook = a / ".git" / "hooks" / "pre-push"
    hook.write_text(f"#!/bin/sh\ntouch {marker}\n")
    hook.chmod(0o755)
    (a / ".gitattributes").write_text("*.safetensors filter=thetastore diff=thetastore merge=thetastore -text\n")
    write(a / "model.safetensors", model_bytes(0, layers=1))
    commit(a, "v1")  # runs the filter: it installs our hook and keeps the old one
    assert "theta-store" in hook.read_text()
    g(a, "push", "-q", file_remote.url, "main")
    assert marker.exists() and versions(file_remote.path) == versions(a)


def test_track_without_install_sets_the_filter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """git ignores a filter it has no config for: without this, `track` alone in a repository never
    `install`ed would put every version of the checkpoint into the history as a plain blob."""
    empty = tmp_path / "empty-gitconfig"
    empty.write_text("")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(empty))
    a = tmp_path / "a"
    a.mkdir()
    g(a, "init", "-q", "-b", "main")
    out = ts(a, "track", "*.safetensors").stdout
    assert "tracking *.safetensors" in out and "filter in this repository's git config" in out
    assert g(a, "config", "--local", "filter.thetastore.process").stdout.strip().endswith("filter-process")
    assert "git config" not in ts(a, "track", "*.safetensors").stdout  # set once
    data = model_bytes(0, layers=1)
    write(a / "model.safetensors", data)
    commit(a, "v1", ".gitattributes", "model.safetensors")
    assert int(g(a, "cat-file", "-s", "HEAD:model.safetensors").stdout) < 1024  # a pointer, not the file
    (a / "model.safetensors").unlink()
    g(a, "checkout", "--", "model.safetensors")
    assert (a / "model.safetensors").read_bytes() == data
    clean_status(a)


def test_git_theta_store_subcommand_and_diff(tmp_path: Path) -> None:
    a = new_repo(tmp_path / "a")
    m = a / "model.safetensors"
    write(m, model_bytes(0, layers=2))
    commit(a, "v1")
    out = g(a, "theta-store", "show", "HEAD:model.safetensors").stdout
    assert "layers.0.weight" in out
    stats = json.loads(g(a, "theta-store", "stats", "--json").stdout)
    assert len(stats["versions"]) == 1
    # textconv: `git diff` names the tensors that changed, and only those
    write(m, model_bytes(0, bias=1.0, layers=2))
    changed = [ln for ln in g(a, "diff").stdout.splitlines() if ln[:1] in "+-" and ln[:3] not in ("+++", "---")]
    assert len(changed) == 4 and changed[0].startswith("-# theta-store checkpoint: safetensors"), changed
    assert changed[1].startswith("-layers.0.bias\tF32\t1024\t4096\t") and changed[3].startswith("+layers.0.bias\t"), changed
    commit(a, "v2")
    assert [ln[1:].split("\t")[0] for ln in g(a, "diff", "HEAD~1", "HEAD").stdout.splitlines() if ln[:1] in "+-" and ln[1:2] == "l"] == [
        "layers.0.bias",
        "layers.0.bias",
    ]
    clean_status(a)
