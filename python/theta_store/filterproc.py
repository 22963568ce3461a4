"""git's long-running filter process (`filter.thetastore.process`), pkt-line protocol version 2.

Git-facing: git starts this (see repo.py for the two parts).

clean  (git add, git status): the checkpoint streams in; out goes its pointer. The stream is hashed
       as it arrives and compared with the work-tree file; if they match, the work-tree file is
       stored directly (no temporary copy). A content-addressed cache (file BLAKE3 -> pointer) makes
       re-cleaning an unchanged file cost one pass of hashing: this is what `touch; git status` pays.
smudge (checkout, clone): the pointer comes in; out go the checkpoint's bytes, decoded by the core
       and verified. A version not present locally is fetched from the remote; when git allows
       (`can-delay`), missing versions are collected and fetched in one batch.
       With `thetastore.skipDownloadErrors` (or THETA_STORE_SKIP_DOWNLOAD_ERRORS=1) on, a version
       that is damaged or cannot be fetched is answered with the pointer itself and the error goes
       to stderr, like Git LFS's `lfs.skipdownloaderrors`: checkout, stash and rebase go on.
"""

from __future__ import annotations

import contextlib
import os
import struct
import sys
import threading

from . import _native
from .errors import CorruptObject, FormatError, ObjectNotFound, PointerError, ProtocolError, ThetaStoreError
from .hooks import looks_installed
from .plan import damaged_chunk, drop_plan, load_plan, pack_lock, plan_for, ref_name
from .pointer import POINTER_MAX, Pointer, looks_like_pointer

# Not typing, pathlib or re: this module starts with every filter process git runs (see
# __init__.py). Type checkers treat any TYPE_CHECKING as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator
    from typing import BinaryIO

    from .gitstore import GitStore
    from .plan import ReadPlan
    from .progress import StatusLine

MAX_PKT_DATA = 65516
_HEX_DIGITS = b"0123456789abcdefABCDEF"
_CACHE_REC = struct.Struct("<32sH")


class PktIO:
    """pkt-line I/O on git's pipes. Reads are exact (no read-ahead), so that the content of a
    request can be handed to the Rust core, which reads it from the same pipe."""

    def __init__(self, rfd: int, wfile: BinaryIO) -> None:
        self.rfd = rfd
        self.w = wfile

    def _read(self, n: int) -> bytes:
        parts, left = [], n
        while left:
            b = os.read(self.rfd, left)
            if not b:
                raise EOFError
            parts.append(b)
            left -= len(b)
        return b"".join(parts)

    def read_pkt(self) -> bytes | None:
        """One packet's payload, or None for a flush packet."""
        head = self._read(4)
        # Four hex digits exactly, as git writes them: int() alone would take "+00a" or " 1f ".
        if not all(c in _HEX_DIGITS for c in head):
            raise ProtocolError(f"bad pkt-line header {head!r}")
        n = int(head, 16)
        if n == 0:
            return None
        if not 4 < n <= MAX_PKT_DATA + 4:
            raise ProtocolError(f"bad pkt-line length {n} (header {head!r})")
        return self._read(n - 4)

    def read_text_list(self) -> list[str]:
        out = []
        while (p := self.read_pkt()) is not None:
            # A path git sends is bytes, not always UTF-8: decoded as the file system's names are.
            out.append(os.fsdecode(p).rstrip("\n"))
        return out

    def read_stream(self) -> Iterator[bytes]:
        while (p := self.read_pkt()) is not None:
            yield p

    def write_pkt(self, data: bytes) -> None:
        self.w.write(b"%04x" % (len(data) + 4) + data)

    def write_text(self, *lines: str) -> None:
        for line in lines:
            self.write_pkt(line.encode() + b"\n")

    def flush_pkt(self) -> None:
        self.w.write(b"0000")
        self.w.flush()

    def write_stream(self, data: bytes | memoryview) -> None:
        mv = memoryview(data)
        for i in range(0, len(mv), MAX_PKT_DATA):
            self.write_pkt(bytes(mv[i : i + MAX_PKT_DATA]))


class CleanCache:
    """file BLAKE3 -> pointer bytes, appended as records to <git dir>/theta-store/clean.cache."""

    def __init__(self, state_dir: str) -> None:
        self.path = os.path.join(state_dir, "clean.cache")
        self.entries: dict[bytes, bytes] = {}
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            data = b""
        pos = 0
        while pos + _CACHE_REC.size <= len(data):
            h, n = _CACHE_REC.unpack_from(data, pos)
            pos += _CACHE_REC.size
            if pos + n > len(data):
                break
            self.entries[h] = data[pos : pos + n]
            pos += n
        self.sizes = _sizes(self.entries.values())

    def may_hold(self, size: int) -> bool:
        """False if no cached pointer is of a file of this size: the clean will be a miss."""
        return size in self.sizes

    def get(self, repo: Repository, file_hash: bytes) -> bytes | None:
        ptr = self.entries.get(file_hash)
        if ptr is None:
            return None
        try:
            p = Pointer.parse(ptr)
        except ThetaStoreError:
            return None
        return ptr if repo.has_version(p.manifest_id) else None

    def put(self, file_hash: bytes, pointer: bytes) -> None:
        if self.entries.get(file_hash) == pointer:
            return
        self.entries[file_hash] = pointer
        self.sizes |= _sizes([pointer])
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "ab") as f:
            f.write(_CACHE_REC.pack(file_hash, len(pointer)) + pointer)


def _sizes(pointers: Iterable[bytes]) -> set[int]:
    """The file sizes these pointers name (their "size N" lines), without parsing them whole."""
    return {int(v[5:]) for p in pointers for v in p.split(b"\n") if v.startswith(b"size ") and v[5:].isdigit()}


def clean(repo: Repository, pathname: str, rfd: int) -> bytes:
    """Turn the checkpoint git streams on `rfd` into its pointer.

    The Rust core reads the content packets and hashes them. A known hash answers from the clean
    cache. Otherwise the work-tree file is stored (and must hash the same), or, when there is
    none, a copy of the stream (same extension: format detection must judge the copy as it
    would the file).
    """
    # When the work-tree file exists, git is streaming it: only hash. Re-cleaning an unchanged file
    # is the hot path of `touch; git status`: it needs neither dulwich nor the object store. When
    # no cached pointer is of this size, the clean is a miss: the store opens meanwhile. A miss
    # re-reads the file and checks its hash. git runs filters at the top of the work tree, so
    # `pathname` names the file from here. Without a work-tree file, keep a copy of what git sends.
    try:
        if os.path.isfile(pathname):
            if not repo.cache.may_hold(os.path.getsize(pathname)):
                repo.prefetch()
            total, digest, head, spill = _native.receive_content(f"/dev/fd/{rfd}", pathname, None, POINTER_MAX + 1, compare=False)
        else:
            repo.prefetch()
            os.makedirs(repo.state_dir, exist_ok=True)
            total, digest, head, spill = _native.receive_content(f"/dev/fd/{rfd}", None, repo.state_dir, POINTER_MAX + 1, compare=True)
    except ProtocolError:
        raise
    except Exception as e:  # the core reads ahead: where the stream stopped is unknown, so no answer can follow
        raise ProtocolError(f"clean {pathname}: reading the content git sent failed: {_message(e)}") from None
    try:
        if spill is not None:
            named = spill + os.path.splitext(pathname)[1]
            os.replace(spill, named)
            spill = named
        if total <= POINTER_MAX and looks_like_pointer(head):
            # Already a pointer (a THETA_STORE_SKIP_SMUDGE checkout): cleaning is the identity. A
            # damaged one (edited by hand, a merge of two pointers) must not reach a commit.
            try:
                Pointer.parse(head, pathname)
            except PointerError as e:
                raise PointerError(
                    f"{pathname} is a damaged theta-store pointer: {_strip(e.args[0], pathname)}",
                    hint=f"`git checkout -- {pathname}` puts the committed version back",
                ) from None
            return head
        cached = repo.cache.get(repo, digest)
        if cached is not None:
            return cached
        from .bases import base_version, delta_depth  # imported when needed: a filter that only re-hashes starts faster
        from .checkpoint import add_file

        try:
            depth = delta_depth(repo.store)
            base = base_version(repo.store, pathname) if depth else None
            result = add_file(repo.store, spill or os.path.abspath(pathname), progress=False, base=base, max_depth=depth)
        except FormatError as e:  # name the file as the user knows it, not our copy of it
            raise FormatError(pathname, e.where, e.problem, hint=e.hint) from None
        if result.pointer.blake3 != digest:
            raise ThetaStoreError(
                f"{pathname}: what git sent is not the file in the work tree (it changed while git read it?)",
                hint=f"run `git add {pathname}` again",
            )
        ptr = result.pointer.to_bytes()
        repo.cache.put(digest, ptr)
        return ptr
    finally:
        if spill is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(spill)


def _strip(message: str, pathname: str) -> str:
    return message.removeprefix(f"{pathname}: ")


def _parse_pointer(data: bytes, pathname: str) -> Pointer:
    try:
        return Pointer.parse(data, pathname)
    except PointerError as e:
        raise PointerError(
            f"the commit holds a damaged theta-store pointer: {_strip(e.args[0], pathname)}",
            hint="check out another commit, or commit the checkpoint again",
        ) from None


def _damaged(ptr: Pointer, e: BaseException, chunk: str = "") -> ThetaStoreError:
    """An error while decoding a stored version, said as such (with the chunk, if known), with what to do."""
    if isinstance(e, CorruptObject) and ptr.manifest_id.hex()[:16] in e.args[0] and not chunk:
        return e  # it names the version and the object already
    own = isinstance(e, ThetaStoreError) and bool(e.args)
    hint = (
        e.hint
        if isinstance(e, ThetaStoreError) and e.hint
        else "`theta-store fsck` lists what is damaged; a clone of the remote has an intact copy"
    )
    return CorruptObject(
        f"checkpoint version {ptr.manifest_id.hex()[:16]} is damaged in this repository{chunk}: {e.args[0] if own else _message(e)}",
        hint=hint,
    )


def _skip_download_errors() -> bool:
    """`THETA_STORE_SKIP_DOWNLOAD_ERRORS`, else git config `thetastore.skipDownloadErrors`; off by default."""
    env = os.environ.get("THETA_STORE_SKIP_DOWNLOAD_ERRORS")
    if env is not None:
        return env.strip().lower() in ("1", "true", "yes", "on")
    import subprocess

    r = subprocess.run(["git", "config", "--type=bool", "--get", "thetastore.skipDownloadErrors"], capture_output=True, text=True)
    return r.returncode == 0 and r.stdout.strip() == "true"


def _message(e: BaseException) -> str:
    if isinstance(e, ThetaStoreError):
        return (e.args[0] if e.args else "") + (f" (hint: {e.hint})" if e.hint else "")
    if isinstance(e, OSError):
        return str(e)
    return f"{type(e).__name__}: {e}"


class FilterServer:
    """One conversation with git: handshake, then clean / smudge / list_available_blobs requests."""

    def __init__(self, io: PktIO, repo: Repository) -> None:
        self.io = io
        self.repo = repo
        self.skip_smudge = os.environ.get("THETA_STORE_SKIP_SMUDGE") == "1"
        self.out_fd = sys.stdout.fileno()
        self.delayed: dict[str, Pointer] = {}  # smudges answered "delayed": fetched in one batch
        self.ready: dict[str, Pointer] = {}  # fetched (or failed): git asks for them again
        self.failed: dict[str, ThetaStoreError] = {}
        self.raw: dict[str, bytes] = {}  # the pointer of each delayed file, passed through if it fails
        self._skip_errors: bool | None = None  # thetastore.skipDownloadErrors, read at the first smudge
        # Progress ("Filtering content: 3/7 checkpoints, 1.2/4.1 GB"), on a terminal only. Counted
        # per file: the core sends a file without reporting how far it is.
        self.line: StatusLine | None = None
        self.show_progress: bool | None = None  # decided at the first smudge of a pointer
        self.done = self.done_bytes = self.failed_count = 0
        self.total: tuple[int, int] | None = None  # known once git has asked for every file

    def serve(self) -> int:
        while True:
            try:
                headers = self.io.read_text_list()
            except EOFError:
                return 0
            meta = dict(h.split("=", 1) for h in headers if "=" in h)
            command = meta.get("command", "")
            pathname = meta.get("pathname", "")
            if command == "list_available_blobs":
                self.list_available()
                continue
            try:
                if command == "clean":
                    self.reply(clean(self.repo, pathname, self.io.rfd))
                    continue
                try:
                    content = b"".join(self.io.read_stream())
                except EOFError:
                    raise ProtocolError(f"{command} {pathname}: git closed the pipe in the middle of a request") from None
                if command == "smudge":
                    self.smudge(pathname, content, meta.get("can-delay") == "1")
                else:
                    raise ThetaStoreError(f"unknown filter command {command!r}")
            except ProtocolError:  # the stream is out of step: no answer git could read can follow
                raise
            except Exception as e:  # the request was read whole: tell git this file failed, serve the next
                if command == "smudge" and self.skip_errors:
                    self.pass_through(pathname, content, e)
                    continue
                self.say(f"theta-store: {command} {pathname}: {_message(e)}")  # pauses the line
                self.io.write_text("status=error")
                self.io.flush_pkt()

    @property
    def skip_errors(self) -> bool:
        if self._skip_errors is None:
            self._skip_errors = _skip_download_errors()
        return self._skip_errors

    def pass_through(self, pathname: str, content: bytes, e: BaseException) -> None:
        """A smudge that failed, answered with its pointer (the error printed): thetastore.skipDownloadErrors."""
        data = content or self.raw.pop(pathname, b"")  # git sends no content when it asks for a delayed file again
        self.say(
            f"theta-store: smudge {pathname}: {_message(e)}\n"
            f"theta-store: {pathname}: left as its pointer (thetastore.skipDownloadErrors is on); "
            "`theta-store restore` rebuilds it once the version is intact"
        )
        self.reply(data)

    def say(self, message: str) -> None:
        if self.line is not None:
            self.line.say(message)
        else:
            print(message, file=sys.stderr)

    def progress(self) -> None:
        """Redraw the progress line with what is known (starting it at the first smudge)."""
        if self.show_progress is None:
            self.show_progress = _progress_wanted()
        if not self.show_progress:
            return
        from .progress import StatusLine
        from .sizes import human_progress

        if self.line is None:
            self.line = StatusLine()
        n = self.done
        if self.total is not None and n + self.failed_count <= self.total[0]:
            count, size = f"{n}/{self.total[0]}", human_progress(self.done_bytes, self.total[1])
        else:
            count, size = f"{n}", human_progress(self.done_bytes)
        text = f"Filtering content: {count} checkpoint{'' if count == '1' else 's'}, {size}"
        if self.delayed:
            text += f"; {len(self.delayed)} to fetch, {human_progress(sum(p.size for p in self.delayed.values()))}"
        if self.failed_count:
            text += f"; {self.failed_count} failed"
        self.line.set(text)

    def close(self) -> None:
        """The end of the conversation: clear the progress line."""
        if self.line is not None:
            self.line.close()
            self.line = None

    def hold(self) -> contextlib.AbstractContextManager[None]:
        """Around a fetch: git fetch's own progress gets the terminal line meanwhile."""
        return self.line.hold() if self.line is not None else contextlib.nullcontext()

    def rest(self) -> None:
        """Before each answer's last packet: git may print once it has it, so the line goes."""
        if self.line is not None:
            self.line.pause()

    def reply(self, data: bytes) -> None:
        self.rest()
        self.io.write_text("status=success")
        self.io.flush_pkt()
        self.io.write_stream(data)
        self.io.flush_pkt()
        self.io.flush_pkt()

    @property
    def store(self) -> GitStore:
        return self.repo.store

    def smudge(self, pathname: str, data: bytes, can_delay: bool) -> None:
        if pathname in self.failed:
            self.ready.pop(pathname, None)
            self.failed_count += 1
            raise self.failed.pop(pathname)
        if pathname in self.ready:
            ptr = self.ready.pop(pathname)  # git sends no content the second time
        elif looks_like_pointer(data) and not self.skip_smudge:
            ptr = _parse_pointer(data, pathname)
        else:
            self.reply(data)  # not a pointer (a file committed before it was tracked), or pointers wanted
            return
        self.progress()
        # Shared: no gc or rollup removes a pack between the plan naming it and the core opening it.
        with pack_lock(self.repo.state_dir, shared=True):
            self._send(pathname, data, ptr, can_delay)

    def _send(self, pathname: str, data: bytes, ptr: Pointer, can_delay: bool) -> None:
        plan: ReadPlan | None = load_plan(self.repo.state_dir, ptr)
        if plan is None:
            self.repo.prefetch()
            if not self.repo.has_version(ptr.manifest_id):
                if can_delay:
                    self.delayed[pathname] = ptr
                    self.raw[pathname] = data
                    self.rest()
                    self.io.write_text("status=delayed")
                    self.io.flush_pkt()
                    return
                from .remote import ensure_versions

                with self.hold():
                    ensure_versions(self.store, {ptr.manifest_id}, quiet=True)
            try:
                plan = plan_for(self.store, ptr)
            except (PointerError, ObjectNotFound):
                raise
            except Exception as e:  # fail before announcing success when we can
                raise _damaged(ptr, e) from None
        if plan.deflated is not None:
            self._smudge_rebuilt(pathname, ptr, plan)
            return
        if self.skip_errors:
            # Once git has "status=success" the file can only fail, not become its pointer: decode
            # the version once to nowhere first, so damage is found while the pointer can still go.
            try:
                _native.send_file(os.devnull, plan.native(), plan.packs, plan.size, plan.blake3, self.repo.read_object, plan.native_bases())
            except Exception as e:
                drop_plan(self.repo.state_dir, ptr.manifest_id)
                raise _damaged(ptr, e, damaged_chunk(plan, self.repo.read_object)) from None
        self.io.write_text("status=success")
        self.io.flush_pkt()
        try:
            _native.send_file(
                f"/dev/fd/{self.out_fd}", plan.native(), plan.packs, plan.size, plan.blake3, self.repo.read_object, plan.native_bases()
            )
        except Exception as e:  # git drops what it got so far: the working file is never half-written
            drop_plan(self.repo.state_dir, ptr.manifest_id)
            self.failed_count += 1
            self.say(f"theta-store: smudge {pathname}: {_message(_damaged(ptr, e, damaged_chunk(plan, self.repo.read_object)))}")
            self.io.flush_pkt()
            self.io.write_text("status=error")
            self.io.flush_pkt()
            return
        self.done += 1
        self.done_bytes += plan.size
        self.rest()
        self.io.flush_pkt()
        self.io.flush_pkt()

    def _smudge_rebuilt(self, pathname: str, ptr: Pointer, plan: ReadPlan) -> None:
        """Smudge a file stored expanded (theta_store.deflated): deflating cannot keep up with a
        stream, so the file is rebuilt and checked on disk first (nameless temporaries in the
        state folder), then sent; any damage is found before git has "status=success"."""
        from .deflated import rebuild, temporary

        assert plan.deflated is not None
        near = os.path.join(self.repo.state_dir, "smudge")
        with temporary(near) as expanded, temporary(near) as real:
            xp, rp = f"/proc/self/fd/{expanded.fileno()}", f"/proc/self/fd/{real.fileno()}"
            try:
                _native.restore_file(
                    xp, plan.native(), plan.packs, plan.size, plan.blake3, self.repo.read_object, None, plan.native_bases()
                )
                rebuild(xp, rp, plan.deflated)
            except Exception as e:
                raise _damaged(ptr, e, damaged_chunk(plan, self.repo.read_object)) from None
            expanded.close()
            self.io.write_text("status=success")
            self.io.flush_pkt()
            try:
                _native.send_path(f"/dev/fd/{self.out_fd}", rp)
            except Exception as e:  # git drops what it got so far
                self.failed_count += 1
                self.say(f"theta-store: smudge {pathname}: {_message(_damaged(ptr, e))}")
                self.io.flush_pkt()
                self.io.write_text("status=error")
                self.io.flush_pkt()
                return
        self.done += 1
        self.done_bytes += plan.deflated.size
        self.rest()
        self.io.flush_pkt()
        self.io.flush_pkt()

    def list_available(self) -> None:
        from .errors import VersionsMissing
        from .remote import ensure_versions

        if self.delayed:
            try:
                with self.hold():
                    ensure_versions(self.store, {p.manifest_id for p in self.delayed.values()}, quiet=True)
            except VersionsMissing as e:
                for path, p in self.delayed.items():
                    if p.manifest_id in e.missing:
                        self.failed[path] = VersionsMissing({p.manifest_id}, e.tried)
            except ThetaStoreError as e:
                self.failed.update(dict.fromkeys(self.delayed, e))
            except Exception as e:  # each delayed file gets this as its answer; the process goes on
                self.failed.update(dict.fromkeys(self.delayed, ThetaStoreError(f"fetching checkpoint versions failed: {_message(e)}")))
            self.ready.update(self.delayed)
            self.delayed.clear()
            # git asks for the delayed files once it has asked for every other one: the total is known
            self.total = (
                self.done + self.failed_count + len(self.ready),
                self.done_bytes + sum(p.size for path, p in self.ready.items() if path not in self.failed),
            )
        self.rest()
        for path in sorted(self.ready):
            self.io.write_text(f"pathname={path}")
        self.io.flush_pkt()
        self.io.write_text("status=success")
        self.io.flush_pkt()


def _progress_wanted() -> bool:
    """Progress on a terminal, unless the git command that runs us was told -q or --no-progress.

    Also tells the fetches this process runs (remote.fetch_versions) to be quiet in that case."""
    from .progress import on_terminal

    if not on_terminal():
        return False
    from .gitproc import git_command, is_quiet

    cmd = git_command()
    if cmd is not None and is_quiet(cmd[1]):
        os.environ["THETA_STORE_PROGRESS"] = "0"
        return False
    return True


def _grow_pipes(size: int = 1 << 20) -> None:
    """Ask for 1 MiB pipe buffers to and from git (Linux; 64 KiB by default): a checkpoint then
    streams with 16x fewer wake-ups of git and of us. Not possible (not a pipe, over the system's
    limit, not Linux): nothing changes."""
    try:
        import fcntl

        op = getattr(fcntl, "F_SETPIPE_SZ", None)
    except ImportError:
        return
    if op is None:
        return
    for fd in (sys.stdin.fileno(), sys.stdout.fileno()):
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, op, size)


def _common_dir() -> str | None:
    """The repository's common git directory, found without dulwich: git runs filters at the top
    of the work tree, where `.git` is the directory or (linked work trees, submodules) a file
    naming it. None if it is elsewhere (GIT_DIR...): dulwich then finds the repository."""
    if "GIT_DIR" in os.environ:
        return None
    if os.path.isdir(".git"):
        git_dir = ".git"
    elif os.path.isfile(".git"):
        with open(".git", encoding="utf-8", errors="replace") as f:
            text = f.read()
        if not text.startswith("gitdir: "):
            return None
        git_dir = text[len("gitdir: ") :].strip()
    else:
        return None
    common = os.path.join(git_dir, "commondir")
    if os.path.isfile(common):
        with open(common, encoding="utf-8", errors="replace") as f:
            git_dir = os.path.join(git_dir, f.read().strip())
    return os.path.realpath(git_dir)


class Repository:
    """The repository, as the filter needs it.

    The clean cache, version refs and smudge plans are plain files in the git directory, read
    without dulwich: `touch; git status` and the checkout of a version checked out before need
    nothing else. The object store (dulwich, slow to import and open) opens on a thread as soon as
    a request is known to need it; then the pre-push hook is checked (`git rev-parse`), also off
    the request path.
    """

    def __init__(self) -> None:
        self.common_dir = _common_dir()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._opened: GitStore | None = None
        self._error: BaseException | None = None
        self._cache: CleanCache | None = None
        # Every time git starts us: a hook another tool put in place of ours would let the next
        # push go without its checkpoint versions. Asking git costs a process: only when unsure.
        self._hooks: threading.Thread | None = None
        if self.common_dir is None or not looks_installed(self.common_dir):
            self._hooks = threading.Thread(target=_check_hooks, name="theta-store-hooks")
            self._hooks.start()

    def prefetch(self) -> None:
        """Start opening the object store, if that has not begun."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._open, name="theta-store-open")
                self._thread.start()

    def _open(self) -> None:
        try:
            from .gitstore import GitStore, remove_stale

            store = GitStore(".")
            remove_stale(store.state_dir, "clean-")  # copies left by a filter that was killed
            self._opened = store
        except BaseException as e:  # given to the request that needs the repository
            self._error = e
            return
        finally:
            self._ready.set()

    @property
    def store(self) -> GitStore:
        self.prefetch()
        self._ready.wait()
        if self._opened is None:
            assert self._error is not None
            raise self._error
        return self._opened

    @property
    def state_dir(self) -> str:
        return os.path.join(self.common_dir, "theta-store") if self.common_dir is not None else str(self.store.state_dir)

    @property
    def cache(self) -> CleanCache:
        if self._cache is None:
            self._cache = CleanCache(self.state_dir)
        return self._cache

    def has_version(self, manifest_id: bytes) -> bool:
        """refs/theta/<id> exists: a loose ref or a line of packed-refs, else as dulwich sees it."""
        if self.common_dir is not None:
            name = ref_name(manifest_id)
            if os.path.isfile(os.path.join(self.common_dir, name)):
                return True
            with contextlib.suppress(FileNotFoundError), open(os.path.join(self.common_dir, "packed-refs"), "rb") as f:
                if f" {name}\n".encode() in f.read():
                    return True
        return self.store.version_commit(manifest_id) is not None

    def read_object(self, oid: bytes) -> bytes:
        return self.store.read_object(oid)

    def close(self) -> None:
        if self._hooks is not None:
            self._hooks.join()
        if self._thread is not None:
            self._thread.join()
        if self._opened is not None:
            self._opened.close()


def _check_hooks() -> None:
    from .install import ensure_hooks_and_say

    ensure_hooks_and_say(".")


def run() -> int:
    _grow_pipes()
    io = PktIO(sys.stdin.fileno(), sys.stdout.buffer)
    hello = io.read_text_list()
    if "git-filter-client" not in hello or "version=2" not in hello:
        raise ProtocolError(f"unexpected filter handshake {hello!r}")
    io.write_text("git-filter-server", "version=2")
    io.flush_pkt()
    caps = io.read_text_list()
    ours = [c for c in ("capability=clean", "capability=smudge", "capability=delay") if c in caps]
    io.write_text(*ours)
    io.flush_pkt()
    repo = Repository()
    server = FilterServer(io, repo)
    try:
        return server.serve()
    finally:
        server.close()
        repo.close()
