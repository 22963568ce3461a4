"""Which checkpoint versions git's trees, index and history point to.

Git-as-storage: which versions commits need (see repo.py for the two parts).

A pointer is a small blob; these functions find the pointer blobs in a tree, the index, every
object of a history, or the changes of each commit, and parse them in two batched `git cat-file`
runs. Push, fetch, pull, gc, status and stats all ask here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .errors import ThetaStoreError
from .gitstore import GitStore
from .pointer import POINTER_MAX, Pointer, looks_like_pointer


@dataclass(frozen=True)
class PointerWrite:
    """A commit that set `path` to a pointer to `version` (added it or changed it)."""

    commit: str
    date: str  # committer date, ISO 8601
    path: str
    version: bytes


def pointers_in(store: GitStore, revs: list[str], exclude: list[str] | None = None) -> dict[bytes, str]:
    """manifest id -> a path, for every pointer blob among the objects of `revs` (minus `exclude`)."""
    return {v: path for v, path in pointer_blobs(store, revs, exclude).values()}


def pointer_blobs(store: GitStore, revs: list[str], exclude: list[str] | None = None) -> dict[str, tuple[bytes, str]]:
    """blob id (hex) -> (manifest id, a path), for every pointer blob among the objects of `revs` (minus `exclude`)."""
    args = ["rev-list", "--objects", *revs]
    if exclude:
        args += ["--not", *exclude]
    listing = store.git(*args).decode(errors="surrogateescape").splitlines()
    paths = {}
    for line in listing:
        oid, _, path = line.partition(" ")
        if path:
            paths[oid] = path
    return {oid: (p.manifest_id, paths[oid]) for oid, p in _pointer_blobs(store, list(paths)).items()}


def tree_pointers(store: GitStore, rev: str | None, pathspecs: Sequence[str] = ()) -> dict[str, Pointer]:
    """path -> pointer for every pointer in `rev`'s tree (None: the index, merged entries only),
    limited to `pathspecs` (git pathspecs, relative to the top of the work tree).

    Only the tree itself is read, never the history behind it: what a checkout of `rev` needs.
    """
    listing = store.git("ls-files", "-s", "-z", "--", *pathspecs) if rev is None else store.ls_tree(rev, pathspecs)
    paths: dict[str, list[str]] = {}
    for rec in listing.split(b"\0"):
        if not rec:
            continue
        meta, _, path = rec.partition(b"\t")
        parts = meta.decode().split()
        # ls-files: mode oid stage; ls-tree: mode type oid. Conflicted entries (stage > 0) are skipped.
        oid, ok = (parts[1], parts[2] == "0") if rev is None else (parts[2], parts[1] == "blob")
        if ok and parts[0] in ("100644", "100755"):
            paths.setdefault(oid, []).append(path.decode(errors="surrogateescape"))
    pointers = _pointer_blobs(store, list(paths))
    return {path: pointers[oid] for oid, names in paths.items() if oid in pointers for path in names}


def _pointer_blobs(store: GitStore, oids: list[str]) -> dict[str, Pointer]:
    """oid -> pointer for the blobs among `oids` that are valid pointers (two batched cat-file runs)."""
    if not oids:
        return {}
    check = store.git("cat-file", "--batch-check=%(objectname) %(objecttype) %(objectsize)", input="\n".join(oids).encode() + b"\n")
    small = []
    for line in check.decode().splitlines():
        fields = line.split()  # "<oid> missing" for an object not here (a partial clone)
        if len(fields) == 3 and fields[1] == "blob" and int(fields[2]) <= POINTER_MAX:
            small.append(fields[0])
    out: dict[str, Pointer] = {}
    if not small:
        return out
    data = store.git("cat-file", "--batch", input="\n".join(small).encode() + b"\n")
    pos = 0
    while pos < len(data):
        nl = data.index(b"\n", pos)
        oid, _, size = data[pos:nl].decode().split()
        blob = data[nl + 1 : nl + 1 + int(size)]
        pos = nl + 1 + int(size) + 1
        if looks_like_pointer(blob):
            try:
                out[oid] = Pointer.parse(blob, oid)
            except ThetaStoreError:
                continue
    return out


def pointer_writes(store: GitStore, revs: Sequence[str], *, oldest_first: bool = False) -> list[PointerWrite]:
    """Each commit in the history of `revs` that set a path to a pointer, with that path and version.

    Merges count where they set a path to a blob neither parent had (a merged checkpoint).
    """
    order = ["--reverse", "--date-order"] if oldest_first else []
    log = store.git(
        "log", *order, "--no-renames", "--diff-merges=dense-combined", "--format=%x01%H %cI", "--raw", "--no-abbrev", "-z", *revs
    )
    wrote: list[tuple[str, str, str, str]] = []  # commit, date, path, blob
    for record in log.split(b"\x01")[1:]:
        head, _, raw = record.partition(b"\0")
        commit, _, date = head.decode().partition(" ")
        fields = raw.lstrip(b"\n").split(b"\0")
        for meta, name in zip(fields[0::2], fields[1::2], strict=False):
            # ":old new oldid newid S" for one parent; "::m1 m2 m id1 id2 id SS" for a merge
            parents = len(meta) - len(meta.lstrip(b":"))
            parts = meta.lstrip(b":").split()
            if parents and len(parts) == 2 * parents + 3 and parts[parents] in (b"100644", b"100755"):
                wrote.append((commit, date, name.decode(errors="surrogateescape"), parts[2 * parents + 1].decode()))
    pointers = _pointer_blobs(store, sorted({blob for *_, blob in wrote}))
    return [PointerWrite(c, d, path, pointers[blob].manifest_id) for c, d, path, blob in wrote if blob in pointers]
