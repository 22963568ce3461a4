"""Moving checkpoint versions between repositories with plain git: push, fetch, gc.

Each version is a parentless, deterministic commit under refs/theta/<manifest id>. Ref names are
content ids, so two people pushing different versions never conflict, and pushing a version
twice is a no-op.

Why a transport repository: git excludes the objects a remote already has only along commit
ancestry ("edges"). Versions share frames but not history, so a plain `git push` of a new
version ref re-sent every frame of the model (measured: 285 MB for a one-bias change of a
345 MB model). Git treats the trees of *all* known commits as already sent when the sending or
the fetching repository is shallow (`--objects-edge-aggressive`). So versions travel through a
small scratch repository, `.git/theta-store/transport`: it shares our object directory
(GIT_OBJECT_DIRECTORY), includes our config (remotes, credentials), mirrors our refs/theta/ and is
marked shallow. Same push, 27 KB. The user's repository itself is never made shallow.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator

if sys.platform != "win32":
    import fcntl

from .errors import ObjectNotFound, ThetaStoreError
from .gitstore import REF_PREFIX, GitStore
from .pointer import POINTER_MAX, Pointer, looks_like_pointer

ZERO = "0" * 40
PUSH_BATCH = 400


def _git(store: GitStore, *args: str, input: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    # Never let git inherit our stdin: in the filter process it is git's pkt-line pipe.
    r = subprocess.run(["git", *args], cwd=store.worktree, input=input or b"", capture_output=True, check=False)
    if check and r.returncode != 0:
        raise ThetaStoreError(f"git {' '.join(args[:3])} failed: {r.stderr.decode(errors='replace').strip()}")
    return r


def ref_name(manifest_id: bytes) -> str:
    return REF_PREFIX.decode() + manifest_id.hex()


def remotes(store: GitStore) -> list[str]:
    """Remotes to try, best first: $THETA_STORE_REMOTE, the branch's upstream remote, origin, the rest."""
    names = _git(store, "remote", check=False).stdout.decode().split()
    order: list[str] = []
    env = os.environ.get("THETA_STORE_REMOTE")
    if env:
        order.append(env)
    branch = _git(store, "symbolic-ref", "-q", "--short", "HEAD", check=False).stdout.decode().strip()
    if branch:
        up = _git(store, "config", f"branch.{branch}.remote", check=False).stdout.decode().strip()
        if up:
            order.append(up)
    if "origin" in names:
        order.append("origin")
    order += names
    return list(dict.fromkeys(order))


def remote_versions(store: GitStore, remote: str, ids: Iterable[bytes] | None = None) -> set[bytes]:
    """Versions the remote has (all of them, or only among `ids`: protocol v2 filters by prefix)."""
    patterns = [ref_name(i) for i in ids] if ids is not None else [REF_PREFIX.decode() + "*"]
    found: set[bytes] = set()
    for i in range(0, max(len(patterns), 1), PUSH_BATCH):
        batch = patterns[i : i + PUSH_BATCH]
        if not batch:
            break
        r = _git(store, "ls-remote", remote, *batch, check=False)
        if r.returncode != 0:
            raise ThetaStoreError(f"cannot reach remote {remote!r}: {r.stderr.decode(errors='replace').strip()}")
        for line in r.stdout.decode().splitlines():
            _, _, ref = line.partition("\t")
            if ref.startswith(REF_PREFIX.decode()):
                try:
                    found.add(bytes.fromhex(ref[len(REF_PREFIX) :]))
                except ValueError:
                    continue
    return found


MARKER_ENV = {
    "GIT_AUTHOR_NAME": "theta-store",
    "GIT_AUTHOR_EMAIL": "theta-store@localhost",
    "GIT_AUTHOR_DATE": "@0 +0000",
    "GIT_COMMITTER_NAME": "theta-store",
    "GIT_COMMITTER_EMAIL": "theta-store@localhost",
    "GIT_COMMITTER_DATE": "@0 +0000",
}


def _transport(store: GitStore) -> dict[str, str]:
    """Prepare the scratch transport repository; returns the environment to run git in it."""
    t = store.state_dir / "transport"
    if not (t / "HEAD").exists():
        for d in ("refs", "objects"):
            (t / d).mkdir(parents=True, exist_ok=True)
        (t / "HEAD").write_text("ref: refs/heads/unused\n")
    config = store.common_dir / "config"
    # Frames are compressed and rarely similar: delta search over hundreds of MB of them cost
    # 10 s on a 400 MB push (measured) for nothing. No delta search, reuse stored data as is.
    (t / "config").write_text(
        f"[include]\n\tpath = {config}\n[core]\n\tbare = true\n\trepositoryformatversion = 0\n[pack]\n\twindow = 0\n\tdepth = 0\n"
    )
    env = dict(os.environ, GIT_DIR=str(t), GIT_OBJECT_DIRECTORY=str(store.objects_dir))
    env.pop("GIT_WORK_TREE", None)
    env.pop("GIT_INDEX_FILE", None)
    # Mirror our versions (they become the "haves" of a fetch) and keep the shallow marker.
    refs = "".join(f"{store.version_commit(v).hex()} {ref_name(v)}\n" for v in store.versions())  # type: ignore[union-attr]
    (t / "packed-refs").write_text("# pack-refs with: peeled fully-peeled sorted\n" + refs)
    # Written each time (deterministic ids): a git gc in our repository may have pruned them.
    tree = subprocess.run(["git", "hash-object", "-t", "tree", "-w", "--stdin"], input=b"", env=env, capture_output=True, check=True)
    marker = subprocess.run(
        ["git", "commit-tree", tree.stdout.decode().strip(), "-m", "theta-store transport marker"],
        input=b"",
        env=dict(env, **MARKER_ENV),
        capture_output=True,
        check=True,
    )
    (t / "shallow").write_text(marker.stdout.decode())
    shutil.rmtree(t / "refs" / "theta", ignore_errors=True)
    return env


@contextlib.contextmanager
def _transport_lock(store: GitStore) -> Iterator[None]:
    """One user of the transport repository at a time (a push in one terminal, a checkout in another)."""
    store.state_dir.mkdir(parents=True, exist_ok=True)
    with open(store.state_dir / "transport.lock", "wb") as f:
        if sys.platform != "win32":
            fcntl.flock(f, fcntl.LOCK_EX)  # released when f closes
        yield


def _run_transport(store: GitStore, *args: str) -> subprocess.CompletedProcess[bytes]:
    """Run git in the transport repository (call with _transport_lock held)."""
    env = _transport(store)
    return subprocess.run(["git", *args], cwd=store.worktree, env=env, stdin=subprocess.DEVNULL, capture_output=True, check=False)


def fetch_versions(store: GitStore, remote: str, ids: set[bytes]) -> set[bytes]:
    """Fetch these versions from one remote; returns the ones it had."""
    have = remote_versions(store, remote, sorted(ids))
    todo = sorted(have & ids)
    got: set[bytes] = set()
    for i in range(0, len(todo), PUSH_BATCH):
        batch = todo[i : i + PUSH_BATCH]
        specs = [f"+{ref_name(v)}:{ref_name(v)}" for v in batch]
        with _transport_lock(store):
            r = _run_transport(store, "fetch", "--depth=1", "--no-tags", "--no-write-fetch-head", "-q", remote, *specs)
            if r.returncode != 0:
                raise ThetaStoreError(f"fetching checkpoint versions from {remote} failed: {r.stderr.decode(errors='replace').strip()}")
            t = store.state_dir / "transport"
            listing = subprocess.run(
                ["git", "for-each-ref", "--format=%(objectname) %(refname)", *[ref_name(v) for v in batch]],
                env=dict(os.environ, GIT_DIR=str(t), GIT_OBJECT_DIRECTORY=str(store.objects_dir)),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                check=True,
            ).stdout.decode()
        pairs = [line.split(" ", 1) for line in listing.splitlines() if line]
        _git(store, "update-ref", "--stdin", input="".join(f"update {ref} {sha}\n" for sha, ref in pairs).encode())
        got |= {bytes.fromhex(ref[len(REF_PREFIX) :]) for _, ref in pairs}
    store.refresh()
    for v in sorted(got):
        store.record_chunks(store.version_frames(v))
    return got


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


def ensure_versions(store: GitStore, ids: set[bytes], *, quiet: bool = False, what: str = "", remote: str | None = None) -> int:
    """Make sure these versions are local, fetching from the remotes. Returns how many were fetched.

    Raises VersionsMissing (naming the version, `what` and every remote tried) if some stay missing.
    """
    missing = {i for i in ids if store.version_commit(i) is None}
    if not missing:
        return 0
    tried = []
    fetched = 0
    for name in [remote] if remote else remotes(store):
        try:
            got = fetch_versions(store, name, missing)
        except ThetaStoreError as e:
            if not quiet:
                print(f"theta-store: {e}", file=sys.stderr)
            reason = " ".join((e.args[0] if e.args else str(e)).split())
            prefix = f"cannot reach remote {name!r}: "
            reason = "unreachable: " + reason.removeprefix(prefix) if reason.startswith(prefix) else reason
            tried.append(f"{name} ({reason[:200]})")
            continue
        tried.append(name)
        fetched += len(got)
        missing -= got
        if not missing:
            return fetched
    raise VersionsMissing(missing, tried, what)


def pointers_in(store: GitStore, revs: list[str], exclude: list[str] | None = None) -> dict[bytes, str]:
    """manifest id -> a path, for every pointer blob among the objects of `revs` (minus `exclude`)."""
    args = ["rev-list", "--objects", *revs]
    if exclude:
        args += ["--not", *exclude]
    listing = _git(store, *args).stdout.decode(errors="surrogateescape").splitlines()
    paths = {}
    for line in listing:
        oid, _, path = line.partition(" ")
        if path:
            paths[oid] = path
    if not paths:
        return {}
    check = _git(store, "cat-file", "--batch-check=%(objectname) %(objecttype) %(objectsize)", input="\n".join(paths).encode() + b"\n")
    small = []
    for line in check.stdout.decode().splitlines():
        oid, kind, size = line.split()
        if kind == "blob" and int(size) <= POINTER_MAX:
            small.append(oid)
    return _read_pointers(store, small, paths)


def _read_pointers(store: GitStore, oids: list[str], paths: dict[str, str]) -> dict[bytes, str]:
    out: dict[bytes, str] = {}
    if not oids:
        return out
    data = _git(store, "cat-file", "--batch", input="\n".join(oids).encode() + b"\n").stdout
    pos = 0
    while pos < len(data):
        nl = data.index(b"\n", pos)
        oid, _, size = data[pos:nl].decode().split()
        blob = data[nl + 1 : nl + 1 + int(size)]
        pos = nl + 1 + int(size) + 1
        if looks_like_pointer(blob):
            try:
                out[Pointer.parse(blob, paths.get(oid, oid)).manifest_id] = paths.get(oid, oid)
            except ThetaStoreError:
                continue
    return out


def pre_push(store: GitStore, remote: str, url: str, lines: list[str]) -> dict[str, int]:
    """The pre-push hook: push refs/theta/<id> for every version the pushed commits point to."""
    if os.environ.get("THETA_STORE_SKIP_PUSH") == "1":
        return {"versions": 0}
    tips, exclude = [], []
    named = remote in _git(store, "remote", check=False).stdout.decode().split()
    for line in lines:
        parts = line.split()
        if len(parts) != 4 or parts[1] == ZERO:
            continue
        tips.append(parts[1])
        if parts[3] != ZERO and _git(store, "cat-file", "-e", parts[3], check=False).returncode == 0:
            exclude.append(parts[3])
    if not tips:
        return {"versions": 0}
    if named:
        exclude.append(f"--remotes={remote}")
    return send_versions(store, remote, remote if named else url, pointers_in(store, tips, exclude))


def push(store: GitStore, remote: str | None, revs: list[str], all_refs: bool = False) -> dict[str, int]:
    """`theta-store push`: send the versions that `revs` (default HEAD) need and the remote lacks.

    The pre-push hook only looks at the commits a push adds; this covers what it could not send
    (a push with THETA_STORE_SKIP_PUSH=1, a version fetched after the commits were pushed).
    """
    name = remote or (remotes(store) or [""])[0]
    if not name:
        raise ThetaStoreError("no remote configured", hint="git remote add origin URL")
    return send_versions(store, name, name, pointers_in(store, ["--branches", "--tags"] if all_refs else (revs or ["HEAD"])))


def send_versions(store: GitStore, remote: str, target: str, needed: dict[bytes, str]) -> dict[str, int]:
    """Push refs/theta/<id> for the versions in `needed` (id -> a path that uses it) that `target` lacks."""
    if not needed:
        return {"versions": 0}
    everything = remote_versions(store, target)  # one ls-remote: also tells new frames from reused ones
    on_remote = everything & set(needed)
    todo = sorted(v for v in needed if v not in on_remote)
    local = [v for v in todo if store.version_commit(v) is not None]
    for v in todo:
        if v not in local:
            print(
                f"theta-store: warning: {needed[v]} points to version {v.hex()[:16]}, which is not in this repository;"
                " the remote will not be able to check it out",
                file=sys.stderr,
            )
    if not local:
        return {"versions": 0}
    new_frames = _frames(store, local)
    old_frames: set[bytes] = set()
    for v in everything:
        if store.version_commit(v) is not None:
            old_frames |= set(store.version_frames(v))
    new_bytes = sum(n for cid, n in new_frames.items() if cid not in old_frames)
    reused = sum(n for cid, n in new_frames.items() if cid in old_frames)
    for i in range(0, len(local), PUSH_BATCH):
        specs = [f"{ref_name(v)}:{ref_name(v)}" for v in local[i : i + PUSH_BATCH]]
        with _transport_lock(store):
            r = _run_transport(store, "push", "--no-verify", "-q", target, *specs)
        if r.returncode != 0:
            raise ThetaStoreError(
                f"pushing checkpoint versions to {remote} failed: {r.stderr.decode(errors='replace').strip()}",
                hint="set THETA_STORE_SKIP_PUSH=1 to push the commits alone",
            )
    from .sizes import human_size

    already = f", {human_size(reused)} already there" if reused else ""
    print(f"theta-store: pushed {len(local)} checkpoint version(s) to {remote}: {human_size(new_bytes)} new{already}", file=sys.stderr)
    return {"versions": len(local), "new_bytes": new_bytes, "reused_bytes": reused}


def _frames(store: GitStore, versions: Iterable[bytes]) -> dict[bytes, int]:
    out: dict[bytes, int] = {}
    for v in versions:
        for cid, f in store.version_frames(v).items():
            out[cid] = f.frame_len
    return out


def fetch(store: GitStore, remote: str | None, revs: list[str], all_versions: bool = False) -> dict[str, int]:
    """Prefetch the versions that `revs` (default HEAD) point to, or every version the remote has."""
    if all_versions:
        name = remote or (remotes(store) or [""])[0]
        if not name:
            raise ThetaStoreError("no remote configured", hint="git remote add origin URL")
        ids = remote_versions(store, name)
    else:
        ids = set(pointers_in(store, revs or ["HEAD"]))
    n = ensure_versions(store, ids, remote=remote)
    return {"needed": len(ids), "fetched": n}


# Everything git itself keeps (refs but our own, every worktree's HEAD and index, reflogs, older
# stashes): a version is dropped only when git would also prune every pointer to it.
GC_ROOTS = ["--exclude=" + REF_PREFIX.decode() + "*", "--all", "--reflog", "--indexed-objects"]


def gc(store: GitStore, dry_run: bool = False, prune: bool = False) -> dict[str, object]:
    """Drop refs/theta versions that no ref (branch, tag, remote-tracking, stash...), reflog or index needs."""
    needed = set(pointers_in(store, GC_ROOTS))
    versions = store.versions()
    drop = [v for v in versions if v not in needed]
    keep_frames = _frames(store, [v for v in versions if v in needed])
    drop_frames = _frames(store, drop)
    freed = sum(n for cid, n in drop_frames.items() if cid not in keep_frames)
    if not dry_run:
        from .filterproc import drop_plan

        for v in drop:
            _git(store, "update-ref", "-d", ref_name(v))
            drop_plan(store.state_dir, v)
        store.rebuild_chunk_index()
        if prune:
            _git(store, "gc", "--quiet", "--prune=now")
    return {
        "versions": len(versions),
        "dropped": [v.hex() for v in drop],
        "kept": len(versions) - len(drop),
        "freed_bytes": freed,
        "dry_run": dry_run,
        "pruned": prune and not dry_run,
    }
