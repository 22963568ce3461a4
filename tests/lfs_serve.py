"""dulwich's Git LFS server (`dulwich.lfs_server`), run as a program by `servers.lfs_server`.

The batch, upload and verify endpoints are dulwich's own. This wrapper adds what the tests need
around them: HTTP Basic auth when --user/--password are given; counts of requests and bytes per
operation (written to --stats as JSON before the bytes counted reach the client, so a test reading
the file after a call returns sees them); with --ranges, downloads that honour an HTTP `Range`
header (dulwich always answers 200 with the whole object); with --unavailable N, "503 Service
Unavailable" to the first N requests, as a restarting or overloaded server answers.

    python lfs_serve.py --dir D --stats F [--user U --password P] [--ranges] [--unavailable N]

prints `http://127.0.0.1:PORT` (the LFS URL: the batch endpoint is PORT/objects/batch) once it listens.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import sys
import threading
from typing import Any, BinaryIO

from dulwich.lfs import LFSStore
from dulwich.lfs_server import LFSRequestHandler, LFSServer

OID = re.compile(r"[0-9a-f]{64}")
OPS = ("batch-upload", "batch-download", "upload", "download", "verify", "unauthorized", "unavailable", "other")


class Counts:
    """Requests and bytes per operation, mirrored to a JSON file on every change."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.data: dict[str, dict[str, int]] = {op: {"requests": 0, "bytes_in": 0, "bytes_out": 0, "objects": 0} for op in OPS}
        self.write()

    def add(self, op: str, flush: bool = True, **fields: int) -> None:
        with self.lock:
            for name, n in fields.items():
                self.data[op][name] += n
            if flush:
                self.write()

    def flush(self) -> None:
        with self.lock:
            self.write()

    def write(self) -> None:
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f)
        os.replace(tmp, self.path)


class CountingReader(io.RawIOBase):
    """The request body stream, counting what dulwich reads from it."""

    def __init__(self, inner: BinaryIO, counts: Counts, op: str) -> None:
        self.inner, self.counts, self.op = inner, counts, op

    def read(self, n: int = -1) -> bytes:
        data = self.inner.read(n)
        self.counts.add(self.op, flush=False, bytes_in=len(data))  # written out before the answer (send_response)
        return data

    def readline(self, limit: int = -1) -> bytes:
        return self.inner.readline(limit)


class CountingWriter(io.RawIOBase):
    """The response stream, counting body bytes (after the headers) before sending them."""

    def __init__(self, inner: BinaryIO, counts: Counts) -> None:
        self.inner, self.counts = inner, counts
        self.op: str | None = None  # set once the headers are out

    def write(self, data: Any) -> int:
        if self.op is not None:
            self.counts.add(self.op, bytes_out=len(data))
        return self.inner.write(data)

    def flush(self) -> None:
        self.inner.flush()


class Handler(LFSRequestHandler):
    server: Server

    def _op(self) -> str:
        path = self.path.split("?")[0]
        if path == "/objects/batch":
            return "batch"
        if path.startswith("/objects/") and path.endswith("/verify"):
            return "verify"
        if path.startswith("/objects/"):
            return {"PUT": "upload", "GET": "download"}.get(self.command, "other")
        return "other"

    def _refuse(self, op: str, status: int, message: str, headers: dict[str, str]) -> None:
        self.server.counts.add(op, requests=1)
        # Read the body the client sent: an unread body would be taken for the next request.
        length = int(self.headers.get("Content-Length") or 0)
        while length > 0:
            block = self.rfile.read(min(length, 1 << 20))
            if not block:
                break
            length -= len(block)
        body = json.dumps({"message": message}).encode()
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/vnd.git-lfs+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _available(self) -> bool:
        with self.server.counts.lock:
            left = self.server.unavailable
            self.server.unavailable = max(0, left - 1)
        if left > 0:
            self._refuse("unavailable", 503, "Service Unavailable", {"Retry-After": "0"})
        return left == 0

    def _authorized(self) -> bool:
        expected = self.server.auth
        if expected is None or self.headers.get("Authorization") == expected:
            return True
        realm = 'Basic realm="theta-store test LFS"'
        self._refuse("unauthorized", 401, "Credentials needed", {"WWW-Authenticate": realm, "LFS-Authenticate": realm})
        return False

    def _serve(self, handler: Any) -> None:
        if not self._available() or not self._authorized():
            return
        op = self._op()
        if op == "batch":
            self._batch()
            return
        self.server.counts.add(op, requests=1)
        self.rfile = CountingReader(self.rfile, self.server.counts, op)  # type: ignore[assignment]
        writer = CountingWriter(self.wfile, self.server.counts)  # type: ignore[arg-type]
        self.wfile = writer  # type: ignore[assignment]
        self._writer = writer
        self._writer_op = op
        try:
            handler()
        finally:
            self.rfile = self.rfile.inner  # type: ignore[attr-defined]
            self.wfile = writer.inner  # type: ignore[assignment]

    def send_response(self, code: int, message: str | None = None) -> None:
        self.server.counts.flush()
        super().send_response(code, message)

    def flush_headers(self) -> None:
        super().flush_headers()
        writer = getattr(self, "_writer", None)
        if writer is not None:
            writer.op = self._writer_op

    def _batch(self) -> None:
        """dulwich's batch handler, counted by the operation the request names."""
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        try:
            request = json.loads(body)
            op = f"batch-{request.get('operation')}"
            objects = len(request.get("objects", []))
        except (ValueError, AttributeError):
            op, objects = "other", 0
        self.server.counts.add(op if op in OPS else "other", requests=1, objects=objects, bytes_in=len(body))
        sock, self.rfile = self.rfile, io.BufferedReader(io.BytesIO(body))  # type: ignore[assignment]
        try:
            self.handle_batch()
        finally:
            self.rfile = sock

    def do_POST(self) -> None:
        self._serve(super().do_POST)

    def do_PUT(self) -> None:
        self._serve(super().do_PUT)

    def do_GET(self) -> None:
        self._serve(self._download if self.server.ranges else super().do_GET)

    def _download(self) -> None:
        """A download that honours one `Range: bytes=a-b` (as S3 and most LFS storage do), streamed."""
        parts = self.path.strip("/").split("/")
        if len(parts) != 2 or parts[0] != "objects" or not OID.fullmatch(parts[1]):
            self.send_error(404, "Not Found")
            return
        try:
            f = self.lfs_server.lfs_store.open_object(parts[1])
        except KeyError:
            self.send_error(404, "Object not found")
            return
        with f:
            size = os.fstat(f.fileno()).st_size
            start, end = 0, size
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
            if m:
                start = int(m.group(1))
                end = min(size, int(m.group(2)) + 1) if m.group(2) else size
                if start >= size or start >= end:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
            else:
                self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(end - start))
            self.end_headers()
            f.seek(start)
            left = end - start
            while left > 0:
                block = f.read(min(left, 1 << 20))
                if not block:
                    break
                self.wfile.write(block)
                left -= len(block)


class Server(LFSServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], store: LFSStore, counts: Counts, auth: str | None, ranges: bool, unavailable: int) -> None:
        super().__init__(address, store)
        self.RequestHandlerClass = Handler
        self.counts = counts
        self.auth = auth
        self.ranges = ranges
        self.unavailable = unavailable


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--stats", required=True)
    ap.add_argument("--user")
    ap.add_argument("--password")
    ap.add_argument("--ranges", action="store_true")
    ap.add_argument("--unavailable", type=int, default=0)
    ap.add_argument("--port", type=int, default=0, help="default: a free one")
    args = ap.parse_args()
    auth = None
    if args.user is not None:
        auth = "Basic " + base64.b64encode(f"{args.user}:{args.password or ''}".encode()).decode()
    server = Server(("127.0.0.1", args.port), LFSStore.create(args.dir), Counts(args.stats), auth, args.ranges, args.unavailable)
    print(f"http://127.0.0.1:{server.server_address[1]}", flush=True)
    sys.stdout.close()
    server.serve_forever()


if __name__ == "__main__":
    main()
