"""Which earlier version a new version of a checkpoint is coded against, and how deep delta
chains may grow (`thetastore.deltaDepth`).

The base is the file's version in HEAD, or in a revision the user names (`add --base REV`):
each tensor that changed but kept its name, shape and dtype is then stored as a delta against
the same tensor there (checkpoint.add_file does the pairing).
"""

from __future__ import annotations

import subprocess

from .checkpoint import DEFAULT_DELTA_DEPTH, MAX_DELTA_DEPTH
from .errors import InvalidArgument, ObjectNotFound
from .gitstore import GitStore
from .pointer import POINTER_MAX, Pointer, looks_like_pointer

__all__ = ["base_version", "delta_depth"]


def base_version(store: GitStore, relpath: str, rev: str | None = None) -> Pointer | None:
    """The version of `relpath` (relative to the work tree's top) in `rev`, default HEAD. None
    when HEAD has no such checkpoint (a new file, a first commit); for a `rev` the user named,
    a missing file or revision is an error."""
    try:
        data = store.read_path(relpath, rev or "HEAD")
    except ObjectNotFound:
        if rev is None:
            return None
        raise
    if len(data) > POINTER_MAX or not looks_like_pointer(data):
        if rev is None:
            return None
        raise InvalidArgument(
            f"{rev}:{relpath} is not a theta-store checkpoint", hint="name a revision where it was added with theta-store"
        )
    return Pointer.parse(data, f"{rev or 'HEAD'}:{relpath}")


def delta_depth(store: GitStore) -> int:
    """`thetastore.deltaDepth`: how many delta frames a chunk may be decoded through (0: no deltas)."""
    r = subprocess.run(
        ["git", "-C", str(store.worktree), "config", "--get", "thetastore.deltaDepth"],
        capture_output=True,
        text=True,
        check=False,
    )
    value = r.stdout.strip()
    if not value:
        return DEFAULT_DELTA_DEPTH
    if not value.isdigit() or int(value) > MAX_DELTA_DEPTH:
        raise InvalidArgument(
            f"git config thetastore.deltaDepth = {value!r}: not a whole number from 0 to {MAX_DELTA_DEPTH}",
            hint=f"`git config thetastore.deltaDepth {DEFAULT_DELTA_DEPTH}` sets the default",
        )
    return int(value)
