"""Exception hierarchy of theta-store.

Every error says what failed, on which file / tensor / offset, and what the user can do.
They subclass builtins so callers can catch them generically.
"""

from __future__ import annotations


class ThetaStoreError(Exception):
    """Base class of every error theta-store raises on purpose."""

    hint: str = ""

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        if hint:
            self.hint = hint

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text} (hint: {self.hint})" if self.hint else text


class FormatError(ThetaStoreError, ValueError):
    """A checkpoint file is malformed: names the file, the place and the fault."""

    def __init__(self, path: str, where: str, problem: str, *, hint: str = "") -> None:
        self.path = path
        self.where = where
        self.problem = problem
        location = f"{path}: {where}: " if where else f"{path}: "
        super().__init__(location + problem, hint=hint)


class CorruptObject(ThetaStoreError, ValueError):
    """A stored frame, manifest or pointer does not decode or does not match its id."""


class ObjectNotFound(ThetaStoreError, FileNotFoundError):
    """An object the manifest needs is not in this repository."""


class NotARepository(ThetaStoreError, FileNotFoundError):
    """The path is not inside a Git repository."""


class PointerError(ThetaStoreError, ValueError):
    """A file that should be a theta-store pointer is not one."""


class GitCommandError(ThetaStoreError):
    """A git command that theta-store ran failed: names the command and git's own message."""


class LockTimeout(ThetaStoreError, TimeoutError):
    """Another process held a lock (git's index.lock, ours) for longer than we wait: names the lock file."""


class FileChanged(ThetaStoreError, OSError):
    """A file changed (was cut short, rewritten) while theta-store read it: nothing was stored."""


class ProtocolError(ThetaStoreError):
    """git's pkt-line stream to the filter process is broken: there is nothing to resynchronise on."""


class InvalidArgument(ThetaStoreError, ValueError):
    """A caller passed arguments the core cannot honour: a bug in the caller, not bad data."""


class VersionsMissing(ObjectNotFound):
    """Versions that are neither here nor on any remote tried."""

    HINT = (
        "push it from a clone that has it (a plain git push sends it; `theta-store push` if it was skipped), "
        "or set THETA_STORE_REMOTE to the remote that has it"
    )

    def __init__(self, missing: set[bytes], tried: list[str], what: str = "") -> None:
        self.missing = missing
        self.tried = tried
        super().__init__(self.describe(min(missing), what), hint=self.HINT)

    def describe(self, version: bytes, what: str = "") -> str:
        where = f"{what}: " if what else ""
        remotes = ", ".join(self.tried) or "any remote (none configured)"
        return f"{where}checkpoint version {version.hex()[:16]} is not here and not on {remotes}"


class IncompletePush(ThetaStoreError):
    """A push whose history needs checkpoint versions that are neither here nor on another remote."""


class MergeConflict(ThetaStoreError):
    """Tensors both sides changed that the strategy did not resolve (listed in `conflicts`)."""

    def __init__(self, path: str, conflicts: list[str], hint: str = "") -> None:
        self.conflicts = conflicts
        super().__init__(f"{path}: {len(conflicts)} conflicting tensor(s) or metadata key(s)", hint=hint)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as Ctrl-C raises KeyboardInterrupt: the signal's default action ends the
    process at once, leaving a pack or a restored file half-written under its temporary name."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signum)


class BlobStoreError(ThetaStoreError):
    """A chunk store (S3-compatible bucket, Git LFS server) refused, failed or could not be reached:
    names the store's URL, the object and what the server said."""


class BlobStoreUnreachable(BlobStoreError, ConnectionError):
    """The chunk store did not answer (refused, timed out, stopped mid-transfer) after the retries."""


class BlobStoreAuthError(BlobStoreError, PermissionError):
    """The chunk store refused our credentials (HTTP 401/403, S3 InvalidAccessKeyId/SignatureDoesNotMatch)."""


class BlobStoreCorrupt(BlobStoreError, CorruptObject):
    """An object read from the chunk store does not match its id: names the store, object and chunk."""


class DiskFull(ThetaStoreError, OSError):
    """The file system filled up (ENOSPC, or EDQUOT over quota) while theta-store wrote to it:
    names the checkpoint and the folder. What was half-written is removed; nothing stored changed."""


def disk_full(e: BaseException, subject: str, folder: str, doing: str, undone: str) -> DiskFull | None:
    """`e` said as a DiskFull if it is one (None otherwise): "`subject`: the disk is full (ENOSPC)
    `doing` in `folder`: `undone`"."""
    import errno

    code = getattr(e, "errno", None)
    if code not in (errno.ENOSPC, errno.EDQUOT):
        return None
    name = "ENOSPC: no space left on device" if code == errno.ENOSPC else "EDQUOT: disk quota exceeded"
    out = DiskFull(
        f"{subject}: the disk is full ({name}) {doing} in {folder}: {undone}",
        hint="free space on that file system, then run the command again",
    )
    out.errno = code
    return out
