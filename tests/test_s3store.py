"""S3Store against a real SeaweedFS on 127.0.0.1 (tests/servers.py starts it): what reaches the
server is counted on the server's side, from its own metrics and its filer's listing."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest

from servers import SeaweedFS, faulty_proxy, seaweedfs
from theta_store.blobstore import BlobStore, coalesce
from theta_store.errors import BlobStoreAuthError, BlobStoreCorrupt, BlobStoreError, BlobStoreUnreachable, FileChanged
from theta_store.s3store import COALESCE_GAP, S3Store

MiB = 1 << 20
# sizes that cover a single PUT, a multipart upload ending in a short part and one of whole parts
SIZES = (0, 1000, 3 * MiB, 20 * MiB, 16 * MiB)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as s:
        yield s


def make_store(server: SeaweedFS, prefix: str, tmp_path: Path, **kwargs: object) -> S3Store:
    env = server.env() | {"HOME": str(tmp_path / "home")}
    return S3Store(f"s3://{server.bucket}/{prefix}", server.endpoint, env=env, **kwargs)  # type: ignore[arg-type]


def make_files(d: Path, sizes: tuple[int, ...] = SIZES, seed: int = 0) -> list[Path]:
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for i, n in enumerate(sizes):
        p = d / f"obj{i}"
        p.write_bytes(os.urandom(n) if n else b"")
        out.append(p)
    return out


def objects(store: S3Store, files: list[Path]) -> list[tuple[str, Path, int]]:
    return [(store.key(p), p, p.stat().st_size) for p in files]


def test_satisfies_the_interface(server: SeaweedFS, tmp_path: Path) -> None:
    store: BlobStore = make_store(server, "iface", tmp_path)
    assert store.url == f"s3://{server.bucket}/iface"


def test_key_is_blake3_of_the_content(server: SeaweedFS, tmp_path: Path) -> None:
    store = make_store(server, "keys", tmp_path)
    # known answer: BLAKE3 of the empty input, from the BLAKE3 specification's test vectors
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert store.key(empty) == "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
    for p in make_files(tmp_path / "f", (1, 8 * MiB, 8 * MiB + 1, 20 * MiB + 7)):
        assert store.key(p) == blake3.blake3(p.read_bytes()).hexdigest()
    assert store.path("ab" * 32) == f"keys/frames/{'ab' * 32}"


def test_round_trip(server: SeaweedFS, tmp_path: Path) -> None:
    store = make_store(server, "roundtrip", tmp_path)
    files = make_files(tmp_path / "f")
    objs = objects(store, files)
    assert sorted(store.missing([(k, n) for k, _, n in objs])) == sorted(k for k, _, _ in objs)

    before = server.counters()
    seen: list[int] = []
    stats = store.put(objs, progress=seen.append)
    sent = server.counters() - before
    total = sum(n for _, _, n in objs)
    assert sum(seen) == total == stats.bytes_sent
    assert sent.bytes_received == total
    # no HEADs (missing() just asked), 3 single PUTs, and multipart: 20 MiB in 8 MiB parts is 3,
    # 16 MiB is 2 (+ create and complete each)
    assert sent.count("GET") == 0
    assert sent.count("PUT") == 3 + 3 + 2
    assert sent.count("POST") == 4
    assert stats.requests == sent.count() == 3 + (3 + 2) + 4
    assert stats.skipped == []
    assert server.pending_uploads() == 0

    stored = server.objects("roundtrip")
    assert stored == {store.path(k): n for k, _, n in objs}
    assert store.missing([(k, n) for k, _, n in objs]) == []
    assert store.missing([(k, 0) for k, _, _ in objs]) == []  # a caller that does not know the sizes
    for key, path, size in objs:
        data = path.read_bytes()
        assert store.get(key, [(0, size)]) == [data]


def test_put_of_objects_already_there_sends_nothing(server: SeaweedFS, tmp_path: Path) -> None:
    store = make_store(server, "again", tmp_path)
    objs = objects(store, make_files(tmp_path / "f"))
    store.put(objs[:3])
    before = server.counters()
    seen: list[int] = []
    stats = store.put(objs, progress=seen.append)
    sent = server.counters() - before
    assert sorted(stats.skipped) == sorted(k for k, _, _ in objs[:3])
    # only the two that were not there went up; the others cost a HEAD each
    assert sent.bytes_received == sum(n for _, _, n in objs[3:]) == sum(seen)
    assert sent.count("GET", "200") == 3

    before = server.counters()
    stats = store.put(objs)
    sent = server.counters() - before
    assert sent.count("PUT") == sent.count("POST") == 0
    assert sent.bytes_received == 0
    assert sent.count() == sent.count("GET", "200") == len(objs)
    assert stats.bytes_sent == 0 and len(stats.skipped) == len(objs)


def test_put_if_absent_when_another_push_wins(server: SeaweedFS, tmp_path: Path) -> None:
    store = make_store(server, "race", tmp_path)
    other = make_store(server, "race", tmp_path)
    objs = objects(store, make_files(tmp_path / "f", (1000, 12 * MiB)))
    assert sorted(store.missing([(k, n) for k, _, n in objs])) == sorted(k for k, _, _ in objs)
    other.put(objs)  # lands after our missing() and before our put()

    before = server.counters()
    stats = store.put(objs)
    sent = server.counters() - before
    # the single PUT carries If-None-Match: SeaweedFS refuses it (412) and keeps the first
    assert sent.count("PUT", "412") == 1
    assert stats.skipped == [objs[0][0]]
    # the multipart upload has no such condition; it stores the same bytes again
    assert sent.bytes_received == objs[1][2]
    assert server.objects("race") == {store.path(k): n for k, _, n in objs}
    assert [store.get(k, [(0, n)])[0] == p.read_bytes() for k, p, n in objs] == [True, True]


def test_ranged_get(server: SeaweedFS, tmp_path: Path) -> None:
    store = make_store(server, "ranges", tmp_path)
    [(key, path, size)] = objects(store, make_files(tmp_path / "f", (20 * MiB,)))
    store.put([(key, path, size)])
    data = path.read_bytes()
    # out of order, overlapping, adjacent, empty, and far apart
    ranges = [(size - 100, size), (5, 10), (0, 7), (10, 4096), (3 * MiB, 3 * MiB + 17), (9 * MiB, 9 * MiB), (12 * MiB, 13 * MiB)]
    spans = coalesce([r for r in ranges if r[0] < r[1]], COALESCE_GAP)
    assert len(spans) == 4
    before = server.counters()
    got = store.get(key, ranges)
    sent = server.counters() - before
    assert got == [data[a:b] for a, b in ranges]
    assert sent.count("GET") == sent.count("GET", "206") == len(spans)
    assert sent.bytes_sent == sum(b - a for a, b in spans) < size // 10
    with pytest.raises(BlobStoreCorrupt, match=r"ends at byte 20971520, before the range \[20971000, 20971530\)"):
        store.get(key, [(size - 520, size + 10)])
    with pytest.raises(BlobStoreError, match="is not in the store"):
        store.get("00" * 32, [(0, 1)])


def test_wrong_credentials(server: SeaweedFS, tmp_path: Path) -> None:
    good = make_store(server, "auth", tmp_path)
    objs = objects(good, make_files(tmp_path / "f", (1000, 12 * MiB)))
    good.put(objs[:1])
    for env in ({"AWS_SECRET_ACCESS_KEY": "not-the-secret"}, {"AWS_ACCESS_KEY_ID": "no-such-key"}):
        bad = S3Store(f"s3://{server.bucket}/auth", server.endpoint, env=server.env() | env | {"HOME": str(tmp_path)})
        before = server.counters()
        for call in (
            lambda b=bad: b.missing([(k, n) for k, _, n in objs]),
            lambda b=bad: b.put(objs[1:]),
            lambda b=bad: b.get(objs[0][0], [(0, 10)]),
        ):
            with pytest.raises(BlobStoreAuthError) as e:
                call()
            msg = str(e.value)
            assert f"s3://{server.bucket}/auth" in msg and "environment (AWS_ACCESS_KEY_ID)" in msg and "403" in msg
        assert (server.counters() - before).bytes_received == 0
    assert server.objects("auth") == {good.path(objs[0][0]): 1000}


def test_missing_bucket(server: SeaweedFS, tmp_path: Path) -> None:
    store = S3Store("s3://no-such-bucket/p", server.endpoint, env=server.env() | {"HOME": str(tmp_path)})
    objs = objects(store, make_files(tmp_path / "f", (1000, 12 * MiB)))
    for call in (lambda: store.missing([(objs[0][0], 1000)]), lambda: store.put(objs), lambda: store.get(objs[0][0], [(0, 1)])):
        expected = r"s3://no-such-bucket/p: bucket 'no-such-bucket' does not exist on http://127\.0\.0\.1"
        with pytest.raises(BlobStoreError, match=expected) as e:
            call()
        assert "aws s3 mb s3://no-such-bucket" in str(e.value)
        assert not isinstance(e.value, BlobStoreAuthError)


def test_corrupted_object_is_returned_as_stored(server: SeaweedFS, tmp_path: Path) -> None:
    store = make_store(server, "corrupt", tmp_path)
    objs = objects(store, make_files(tmp_path / "f", (1000, 3 * MiB)))
    store.put(objs)
    (key, path, size) = objs[1]
    assert server.read(store.path(key)) == path.read_bytes()
    bad = bytearray(path.read_bytes())
    bad[1234] ^= 0xFF
    server.write(store.path(key), bytes(bad))
    # same size: the store cannot tell; get returns what is stored and the caller's BLAKE3 check finds it
    assert store.missing([(key, size)]) == []
    [got] = store.get(key, [(0, size)])
    assert got == bytes(bad) != path.read_bytes()
    assert blake3.blake3(got).hexdigest() != key

    # a truncated object: get cannot return the range asked, and put() replaces it
    (key0, path0, size0) = objs[0]
    server.write(store.path(key0), path0.read_bytes()[:10])
    with pytest.raises(BlobStoreCorrupt, match="is truncated"):
        store.get(key0, [(0, size0)])
    assert store.missing([(key0, size0)]) == []  # it is there, whatever its size
    before = server.counters()
    stats = store.put([objs[0]])
    assert (server.counters() - before).count("PUT", "200") == 1
    assert stats.skipped == [] and stats.bytes_sent == size0
    assert store.get(key0, [(0, size0)]) == [path0.read_bytes()]


def test_file_changed_after_its_key_was_taken(server: SeaweedFS, tmp_path: Path) -> None:
    store = make_store(server, "changed", tmp_path)
    objs = objects(store, make_files(tmp_path / "f", (1000, 20 * MiB)))
    for key, path, size in objs:
        with open(path, "r+b") as f:
            f.seek(size - 1)
            last = f.read(1)
            f.seek(size - 1)
            f.write(bytes([last[0] ^ 1]))
        with pytest.raises(FileChanged, match=f"{path}: its content no longer hashes to {key}"):
            store.put([(key, path, size)])
    assert server.objects("changed") == {}
    # object_store aborts a dropped multipart upload from a task of its own: seen a moment later
    deadline = time.monotonic() + 10
    while server.pending_uploads() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.pending_uploads() == 0
    key, path, size = objs[0]
    with pytest.raises(FileChanged, match="not the 999 expected"):
        store.put([(key, path, size - 1)])


@pytest.mark.parametrize("mode", ["reset", "503"])
def test_transient_faults_are_retried(server: SeaweedFS, tmp_path: Path, mode: str) -> None:
    with faulty_proxy(server.endpoint, mode, faults=3) as proxy:
        store = S3Store(f"s3://{server.bucket}/flaky-{mode}", proxy.url, env=server.env() | {"HOME": str(tmp_path)})
        objs = objects(store, make_files(tmp_path / "f", (1000, 12 * MiB)))
        store.put(objs)
        assert [store.get(k, [(0, n)])[0] == p.read_bytes() for k, p, n in objs] == [True, True]
        assert proxy.spoiled == 3 and proxy.forwarded > 0
    assert server.objects(f"flaky-{mode}") == {store.path(k): n for k, _, n in objs}


def test_persistent_faults_give_unreachable(server: SeaweedFS, tmp_path: Path) -> None:
    with faulty_proxy(server.endpoint, "503", faults=-1) as proxy:
        store = S3Store(
            f"s3://{server.bucket}/down", proxy.url, env=server.env() | {"HOME": str(tmp_path)}, max_retries=2, retry_timeout=5.0
        )
        objs = objects(store, make_files(tmp_path / "f", (1000,)))
        for call in (lambda: store.missing([(objs[0][0], 1000)]), lambda: store.put(objs), lambda: store.get(objs[0][0], [(0, 10)])):
            with pytest.raises(BlobStoreUnreachable) as e:
                call()
            msg = str(e.value)
            assert f"s3://{server.bucket}/down: " in msg and store.path(objs[0][0]) in msg and f"no answer from {proxy.url}" in msg
            assert "503" in msg
        assert proxy.spoiled == 3 * 3  # each request tried once and retried twice
    assert server.objects("down") == {}


def test_server_stopped_mid_transfer(tmp_path: Path) -> None:
    with seaweedfs(tmp_path / "seaweedfs") as server:
        store = make_store(server, "stop", tmp_path, parallel=2, max_retries=2, retry_timeout=3.0, connect_timeout=1.0)
        objs = objects(store, make_files(tmp_path / "f", (24 * MiB,) * 6))
        halfway = threading.Event()
        sent = [0]

        def progress(n: int) -> None:
            sent[0] += n
            if sent[0] >= 40 * MiB:
                halfway.set()
                halfway.wait()
            threading.Event().wait(0.05)  # slow enough that the server dies with uploads in flight

        error: list[BaseException] = []

        def push() -> None:
            try:
                store.put(objs, progress=progress)
            except BaseException as e:
                error.append(e)

        t = threading.Thread(target=push)
        t.start()
        assert halfway.wait(60)
        server.stop(kill=True)
        t.join(120)
        assert not t.is_alive()
        [e] = error
        assert isinstance(e, BlobStoreUnreachable), repr(e)
        assert f"s3://{server.bucket}/stop: " in str(e) and "/stop/frames/" in str(e) and "no answer from http://127.0.0.1" in str(e)

        server.start()
        stored = server.objects("stop")
        assert len(stored) < len(objs)
        for key, _, size in objs:
            name = store.path(key)
            if name in stored:  # finished before the kill: whole and right
                assert stored[name] == size
                assert blake3.blake3(store.get(key, [(0, size)])[0]).hexdigest() == key
        done = [k for k, _, _ in objs if store.path(k) in stored]

        # a second run sends only what is not there
        before = server.counters()
        stats = store.put(objs)
        assert sorted(stats.skipped) == sorted(done)
        assert (server.counters() - before).bytes_received == 24 * MiB * (len(objs) - len(done))
        assert store.missing([(k, n) for k, _, n in objs]) == []


def test_credentials_from_a_profile(server: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    (home / ".aws").mkdir(parents=True)
    (home / ".aws" / "credentials").write_text(
        f"[default]\naws_access_key_id = wrong\naws_secret_access_key = wrong\n\n"
        f"[theta]\naws_access_key_id = {server.access_key}\naws_secret_access_key = {server.secret_key}\n"
    )
    (home / ".aws" / "config").write_text("[default]\nregion = eu-west-1\n\n[profile theta]\nregion = us-east-1\n")
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(var, raising=False)
    for var in ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("AWS_PROFILE", "theta")

    store = S3Store(f"s3://{server.bucket}/profile", server.endpoint)
    assert store.credentials.source == f"profile 'theta' in {home}/.aws/credentials"
    assert store.region == "us-east-1"
    objs = objects(store, make_files(tmp_path / "f", (1000,)))
    store.put(objs)
    assert store.get(objs[0][0], [(0, 1000)]) == [objs[0][1].read_bytes()]

    monkeypatch.delenv("AWS_PROFILE")
    wrong = S3Store(f"s3://{server.bucket}/profile", server.endpoint)
    assert wrong.region == "eu-west-1"
    with pytest.raises(BlobStoreAuthError, match=f"credentials from profile 'default' in {home}/.aws/credentials"):
        wrong.missing([(objs[0][0], 1000)])


def test_no_credentials_anywhere(tmp_path: Path) -> None:
    with pytest.raises(BlobStoreAuthError, match="no AWS credentials: AWS_ACCESS_KEY_ID is not set and profile 'default'") as e:
        S3Store("s3://bucket/p", "http://127.0.0.1:9", env={"HOME": str(tmp_path)})
    assert "AWS_PROFILE" in str(e.value)
    with pytest.raises(BlobStoreAuthError, match="AWS_SECRET_ACCESS_KEY is not set"):
        S3Store("s3://bucket/p", None, env={"HOME": str(tmp_path), "AWS_ACCESS_KEY_ID": "x"})
    (tmp_path / ".aws").mkdir()
    (tmp_path / ".aws" / "credentials").write_text("[default\naws_access_key_id = x\n")
    # the first line is not a section header
    with pytest.raises(BlobStoreAuthError, match=f"{tmp_path}/.aws/credentials: line 1: '\\[default' is outside any \\[section\\]"):
        S3Store("s3://bucket/p", None, env={"HOME": str(tmp_path)})
    (tmp_path / ".aws" / "credentials").write_text("[default]\naws_access_key_id = x\nthis is not a setting\n")
    with pytest.raises(BlobStoreAuthError, match=f"{tmp_path}/.aws/credentials: line 3: cannot parse 'this is not a setting'"):
        S3Store("s3://bucket/p", None, env={"HOME": str(tmp_path)})


def test_bad_url_and_endpoint(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path), "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}
    for url in ("s3:///prefix", "http://bucket/prefix", "bucket/prefix"):
        with pytest.raises(BlobStoreError, match=f"{url}: not an S3 chunk-store URL"):
            S3Store(url, None, env=env)
    with pytest.raises(BlobStoreError, match="plain http to another machine"):
        S3Store("s3://b/p", "http://storage.example.com:8333", env=env)
    assert S3Store("s3://b/p", "http://storage.example.com:8333", env=env, allow_http=True).endpoint == "http://storage.example.com:8333"
    assert S3Store("s3://b/p", None, env=env | {"AWS_ENDPOINT_URL": "http://127.0.0.1:1"}).endpoint == "http://127.0.0.1:1"
    assert S3Store("s3://b", "http://[::1]:1", env=env).path("ab") == "frames/ab"
