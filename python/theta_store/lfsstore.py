"""Git LFS servers as chunk stores: the Git LFS batch API (basic transfer) behind `BlobStore`.

A chunk-store object is an LFS object named by its oid, the SHA-256 of its content, so any Git LFS
server (GitHub, GitLab, Gitea, Hugging Face, dulwich's) can hold frame packs:

- `missing`: one batch "upload" request per 100 objects; an object the server answers without an
  upload action is one it already has, so nothing is listed.
- `put`: the objects the server lacks go up a few at a time, each streamed from its file by a PUT to
  the upload action's href (SHA-256 checked while it is read), then the verify action if given.
- `get`: a batch "download" request (its action kept while fresh), then one GET with an HTTP Range
  per group of nearby ranges; from a server that ignores Range (200, the whole object) the wanted
  ranges are cut out of the stream, so memory stays the size of what was asked.

The LFS URL is found as git-lfs finds it (`lfs_endpoint`); credentials come from the URL or from
git's credential helpers (`git credential fill` after a 401, then `approve` or `reject`).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import re
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar, cast
from urllib.parse import unquote, urljoin, urlsplit, urlunsplit

import urllib3

from .blobstore import TransferStats, coalesce

if TYPE_CHECKING:
    from .blobstore import BlobStore
from .errors import BlobStoreAuthError, BlobStoreError, BlobStoreUnreachable, FileChanged, InvalidArgument

__all__ = ["LfsStore", "lfs_endpoint", "lfs_url_from_git_url"]

LFS_JSON = "application/vnd.git-lfs+json"
USER_AGENT = "theta-store (Git LFS batch API, basic transfer)"
BATCH_OBJECTS = 100  # git-lfs's own lfs.transfer.batchSize default
BLOCK = 1 << 20
COALESCE_GAP = 1 << 16  # ranges closer than this share one GET: a request costs more than 64 KiB of transfer
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
REDIRECTS = frozenset({301, 302, 303, 307, 308})
EXPIRY_MARGIN = 10.0  # seconds: an action this close to its expiry is asked for again
CREDENTIALS_HINT = (
    "LFS credentials come from git's credential helpers (see `git config credential.helper`; "
    "`git credential fill` shows what they give for this host) or from user:password in the LFS URL"
)
_OID = re.compile(r"[0-9a-f]{64}")

T = TypeVar("T")


# ---------------------------------------------------------------- where the LFS server is


@dataclass(frozen=True)
class Endpoint:
    """An LFS URL (without credentials) and where it came from, for messages."""

    url: str
    source: str
    username: str | None = None
    password: str | None = None


def lfs_url_from_git_url(url: str) -> str | None:
    """The LFS URL git-lfs derives from a Git remote's URL: `https://host/path.git/info/lfs`
    (`.git` added when missing; ssh, scp-like and git:// URLs become https). None for a local path
    or a file:// URL, which has no LFS server."""
    if "://" in url:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        path = parts.path.rstrip("/")
        if scheme in ("http", "https"):
            base = urlunsplit((scheme, parts.netloc, path, "", ""))
        elif scheme in ("ssh", "git+ssh", "ssh+git", "git"):
            host = parts.hostname or ""
            base = urlunsplit(("https", f"[{host}]" if ":" in host else host, path, "", ""))
        else:
            return None
    else:
        # scp-like [user@]host:path; a colon after a slash is part of a local path (git's rule)
        m = re.fullmatch(r"(?:[^@/]+@)?([^:/]+):(.+)", url)
        if m is None:
            return None
        host, path = m.group(1), m.group(2).strip("/")
        base = f"https://{host}/{path}"
    if not urlsplit(base).path.strip("/"):
        return None
    return base + ("/info/lfs" if base.endswith(".git") else ".git/info/lfs")


def _split_credentials(url: str, source: str) -> Endpoint:
    """An http(s) LFS URL with any user:password taken out of it."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise BlobStoreError(
            f"{source}: {_redact(url)} is not an http(s) LFS URL",
            hint="theta-store speaks the LFS batch API over HTTP(S); set lfs.url to the server's https://…/info/lfs URL",
        )
    netloc = parts.netloc.rpartition("@")[2]
    bare = urlunsplit((parts.scheme.lower(), netloc, parts.path.rstrip("/"), parts.query, ""))
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    return Endpoint(bare, source, user, password)


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.netloc.rpartition('@')[2]}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class _GitConfig:
    """Reads git config and the repository's committed .lfsconfig, git config first (as git-lfs does)."""

    def __init__(self, repo: Path) -> None:
        self.repo = repo
        top = self._git("rev-parse", "--show-toplevel")
        self.lfsconfig: list[str] = []  # `git config` options that read .lfsconfig
        if top.returncode == 0 and (Path(top.stdout.strip()) / ".lfsconfig").is_file():
            self.lfsconfig = ["-f", str(Path(top.stdout.strip()) / ".lfsconfig")]
        elif self._git("cat-file", "-e", "HEAD:.lfsconfig").returncode == 0:  # a bare repository
            self.lfsconfig = ["--blob", "HEAD:.lfsconfig"]

    def _git(self, *args: str) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(["git", *args], cwd=self.repo, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)
        except OSError as e:
            raise BlobStoreError(f"{self.repo}: cannot run git to find the LFS URL: {e}") from e

    def _get(self, key: str, scope: list[str], where: str) -> str | None:
        r = self._git("config", *scope, "--get", key)
        if r.returncode == 1:
            return None
        if r.returncode != 0:
            raise BlobStoreError(f"{where}: cannot read {key}: {r.stderr.strip()}", hint="fix the file git names, or the key in it")
        return r.stdout.rstrip("\n")

    def get(self, key: str) -> tuple[str, str] | None:
        """(value, where it was set) of `key`, or None. Like git-lfs, .lfsconfig is read only for LFS
        URLs: a committed file must not redirect anything else."""
        value = self._get(key, [], f"{self.repo} (git config)")
        if value is not None:
            return value, f"{key} (git config)"
        if self.lfsconfig and (key.startswith("lfs.") or key.endswith((".lfsurl", ".lfspushurl"))):
            value = self._get(key, self.lfsconfig, f"{self.repo}/.lfsconfig")
            if value is not None:
                return value, f"{key} (.lfsconfig)"
        return None

    def remote(self, given: str | None) -> str:
        """The remote git-lfs would use: given, the branch's remote, remote.lfsdefault, the only one, origin."""
        if given:
            return given
        branch = self._git("symbolic-ref", "--short", "-q", "HEAD").stdout.strip()
        if branch:
            found = self.get(f"branch.{branch}.remote")
            if found:
                return found[0]
        found = self.get("remote.lfsdefault")
        if found:
            return found[0]
        names = self._git("remote").stdout.split()
        return names[0] if len(names) == 1 else "origin"

    def remote_url(self, name: str, push: bool) -> str | None:
        r = self._git("remote", "get-url", *(["--push"] if push else []), name)
        return r.stdout.strip() if r.returncode == 0 else None


def lfs_endpoint(
    url: str, repo: Path, remote: str | None = None, operation: str = "download", config: _GitConfig | None = None
) -> Endpoint:
    """The LFS URL a store configured as `url` talks to for `operation` ("download" or "upload").

    `url` is an explicit http(s) LFS URL, used as is, or "lfs": the Git remote's own LFS server,
    found as git-lfs finds it: lfs.pushurl (uploads), lfs.url, remote.<remote>.lfspushurl (uploads),
    remote.<remote>.lfsurl — each from git config, else from the repository's .lfsconfig — else
    derived from the remote's (push) URL by `lfs_url_from_git_url`.
    """
    if url != "lfs":
        if urlsplit(url).scheme.lower() in ("http", "https"):
            return _split_credentials(url, "the configured LFS URL")
        raise BlobStoreError(
            f"{_redact(url)}: not an LFS store URL",
            hint='use "lfs" for the Git remote\'s own LFS server, or its http(s)://…/info/lfs URL',
        )
    config = config or _GitConfig(repo)
    name = config.remote(remote)
    upload = operation == "upload"
    keys = [
        *(["lfs.pushurl"] if upload else []),
        "lfs.url",
        *([f"remote.{name}.lfspushurl"] if upload else []),
        f"remote.{name}.lfsurl",
    ]
    for key in keys:
        found = config.get(key)
        if found is not None:
            return _split_credentials(found[0], f"{repo}: {found[1]}")
    remote_url = config.remote_url(name, upload)
    if remote_url is None:
        raise BlobStoreError(
            f"{repo}: no LFS URL: lfs.url is not set and there is no remote {name!r} to derive it from",
            hint="set it with `git config lfs.url https://…/info/lfs` (or commit it in .lfsconfig), or name the remote",
        )
    derived = lfs_url_from_git_url(remote_url)
    if derived is None:
        raise BlobStoreError(
            f"{repo}: remote {name!r} is {_redact(remote_url)}, a local repository: it has no LFS server",
            hint="set lfs.url (git config or .lfsconfig) to an LFS server's https://…/info/lfs URL",
        )
    return _split_credentials(derived, f"{repo}: derived from remote {name!r} ({_redact(remote_url)})")


# ---------------------------------------------------------------- credentials


@dataclass
class _Credential:
    username: str
    password: str
    from_helper: list[str] | None = None  # what `git credential fill` said, to approve or reject it with
    approved: bool = False

    def header(self) -> str:
        return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme.lower()}://{parts.netloc.rpartition('@')[2].lower()}"


# ---------------------------------------------------------------- transfers


class _Transient(Exception):
    """A failure worth another attempt (connection refused or reset, timeout, HTTP 5xx/429)."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


@dataclass
class _Action:
    href: str
    headers: dict[str, str]
    deadline: float | None  # time.monotonic() after which the server may refuse it
    authenticated: bool = False  # the headers carry the authorization: add none of ours

    def fresh(self) -> bool:
        return self.deadline is None or time.monotonic() < self.deadline - EXPIRY_MARGIN


def _action(obj: dict[str, Any], name: str, asked_at: float) -> _Action | None:
    raw = (obj.get("actions") or {}).get(name)
    if not isinstance(raw, dict) or not isinstance(raw.get("href"), str):
        return None
    deadline = None
    expires_in = raw.get("expires_in")
    if isinstance(expires_in, int | float) and expires_in > 0:
        deadline = asked_at + float(expires_in)
    expires_at = raw.get("expires_at")
    if isinstance(expires_at, str) and expires_at and not expires_at.startswith("0001-"):
        try:
            at = datetime.fromisoformat(expires_at.replace("Z", "+00:00"))
            left = (at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp() - time.time()
            deadline = min(deadline, asked_at + left) if deadline is not None else asked_at + left
        except ValueError:
            pass
    headers = {str(k): str(v) for k, v in (raw.get("header") or {}).items()}
    return _Action(raw["href"], headers, deadline, bool(obj.get("authenticated")))


class _UploadBody:
    """One file's bytes for a PUT, read block by block as urllib3 sends them. The SHA-256 is checked
    before the last block goes out, so a file that changed since its key was computed never completes
    an upload under that key: the server sees a short body and stores nothing."""

    def __init__(self, path: Path, key: str, size: int, sent: Callable[[int], None]) -> None:
        self.path, self.key, self.size, self.sent_to = path, key, size, sent
        self.left = size
        self.sent = 0
        self.sha = hashlib.sha256()
        self.failure: FileChanged | None = None
        try:
            self.file = open(path, "rb")  # noqa: SIM115 (closed by close(), after the request)
        except OSError as e:
            raise FileChanged(f"{path}: cannot read it to upload LFS object {key}: {e}") from e

    def read(self, n: int | None = -1) -> bytes:
        if self.left == 0:
            return b""
        data = self.file.read(min(self.left, n if n is not None and n > 0 else BLOCK))
        if not data:
            self._fail(f"it ended at byte {self.sent} of {self.size}")
        self.sha.update(data)
        self.left -= len(data)
        if self.left == 0 and self.sha.hexdigest() != self.key:
            self._fail(f"its content no longer has SHA-256 {self.key}")
        self.sent += len(data)
        self.sent_to(len(data))
        return data

    def _fail(self, what: str) -> None:
        self.failure = FileChanged(
            f"{self.path}: changed while it was uploaded as LFS object {self.key}: {what}; nothing was stored under that oid",
            hint="write the object again and push again",
        )
        raise self.failure

    def close(self) -> None:
        self.file.close()


class _Ranges:
    """Collects byte ranges of an object out of a stream of its bytes that starts at some offset.
    A range keeps the blocks it spans (sliced at its ends) and joins them once: one copy, no zeroed
    buffer to fill."""

    def __init__(self, ranges: list[tuple[int, int]]) -> None:
        self.ranges = sorted(ranges)
        self.pieces: dict[tuple[int, int], list[bytes]] = {r: [] for r in self.ranges}
        self.next = 0
        self.active: list[tuple[int, int]] = []
        self.end = max(e for _, e in self.ranges)

    def feed(self, pos: int, data: bytes) -> None:
        stop = pos + len(data)
        while self.next < len(self.ranges) and self.ranges[self.next][0] < stop:
            self.active.append(self.ranges[self.next])
            self.next += 1
        for s, e in self.active:
            lo, hi = max(s, pos), min(e, stop)
            if lo < hi:
                self.pieces[(s, e)].append(data if lo == pos and hi == stop else data[lo - pos : hi - pos])
        self.active = [r for r in self.active if r[1] > stop]

    def result(self) -> dict[tuple[int, int], bytes]:
        return {r: b"".join(p) for r, p in self.pieces.items()}


def _message(resp: urllib3.BaseHTTPResponse, stream: bool) -> str:
    """HTTP status and the server's own message (LFS servers answer {"message": ...})."""
    text = f"HTTP {resp.status}"
    try:
        data = resp.read(1 << 16) if stream else resp.data
    except (urllib3.exceptions.HTTPError, OSError):
        data = b""
    try:
        body = json.loads(data)
        if isinstance(body, dict) and body.get("message"):
            text += f": {body['message']}"
            if body.get("documentation_url"):
                text += f" (see {body['documentation_url']})"
            return text
    except (ValueError, UnicodeDecodeError):
        pass
    snippet = data[:200].decode(errors="replace").strip() if data else ""
    return f"{text}: {snippet}" if snippet else text


def _discard(resp: urllib3.BaseHTTPResponse) -> None:
    """Done with an answer: read what is left of it so that its connection can serve the next request."""
    try:
        resp.drain_conn()
    except (urllib3.exceptions.HTTPError, OSError):
        resp.close()
    resp.release_conn()


class LfsStore:
    """A Git LFS server's batch API as a `BlobStore` (blobstore.py).

    `url` is "lfs" (the Git remote's own LFS server, found from `repo`'s config and .lfsconfig as
    git-lfs finds it; `remote` names the remote, else the branch's, else origin) or an explicit
    http(s) LFS URL (the batch endpoint is URL/objects/batch). `repo` is also where git's credential
    helpers are configured. `parallel` objects are uploaded at a time; transient failures are tried
    `retries` more times, waiting `backoff` seconds and doubling.

    Example (needs a server):
        store = LfsStore("lfs", Path("."))
        store.put([(store.key(p), p, p.stat().st_size) for p in packs])
    """

    def __init__(
        self,
        url: str,
        repo: Path,
        remote: str | None = None,
        *,
        parallel: int = 4,
        retries: int = 4,
        backoff: float = 0.5,
        timeout: float = 60.0,
    ) -> None:
        self.url = _redact(url)
        self.repo = Path(repo)
        config = _GitConfig(self.repo) if url == "lfs" else None
        self.download = lfs_endpoint(url, self.repo, remote, "download", config)
        self.upload = lfs_endpoint(url, self.repo, remote, "upload", config)
        self.parallel = max(1, parallel)
        self.retries = max(0, retries)
        self.backoff = backoff
        self._http = urllib3.PoolManager(
            num_pools=4,
            maxsize=self.parallel + 8,  # get() may be called from more threads; a full pool logs a warning per connection
            retries=False,
            timeout=urllib3.Timeout(connect=min(30.0, timeout), read=timeout),
            blocksize=BLOCK,
        )
        self._lock = threading.Lock()  # guards the totals and the caches below
        self._total = TransferStats()
        self._downloads: dict[str, _Action] = {}
        self._credentials: dict[str, _Credential] = {}
        self._usernames: dict[str, str] = {}
        self._fill_lock = threading.Lock()  # one credential prompt at a time
        for ep in (self.download, self.upload):
            if ep.username is not None and ep.password is not None:
                self._credentials[_origin(ep.url)] = _Credential(ep.username, ep.password)
            elif ep.username is not None:
                self._usernames[_origin(ep.url)] = ep.username

    def __enter__(self) -> LfsStore:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._http.clear()

    # ------------------------------------------------------------ BlobStore

    def key(self, path: Path) -> str:
        """The LFS oid of this file: SHA-256 hex of its content, read in blocks."""
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()

    def missing(self, objects: Sequence[tuple[str, int]]) -> list[str]:
        """The keys the server has not got: those its batch "upload" answer gives an upload action
        (so this needs write access, as a push does)."""
        call = TransferStats()
        wanted = list(dict.fromkeys((self._check_key(k), int(size)) for k, size in objects))
        out: list[str] = []
        for i in range(0, len(wanted), BATCH_OBJECTS):
            group = wanted[i : i + BATCH_OBJECTS]
            answer, asked_at = self._batch("upload", group, call)
            out += [k for k, _ in group if _action(answer[k], "upload", asked_at) is not None]
        return out

    def put(self, objects: Sequence[tuple[str, Path, int]], progress: Callable[[int], object] | None = None) -> TransferStats:
        """Upload what the server lacks, `parallel` objects at a time. `progress` is called from the
        upload threads, with the bytes of every attempt (a retried upload counts twice). A file that
        no longer has its key's content raises FileChanged, and nothing is stored under that key."""
        call = TransferStats()
        todo: dict[str, tuple[Path, int]] = {}
        for key, path, size in objects:
            todo.setdefault(self._check_key(key), (Path(path), int(size)))
        items = list(todo.items())
        with ThreadPoolExecutor(self.parallel, thread_name_prefix="lfs-upload") as pool:
            for i in range(0, len(items), BATCH_OBJECTS):
                group = items[i : i + BATCH_OBJECTS]
                answer, asked_at = self._batch("upload", [(k, size) for k, (_, size) in group], call)
                futures: list[Future[None]] = []
                for key, (path, size) in group:
                    action = _action(answer[key], "upload", asked_at)
                    if action is None:
                        self._count(call, skipped=key)
                        continue
                    verify = _action(answer[key], "verify", asked_at)
                    futures.append(pool.submit(self._upload, key, path, size, action, verify, call, progress))
                done, pending = wait(futures, return_when=FIRST_EXCEPTION)
                failed = [f for f in done if f.exception() is not None]
                if failed:
                    for f in pending:
                        f.cancel()
                    wait(pending)
                    failed[0].result()
        return call

    def get(self, key: str, ranges: Sequence[tuple[int, int]], size: int | None = None) -> list[bytes]:
        """The byte ranges [start, end) of one object. `size`, the object's size if the caller knows
        it, goes in the batch request (strict servers check it; without it the largest end is sent)."""
        self._check_key(key)
        asked = [(int(s), int(e)) for s, e in ranges]
        for s, e in asked:
            if s < 0 or e < s:
                raise InvalidArgument(f"LFS object {key}: range [{s}, {e}) is not a byte range")
        wanted = sorted({r for r in asked if r[1] > r[0]})
        got: dict[tuple[int, int], bytes] = {}
        call = TransferStats()
        if wanted:
            size_hint = size if size is not None else max(e for _, e in wanted)
            for again in (False, True):
                action = self._download_action(key, size_hint, call, refresh=again)
                try:
                    for span in coalesce(wanted, COALESCE_GAP):
                        if all(r in got for r in wanted if span[0] <= r[0] and r[1] <= span[1]):
                            continue
                        fetch = functools.partial(self._fetch, key, action, span, wanted, got, call)
                        self._attempts(f"download of LFS object {key}", action.href, fetch)
                    break
                except _Expired as e:
                    if again:
                        href = action.href.split("?")[0]
                        what = f"{self._where(self.download)}: download of LFS object {key}: {href} refused it ({e.message})"
                        if e.status in (401, 403):
                            raise BlobStoreAuthError(what, hint=CREDENTIALS_HINT) from None
                        raise BlobStoreError(what) from None
        return [got[r] if r[1] > r[0] else b"" for r in asked]

    def prefetch(self, objects: Sequence[tuple[str, int]]) -> None:
        """Ask for the download actions of these (key, size) in one batch request per 100 objects,
        so that get() of each needs no batch request of its own (beyond the BlobStore protocol)."""
        call = TransferStats()
        wanted = list(dict.fromkeys((self._check_key(k), int(size)) for k, size in objects))
        for i in range(0, len(wanted), BATCH_OBJECTS):
            group = wanted[i : i + BATCH_OBJECTS]
            answer, asked_at = self._batch("download", group, call)
            for key, _ in group:
                self._remember_download(key, answer[key], asked_at)

    def stats(self) -> TransferStats:
        with self._lock:
            t = self._total
            return TransferStats(t.requests, t.bytes_sent, t.bytes_received, list(t.skipped))

    # ------------------------------------------------------------ the batch API

    def _where(self, ep: Endpoint) -> str:
        return ep.url if self.url == ep.url else f"LFS store {self.url} ({ep.url}, {ep.source})"

    def _check_key(self, key: str) -> str:
        if not isinstance(key, str) or not _OID.fullmatch(key):
            raise InvalidArgument(f"{key!r} is not an LFS oid (64 lowercase hex digits of SHA-256)")
        return key

    def _batch(self, operation: str, objects: list[tuple[str, int]], call: TransferStats) -> tuple[dict[str, dict[str, Any]], float]:
        """The server's answer per oid to one batch request, and when it was asked (for expiries)."""
        ep = self.upload if operation == "upload" else self.download
        url = ep.url + "/objects/batch"
        body = json.dumps(
            {"operation": operation, "transfers": ["basic"], "objects": [{"oid": k, "size": s} for k, s in objects], "hash_algo": "sha256"}
        ).encode()
        headers = {"Accept": LFS_JSON, "Content-Type": LFS_JSON}
        what = f"batch {operation} request for {len(objects)} object(s) ({objects[0][0]}{', …' if len(objects) > 1 else ''})"
        asked_at = time.monotonic()

        def attempt() -> urllib3.BaseHTTPResponse:
            return self._send("POST", url, headers, call, what, ep, body=body)

        resp = self._attempts(what, url, attempt)
        if resp.status == 404:
            raise BlobStoreError(
                f"{self._where(ep)}: no Git LFS batch API at {url} ({_message(resp, False)})",
                hint="check the LFS URL (lfs.url, .lfsconfig, the remote's URL)",
            )
        if resp.status != 200:
            raise BlobStoreError(f"{self._where(ep)}: {what} refused: {_message(resp, False)}")
        try:
            answer = json.loads(resp.data)
            listed = answer["objects"]
            if not isinstance(listed, list):
                raise TypeError("objects is not a list")
            by_oid = {str(o["oid"]): o for o in listed if isinstance(o, dict)}
        except (ValueError, KeyError, TypeError) as e:
            raise BlobStoreError(
                f"{self._where(ep)}: {what}: the server's answer is not a batch response ({e}): {resp.data[:200]!r}"
            ) from e
        transfer = answer.get("transfer") or "basic"
        if transfer != "basic":
            raise BlobStoreError(f"{self._where(ep)}: {what}: the server chose transfer {transfer!r}; only 'basic' is spoken here")
        for oid, _ in objects:
            obj = by_oid.get(oid)
            if obj is None:
                raise BlobStoreError(f"{self._where(ep)}: {what}: the server's answer says nothing of object {oid}")
            error = obj.get("error")
            if error:
                code = error.get("code") if isinstance(error, dict) else None
                message = error.get("message") if isinstance(error, dict) else error
                if operation == "download" and code in (404, 410):
                    raise BlobStoreError(f"{self._where(ep)}: LFS object {oid} is not on the server (error {code}: {message})")
                raise BlobStoreError(f"{self._where(ep)}: {operation} of LFS object {oid} refused (error {code}: {message})")
        return by_oid, asked_at

    def _upload(
        self,
        key: str,
        path: Path,
        size: int,
        action: _Action,
        verify: _Action | None,
        call: TransferStats,
        progress: Callable[[int], object] | None,
    ) -> None:
        if not action.fresh():
            answer, asked_at = self._batch("upload", [(key, size)], call)
            fresh = _action(answer[key], "upload", asked_at)
            if fresh is None:  # stored by someone else in the meantime
                self._count(call, skipped=key)
                return
            action, verify = fresh, _action(answer[key], "verify", asked_at)
        try:
            actual = path.stat().st_size
        except OSError as e:
            raise FileChanged(f"{path}: cannot read it to upload LFS object {key}: {e}") from e
        if actual != size:
            raise FileChanged(f"{path}: is {actual} bytes, not the {size} of LFS object {key}; nothing was uploaded")
        headers = {"Content-Type": "application/octet-stream", **action.headers, "Content-Length": str(size)}
        what = f"upload of LFS object {key} ({path})"

        def attempt() -> None:
            def sent(n: int) -> None:
                self._count(call, sent=n)
                if progress is not None:
                    progress(n)

            resp = self._send(
                "PUT", action.href, headers, call, what, self.upload, body=lambda: _UploadBody(path, key, size, sent), action=action
            )
            if not 200 <= resp.status < 300:
                raise BlobStoreError(f"{self._where(self.upload)}: {what} refused: {_message(resp, False)}")

        self._attempts(what, action.href, attempt)
        if verify is not None:
            check = json.dumps({"oid": key, "size": size}).encode()
            vheaders = {**verify.headers, "Accept": LFS_JSON, "Content-Type": LFS_JSON}
            vwhat = f"verify of LFS object {key} after its upload"

            def verify_attempt() -> None:
                resp = self._send("POST", verify.href, vheaders, call, vwhat, self.upload, body=check, action=verify)
                if not 200 <= resp.status < 300:
                    raise BlobStoreError(
                        f"{self._where(self.upload)}: the server did not verify LFS object {key} after its upload: {_message(resp, False)}"
                    )

            self._attempts(vwhat, verify.href, verify_attempt)

    def _download_action(self, key: str, size: int, call: TransferStats, refresh: bool) -> _Action:
        with self._lock:
            cached = self._downloads.get(key)
        if cached is not None and cached.fresh() and not refresh:
            return cached
        answer, asked_at = self._batch("download", [(key, size)], call)
        return self._remember_download(key, answer[key], asked_at)

    def _remember_download(self, key: str, obj: dict[str, Any], asked_at: float) -> _Action:
        action = _action(obj, "download", asked_at)
        if action is None:
            raise BlobStoreError(f"{self._where(self.download)}: the batch answer for LFS object {key} has no download action")
        with self._lock:
            self._downloads[key] = action
        return action

    def _fetch(
        self,
        key: str,
        action: _Action,
        span: tuple[int, int],
        wanted: list[tuple[int, int]],
        got: dict[tuple[int, int], bytes],
        call: TransferStats,
    ) -> None:
        """One GET of `span`; a whole-object answer (200) serves every range still wanted."""
        what = f"download of LFS object {key}"
        where = self._where(self.download)
        headers = {**action.headers, "Range": f"bytes={span[0]}-{span[1] - 1}", "Accept-Encoding": "identity"}
        resp = self._send("GET", action.href, headers, call, what, self.download, stream=True, action=action, expired_ok=True)
        complete = False
        try:
            if resp.status in (401, 403, 404, 410):
                raise _Expired(resp.status, _message(resp, True))
            if resp.status == 416:
                raise BlobStoreError(f"{where}: LFS object {key} is shorter than the range [{span[0]}, {span[1]}) asked of it")
            if resp.status == 206:
                m = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", resp.headers.get("Content-Range", ""))
                if m is None or int(m.group(1)) != span[0]:
                    raise BlobStoreError(
                        f"{where}: {what}: asked bytes {span[0]}-{span[1] - 1}, "
                        f"the server sent Content-Range {resp.headers.get('Content-Range')!r}"
                    )
                if int(m.group(2)) + 1 < span[1]:
                    raise BlobStoreError(
                        f"{where}: LFS object {key} is {m.group(3)} bytes: shorter than the range [{span[0]}, {span[1]}) asked of it"
                    )
                todo = [r for r in wanted if span[0] <= r[0] and r[1] <= span[1] and r not in got]
                start = span[0]
            elif resp.status == 200:
                todo = [r for r in wanted if r not in got]
                start = 0
                length = resp.headers.get("Content-Length")
                end = max(e for _, e in todo)
                if length is not None and length.isdigit() and int(length) < end:
                    raise BlobStoreError(f"{where}: LFS object {key} is {length} bytes: shorter than the range ending at {end} asked of it")
            else:
                raise BlobStoreError(f"{where}: {what} refused: {_message(resp, True)}")
            ranges = _Ranges(todo)
            pos = start
            try:
                while pos < ranges.end:
                    block = resp.read(min(BLOCK, ranges.end - pos))
                    if not block:
                        raise BlobStoreError(f"{where}: LFS object {key} ended at byte {pos}, before byte {ranges.end} asked of it")
                    self._count(call, received=len(block))
                    ranges.feed(pos, block)
                    pos += len(block)
            except (urllib3.exceptions.HTTPError, OSError) as e:
                raise _Transient(f"the connection broke at byte {pos}: {e}") from e
            got.update(ranges.result())
            complete = resp.status == 206 and pos == span[1]
        finally:
            if not complete:
                resp.close()  # unread bytes stay on the connection: it must not go back to the pool
            resp.release_conn()

    # ------------------------------------------------------------ HTTP

    def _count(self, call: TransferStats, requests: int = 0, sent: int = 0, received: int = 0, skipped: str | None = None) -> None:
        with self._lock:
            for t in (call, self._total):
                t.requests += requests
                t.bytes_sent += sent
                t.bytes_received += received
                if skipped is not None:
                    t.skipped.append(skipped)

    def _attempts(self, what: str, url: str, attempt: Callable[[], T]) -> T:
        """`attempt()`, tried again after transient failures with exponential backoff."""
        delay = self.backoff
        for n in range(self.retries + 1):
            try:
                return attempt()
            except _Transient as e:
                last = e
                if n == self.retries:
                    break
                time.sleep(min(e.retry_after, 60.0) if e.retry_after is not None else delay)
                delay *= 2
        raise BlobStoreUnreachable(
            f"LFS store {self.url}: {what}: {url.split('?')[0]}: {last.reason} (gave up after {self.retries + 1} attempts)",
            hint="check that the LFS server is up and reachable, then run the command again: what was stored stays stored",
        )

    def _send(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        call: TransferStats,
        what: str,
        ep: Endpoint,
        body: bytes | Callable[[], _UploadBody] | None = None,
        stream: bool = False,
        action: _Action | None = None,
        expired_ok: bool = False,
    ) -> urllib3.BaseHTTPResponse:
        """One HTTP exchange: credentials added and asked for (one round on 401), redirects followed;
        raises _Transient for what another attempt may cure."""
        given_auth = action is not None and (action.authenticated or any(k.lower() == "authorization" for k in action.headers))
        for _hop in range(10):
            origin = _origin(url)
            sent_headers = {"User-Agent": USER_AGENT, **headers}
            with self._lock:
                credential = None if given_auth else self._credentials.get(origin)
            if credential is not None:
                sent_headers["Authorization"] = credential.header()
            data = body() if callable(body) else body
            try:
                resp = self._http.request(
                    method, url, headers=sent_headers, body=cast(Any, data), preload_content=not stream, redirect=False, retries=False
                )
            except urllib3.exceptions.SSLError as e:
                raise BlobStoreError(f"{self._where(ep)}: {what}: TLS failed for {url.split('?')[0]}: {e}") from e
            except urllib3.exceptions.LocationParseError as e:
                raise BlobStoreError(f"{self._where(ep)}: {what}: the server gave an unusable URL {url!r}: {e}") from e
            except (urllib3.exceptions.HTTPError, OSError) as e:
                if isinstance(data, _UploadBody) and data.failure is not None:
                    raise data.failure from None
                raise _Transient(str(getattr(e, "reason", None) or e)) from e
            finally:
                if isinstance(data, _UploadBody):
                    data.close()
                self._count(call, requests=1, sent=len(data) if isinstance(data, bytes) else 0)
            if not stream:
                self._count(call, received=len(resp.data))
            status = resp.status
            if status in REDIRECTS and resp.headers.get("Location"):
                _discard(resp)
                target = urljoin(url, resp.headers["Location"])
                if _origin(target) != origin:  # credentials meant for one host go to no other
                    headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
                if status == 303:
                    method, body = "GET", None
                url = target
                continue
            if status == 401 and not given_auth:
                message = _message(resp, stream)
                _discard(resp)
                self._authenticate(url, credential, what, ep, message)
                continue
            if status in (401, 403) and not expired_ok:
                message = _message(resp, stream)
                _discard(resp)
                raise BlobStoreAuthError(
                    f"{self._where(ep)}: {what}: {url.split('?')[0]} refused "
                    + ("the authorization the batch answer gave" if given_auth else "access")
                    + f" ({message})",
                    hint=CREDENTIALS_HINT,
                )
            if status in TRANSIENT_STATUS:
                retry_after = resp.headers.get("Retry-After", "")
                reason = _message(resp, stream)
                _discard(resp)
                raise _Transient(reason, float(retry_after) if retry_after.isdigit() else None)
            if credential is not None and credential.from_helper is not None and 200 <= status < 300:
                with self._lock:
                    approve, credential.approved = not credential.approved, True
                if approve:
                    self._credential_helper("approve", credential.from_helper)
            return resp
        raise BlobStoreError(f"{self._where(ep)}: {what}: too many redirects, the last to {url.split('?')[0]}")

    def _authenticate(self, url: str, used: _Credential | None, what: str, ep: Endpoint, message: str) -> None:
        """After a 401: have credentials for the next try (another thread's, or git's credential
        helpers'), or raise BlobStoreAuthError."""
        origin = _origin(url)
        with self._fill_lock:
            with self._lock:
                current = self._credentials.get(origin)
            if current is not None and current is not used:
                return  # another thread got credentials meanwhile
            if used is not None:
                with self._lock:
                    self._credentials.pop(origin, None)
                if used.from_helper is not None:
                    self._credential_helper("reject", used.from_helper)
                who = "git's credential helpers" if used.from_helper is not None else "the LFS URL"
                raise BlobStoreAuthError(
                    f"{self._where(ep)}: {what}: {origin} refused the credentials of user {used.username!r} from {who} ({message})",
                    hint=CREDENTIALS_HINT,
                )
            parts = urlsplit(url)
            fields = [f"protocol={parts.scheme.lower()}", f"host={parts.netloc.rpartition('@')[2]}", f"path={parts.path.lstrip('/')}"]
            if origin in self._usernames:
                fields.append(f"username={self._usernames[origin]}")
            out, err = self._credential_helper("fill", fields)
            got = dict(line.split("=", 1) for line in out if "=" in line)
            if "password" not in got:
                raise BlobStoreAuthError(
                    f"{self._where(ep)}: {what}: {origin} asks for credentials ({message}) and git's credential helpers gave none"
                    + (f": {err}" if err else ""),
                    hint=CREDENTIALS_HINT,
                )
            with self._lock:
                self._credentials[origin] = _Credential(got.get("username", ""), got["password"], out)

    def _credential_helper(self, verb: str, fields: list[str]) -> tuple[list[str], str]:
        """`git credential <verb>` run in the repository (so its config's helpers apply): its output lines and stderr."""
        cwd = self.repo if self.repo.is_dir() else None
        try:
            r = subprocess.run(
                ["git", "credential", verb],
                cwd=cwd,
                input="".join(f"{f}\n" for f in fields) + "\n",
                capture_output=True,
                text=True,
                check=False,
            )
        except OSError as e:
            return [], f"cannot run git credential {verb}: {e}"
        return r.stdout.splitlines(), r.stderr.strip()


if TYPE_CHECKING:

    def _is_a_blobstore(store: LfsStore) -> BlobStore:
        return store  # mypy checks that LfsStore has every member of the protocol


class _Expired(Exception):
    """A download href the server no longer honours (expired, or the object moved): ask the batch API again."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
