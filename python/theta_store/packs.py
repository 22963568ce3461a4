"""The packs theta-store writes: kept out of git's repacking, consolidated in geometric tiers.

Git's own maintenance rewrites every pack into one when they pile up (`gc.autoPackLimit`), so a
store of frames that only grows would be copied whole again and again. Each pack an add writes
gets a `.keep` file saying `theta-store`; git's gc and auto gc neither count nor rewrite kept
packs. We consolidate our kept packs ourselves, by bytes: a pack of `s` bytes is in tier
`floor(log8(s))`, and a tier that holds 8 packs is rolled up into one pack of a higher tier
(`git pack-objects --stdin-packs`, which copies stored objects as they are and deltifies the
small version objects). A byte is thus rewritten once per tier it climbs, the pack count stays
below 8 per tier, and a one-bias version never makes a 400 MB pack move.

Git never prunes from a kept pack, so `theta-store gc --prune` rewrites each of our packs that
holds objects no ref reaches, keeping the others (`prune`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
import subprocess

from .errors import GitCommandError
from .plan import PACK_LOCK_WAIT, pack_lock

TYPE_CHECKING = False  # not typing's: see __init__.py
if TYPE_CHECKING:
    from collections.abc import Iterable

    from .gitstore import GitStore

MARK = "theta-store\n"  # what our .keep files say: other keeps (git's, a user's) are left alone
FANOUT = 8
# An add rolls up a tier only when the new pack stays below this: a bigger rollup waits for
# `theta-store gc`, so that no commit pays for copying a large part of the store.
INLINE_MAX = 64 << 20
_PACK_FILES = (".idx", ".pack", ".rev", ".bitmap", ".mtimes", ".promisor", ".keep")  # .idx first: git stops seeing it


def tier(size: int) -> int:
    """floor(log_FANOUT(size)), in integers (floats round 8**k wrongly for large k)."""
    t, bound = 0, FANOUT
    while size >= bound:
        t += 1
        bound *= FANOUT
    return t


def rollup(sizes: dict[str, int], limit: int | None = INLINE_MAX) -> list[str]:
    """The next packs to roll up into one, for packs of these sizes (name -> bytes): the lowest
    tier holding FANOUT packs whose total is at most `limit` (None: any). Empty if none."""
    tiers: dict[int, list[str]] = {}
    for name, size in sizes.items():
        tiers.setdefault(tier(size), []).append(name)
    for t in sorted(tiers):
        names = tiers[t]
        if len(names) >= FANOUT and (limit is None or sum(sizes[n] for n in names) <= limit):
            return sorted(names)
    return []


def ours(pack_dir: str | os.PathLike[str]) -> dict[str, int]:
    """Our kept packs: pack file name -> size. Keep files of ours whose pack is gone are removed."""
    out: dict[str, int] = {}
    try:
        names = os.listdir(pack_dir)
    except FileNotFoundError:
        return out
    for name in names:
        if not (name.startswith("pack-") and name.endswith(".keep")):
            continue
        keep = os.path.join(pack_dir, name)
        if not _is_ours(keep):
            continue
        pack = name[: -len(".keep")] + ".pack"
        if not os.path.exists(os.path.join(pack_dir, name[: -len(".keep")] + ".idx")):
            # Its index goes first when a pack is removed (_remove): a removal that was killed. Finish it.
            for ext in _PACK_FILES:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(pack_dir, name[: -len(".keep")] + ext))
            continue
        try:
            out[pack] = os.stat(os.path.join(pack_dir, pack)).st_size
        except FileNotFoundError:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(keep)
    return out


def _is_ours(keep: str) -> bool:
    try:
        with open(keep, encoding="utf-8", errors="replace") as f:
            return f.read(len(MARK) + 1) == MARK
    except OSError:
        return False


def keep(pack_paths: Iterable[str]) -> list[str]:
    """Mark these packs ours (kept); a pack another tool keeps stays theirs. Returns those marked."""
    done = []
    for path in pack_paths:
        base = path[: -len(".pack")] if path.endswith(".pack") else path
        k = base + ".keep"
        if os.path.exists(k) or not os.path.exists(base + ".pack"):
            continue
        # Named as an add's temporary pack is: the next add removes one a killed process left.
        tmp = os.path.join(os.path.dirname(k), f"tmp_pack_theta_{os.getpid()}_keep_{os.path.basename(k)}")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(MARK)
        os.replace(tmp, k)
        done.append(base + ".pack")
    return done


def _locked(store: GitStore, wait: bool) -> contextlib.AbstractContextManager[bool]:
    """Hold the pack lock exclusively (or yield False at once if `wait` is off and another process
    has it): readers of packs hold it shared (plan.pack_lock), so no pack they read goes meanwhile."""
    return pack_lock(store.state_dir, shared=False, wait=PACK_LOCK_WAIT if wait else None)


def _git(store: GitStore, *args: str, input: bytes = b"") -> bytes:
    # Never inherit our stdin: in the filter process it is git's pkt-line pipe.
    r = subprocess.run(["git", "-C", str(store.worktree), *args], input=input, capture_output=True, check=False)
    if r.returncode != 0:
        raise GitCommandError(f"git {' '.join(args[:2])} failed: {r.stderr.decode(errors='replace').strip()}")
    return r.stdout


def _write_pack(store: GitStore, args: list[str], stdin: bytes) -> str:
    """Run pack-objects into our pack folder and keep the result; returns its file name."""
    prefix = str(store.pack_dir / "pack")
    out = _git(store, "pack-objects", "-q", "--delta-base-offset", *args, prefix, input=stdin).decode().strip()
    name = f"pack-{out}.pack"
    keep([str(store.pack_dir / name)])
    return name


def _remove(store: GitStore, name: str) -> None:
    base = str(store.pack_dir / name[: -len(".pack")])
    for ext in _PACK_FILES:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(base + ext)


def _drop_midx(store: GitStore) -> bool:
    """Remove the multi-pack index (git maintenance writes one) before packs it names go: git
    keeps the packs of an existing index when it rewrites one, even those that are gone."""
    found = False
    for name in os.listdir(store.pack_dir):
        if name.startswith("multi-pack-index"):
            found = True
            path = store.pack_dir / name
            if path.is_dir():  # an incremental chain (multi-pack-index.d)
                shutil.rmtree(path, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                os.unlink(path)
    return found


def _write_midx(store: GitStore) -> None:
    _git(store, "multi-pack-index", "write")


def settle(store: GitStore, pack_paths: Iterable[str], limit: int | None = INLINE_MAX) -> dict[str, int]:
    """After an add or a fetch: keep the packs it wrote, then consolidate."""
    try:
        keep(pack_paths)
        return consolidate(store, limit=limit, wait=False)
    except (GitCommandError, OSError):  # the version is stored: an old git or a full disk only leaves more packs
        return {"packs": 0, "bytes": 0}


def consolidate(store: GitStore, limit: int | None = INLINE_MAX, wait: bool = True) -> dict[str, int]:
    """Roll up full tiers of our packs (see the module doc). Returns {"packs": packs rolled up,
    "bytes": bytes written}; nothing is done if another process holds the lock and `wait` is off."""
    done = {"packs": 0, "bytes": 0}
    with _locked(store, wait) as got:
        if not got:
            return done
        midx = False
        for _ in range(64):  # each rollup removes FANOUT - 1 packs or more: this bound is never reached
            names = rollup(ours(store.pack_dir), limit)
            if not names:
                break
            new = _write_pack(store, ["--stdin-packs"], "".join(n + "\n" for n in names).encode())
            midx = _drop_midx(store) or midx
            for n in names:
                if n != new:
                    _remove(store, n)
            done["packs"] += len(names)
            done["bytes"] += os.stat(store.pack_dir / new).st_size
        if midx:
            _write_midx(store)
        if done["packs"]:
            store.refresh()
    return done


def pack_objects(idx_path: str | os.PathLike[str]) -> list[bytes]:
    """The object ids (binary) a pack index lists (version 2, or the headerless version 1)."""
    with open(idx_path, "rb") as f:
        data = f.read()
    if data[:4] == b"\xfftOc":
        if struct.unpack_from(">I", data, 4)[0] != 2:
            raise ValueError(f"{idx_path}: unknown pack index version")
        n = struct.unpack_from(">I", data, 8 + 255 * 4)[0]
        start = 8 + 256 * 4
        return [data[start + 20 * i : start + 20 * i + 20] for i in range(n)]
    n = struct.unpack_from(">I", data, 255 * 4)[0]
    start = 256 * 4
    return [data[start + 24 * i + 4 : start + 24 * i + 24] for i in range(n)]


# Everything git itself keeps (refs, every worktree's HEAD and index, reflogs): our packs keep
# exactly what `git gc --prune=now` would keep of them.
_ROOTS = ["--all", "--reflog", "--indexed-objects"]


def prune(store: GitStore) -> dict[str, int]:
    """Rewrite each of our packs that holds objects nothing reaches, without them (git never
    prunes from a kept pack). Returns {"packs": packs rewritten, "bytes": bytes written}."""
    done = {"packs": 0, "bytes": 0}
    with _locked(store, True):
        have = ours(store.pack_dir)
        if not have:
            return done
        out = _git(store, "rev-list", "--objects", "--no-object-names", *_ROOTS)
        reachable = {bytes.fromhex(line) for line in out.decode().split()}
        dirty: list[str] = []
        live: set[bytes] = set()
        for name in sorted(have):
            oids = pack_objects(store.pack_dir / (name[: -len(".pack")] + ".idx"))
            kept = [o for o in oids if o in reachable]
            if len(kept) < len(oids):
                dirty.append(name)
                live.update(kept)
        if not dirty:
            return done
        new = None
        if live:
            new = _write_pack(store, [], b"".join(o.hex().encode() + b"\n" for o in sorted(live)))
            done["bytes"] = os.stat(store.pack_dir / new).st_size
        midx = _drop_midx(store)
        for n in dirty:
            if n != new:
                _remove(store, n)
        done["packs"] = len(dirty)
        if midx:
            _write_midx(store)
        store.refresh()
    return done
