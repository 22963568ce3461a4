"""One filter process, spoken to directly in git's pkt-line protocol (version 2): a request that
fails gets its own `status=error` (the file named on stderr), and the process serves the next one.
Only a broken stream ends it."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import theta_store
from conftest import FIXTURES
from test_git_e2e import commit, g, global_config, model_bytes, new_repo, pointer_version, write
from theta_store.install import command
from theta_store.pointer import Pointer

__all__ = ["global_config"]  # autouse fixture: theta-store installed in a private global config

MALFORMED = sorted((FIXTURES / "malformed").iterdir())


class FilterClient:
    """git's side of the long-running filter protocol, over the pipes of one process."""

    def __init__(self, cwd: Path, stderr: Path) -> None:
        self.err = stderr.open("wb")
        self.p = subprocess.Popen(
            [*shlex.split(command()), "filter-process"], cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err
        )
        assert self.p.stdin is not None and self.p.stdout is not None
        self.w, self.r = self.p.stdin, self.p.stdout
        self.text("git-filter-client", "version=2")
        assert self.read_text() == ["git-filter-server", "version=2"]
        self.text("capability=clean", "capability=smudge")
        assert self.read_text() == ["capability=clean", "capability=smudge"]

    def pkt(self, data: bytes) -> None:
        self.w.write(b"%04x" % (len(data) + 4) + data)

    def flush(self) -> None:
        self.w.write(b"0000")
        self.w.flush()

    def text(self, *lines: str) -> None:
        for line in lines:
            self.pkt(line.encode() + b"\n")
        self.flush()

    def read_pkt(self) -> bytes | None:
        head = self.r.read(4)
        assert len(head) == 4, f"the filter process closed its output (exit {self.p.poll()})"
        n = int(head, 16)
        return None if n == 0 else self.r.read(n - 4)

    def read_text(self) -> list[str]:
        out = []
        while (p := self.read_pkt()) is not None:
            out.append(p.decode().rstrip("\n"))
        return out

    def request(self, cmd: str, pathname: str, content: bytes) -> tuple[str, bytes]:
        """Send one request; returns the final status and the content that came back."""
        self.text(f"command={cmd}", f"pathname={pathname}")
        for i in range(0, len(content), 65516):
            self.pkt(content[i : i + 65516])
        self.flush()
        status = self.read_text()
        if status != ["status=success"]:
            return status[-1].removeprefix("status="), b""
        parts = []
        while (p := self.read_pkt()) is not None:
            parts.append(p)
        final = self.read_text()  # empty: the status stands; else what went wrong after all
        return (final[-1].removeprefix("status=") if final else "success"), b"".join(parts)

    def close(self) -> int:
        self.w.close()
        rc = self.p.wait(timeout=60)
        self.r.close()
        self.err.close()
        return rc


def _corrupt_largest_frame(repo: Path, version: str) -> None:
    """Flip a byte in the middle of the largest frame of `version`, in its pack."""
    with theta_store.Repo(repo) as r:
        frames = r.store.version_frames(bytes.fromhex(version))
        paths, where = r.store.locate([max(frames.values(), key=lambda f: f.frame_len).object_id])
    loc = where[0]
    assert loc is not None
    pack = Path(paths[loc.pack])
    data = bytearray(pack.read_bytes())
    data[loc.offset + 5000] ^= 0x55
    os.chmod(pack, 0o644)
    pack.write_bytes(bytes(data))


def test_one_process_serves_on_after_failed_requests(tmp_path: Path) -> None:
    a = new_repo(tmp_path / "a")
    m = a / "model.safetensors"
    v1, v2 = model_bytes(0), model_bytes(3)  # no matrix in common
    write(m, v1)
    commit(a, "v1")
    write(m, v2)
    commit(a, "v2")
    p1 = g(a, "cat-file", "blob", "HEAD~1:model.safetensors").stdout.encode()
    p2 = g(a, "cat-file", "blob", "HEAD:model.safetensors").stdout.encode()
    _corrupt_largest_frame(a, pointer_version(a, "HEAD~1:model.safetensors"))
    good = model_bytes(5)
    write(a / "good.safetensors", good)
    for f in MALFORMED:
        write(a / f.name, f.read_bytes())

    stderr = tmp_path / "filter.stderr"
    client = FilterClient(a, stderr)
    try:
        for f in MALFORMED:
            status, _ = client.request("clean", f.name, f.read_bytes())
            assert status == "error", f.name
        status, out = client.request("clean", "good.safetensors", good)
        assert status == "success"
        assert Pointer.parse(out).size == len(good)
        status, _ = client.request("smudge", "model.safetensors", p1)  # damaged version
        assert status == "error"
        status, out = client.request("smudge", "model.safetensors", p2)
        assert status == "success" and out == v2
        status, out = client.request("clean", "good.safetensors", good)  # the clean cache, still right
        assert status == "success" and Pointer.parse(out).size == len(good)
    finally:
        rc = client.close()
    err = stderr.read_text()
    assert rc == 0, err
    for f in MALFORMED:
        assert f"clean {f.name}: " in err, err
    version = pointer_version(a, "HEAD~1:model.safetensors")
    assert f"smudge model.safetensors: checkpoint version {version[:16]} is damaged" in err, err
    assert "good.safetensors" not in err, err


def test_a_broken_stream_ends_the_process(tmp_path: Path) -> None:
    """A packet header that is not one: nothing to resynchronise on, so the process exits 1 and says why."""
    a = new_repo(tmp_path / "a")
    stderr = tmp_path / "filter.stderr"
    client = FilterClient(a, stderr)
    client.text("command=smudge", "pathname=x.safetensors")
    client.w.write(b"zzzzjunk")
    client.w.flush()
    assert client.r.read() == b""  # no answer: the process is gone
    assert client.close() == 1
    assert "bad pkt-line header" in stderr.read_text()


def test_a_missing_frame_is_a_per_file_error(tmp_path: Path) -> None:
    """A version whose frame object is gone (its pack deleted): that smudge fails, the next one works."""
    a = new_repo(tmp_path / "a")
    pathname = "model.safetensors"
    m = a / pathname
    v1 = model_bytes(0)
    write(m, v1)
    commit(a, "v1")
    p1 = g(a, "cat-file", "blob", "HEAD:" + pathname).stdout.encode()
    version = pointer_version(a, "HEAD:" + pathname)
    with theta_store.Repo(a) as r:
        frames = r.store.version_frames(bytes.fromhex(version))
        paths, where = r.store.locate([max(frames.values(), key=lambda f: f.frame_len).object_id])
    loc = where[0]
    assert loc is not None
    small = model_bytes(4, layers=1, rows=64, cols=64)
    write(a / "small.safetensors", small)
    commit(a, "small")
    p2 = g(a, "cat-file", "blob", "HEAD:small.safetensors").stdout.encode()
    # The pack of v1's largest frame goes (with its index): v1 now lacks that frame.
    pack = Path(paths[loc.pack])
    for f in (pack, pack.with_suffix(".idx")):
        os.chmod(f, 0o644)
        f.unlink()

    stderr = tmp_path / "filter.stderr"
    client = FilterClient(a, stderr)
    try:
        status, _ = client.request("smudge", pathname, p1)
        assert status == "error"
        status, out = client.request("smudge", "small.safetensors", p2)
        assert status == "success" and out == small
    finally:
        rc = client.close()
    err = stderr.read_text()
    assert rc == 0, err
    assert f"smudge {pathname}: " in err and version[:16] in err, err
