"""An S3-compatible bucket as a chunk store (`s3://bucket/prefix`), through `obstore`.

`obstore` wraps the Rust `object_store` crate: requests run on its own thread pool with the GIL
released, with retries and exponential backoff on 5xx answers and dropped connections.

Objects are named `<prefix>/frames/<BLAKE3 hex of content>`. Credentials come from the usual
places, never from the committed configuration: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
AWS_SESSION_TOKEN, else the profile AWS_PROFILE (default "default") of ~/.aws/credentials and
~/.aws/config (AWS_SHARED_CREDENTIALS_FILE / AWS_CONFIG_FILE move them). Region: the argument,
else AWS_REGION / AWS_DEFAULT_REGION, else the profile's, else us-east-1. Endpoint: the argument,
else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else the profile's `endpoint_url`, else AWS itself.

Example:
    >>> from theta_store.s3store import parse_url
    >>> parse_url("s3://weights/team/llama")
    ('weights', 'team/llama')
"""

from __future__ import annotations

import ast
import configparser
import ipaddress
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar
from urllib.parse import urlsplit

import obstore
from obstore.exceptions import AlreadyExistsError, PermissionDeniedError, UnauthenticatedError
from obstore.store import S3Store as _ObS3Store

from . import _native
from .blobstore import TransferStats, coalesce, file_key
from .errors import BlobStoreAuthError, BlobStoreCorrupt, BlobStoreError, BlobStoreUnreachable, FileChanged, InvalidArgument

if TYPE_CHECKING:
    from obstore.store import ClientConfig, RetryConfig, S3Config

T = TypeVar("T")
MiB = 1 << 20
# object_store's own coalescing gap: ranges closer than this are fetched with one GET
COALESCE_GAP = 1 * MiB
# S3 refuses multipart parts under 5 MiB (except the last one)
MIN_PART_SIZE = 5 * MiB

_STATUS = re.compile(r"status(?: code)?: (\d{3})")
_S3_CODE = re.compile(r"<Code>([^<]+)</Code>")


def parse_url(url: str) -> tuple[str, str]:
    """(bucket, prefix) of an `s3://bucket/prefix` URL; the prefix may be empty."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
        raise BlobStoreError(f"{url}: not an S3 chunk-store URL", hint="write it as s3://bucket or s3://bucket/prefix")
    return parts.netloc, parts.path.strip("/")


@dataclass(frozen=True)
class Credentials:
    access_key_id: str
    secret_access_key: str
    session_token: str | None
    source: str  # where they came from, for messages: "environment (AWS_ACCESS_KEY_ID)", "profile 'x' in /path"


@dataclass(frozen=True)
class _Profile:
    name: str
    credentials_file: Path
    config_file: Path
    credentials: Mapping[str, str]  # the profile's section of the credentials file ({} if none)
    config: Mapping[str, str]  # its section of the config file ({} if none)


def _read_ini(path: Path, section: str) -> Mapping[str, str]:
    if not path.is_file():
        return {}
    parser = configparser.RawConfigParser(default_section="\0none")
    try:
        parser.read(path, encoding="utf-8")
    except configparser.MissingSectionHeaderError as e:
        raise BlobStoreAuthError(f"{path}: line {e.lineno}: {e.line.strip()!r} is outside any [section]") from e
    except configparser.ParsingError as e:
        lineno, line = e.errors[0]  # the line comes repr()'d
        raise BlobStoreAuthError(f"{path}: line {lineno}: cannot parse {ast.literal_eval(line).strip()!r}") from e
    except (configparser.Error, UnicodeDecodeError) as e:
        raise BlobStoreAuthError(f"{path}: cannot read this AWS configuration file: {e}".replace("\n", " ")) from e
    return dict(parser[section]) if parser.has_section(section) else {}


def _profile(env: Mapping[str, str]) -> _Profile:
    name = env.get("AWS_PROFILE") or env.get("AWS_DEFAULT_PROFILE") or "default"
    home = Path(env.get("HOME") or os.path.expanduser("~"))
    credentials_file = Path(env.get("AWS_SHARED_CREDENTIALS_FILE") or home / ".aws" / "credentials")
    config_file = Path(env.get("AWS_CONFIG_FILE") or home / ".aws" / "config")
    config_section = name if name == "default" else f"profile {name}"
    return _Profile(name, credentials_file, config_file, _read_ini(credentials_file, name), _read_ini(config_file, config_section))


def resolve_credentials(env: Mapping[str, str], profile: _Profile) -> Credentials:
    """Credentials from the environment, else from the profile (credentials file, then config file)."""
    key, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        return Credentials(key, secret, env.get("AWS_SESSION_TOKEN") or None, "environment (AWS_ACCESS_KEY_ID)")
    if key or secret:
        lacking = "AWS_SECRET_ACCESS_KEY" if key else "AWS_ACCESS_KEY_ID"
        raise BlobStoreAuthError(f"AWS credentials in the environment are incomplete: {lacking} is not set", hint="set both or neither")
    for path, section in ((profile.credentials_file, profile.credentials), (profile.config_file, profile.config)):
        key, secret = section.get("aws_access_key_id"), section.get("aws_secret_access_key")
        if key and secret:
            return Credentials(key, secret, section.get("aws_session_token") or None, f"profile '{profile.name}' in {path}")
        if key or secret:
            raise BlobStoreAuthError(f"{path}: profile '{profile.name}' has only one of aws_access_key_id / aws_secret_access_key")
    raise BlobStoreAuthError(
        f"no AWS credentials: AWS_ACCESS_KEY_ID is not set and profile '{profile.name}' has none in "
        f"{profile.credentials_file} or {profile.config_file}",
        hint="export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or add the profile to ~/.aws/credentials (AWS_PROFILE picks one)",
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _message(e: BaseException) -> str:
    """obstore's message without its multi-line debug dump."""
    return str(e).split("\n\nDebug source:")[0].strip().replace("\n", " ")


class S3Store:
    """A bucket (or a prefix of one) on S3 or an S3-compatible server, as a `BlobStore`.

    Args:
        url: `s3://bucket/prefix`, as configured (shown in messages).
        endpoint: the server, e.g. `http://127.0.0.1:8333`; None: AWS_ENDPOINT_URL or AWS itself.
            Plain http only to a loopback address unless `allow_http`.
        region: the bucket's region; None: from the environment or profile, else us-east-1.
        env: where to read AWS_* variables and HOME (default: os.environ).
        parallel: objects transferred at once by `put` (HEADs by `missing` run 4x as many).
        part_size: objects larger than this go up in parts of this size (multipart upload).
        part_concurrency: parts of one object in flight at once; `put` holds at most about
            parallel * (part_concurrency + 1) parts in memory.
        max_retries, retry_timeout: per request, on 5xx answers and broken connections (seconds).
        timeout: seconds one request may take, connect_timeout: to connect.
    """

    def __init__(
        self,
        url: str,
        endpoint: str | None = None,
        region: str | None = None,
        *,
        env: Mapping[str, str] | None = None,
        allow_http: bool = False,
        parallel: int = 4,
        part_size: int = 8 * MiB,
        part_concurrency: int = 2,
        max_retries: int = 6,
        retry_timeout: float = 120.0,
        timeout: float = 300.0,
        connect_timeout: float = 10.0,
    ) -> None:
        if parallel < 1 or part_concurrency < 1 or part_size < MIN_PART_SIZE:
            raise InvalidArgument(f"S3Store: parallel and part_concurrency must be >= 1, part_size >= {MIN_PART_SIZE}")
        env = os.environ if env is None else env
        self.url = url
        self.bucket, self.prefix = parse_url(url)
        profile = _profile(env)
        self.credentials = resolve_credentials(env, profile)
        self.region = region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or profile.config.get("region") or "us-east-1"
        self.endpoint = (
            endpoint or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or profile.config.get("endpoint_url") or None
        )
        http = False
        if self.endpoint is not None:
            parts = urlsplit(self.endpoint)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise BlobStoreError(f"{url}: endpoint {self.endpoint!r} is not an http(s) URL", hint="e.g. https://s3.example.com")
            http = parts.scheme == "http"
            if http and not allow_http and not _is_loopback(parts.hostname):
                raise BlobStoreError(
                    f"{url}: endpoint {self.endpoint} is plain http to another machine: objects would cross the network unencrypted",
                    hint="use https, or an http endpoint on 127.0.0.1",
                )
        self.parallel = parallel
        self.part_size = part_size
        self.part_concurrency = part_concurrency
        client: ClientConfig = {
            "allow_http": http,
            "timeout": timedelta(seconds=timeout),
            "connect_timeout": timedelta(seconds=connect_timeout),
        }
        retry: RetryConfig = {
            "max_retries": max_retries,
            "retry_timeout": timedelta(seconds=retry_timeout),
            "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=15), "base": 2},
        }
        config: S3Config = {
            "region": self.region,
            "access_key_id": self.credentials.access_key_id,
            "secret_access_key": self.credentials.secret_access_key,
            "virtual_hosted_style_request": False,
        }
        if self.endpoint is not None:
            config["endpoint"] = self.endpoint
        if self.credentials.session_token is not None:
            config["session_token"] = self.credentials.session_token
        self._store = _ObS3Store(self.bucket, config=config, client_options=client, retry_config=retry)
        self._lock = threading.Lock()
        self._stats = TransferStats()
        self._bucket_checked = False
        self._bucket_lock = threading.Lock()
        # what missing() found lacking, so that the put() that follows need not ask again
        self._lacking: dict[str, int | None] = {}

    def __repr__(self) -> str:
        return f"S3Store({self.url!r}, endpoint={self.endpoint!r}, region={self.region!r})"

    def __enter__(self) -> S3Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ names

    def path(self, key: str) -> str:
        """The object's name in the bucket."""
        return f"{self.prefix}/frames/{key}" if self.prefix else f"frames/{key}"

    def key(self, path: Path) -> str:
        return file_key(path)

    # ------------------------------------------------------------------ errors

    def _count(self, stats: TransferStats, requests: int = 0, sent: int = 0, received: int = 0) -> None:
        with self._lock:
            for s in (stats, self._stats) if stats is not self._stats else (stats,):
                s.requests += requests
                s.bytes_sent += sent
                s.bytes_received += received

    def _error(self, e: Exception, what: str, key: str) -> BlobStoreError:
        """Our error for an obstore error, naming the store, the operation and the object."""
        text = _message(e)
        m = _S3_CODE.search(text)
        code = m.group(1) if m else ""
        m = _STATUS.search(text)
        status = int(m.group(1)) if m else 0
        where = f"{self.url}: {what} {self.path(key)}"
        if isinstance(e, (PermissionDeniedError, UnauthenticatedError)) or status in (401, 403):
            problem = self._bucket_problem()
            if problem is not None:
                return problem
            return BlobStoreAuthError(
                f"{where}: the server refused the credentials from {self.credentials.source} ({status or 403} {code or 'Forbidden'})",
                hint="check the access key and secret (and that they may read and write this bucket)",
            )
        if status == 404 and code == "NoSuchBucket":
            return self._no_bucket()
        if code in ("PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException"):
            return BlobStoreError(
                f"{where}: {text}", hint=f"the bucket is not in region {self.region}: set AWS_REGION (or the profile's region) to it"
            )
        if status >= 500 or (status == 0 and not isinstance(e, (FileNotFoundError, AlreadyExistsError, ValueError))):
            return BlobStoreUnreachable(
                f"{where}: no answer from {self.endpoint or 'AWS S3'} after retries: {text}",
                hint="check that the server is up and reachable; a re-run resumes where this one stopped",
            )
        return BlobStoreError(f"{where}: {text}")

    def _no_bucket(self) -> BlobStoreError:
        return BlobStoreError(
            f"{self.url}: bucket '{self.bucket}' does not exist on {self.endpoint or 'AWS S3'}",
            hint=f"create it (aws s3 mb s3://{self.bucket}), or correct the URL in .thetastore",
        )

    def _bucket_problem(self) -> BlobStoreError | None:
        """A missing bucket, told apart from a missing object or a refusal (HEAD answers carry no
        error code, and a server may answer a PUT into a missing bucket with 403): one GET's error
        code says which, once per store object."""
        with self._bucket_lock:
            return self._probe_bucket()

    def _probe_bucket(self) -> BlobStoreError | None:
        if self._bucket_checked:
            return None
        self._count(self._stats, requests=1)
        try:
            obstore.get(self._store, self.path("bucket-probe")).bytes()
        except FileNotFoundError as e:
            if "NoSuchBucket" in str(e):
                return self._no_bucket()
        except Exception:
            pass  # the caller reports its own error
        self._bucket_checked = True
        return None

    # ------------------------------------------------------------------ missing

    def _head(self, key: str, stats: TransferStats) -> int | None:
        """The stored object's size, None if there is none."""
        self._count(stats, requests=1)
        try:
            meta = obstore.head(self._store, self.path(key))
        except FileNotFoundError:
            problem = self._bucket_problem()
            if problem is not None:
                raise problem from None
            return None
        except Exception as e:
            raise self._error(e, "HEAD", key) from e
        return int(meta["size"])

    def missing(self, objects: Sequence[tuple[str, int]]) -> list[str]:
        """Keys with no object, by one HEAD each (the sizes are not compared: callers may not know
        them; `put` replaces a stored object whose size differs from the file's). `put` does not
        ask again about the keys returned here."""
        stats = TransferStats()
        with ThreadPoolExecutor(max_workers=min(4 * self.parallel, max(1, len(objects))), thread_name_prefix="s3-head") as pool:
            sizes = _run_all(pool, [partial(self._head, key, stats) for key, _ in objects])
        lacking = [key for (key, _), stored in zip(objects, sizes, strict=True) if stored is None]
        with self._lock:
            self._lacking.update(dict.fromkeys(lacking))
        return lacking

    # ------------------------------------------------------------------ put

    def put(self, objects: Sequence[tuple[str, Path, int]], progress: Callable[[int], object] | None = None) -> TransferStats:
        """Upload these (key, file, size) that the store lacks, `parallel` at a time: one HEAD each
        tells (none for the keys an earlier `missing` reported lacking).

        Each file is read once, in blocks, and its BLAKE3 digest checked against its key before the
        object is completed: a file that changed since its key was computed raises FileChanged and
        leaves nothing under the key. `progress` gets the bytes of each block handed to the
        uploader (at most `part_concurrency` parts ahead of the server), from worker threads one at
        a time; objects skipped are not counted in it.
        """
        stats = TransferStats()
        report_lock = threading.Lock()

        def report(n: int) -> None:
            if progress is not None:
                with report_lock:
                    progress(n)

        unique = list({key: (key, path, size) for key, path, size in objects}.values())
        with ThreadPoolExecutor(max_workers=min(self.parallel, max(1, len(unique))), thread_name_prefix="s3-put") as pool:
            _run_all(pool, [partial(self._put_one, key, path, size, stats, report) for key, path, size in unique])
        return stats

    def _put_one(self, key: str, path: Path, size: int, stats: TransferStats, report: Callable[[int], None]) -> None:
        # Trusting an earlier missing() is safe: if the object arrived since, the single PUT's
        # If-None-Match refuses ours, and a multipart upload stores the same bytes again.
        with self._lock:
            known = key in self._lacking
            stored = self._lacking.pop(key, None)
        if not known:
            stored = self._head(key, stats)
        if stored == size:
            with self._lock:
                stats.skipped.append(key)
                self._stats.skipped.append(key)
            return
        actual = os.stat(path).st_size
        if actual != size:
            raise FileChanged(f"{path}: is {actual} bytes, not the {size} expected for {key}: nothing was uploaded")
        name = self.path(key)
        try:
            if size <= self.part_size:
                data = Path(path).read_bytes()
                self._check(path, key, size, data)
                # If-None-Match: a concurrent push of the same object wins and ours is dropped; a
                # damaged object (another size) is replaced, which put-if-absent would refuse.
                mode: Literal["create", "overwrite"] = "create" if stored is None else "overwrite"
                self._count(stats, requests=1)
                try:
                    obstore.put(self._store, name, data, mode=mode, use_multipart=False)
                except AlreadyExistsError:
                    with self._lock:
                        stats.skipped.append(key)
                        self._stats.skipped.append(key)
                    return
                self._count(stats, sent=size)
                report(size)
            else:
                # object_store sends multipart uploads without If-None-Match; the key names the content,
                # so a concurrent upload of the same key completes with the same bytes.
                parts = -(-size // self.part_size)
                self._count(stats, requests=parts + 2)  # create, parts, complete
                obstore.put(
                    self._store,
                    name,
                    self._blocks(path, key, size, stats, report),
                    use_multipart=True,
                    chunk_size=self.part_size,
                    max_concurrency=self.part_concurrency,
                )
        except (BlobStoreError, FileChanged):
            raise
        except Exception as e:
            raise self._error(e, "PUT", key) from e

    def _blocks(self, path: Path, key: str, size: int, stats: TransferStats, report: Callable[[int], None]) -> Iterator[bytes]:
        """The file in parts, checked against its key before the last part is let go (raising here
        aborts the multipart upload: nothing is completed under the key)."""
        h = _native.Hasher()
        done = 0
        with open(path, "rb") as f:
            while True:
                block = f.read(self.part_size)
                done += len(block)
                h.update(block)
                if len(block) < self.part_size or done >= size:
                    if f.read(1) or done != size:
                        raise FileChanged(f"{path}: changed while it was uploaded as {key} (size): nothing was stored under the key")
                    if h.digest().hex() != key:
                        raise FileChanged(f"{path}: its content no longer hashes to {key}: nothing was stored under the key")
                    if block:
                        self._count(stats, sent=len(block))
                        yield block
                        report(len(block))
                    return
                self._count(stats, sent=len(block))
                yield block
                report(len(block))

    def _check(self, path: Path, key: str, size: int, data: bytes) -> None:
        h = _native.Hasher()
        h.update(data)
        if len(data) != size or h.digest().hex() != key:
            raise FileChanged(f"{path}: its content no longer hashes to {key}: nothing was uploaded")

    # ------------------------------------------------------------------ get

    def prefetch(self, objects: Sequence[tuple[str, int]]) -> None:
        """Nothing to ask ahead: an S3 key is where the object is."""

    def get(self, key: str, ranges: Sequence[tuple[int, int]], size: int | None = None) -> list[bytes]:
        """The byte ranges [start, end) of one object, in the order asked; ranges less than 1 MiB
        apart are fetched by one GET. The bytes are returned as stored: checking them is the caller's."""
        for start, end in ranges:
            if not 0 <= start <= end:
                raise InvalidArgument(f"{self.url}: range [{start}, {end}) of {self.path(key)} is not a range")
        spans = coalesce([r for r in ranges if r[0] < r[1]], COALESCE_GAP)
        if not spans:
            return [b"" for _ in ranges]
        self._count(self._stats, requests=len(spans))
        try:
            got = obstore.get_ranges(self._store, self.path(key), starts=[s for s, _ in spans], ends=[e for _, e in spans])
        except FileNotFoundError as e:
            problem = self._bucket_problem()
            if problem is not None:
                raise problem from None
            raise BlobStoreError(f"{self.url}: {self.path(key)} is not in the store", hint="push it again from a clone that has it") from e
        except Exception as e:
            raise self._error(e, "GET", key) from e
        self._count(self._stats, received=sum(len(b) for b in got))
        out: list[bytes] = []
        for start, end in ranges:
            if start == end:
                out.append(b"")
                continue
            i = _span_of(spans, start, end)
            view = memoryview(got[i])
            piece = bytes(view[start - spans[i][0] : end - spans[i][0]])
            if len(piece) != end - start:
                raise BlobStoreCorrupt(
                    f"{self.url}: {self.path(key)} ends at byte {spans[i][0] + len(view)}, before the range [{start}, {end}) asked",
                    hint="the object is truncated: push it again from a clone that has it",
                )
            out.append(piece)
        return out

    def stats(self) -> TransferStats:
        with self._lock:
            s = self._stats
            return TransferStats(s.requests, s.bytes_sent, s.bytes_received, list(s.skipped))

    def close(self) -> None:
        """Nothing to release: object_store's connection pool goes with the object."""


def _span_of(spans: list[tuple[int, int]], start: int, end: int) -> int:
    lo, hi = 0, len(spans) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if spans[mid][0] <= start:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _run_all(pool: ThreadPoolExecutor, jobs: Sequence[Callable[[], T]]) -> list[T]:
    """Run the jobs, stop scheduling on the first error and raise it; else their results in order."""
    futures: list[Future[T]] = [pool.submit(job) for job in jobs]
    _, pending = wait(futures, return_when=FIRST_EXCEPTION)
    for f in futures:
        if f.done() and f.exception() is not None:
            for p in pending:
                p.cancel()
            wait(pending)
            raise f.exception()  # type: ignore[misc]
    return [f.result() for f in futures]
