"""The Git LFS chunk store (lfsstore.py) against a real Git LFS server on 127.0.0.1 (dulwich's,
wrapped by lfs_serve.py to count requests and bytes on the server's side and to add Basic auth),
with real git repositories and git's own credential helpers. Where git-lfs is installed, the real
git-lfs client checks that the server and our oids and URLs are the ones Git LFS users know."""

from __future__ import annotations

import hashlib
import logging
import os
import random
import shutil
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import urllib3

from servers import LfsServer, lfs_server
from theta_store.errors import BlobStoreAuthError, BlobStoreError, BlobStoreUnreachable, FileChanged, InvalidArgument
from theta_store.lfsstore import LfsStore, lfs_endpoint, lfs_url_from_git_url

needs_git_lfs = pytest.mark.skipif(shutil.which("git-lfs") is None, reason="git-lfs is not installed (.ci/run installs it)")
SIZES = (3 << 20, 5 << 20, (4 << 20) + 1, 2 << 20)


def git(cwd: Path, *args: str, ok: bool = True) -> str:
    r = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if ok and r.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} exited {r.returncode}: {r.stderr}")
    return r.stdout


def write_objects(d: Path, sizes: tuple[int, ...] = SIZES, seed: int = 0) -> list[Path]:
    d.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for i, n in enumerate(sizes):
        p = d / f"pack{i}.bin"
        p.write_bytes(rng.randbytes(n))
        paths.append(p)
    return paths


def entries(store: LfsStore, paths: list[Path]) -> list[tuple[str, Path, int]]:
    return [(store.key(p), p, p.stat().st_size) for p in paths]


def assert_intact(server: LfsServer) -> dict[str, Path]:
    """Every object on the server's disk is whole: its content hashes to its name."""
    stored = server.objects()
    for oid, p in stored.items():
        assert hashlib.sha256(p.read_bytes()).hexdigest() == oid, f"{p} is not the object it is named after"
    return stored


@pytest.fixture
def repo(repo_dir: Path) -> Path:
    """A git repository (conftest's), as a path: the store reads its config."""
    return repo_dir


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LfsServer]:
    with lfs_server(tmp_path / "lfs") as s:
        yield s


@pytest.fixture
def packs(tmp_path: Path) -> list[Path]:
    return write_objects(tmp_path / "packs")


# ---------------------------------------------------------------- round trip and dedup


def test_put_missing_get_round_trip(server: LfsServer, repo: Path, packs: list[Path]) -> None:
    with LfsStore(server.url, repo) as store:
        objs = entries(store, packs)
        for key, path, _ in objs:
            assert key == hashlib.sha256(path.read_bytes()).hexdigest()  # the LFS oid
        assert store.missing([(k, n) for k, _, n in objs]) == [k for k, _, _ in objs]
        stats = store.put(objs)
        assert stats.skipped == []
        assert stats.bytes_sent >= sum(SIZES)
        counted = server.stats()
        assert counted["upload"]["requests"] == len(objs)
        assert counted["upload"]["bytes_in"] == sum(SIZES)
        assert counted["batch-upload"]["requests"] == 2  # missing() and put(): one batch each, no listing
        assert store.missing([(k, n) for k, _, n in objs]) == []
        stored = assert_intact(server)
        assert set(stored) == {k for k, _, _ in objs}
        for key, path, size in objs:
            assert store.get(key, [(0, size)]) == [path.read_bytes()]
            assert stored[key].read_bytes() == path.read_bytes()
        total = store.stats()
        assert total.requests >= 2 + len(objs) * 2 + 1
        assert total.bytes_received >= sum(SIZES)


def test_oid_is_the_one_git_lfs_computes(tmp_path: Path, packs: list[Path]) -> None:
    if shutil.which("git-lfs") is None:
        pytest.skip("git-lfs is not installed")
    store = LfsStore("http://127.0.0.1:9/", tmp_path)  # no request is made
    for p in packs[:2]:
        pointer = subprocess.run(["git", "lfs", "pointer", f"--file={p}"], capture_output=True, text=True, check=True).stdout
        assert f"oid sha256:{store.key(p)}" in pointer.splitlines()


def test_second_put_uploads_nothing_and_a_new_object_alone(server: LfsServer, repo: Path, packs: list[Path], tmp_path: Path) -> None:
    store = LfsStore(server.url, repo)
    objs = entries(store, packs)
    store.put(objs)
    before = server.stats()
    again = store.put(objs)
    after = server.stats()
    assert after["upload"] == before["upload"]  # not one byte or request more
    assert after["verify"] == before["verify"]
    assert after["batch-upload"]["requests"] == before["batch-upload"]["requests"] + 1
    assert sorted(again.skipped) == sorted(k for k, _, _ in objs)
    assert again.requests == 1

    new = write_objects(tmp_path / "more", (1 << 20,), seed=7)
    third = store.put(objs + entries(store, new))
    final = server.stats()
    assert final["upload"]["requests"] == after["upload"]["requests"] + 1
    assert final["upload"]["bytes_in"] == after["upload"]["bytes_in"] + (1 << 20)
    assert len(third.skipped) == len(objs)


def test_progress_counts_every_byte_sent(server: LfsServer, repo: Path, packs: list[Path]) -> None:
    seen: list[int] = []
    store = LfsStore(server.url, repo, parallel=3)
    store.put(entries(store, packs), progress=seen.append)
    assert sum(seen) == sum(SIZES)


# ---------------------------------------------------------------- ranged reads


@pytest.mark.parametrize("ranges", [False, True], ids=["whole-object-200", "range-206"])
def test_ranged_get(tmp_path: Path, repo: Path, ranges: bool) -> None:
    """dulwich answers a Range request with 200 and the whole object: the ranges are cut out of the
    stream. A server that honours Range (as S3 behind most LFS servers does) sends only the spans."""
    (path,) = write_objects(tmp_path / "p", (6 << 20,), seed=3)
    data = path.read_bytes()
    asked = [(100, 200), (0, 10), (5 << 20, 6 << 20), (150, 160), (300, 300), (190, 250), ((1 << 20) + 7, (3 << 20) - 1)]
    with lfs_server(tmp_path / "lfs", ranges=ranges) as server:
        store = LfsStore(server.url, repo)
        key = store.key(path)
        store.put([(key, path, len(data))])
        got = store.get(key, asked)
        assert got == [data[s:e] for s, e in asked]
        sent = server.stats()["download"]
        if ranges:
            # spans [0, 250), [1 MiB + 7, 3 MiB - 1), [5 MiB, 6 MiB): one GET each, only their bytes
            assert sent["requests"] == 3
            assert sent["bytes_out"] == 250 + (2 << 20) - 8 + (1 << 20)
        else:
            assert sent["requests"] == 1  # the whole-object answer serves every range
        assert store.get(key, []) == []
        assert store.get(key, [(7, 7)]) == [b""]


@pytest.mark.parametrize("ranges", [False, True], ids=["whole-object-200", "range-206"])
def test_range_beyond_the_object_is_named(tmp_path: Path, repo: Path, ranges: bool) -> None:
    (path,) = write_objects(tmp_path / "p", (1 << 20,), seed=4)
    with lfs_server(tmp_path / "lfs", ranges=ranges) as server:
        store = LfsStore(server.url, repo)
        key = store.key(path)
        store.put([(key, path, 1 << 20)])
        with pytest.raises(BlobStoreError, match=f"{key}.*shorter than the range"):
            store.get(key, [(0, 10), ((1 << 20) - 5, (1 << 20) + 5)])


def test_prefetch_asks_for_every_download_in_one_batch(server: LfsServer, repo: Path, packs: list[Path]) -> None:
    store = LfsStore(server.url, repo)
    objs = entries(store, packs)
    store.put(objs)
    store.prefetch([(k, n) for k, _, n in objs])
    for key, path, size in objs:
        assert store.get(key, [(size - 10, size)]) == [path.read_bytes()[-10:]]
    counted = server.stats()
    assert counted["batch-download"] == {"requests": 1, "bytes_in": counted["batch-download"]["bytes_in"], "bytes_out": 0, "objects": 4}
    assert counted["download"]["requests"] == len(objs)


def test_a_download_href_that_stops_working_is_asked_for_again(server: LfsServer, repo: Path, packs: list[Path]) -> None:
    store = LfsStore(server.url, repo)
    (key, path, size), (key2, path2, size2) = entries(store, packs[:2])
    store.put([(key, path, size), (key2, path2, size2)])
    store.prefetch([(key, size), (key2, size2)])
    server.objects()[key].unlink()  # the href the store keeps now answers 404
    with pytest.raises(BlobStoreError, match=f"{key} is not on the server"):
        store.get(key, [(0, 10)])
    assert server.stats()["batch-download"]["requests"] == 2  # the prefetch, then once more for this key
    assert store.get(key2, [(0, 10)]) == [path2.read_bytes()[:10]]


def test_action_expiry_is_read_from_expires_in_and_expires_at() -> None:
    from theta_store.lfsstore import EXPIRY_MARGIN, _action

    now = time.monotonic()
    obj = {"actions": {"download": {"href": "https://h/o", "header": {"Authorization": "Bearer t"}, "expires_in": 3600}}}
    action = _action(obj, "download", now)
    assert action is not None and action.fresh() and action.headers == {"Authorization": "Bearer t"}
    assert action.deadline == pytest.approx(now + 3600)
    soon = {"actions": {"download": {"href": "https://h/o", "expires_in": EXPIRY_MARGIN / 2}}}
    assert not _action(soon, "download", now).fresh()  # type: ignore[union-attr]
    past = {"actions": {"upload": {"href": "https://h/o", "expires_at": "2020-01-01T00:00:00Z"}}}
    assert not _action(past, "upload", now).fresh()  # type: ignore[union-attr]
    never = {"actions": {"upload": {"href": "https://h/o", "expires_at": "0001-01-01T00:00:00Z"}}}  # Go's zero time
    assert _action(never, "upload", now).fresh()  # type: ignore[union-attr]
    assert _action({"oid": "x"}, "upload", now) is None  # the server has it


def test_gets_from_many_threads_at_once(server: LfsServer, repo: Path, packs: list[Path], caplog: pytest.LogCaptureFixture) -> None:
    """chunkstore reads several objects at once through one store: answers stay whole and apart, and
    urllib3 has no cause to warn (a full connection pool logs a warning for every connection)."""
    store = LfsStore(server.url, repo)
    objs = entries(store, packs)
    store.put(objs)
    contents = {k: p.read_bytes() for k, p, _ in objs}
    jobs = [(k, [(i * 1000, i * 1000 + 4096), (n - 5000, n - 17)]) for i in range(6) for k, _, n in objs]
    with caplog.at_level(logging.WARNING), ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda job: store.get(*job), jobs))
    for (key, ranges), got in zip(jobs, results, strict=True):
        assert got == [contents[key][s:e] for s, e in ranges]
    assert [r.getMessage() for r in caplog.records if r.name.startswith("urllib3")] == []


def test_get_of_an_object_the_server_lacks(server: LfsServer, repo: Path) -> None:
    store = LfsStore(server.url, repo)
    absent = hashlib.sha256(b"never uploaded").hexdigest()
    with pytest.raises(BlobStoreError, match=f"{absent} is not on the server"):
        store.get(absent, [(0, 1)])


def test_bad_keys_and_ranges_are_the_callers_bug(server: LfsServer, repo: Path, packs: list[Path]) -> None:
    store = LfsStore(server.url, repo)
    with pytest.raises(InvalidArgument, match="not an LFS oid"):
        store.missing([("ABC", 1)])
    with pytest.raises(InvalidArgument, match="not an LFS oid"):
        store.put([("../../etc/passwd", packs[0], 1)])
    with pytest.raises(InvalidArgument, match="not a byte range"):
        store.get(store.key(packs[0]), [(10, 5)])
    assert server.stats()["batch-upload"]["requests"] == 0


# ---------------------------------------------------------------- what the server keeps


def test_corrupted_object_on_the_server_is_returned_as_stored(server: LfsServer, repo: Path, packs: list[Path]) -> None:
    """Verification is the caller's job (chunkstore checks every frame's BLAKE3): a ranged read
    cannot check the oid of the whole object, so get() hands back what the server has."""
    store = LfsStore(server.url, repo)
    key, path, size = entries(store, packs[:1])[0]
    store.put([(key, path, size)])
    on_disk = server.objects()[key]
    damaged = bytearray(on_disk.read_bytes())
    damaged[1000] ^= 0xFF
    on_disk.write_bytes(bytes(damaged))
    (got,) = store.get(key, [(990, 1010)])
    assert got == bytes(damaged[990:1010]) != path.read_bytes()[990:1010]


def test_dulwich_server_refuses_content_that_does_not_match_the_oid(server: LfsServer) -> None:
    """What happens if a client uploads wrong content under an oid: dulwich's server hashes the body
    and answers 400 "OID mismatch", storing nothing (LfsStore never sends such a body: see below)."""
    oid = hashlib.sha256(b"right content").hexdigest()
    http = urllib3.PoolManager()
    r = http.request("PUT", f"{server.url}/objects/{oid}", body=b"wrong content", headers={"Content-Type": "application/octet-stream"})
    assert r.status == 400 and b"OID mismatch" in r.data
    assert oid not in server.objects()


def test_file_changed_since_its_key_uploads_nothing_under_that_oid(server: LfsServer, repo: Path, packs: list[Path]) -> None:
    store = LfsStore(server.url, repo)
    key, path, size = entries(store, packs[:1])[0]
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # same size, other content: caught only by hashing while sending
    path.write_bytes(bytes(data))
    with pytest.raises(FileChanged, match=f"{path}.*{key}"):
        store.put([(key, path, size)])
    assert server.objects() == {}
    assert server.stats()["upload"]["bytes_in"] < size  # the last block was never sent

    path.write_bytes(bytes(data[:1000]))  # cut short: refused before any upload
    with pytest.raises(FileChanged, match="is 1000 bytes"):
        store.put([(key, path, size)])
    assert server.stats()["upload"]["requests"] == 1


# ---------------------------------------------------------------- failures


def test_server_stopped_mid_transfer_then_resumed(tmp_path: Path, repo: Path) -> None:
    paths = write_objects(tmp_path / "packs", (4 << 20,) * 6, seed=5)
    base = tmp_path / "lfs"
    with lfs_server(base) as server:
        store = LfsStore(server.url, repo, parallel=2, retries=2, backoff=0.05)
        objs = entries(store, paths)
        sent = [0]

        def stop_midway(n: int) -> None:
            sent[0] += n
            if sent[0] > 9 << 20:
                server.stop()  # a crash: connections reset, nothing more answers

        with pytest.raises(BlobStoreUnreachable) as err:
            store.put(objs, progress=stop_midway)
        message = str(err.value)
        assert server.url in message and any(k in message for k, _, _ in objs)
        assert "gave up after 3 attempts" in message
        stored = assert_intact(server)  # whole objects only: nothing half-stored under an oid
        assert len(stored) < len(objs)
        with pytest.raises(BlobStoreUnreachable, match=server.url):
            store.get(objs[0][0], [(0, 10)])

    with lfs_server(base) as again:  # the same store, restarted
        store = LfsStore(again.url, repo)
        stats = store.put(objs)
        assert sorted(stats.skipped) == sorted(stored)
        assert again.stats()["upload"]["requests"] == len(objs) - len(stored)
        assert set(assert_intact(again)) == {k for k, _, _ in objs}


def test_transient_503_is_retried(tmp_path: Path, repo: Path, packs: list[Path]) -> None:
    with lfs_server(tmp_path / "lfs", unavailable=2) as server:
        store = LfsStore(server.url, repo, retries=3, backoff=0.01)
        objs = entries(store, packs[:1])
        store.put(objs)
        assert server.stats()["unavailable"]["requests"] == 2
        assert set(server.objects()) == {objs[0][0]}
    with lfs_server(tmp_path / "lfs2", unavailable=100) as server:
        store = LfsStore(server.url, repo, retries=2, backoff=0.01)
        with pytest.raises(BlobStoreUnreachable, match=r"HTTP 503: Service Unavailable \(gave up after 3 attempts\)"):
            store.missing([(objs[0][0], objs[0][2])])


def test_nothing_listening(repo: Path) -> None:
    from servers import free_port

    url = f"http://127.0.0.1:{free_port()}"
    store = LfsStore(url, repo, retries=1, backoff=0.01)
    with pytest.raises(BlobStoreUnreachable, match=f"{url}/objects/batch"):
        store.missing([("0" * 64, 1)])


def test_no_batch_api_at_that_url(server: LfsServer, repo: Path) -> None:
    store = LfsStore(server.url + "/not/lfs", repo)
    with pytest.raises(BlobStoreError, match="no Git LFS batch API") as err:
        store.missing([("0" * 64, 1)])
    assert "lfs.url" in str(err.value)


# ---------------------------------------------------------------- credentials


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private HOME and global git config, and no terminal prompt for credentials."""
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("HOME", str(h))
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(h / ".gitconfig"))
    monkeypatch.setenv("GIT_TERMINAL_PROMPT", "0")
    monkeypatch.delenv("GIT_ASKPASS", raising=False)
    monkeypatch.delenv("SSH_ASKPASS", raising=False)
    return h


def store_credentials(home: Path, url: str, user: str, password: str) -> Path:
    """git's `store` helper holding these credentials, and a second helper that logs what git asks
    of its helpers (get / store / erase: git sends approve and reject to every helper)."""
    log = home / "helper.log"  # first: git asks helpers in order and stops at the first that answers
    git(home, "config", "--global", "credential.helper", f'!f() {{ echo "$1" >> "{log}"; cat >/dev/null; }}; f')
    git(home, "config", "--global", "--add", "credential.helper", "store")
    creds = home / ".git-credentials"
    creds.write_text(f"{url.replace('://', f'://{user}:{password}@')}\n")
    return creds


def helper_calls(home: Path) -> list[str]:
    return (home / "helper.log").read_text().split()


def test_credentials_from_git_credential_helper(tmp_path: Path, repo: Path, packs: list[Path], home: Path) -> None:
    with lfs_server(tmp_path / "lfs", user="alice", password="s3cret") as server:
        store_credentials(home, server.url, "alice", "s3cret")
        store = LfsStore(server.url, repo)
        objs = entries(store, packs[:2])
        store.put(objs)
        assert store.get(objs[1][0], [(5, 50)]) == [objs[1][1].read_bytes()[5:50]]
        counted = server.stats()
        assert counted["unauthorized"]["requests"] == 1  # one challenge; then the helper's credentials throughout
        assert counted["upload"]["requests"] == 2
        assert helper_calls(home) == ["get", "store"]  # asked once, approved once


def test_credentials_in_the_repositorys_own_config(tmp_path: Path, repo: Path, packs: list[Path], home: Path) -> None:
    """The helpers are the repository's: `git credential` runs in it (a local credential.helper applies)."""
    with lfs_server(tmp_path / "lfs", user="bob", password="pw") as server:
        creds = tmp_path / "repo-creds"
        creds.write_text(server.url.replace("://", "://bob:pw@") + "\n")
        git(repo, "config", "credential.helper", f"store --file={creds}")
        store = LfsStore(server.url, repo)
        store.put(entries(store, packs[:1]))
        assert len(server.objects()) == 1


def test_wrong_credentials_are_refused_and_rejected(tmp_path: Path, repo: Path, packs: list[Path], home: Path) -> None:
    with lfs_server(tmp_path / "lfs", user="alice", password="s3cret") as server:
        creds = store_credentials(home, server.url, "alice", "wrong")
        store = LfsStore(server.url, repo)
        with pytest.raises(BlobStoreAuthError) as err:
            store.put(entries(store, packs[:1]))
        message = str(err.value)
        assert server.url in message and "alice" in message and "credential helper" in message
        assert "wrong" not in message
        assert helper_calls(home) == ["get", "erase"]  # `git credential reject`, as git and git-lfs do
        assert creds.read_text() == ""
        assert server.objects() == {}
        assert server.stats()["upload"]["requests"] == 0


def test_no_credentials_at_all(tmp_path: Path, repo: Path, home: Path) -> None:
    with lfs_server(tmp_path / "lfs", user="alice", password="s3cret") as server:
        store = LfsStore(server.url, repo)
        with pytest.raises(BlobStoreAuthError, match=r"asks for credentials.*gave none") as err:
            store.missing([("0" * 64, 1)])
        assert "credential.helper" in str(err.value)


def test_credentials_in_the_url(tmp_path: Path, repo: Path, packs: list[Path], home: Path) -> None:
    with lfs_server(tmp_path / "lfs", user="alice", password="s3cret") as server:
        store = LfsStore(server.url.replace("://", "://alice:s3cret@"), repo)
        assert "s3cret" not in store.url
        objs = entries(store, packs[:1])
        store.put(objs)
        assert server.stats()["unauthorized"]["requests"] == 0  # sent from the first request on
        bad = LfsStore(server.url.replace("://", "://alice:nope@"), repo)
        with pytest.raises(BlobStoreAuthError) as err:
            bad.missing([(k, n) for k, _, n in objs])
        assert "the LFS URL" in str(err.value) and "nope" not in str(err.value)


# ---------------------------------------------------------------- finding the LFS URL


@pytest.mark.parametrize(
    ("remote", "expected"),
    [
        ("https://git.example.com/org/model.git", "https://git.example.com/org/model.git/info/lfs"),
        ("https://git.example.com/org/model", "https://git.example.com/org/model.git/info/lfs"),
        ("https://git.example.com/org/model/", "https://git.example.com/org/model.git/info/lfs"),
        ("https://user@git.example.com:8443/org/model.git", "https://user@git.example.com:8443/org/model.git/info/lfs"),
        ("http://127.0.0.1:8080/r.git", "http://127.0.0.1:8080/r.git/info/lfs"),
        ("git@github.com:org/model.git", "https://github.com/org/model.git/info/lfs"),
        ("github.com:org/model", "https://github.com/org/model.git/info/lfs"),
        ("ssh://git@git.example.com:2222/org/model.git", "https://git.example.com/org/model.git/info/lfs"),
        ("git://git.example.com/org/model", "https://git.example.com/org/model.git/info/lfs"),
        ("file:///srv/git/model.git", None),
        ("/srv/git/model.git", None),
        ("./a:b/model", None),
    ],
)
def test_lfs_url_derived_from_the_remote_url(remote: str, expected: str | None) -> None:
    assert lfs_url_from_git_url(remote) == expected


@needs_git_lfs
@pytest.mark.parametrize(
    "remote_url",
    [
        "https://git.example.com/org/model",
        "https://user@git.example.com:8443/org/model/",
        "git@github.com:org/model.git",
        "ssh://git@h.example.com:2222/x/y.git",
        "git+ssh://git@h.example.com/x/y",
        "git://h.example.com/x/y",
    ],
)
def test_derived_url_is_the_one_git_lfs_uses(repo: Path, remote_url: str) -> None:
    git(repo, "remote", "add", "origin", remote_url)
    git(repo, "remote", "add", "mirror", remote_url.replace("org", "team").replace("/x/", "/z/"))
    env_lines = git(repo, "lfs", "env").splitlines()
    for name, prefix in (("origin", "Endpoint="), ("mirror", "Endpoint (mirror)=")):
        line = next(x for x in env_lines if x.startswith(prefix))
        theirs = line[len(prefix) :].split(" (auth=")[0]
        ep = lfs_endpoint("lfs", repo, name)
        ours = ep.url.replace("://", f"://{ep.username}@") if ep.username else ep.url
        assert ours == theirs


def test_url_resolution_order(repo: Path) -> None:
    git(repo, "remote", "add", "origin", "https://origin.example.com/org/model")
    git(repo, "remote", "add", "other", "git@other.example.com:org/model.git")
    assert lfs_endpoint("lfs", repo).url == "https://origin.example.com/org/model.git/info/lfs"
    assert lfs_endpoint("lfs", repo, "other").url == "https://other.example.com/org/model.git/info/lfs"
    git(repo, "config", "branch.main.remote", "other")  # the branch's remote is the default
    assert lfs_endpoint("lfs", repo).url == "https://other.example.com/org/model.git/info/lfs"

    git(repo, "config", "remote.other.lfsurl", "https://lfs-other.example.com/lfs")
    ep = lfs_endpoint("lfs", repo, "other")
    assert ep.url == "https://lfs-other.example.com/lfs" and "remote.other.lfsurl (git config)" in ep.source

    (repo / ".lfsconfig").write_text("[lfs]\n\turl = https://committed.example.com/info/lfs\n")
    ep = lfs_endpoint("lfs", repo, "other")
    assert ep.url == "https://committed.example.com/info/lfs" and ".lfsconfig" in ep.source

    git(repo, "config", "lfs.url", "https://local.example.com/lfs/")
    ep = lfs_endpoint("lfs", repo, "other")
    assert ep.url == "https://local.example.com/lfs" and "lfs.url (git config)" in ep.source

    # uploads: lfs.pushurl, then the push URL of the remote
    assert lfs_endpoint("lfs", repo, "other", "upload").url == "https://local.example.com/lfs"
    git(repo, "config", "lfs.pushurl", "https://push.example.com/lfs")
    assert lfs_endpoint("lfs", repo, "other", "upload").url == "https://push.example.com/lfs"
    assert lfs_endpoint("lfs", repo, "other", "download").url == "https://local.example.com/lfs"

    # an explicit URL is used as it is
    assert lfs_endpoint("https://x.example.com/a/b", repo).url == "https://x.example.com/a/b"


def test_push_url_of_the_remote(repo: Path) -> None:
    git(repo, "remote", "add", "origin", "https://read.example.com/org/model.git")
    git(repo, "remote", "set-url", "--push", "origin", "git@write.example.com:org/model.git")
    store = LfsStore("lfs", repo)
    assert store.download.url == "https://read.example.com/org/model.git/info/lfs"
    assert store.upload.url == "https://write.example.com/org/model.git/info/lfs"


def test_lfsconfig_committed_in_a_bare_repository(tmp_path: Path, repo: Path) -> None:
    (repo / ".lfsconfig").write_text('[remote "origin"]\n\tlfsurl = https://bare.example.com/lfs\n')
    git(repo, "add", ".lfsconfig")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@e", "commit", "-qm", "lfs url")
    bare = tmp_path / "bare.git"
    git(tmp_path, "clone", "-q", "--bare", str(repo), str(bare))
    assert lfs_endpoint("lfs", bare, "origin").url == "https://bare.example.com/lfs"


def test_lfsconfig_may_name_only_lfs_urls(repo: Path) -> None:
    git(repo, "remote", "add", "origin", "https://origin.example.com/m.git")
    (repo / ".lfsconfig").write_text('[branch "main"]\n\tremote = elsewhere\n')
    assert lfs_endpoint("lfs", repo).url == "https://origin.example.com/m.git/info/lfs"


def test_url_resolution_errors(repo: Path) -> None:
    with pytest.raises(BlobStoreError, match="no remote 'origin'") as err:
        lfs_endpoint("lfs", repo)
    assert "lfs.url" in str(err.value)
    git(repo, "remote", "add", "origin", "/srv/git/model.git")
    with pytest.raises(BlobStoreError, match="a local repository: it has no LFS server"):
        lfs_endpoint("lfs", repo)
    (repo / ".lfsconfig").write_text("[lfs]\n\turl = https://ok.example.com\n[broken\n")
    with pytest.raises(BlobStoreError, match=r"\.lfsconfig.*line 3"):
        lfs_endpoint("lfs", repo)
    (repo / ".lfsconfig").write_text("[lfs]\n\turl = ssh://git@h.example.com/x.git\n")
    with pytest.raises(BlobStoreError, match=r"\.lfsconfig.*not an http\(s\) LFS URL"):
        lfs_endpoint("lfs", repo)
    with pytest.raises(BlobStoreError, match="not an LFS store URL"):
        LfsStore("s3://bucket/prefix", repo)


def test_store_through_the_remotes_own_lfs_server(server: LfsServer, repo: Path, packs: list[Path]) -> None:
    """url "lfs": the server is found from the committed .lfsconfig, as git-lfs finds it."""
    (repo / ".lfsconfig").write_text(f"[lfs]\n\turl = {server.url}\n")
    store = LfsStore("lfs", repo)
    assert store.download.url == server.url
    objs = entries(store, packs[:1])
    store.put(objs)
    assert store.get(objs[0][0], [(0, 100)]) == [packs[0].read_bytes()[:100]]
    assert set(server.objects()) == {objs[0][0]}


# ---------------------------------------------------------------- the real git-lfs client, same server


@needs_git_lfs
def test_git_lfs_client_and_lfsstore_share_the_server(tmp_path: Path, server: LfsServer, packs: list[Path], home: Path) -> None:
    """git-lfs pushes to this server; what it stored LfsStore finds present and reads back; what
    LfsStore stored git-lfs downloads."""
    git(home, "config", "--global", "user.name", "t")
    git(home, "config", "--global", "user.email", "t@example.com")
    git(home, "lfs", "install", "--skip-repo")
    bare = tmp_path / "remote.git"
    git(tmp_path, "init", "-q", "--bare", "-b", "main", str(bare))
    a = tmp_path / "a"
    git(tmp_path, "init", "-q", "-b", "main", str(a))
    git(a, "lfs", "track", "*.bin")
    git(a, "config", "lfs.url", server.url)
    git(a, "config", f"lfs.{server.url}/.locksverify", "false")
    git(a, "remote", "add", "origin", str(bare))
    shutil.copy(packs[0], a / "w0.bin")
    git(a, "add", ".")
    git(a, "commit", "-qm", "weights")
    git(a, "push", "-q", "origin", "main")
    assert server.stats()["upload"]["requests"] == 1
    assert server.stats()["other"]["requests"] == 0  # locksverify off: no POST /locks/verify

    store = LfsStore("lfs", a)
    key0 = store.key(packs[0])
    assert store.missing([(key0, packs[0].stat().st_size)]) == []
    assert store.get(key0, [(0, 1 << 20)]) == [packs[0].read_bytes()[: 1 << 20]]

    key1, p1, n1 = entries(store, packs[1:2])[0]
    store.put([(key1, p1, n1)])
    (a / "w1.bin").write_text(f"version https://git-lfs.github.com/spec/v1\noid sha256:{key1}\nsize {n1}\n")
    git(a, "add", "w1.bin")
    git(a, "commit", "-qm", "a pointer to an object LfsStore uploaded")
    git(a, "push", "-q", "origin", "main")
    b = tmp_path / "b"
    env = {**os.environ, "GIT_LFS_SKIP_SMUDGE": "1"}  # the clone has no lfs.url yet
    r = subprocess.run(["git", "clone", "-q", str(bare), str(b)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    git(b, "config", "lfs.url", server.url)
    git(b, "lfs", "pull")
    assert (b / "w1.bin").read_bytes() == p1.read_bytes()
    assert (b / "w0.bin").read_bytes() == packs[0].read_bytes()
