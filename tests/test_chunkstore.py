"""Issue 15: frames in a chunk store, pointers and index records in Git.

Each scenario runs against every kind of store, each a real one on this machine: a directory
(file://), SeaweedFS's S3 API and a Git LFS server on 127.0.0.1, started by the tests. The Git
remote is a bare repository; `git` is the real binary with `theta-store install --global` in a
private global config (test_git_e2e.global_config).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from servers import Remote
from storeservers import StoreServer, store_server
from test_git_e2e import clone, commit, file_remote, g, global_config, model_bytes, new_repo, ts, write
from theta_store.chunkstore import PARALLEL_PUTS

__all__ = ["file_remote", "global_config"]  # fixtures; global_config is autouse

KINDS = ("file", "s3", "lfs")


@pytest.fixture(params=KINDS)
def chunk_store(
    request: pytest.FixtureRequest, tmp_path: Path, file_remote: Remote, monkeypatch: pytest.MonkeyPatch
) -> Iterator[StoreServer]:
    with store_server(request.param, tmp_path / "store", file_remote) as s:
        for k, v in s.env.items():  # what a user exports (AWS keys): git and theta-store inherit it
            monkeypatch.setenv(k, v)
        yield s


def setup_repo(tmp_path: Path, remote: Remote, store: StoreServer, *, pack_size: int | None = None) -> Path:
    a = new_repo(tmp_path / "a")
    g(a, "remote", "add", "origin", remote.url)
    ts(a, "remote", "add", "weights", store.url, *(["--endpoint", store.endpoint] if store.endpoint else []))
    if pack_size:
        g(a, "config", "thetastore.packSize", str(pack_size))
    commit(a, "weights live in a chunk store", ".thetastore", ".gitattributes")
    return a


def test_push_clone_checkout_every_version(tmp_path: Path, file_remote: Remote, chunk_store: StoreServer) -> None:
    a = setup_repo(tmp_path, file_remote, chunk_store)
    history = [model_bytes(0), model_bytes(0, bias=1.0), model_bytes(1, layers=3)]
    commits = []
    for i, data in enumerate(history):
        write(a / "model.safetensors", data)
        commits.append(commit(a, f"v{i + 1}", "model.safetensors"))
        g(a, "push", "-q", "origin", "main")
    # Git holds pointers and index records only: no frames, no refs/theta/ versions.
    refs = file_remote.refs("refs/")
    assert not [r for r in refs if r.startswith("refs/theta/")]
    assert len([r for r in refs if r.startswith("refs/theta-index/")]) == 3
    assert file_remote.object_bytes() < 200_000, file_remote.object_bytes()
    assert chunk_store.stored_bytes() > len(history[0]) // 2
    b = tmp_path / "b"
    clone(file_remote.url, b)
    assert (b / "model.safetensors").read_bytes() == history[-1]
    for c, data in zip(commits, history, strict=True):
        g(b, "checkout", "-q", c)
        assert (b / "model.safetensors").read_bytes() == data, c
    assert ts(b, "fsck").returncode == 0


def test_second_version_uploads_only_new_frames(tmp_path: Path, file_remote: Remote, chunk_store: StoreServer) -> None:
    a = setup_repo(tmp_path, file_remote, chunk_store)
    write(a / "model.safetensors", model_bytes(0))
    commit(a, "v1", "model.safetensors")
    g(a, "push", "-q", "origin", "main")
    before = chunk_store.objects()
    sent_before, requests_before = chunk_store.received_bytes(), chunk_store.requests()
    write(a / "model.safetensors", model_bytes(0, bias=1.0))
    commit(a, "v2", "model.safetensors")
    r = g(a, "push", "origin", "main")
    after = chunk_store.objects()
    new = {k: n for k, n in after.items() if k not in before}
    assert len(new) == 1 and sum(new.values()) < 10_000, new  # the bias's frame, nothing else
    assert chunk_store.received_bytes() - sent_before < 20_000
    assert chunk_store.requests() - requests_before <= 6  # is it there? (HEAD / batch), then one PUT
    assert "1 object(s) sent" in r.stderr
    # A second push of the same history sends nothing at all.
    n = chunk_store.received_bytes()
    ts(a, "push", "origin")
    assert chunk_store.received_bytes() == n


def test_killed_upload_resumes_without_resending(tmp_path: Path, file_remote: Remote, chunk_store: StoreServer) -> None:
    a = setup_repo(tmp_path, file_remote, chunk_store, pack_size=1 << 20)
    data = model_bytes(3, layers=12)  # 24 MiB of incompressible floats: about 24 objects
    write(a / "model.safetensors", data)
    commit(a, "v1", "model.safetensors")
    proc = subprocess.Popen(["git", "push", "-q", "origin", "main"], cwd=a, start_new_session=True, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while len(chunk_store.objects()) < 8 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = chunk_store.objects()
    assert 8 <= len(partial) < 20, f"the push was not killed midway ({len(partial)} objects stored)"
    assert not [r for r in file_remote.refs("refs/") if r.startswith("refs/theta-index/")]  # Git never names absent frames
    received = chunk_store.received_bytes()
    g(a, "push", "-q", "origin", "main")
    done = chunk_store.objects()
    assert set(partial) <= set(done)
    # What was stored before the kill (8 MiB or more) is not sent again: the resumed push sends
    # the rest, and at most again the objects that were in flight when it was killed.
    resent = chunk_store.received_bytes() - received
    rest = sum(n for k, n in done.items() if k not in partial)
    assert resent <= rest + PARALLEL_PUTS * (1 << 20) + 65536, (resent, rest)
    b = tmp_path / "b"
    clone(file_remote.url, b)
    assert (b / "model.safetensors").read_bytes() == data


def test_corrupt_object_is_named_and_nothing_wrong_is_written(tmp_path: Path, file_remote: Remote, chunk_store: StoreServer) -> None:
    a = setup_repo(tmp_path, file_remote, chunk_store)
    write(a / "model.safetensors", model_bytes(0))
    commit(a, "v1", "model.safetensors")
    g(a, "push", "-q", "origin", "main")
    (key,) = chunk_store.objects()
    chunk_store.corrupt(key, offset=5000)
    b = tmp_path / "b"
    r = clone(file_remote.url, b, ok=False)
    assert key[:12] in r.stderr and "does not match" in r.stderr, r.stderr
    m = b / "model.safetensors"
    assert not m.exists() or m.read_bytes() != model_bytes(0)
    assert not m.exists() or m.stat().st_size < 1024  # the pointer at most, never wrong weights
    r = ts(b, "pull", ok=False)
    assert r.returncode != 0 and key[:12] in r.stderr, r.stderr


def test_clone_without_store_config_says_what_is_missing(tmp_path: Path, file_remote: Remote, chunk_store: StoreServer) -> None:
    a = setup_repo(tmp_path, file_remote, chunk_store)
    write(a / "model.safetensors", model_bytes(0))
    commit(a, "v1", "model.safetensors")
    g(a, "push", "-q", "origin", "main")
    g(a, "rm", "-q", ".thetastore")
    g(a, "commit", "-q", "-m", "drop the store's name")
    g(a, "push", "-q", "origin", "main")
    b = tmp_path / "b"
    clone(file_remote.url, b, "--no-checkout")
    g(b, "checkout", "-q", "HEAD~1")  # has .thetastore: works
    assert (b / "model.safetensors").read_bytes() == model_bytes(0)


def test_remote_add_list_remove(tmp_path: Path, file_remote: Remote, chunk_store: StoreServer) -> None:
    a = setup_repo(tmp_path, file_remote, chunk_store)
    listed = ts(a, "remote", "--json").stdout
    assert chunk_store.url in listed and '"default": "weights"' in listed
    r = ts(a, "remote", "add", "bad name", "s3://b/p", ok=False)
    assert r.returncode != 0 and "cannot name a chunk store" in r.stderr
    r = ts(a, "remote", "add", "x", "ftp://nowhere", ok=False)
    assert r.returncode != 0 and "s3://bucket/prefix" in r.stderr
    ts(a, "remote", "remove", "weights")
    assert "weights" not in (a / ".thetastore").read_text()
    assert ".thetastore" in g(a, "diff", "--cached", "--name-only").stdout


def test_cache_size_evicts_versions_the_store_holds(tmp_path: Path, file_remote: Remote, chunk_store: StoreServer) -> None:
    a = setup_repo(tmp_path, file_remote, chunk_store)
    history = [model_bytes(s, layers=2) for s in range(3)]
    commits = []
    for i, data in enumerate(history):
        write(a / "model.safetensors", data)
        commits.append(commit(a, f"v{i + 1}", "model.safetensors"))
    unpushed = model_bytes(9, layers=2)
    g(a, "push", "-q", "origin", "main")
    g(a, "checkout", "-q", "-b", "local")
    write(a / "model.safetensors", unpushed)
    commits.append(commit(a, "not pushed", "model.safetensors"))
    g(a, "checkout", "-q", "main")
    before = sum(p.stat().st_size for p in (a / ".git/objects/pack").glob("*.pack"))
    g(a, "config", "thetastore.cacheSize", "1m")
    r = ts(a, "gc", "--json")
    import json

    out = json.loads(r.stdout)
    # v1 and v2 go: the store has them and the checkout (v3) does not use them; the unpushed one stays.
    assert len(out["evicted"]) == 2, out
    after = sum(p.stat().st_size for p in (a / ".git/objects/pack").glob("*.pack"))
    assert after < before - 2 * 3_000_000, (before, after)
    for c, data in zip(commits, [*history, unpushed], strict=True):
        g(a, "checkout", "-q", c)
        assert (a / "model.safetensors").read_bytes() == data, c
    assert ts(a, "fsck").returncode == 0


@pytest.fixture(params=[k for k in KINDS if k != "file"])
def store_service(
    request: pytest.FixtureRequest, tmp_path: Path, file_remote: Remote, monkeypatch: pytest.MonkeyPatch
) -> Iterator[StoreServer]:
    """The stores that are servers (they can be stopped and can refuse credentials)."""
    with store_server(request.param, tmp_path / "store", file_remote) as s:
        for k, v in s.env.items():
            monkeypatch.setenv(k, v)
        yield s


def index_refs(remote: Remote) -> list[str]:
    return [r for r in remote.refs("refs/") if r.startswith("refs/theta-index/")]


def test_server_stopped_mid_push_then_push_again(tmp_path: Path, file_remote: Remote, store_service: StoreServer) -> None:
    a = setup_repo(tmp_path, file_remote, store_service, pack_size=1 << 20)
    data = model_bytes(4, layers=12)
    write(a / "model.safetensors", data)
    commit(a, "v1", "model.safetensors")
    proc = subprocess.Popen(["git", "push", "-q", "origin", "main"], cwd=a, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while len(store_service.objects()) < 4 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    store_service.stop()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "weights" in err or store_service.url in err, err  # names the store
    assert "Traceback" not in err
    assert not index_refs(file_remote) and "refs/heads/main" not in file_remote.refs("refs/")
    store_service.start()
    g(a, "push", "-q", "origin", "main")
    b = tmp_path / "b"
    clone(file_remote.url, b)
    assert (b / "model.safetensors").read_bytes() == data


def test_wrong_credentials_are_said_and_nothing_is_pushed(
    tmp_path: Path, file_remote: Remote, store_service: StoreServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = setup_repo(tmp_path, file_remote, store_service)
    write(a / "model.safetensors", model_bytes(0))
    commit(a, "v1", "model.safetensors")
    good = dict(os.environ)
    for k, v in store_service.wrong_credentials().items():
        monkeypatch.setenv(k, v)
    r = g(a, "push", "origin", "main", ok=False)
    assert r.returncode != 0
    assert "credential" in r.stderr.lower() and "Traceback" not in r.stderr, r.stderr
    assert not index_refs(file_remote) and not store_service.objects()
    for k in store_service.wrong_credentials():
        monkeypatch.setenv(k, good[k])
    g(a, "push", "-q", "origin", "main")
    b = tmp_path / "b"
    for k, v in store_service.wrong_credentials().items():
        monkeypatch.setenv(k, v)
    r = clone(file_remote.url, b, ok=False)
    assert r.returncode != 0 and "credential" in r.stderr.lower(), r.stderr
    assert not (b / "model.safetensors").exists() or (b / "model.safetensors").stat().st_size < 1024


def test_lfs_the_git_remotes_own_endpoint(tmp_path: Path, file_remote: Remote, monkeypatch: pytest.MonkeyPatch) -> None:
    """`theta-store remote add hub lfs`: the LFS server git-lfs would use, found through a
    committed .lfsconfig as git-lfs users write it."""
    with store_server("lfs", tmp_path / "store", file_remote) as srv:
        for k, v in srv.env.items():
            monkeypatch.setenv(k, v)
        a = new_repo(tmp_path / "a")
        g(a, "remote", "add", "origin", file_remote.url)
        g(a, "config", "-f", ".lfsconfig", "lfs.url", srv.url)
        ts(a, "remote", "add", "hub", "lfs")
        write(a / "model.safetensors", model_bytes(0))
        commit(a, "v1")
        g(a, "push", "-q", "origin", "main")
        assert len(srv.objects()) == 1 and index_refs(file_remote)
        b = tmp_path / "b"
        clone(file_remote.url, b)
        assert (b / "model.safetensors").read_bytes() == model_bytes(0)


def test_clone_without_smudging_then_pull(tmp_path: Path, file_remote: Remote, chunk_store: StoreServer) -> None:
    """The path for files larger than the memory git may hold: theta-store writes the file."""
    a = setup_repo(tmp_path, file_remote, chunk_store)
    write(a / "model.safetensors", model_bytes(5))
    commit(a, "v1", "model.safetensors")
    g(a, "push", "-q", "origin", "main")
    b = tmp_path / "b"
    clone(file_remote.url, b, env={"THETA_STORE_SKIP_SMUDGE": "1"})
    assert (b / "model.safetensors").stat().st_size < 1024  # the pointer
    ts(b, "pull")
    assert (b / "model.safetensors").read_bytes() == model_bytes(5)
    assert g(b, "status", "--porcelain").stdout == ""


def test_lazy_open_fetches_only_the_frames_it_reads(tmp_path: Path, file_remote: Remote, chunk_store: StoreServer) -> None:
    import numpy as np

    import theta_store

    a = setup_repo(tmp_path, file_remote, chunk_store)
    data = model_bytes(6, layers=8)  # 16 MiB of matrices
    write(a / "model.safetensors", data)
    commit(a, "v1", "model.safetensors")
    g(a, "push", "-q", "origin", "main")
    b = tmp_path / "b"
    clone(file_remote.url, b, env={"THETA_STORE_SKIP_SMUDGE": "1"})
    packs_before = sum(p.stat().st_size for p in (b / ".git/objects/pack").glob("*.pack"))
    with theta_store.open("model.safetensors", rev="HEAD", repo=b) as f:
        got = f.get_tensor("layers.5.weight")
        assert sorted(f.keys()) == sorted([*(f"layers.{i}.weight" for i in range(8)), "layers.0.bias"])
    rng = np.random.default_rng(6)
    want = [(rng.standard_normal((512, 1024)) * 0.02).astype(np.float32) for _ in range(8)][5]
    assert np.array_equal(got, want)
    fetched = sum(p.stat().st_size for p in (b / ".git/objects/pack").glob("*.pack")) - packs_before
    assert 1_000_000 < fetched < 4_000_000, fetched  # one matrix's frames of eight
    assert not g(b, "for-each-ref", "refs/theta/").stdout  # the version itself was not fetched whole
    ts(b, "pull")  # and a full restore still works after a partial fetch
    assert (b / "model.safetensors").read_bytes() == data
