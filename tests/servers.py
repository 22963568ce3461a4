"""Real Git servers on 127.0.0.1 for the end-to-end tests: a bare repository over file://,
`git daemon` (git://) and smart HTTP (`git http-backend` behind lighttpd).

Each server serves the directory `base`; `Remote.url` is the URL of the bare repository
`base/remote.git` and `Remote.path` its directory (tests measure what reached the server there).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
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
