"""Moving checkpoint versions between repositories with plain git: push, fetch, gc.

Git-as-storage: the transport (see repo.py for the two parts).

Each version is a parentless, deterministic commit under refs/theta/<manifest id>. Ref names are
content ids, so two people pushing different versions never conflict, and pushing a version
twice is a no-op.

Why a transport repository: git excludes the objects a remote already has only along commit
ancestry ("edges"). Versions share frames but not history, so a plain `git push` of a new
version ref re-sends every frame of the model, even for a one-bias change. Git treats the trees
of *all* known commits as already sent when the sending or the fetching repository is shallow
(`--objects-edge-aggressive`). So versions travel through a small scratch repository,
`.git/theta-store/transport`: it shares our object directory (GIT_OBJECT_DIRECTORY), includes
our config (remotes, credentials), mirrors our refs/theta/ and is marked shallow: the same push
sends only the new frames (README "Figures"). The user's repository itself is never made shallow.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

if sys.platform != "win32":
    import fcntl

from . import chunkstore, packs
from .errors import BlobStoreAuthError, CorruptObject, DiskFull, GitCommandError, ThetaStoreError
from .errors import IncompletePush as IncompletePush  # re-exported: callers import them from here too
from .errors import VersionsMissing as VersionsMissing
from .gitproc import git_command, is_quiet, push_flags
from .gitstore import INDEX_LOCK_WAIT, GitStore, LockFile, remove_stale
from .history import pointer_writes, pointers_in, tree_pointers
from .plan import INDEX_PREFIX, REF_PREFIX, drop_plan, index_ref_name, plan_path, ref_name, version_lock, version_of_ref
from .progress import on_terminal, run_teeing_stderr
from .sizes import human_size

ZERO = "0" * 40
# How git says it ran out of space (strerror(ENOSPC) and its own wording).
_DISK_FULL = ("No space left on device", "Out of diskspace", "Disk quota exceeded")
PUSH_BATCH = 400


def _git(store: GitStore, *args: str, input: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    # Never let git inherit our stdin: in the filter process it is git's pkt-line pipe.
    r = subprocess.run(["git", *args], cwd=store.worktree, input=input or b"", capture_output=True, check=False)
    if check and r.returncode != 0:
        raise GitCommandError(f"git {' '.join(args[:3])} failed: {r.stderr.decode(errors='replace').strip()}")
    return r


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


def remote_refs(store: GitStore, remote: str, ids: Iterable[bytes] | None = None) -> tuple[set[bytes], set[bytes]]:
    """Versions the remote has in Git objects (refs/theta/) and those it has as index records
    (refs/theta-index/: frames in a chunk store), of all or of `ids` (protocol v2 filters by prefix)."""
    wanted = sorted(ids) if ids is not None else None
    patterns = [f(i) for i in wanted for f in (ref_name, index_ref_name)] if wanted is not None else [REF_PREFIX + "*", INDEX_PREFIX + "*"]
    full: set[bytes] = set()
    indexed: set[bytes] = set()
    for i in range(0, max(len(patterns), 1), PUSH_BATCH):
        batch = patterns[i : i + PUSH_BATCH]
        if not batch:
            break
        r = _git(store, "ls-remote", remote, *batch, check=False)
        if r.returncode != 0:
            raise ThetaStoreError(f"cannot reach remote {remote!r}: {r.stderr.decode(errors='replace').strip()}")
        for line in r.stdout.decode().splitlines():
            name = line.partition("\t")[2]
            if (version := version_of_ref(name)) is not None:
                full.add(version)
            elif (version := version_of_ref(name, INDEX_PREFIX)) is not None:
                indexed.add(version)
    return full, indexed


def remote_versions(store: GitStore, remote: str, ids: Iterable[bytes] | None = None) -> set[bytes]:
    """Versions the remote has, either way (all of them, or only among `ids`)."""
    full, indexed = remote_refs(store, remote, ids)
    return full | indexed


# Bytes of packs git may keep mapped (core.packedGitWindowSize, core.packedGitLimit), given as
# plain numbers: dulwich reads this config too and knows no "m" suffix.
PACK_WINDOW = 16 << 20
PACK_LIMIT = 64 << 20
# A local remote's upload-pack runs here, in the remote's config: the same bound on its mapped packs.
LOCAL_UPLOAD_PACK = f"git -c core.packedGitWindowSize={PACK_WINDOW} -c core.packedGitLimit={PACK_LIMIT} upload-pack"


def _is_local(store: GitStore, remote: str) -> bool:
    """Whether git reaches `remote` (a name or a URL) through the file system."""
    url = _git(store, "ls-remote", "--get-url", remote, check=False).stdout.decode().strip()
    if url.startswith("file://"):
        return True
    if "://" in url:
        return False
    head = url.split("/", 1)[0]
    return ":" not in head  # `host:path` is ssh; `/path`, `./path`, `path` are local


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
    # We hold the transport lock: a lock file here (shallow.lock...) is a killed git's, and git
    # would refuse every later fetch over it, in a repository no user looks into.
    for stale in t.glob("*.lock"):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    config = store.common_dir / "config"
    # Frames are compressed and rarely similar: delta search over them is slow and finds nothing.
    # Pack windows: git maps up to 1 GiB of each pack (8 GiB in all) and every page it copied out
    # stays resident, so pack-objects sending a 4 GB version would hold ~4 GB.
    (t / "config").write_text(
        f"[include]\n\tpath = {config}\n[core]\n\tbare = true\n\trepositoryformatversion = 0\n"
        f"\tpackedGitWindowSize = {PACK_WINDOW}\n\tpackedGitLimit = {PACK_LIMIT}\n[pack]\n\twindow = 0\n\tdepth = 0\n"
    )
    env = dict(os.environ, GIT_DIR=str(t), GIT_OBJECT_DIRECTORY=str(store.objects_dir))
    env.pop("GIT_WORK_TREE", None)
    env.pop("GIT_INDEX_FILE", None)
    # Mirror our versions (they become the "haves" of a fetch) and keep the shallow marker.
    pairs = [(ref_name(v), store.version_commit(v)) for v in store.versions()]
    pairs += [(index_ref_name(v), c) for v, c in store.index_records().items()]
    refs = "".join(f"{c.hex()} {r}\n" for r, c in sorted(pairs) if c is not None)
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
    shutil.rmtree(t / "refs" / "theta-index", ignore_errors=True)
    return env


@contextlib.contextmanager
def _transport_lock(store: GitStore) -> Iterator[None]:
    """One user of the transport repository at a time (a push in one terminal, a checkout in another)."""
    store.state_dir.mkdir(parents=True, exist_ok=True)
    with open(store.state_dir / "transport.lock", "wb") as f:
        if sys.platform != "win32":
            fcntl.flock(f, fcntl.LOCK_EX)  # released when f closes
        yield


def _run_transport_shown(store: GitStore, args: list[str], progress: bool, env: dict[str, str] | None = None) -> tuple[int, bytes]:
    """Run git in the transport repository (call with _transport_lock held), with git's stderr
    (its progress) going on to ours as it comes when `progress`, and `env` on top of the
    transport's; returns the exit status and what git said on stderr. (A fetch writes into its
    quarantine folder, `_incoming`: what a failed one half-wrote goes with it.)"""
    return run_teeing_stderr(["git", *args], {**_transport(store), **(env or {})}, str(store.worktree), tee=progress)


INCOMING_PREFIX = "theta-incoming-"


@contextlib.contextmanager
def _incoming(store: GitStore) -> Iterator[Path]:
    """A new folder in our object directory for a fetch to write into, removed afterwards with
    whatever is left in it (one a killed fetch left is removed by the next fetch)."""
    remove_stale(store.objects_dir, INCOMING_PREFIX)
    path = Path(tempfile.mkdtemp(prefix=f"{INCOMING_PREFIX}{os.getpid()}_", dir=store.objects_dir))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _adopt(incoming: Path, objects: Path) -> None:
    """Move what a fetch wrote whole into our object directory: loose objects, then each pack
    before its index (git sees a pack through its index). git's temporary files stay behind."""
    for sub in sorted(incoming.iterdir()):
        if len(sub.name) == 2 and sub.is_dir():
            for f in sub.iterdir():
                if not f.name.startswith("tmp_"):
                    (objects / sub.name).mkdir(exist_ok=True)
                    os.replace(f, objects / sub.name / f.name)
    packs = incoming / "pack"
    if packs.is_dir():
        (objects / "pack").mkdir(exist_ok=True)
        for idx in sorted(packs.glob("pack-*.idx")):
            stem = idx.name[: -len(".idx")]
            for ext in (".pack", ".rev", ".idx"):
                if (packs / (stem + ext)).exists():
                    os.replace(packs / (stem + ext), objects / "pack" / (stem + ext))


def fetch_versions(store: GitStore, remote: str, ids: set[bytes]) -> set[bytes]:
    """Fetch these versions from one remote (and its chunk store); returns the ones it had."""
    full, indexed = remote_refs(store, remote, sorted(ids))
    todo = sorted(full & ids)
    from_store = sorted((indexed & ids) - full)
    # On a terminal, git's own progress (receiving objects) shows as it comes, without the ref lines
    tty = on_terminal()
    if tty and (todo or from_store):
        print(f"theta-store: fetching {len(todo) + len(from_store)} checkpoint version(s) from {remote}", file=sys.stderr, flush=True)
    got = set(_fetch_refs(store, remote, [ref_name(v) for v in todo], tty))
    store.refresh()
    fetched: list[bytes] = []
    for v in sorted(got):
        frames = store.version_frames(v)
        store.record_chunks(frames)
        fetched += [f.object_id for f in frames.values()]
    # What git fetched is frames like an add's: kept out of git's repacking, consolidated in tiers
    packs.settle(store, store.locate(fetched)[0])
    if from_store:
        need = [v for v in from_store if store.read_index_record(v) is None]
        _fetch_refs(store, remote, [index_ref_name(v) for v in need], tty)
        store.refresh()
        cfg = chunkstore.for_remote(store, remote)
        if cfg is None:
            raise ThetaStoreError(
                f"{remote} keeps {len(from_store)} of these checkpoint versions in a chunk store,"
                f" and no {chunkstore.CONFIG_FILE} names one",
                hint=f"check out a commit that has {chunkstore.CONFIG_FILE}, or `theta-store remote add NAME URL`",
            )
        bs = chunkstore.open_store(store, cfg, remote)
        try:
            chunkstore.download(store, bs, from_store, progress=tty)
        finally:
            bs.close()
        got |= set(from_store)
    return got


def lazy_version(store: GitStore, version: bytes) -> chunkstore.LazyVersion | None:
    """A version whose frames are in a chunk store, to be read frame by frame as needed: its
    index record (fetched from the first remote that has it) and the store. None if no remote
    keeps it that way (then it is fetched whole, as any other)."""
    for name in remotes(store):
        try:
            cfg = chunkstore.for_remote(store, name)
            if cfg is None:
                continue
            if store.read_index_record(version) is None:
                _, indexed = remote_refs(store, name, [version])
                if version not in indexed:
                    continue
                _fetch_refs(store, name, [index_ref_name(version)], on_terminal())
                store.refresh()
        except ThetaStoreError:
            continue  # an unreachable remote: the next one, then a whole fetch, may do
        return chunkstore.LazyVersion(store, chunkstore.open_store(store, cfg, name), version)
    return None


def _fetch_refs(store: GitStore, remote: str, refs: list[str], tty: bool) -> list[bytes]:
    """Fetch these refs/theta/ or refs/theta-index/ refs through the transport into ours."""
    got: list[bytes] = []
    local = bool(refs) and _is_local(store, remote)
    for i in range(0, len(refs), PUSH_BATCH):
        batch = refs[i : i + PUSH_BATCH]
        specs = [f"+{r}:{r}" for r in batch]
        # Our objects are the fetch's alternate (below): their repository's branches must not be
        # offered as haves (a shallow clone's cannot be walked), as they never were.
        args = ["-c", "core.alternateRefsCommand=true", "fetch", "--depth=1", "--no-tags", "--no-write-fetch-head", "-q"]
        args += [*(["--progress"] if tty else []), *([f"--upload-pack={LOCAL_UPLOAD_PACK}"] if local else []), remote, *specs]
        with _transport_lock(store), _incoming(store) as incoming:
            # Into a folder of its own (our objects as its alternate): what a failed fetch half-wrote
            # (git leaves tmp_obj_ and tmp_pack_ files on a full disk) goes with the folder.
            quarantine = {"GIT_OBJECT_DIRECTORY": str(incoming), "GIT_ALTERNATE_OBJECT_DIRECTORIES": str(store.objects_dir)}
            rc, err = _run_transport_shown(store, args, tty, quarantine)
            if rc == 0:
                _adopt(incoming, store.objects_dir)
            else:
                said = err.decode(errors="replace").strip()
                if any(s in said for s in _DISK_FULL):
                    # Said as such: the remote has the versions, and no other remote would fit either.
                    raise DiskFull(
                        f"fetching {len(batch)} checkpoint version(s) from {remote}: the disk is full (ENOSPC: no space left on"
                        f" device) in {store.objects_dir}: no version was added (git said: {' '.join(said.split())[:300]})",
                        hint="free space on that file system, then run the command again",
                    )
                raise ThetaStoreError(f"fetching checkpoint versions from {remote} failed: {said}")
            t = store.state_dir / "transport"
            listing = subprocess.run(
                ["git", "for-each-ref", "--format=%(objectname) %(refname)", *batch],
                env=dict(os.environ, GIT_DIR=str(t), GIT_OBJECT_DIRECTORY=str(store.objects_dir)),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                check=True,
            ).stdout.decode()
        pairs = [line.split(" ", 1) for line in listing.splitlines() if line]
        _git(store, "update-ref", "--stdin", input="".join(f"update {ref} {sha}\n" for sha, ref in pairs).encode())
        got += [v for _, ref in pairs if (v := version_of_ref(ref)) is not None]
    return got


def ensure_versions(
    store: GitStore,
    ids: set[bytes],
    *,
    quiet: bool = False,
    what: str = "",
    remote: str | None = None,
    exclude: Iterable[str] = (),
) -> int:
    """Make sure these versions are local, fetching from the remotes (but `exclude`). Returns how
    many were fetched.

    Raises VersionsMissing (naming the version, `what` and every remote tried) if some stay missing.
    """
    missing = {i for i in ids if store.version_commit(i) is None}
    if not missing:
        return 0
    tried = []
    fetched = 0
    for name in [remote] if remote else [r for r in remotes(store) if r not in exclude]:
        try:
            got = fetch_versions(store, name, missing)
        except (CorruptObject, BlobStoreAuthError, DiskFull):
            raise  # damaged data, refused credentials or a full disk: another remote is no answer to those
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


def is_remote(store: GitStore, name: str) -> bool:
    """Whether `name` is a configured remote or names a repository (URL, scp-like, a repository's path)."""
    if name in _git(store, "remote", check=False).stdout.decode().split():
        return True
    if "://" in name or (":" in name and "/" not in name.split(":", 1)[0]):
        return True
    p = os.path.abspath(name)
    bare = os.path.isfile(os.path.join(p, "HEAD")) and os.path.isdir(os.path.join(p, "objects"))
    return os.path.isdir(p) and (bare or os.path.exists(os.path.join(p, ".git")))


def pre_push(store: GitStore, remote: str, url: str, lines: list[str]) -> dict[str, int]:
    """The pre-push hook: push refs/theta/<id> for every version the pushed commits point to."""
    if os.environ.get("THETA_STORE_SKIP_PUSH") == "1":
        return {"versions": 0}
    cmd = git_command()
    push_args = cmd[1] if cmd is not None and cmd[0] == "push" else None
    dry_run, forced = push_flags(push_args)
    tips, exclude = [], []
    named = remote in _git(store, "remote", check=False).stdout.decode().split()
    forced = forced or (named and _configured_force(store, remote))
    for line in lines:
        parts = line.split()
        if len(parts) != 4 or parts[1] == ZERO:
            continue
        if parts[3] != ZERO:
            if _git(store, "cat-file", "-e", parts[3], check=False).returncode == 0:
                exclude.append(parts[3])
            elif not forced and push_args is not None:
                # The remote's tip is unknown here: git rejects this ref ("fetch first") after
                # the hook, so sending its versions now would upload data for nothing.
                continue
        tips.append(parts[1])
    if not tips:
        return {"versions": 0}
    if named:
        exclude.append(f"--remotes={remote}")
    progress = on_terminal() and not (push_args is not None and is_quiet(push_args))
    return send_versions(store, remote, remote if named else url, pointers_in(store, tips, exclude), dry_run=dry_run, progress=progress)


def _configured_force(store: GitStore, remote: str) -> bool:
    r = _git(store, "config", "--get-all", f"remote.{remote}.push", check=False)
    mirror = _git(store, "config", "--bool", f"remote.{remote}.mirror", check=False).stdout.strip() == b"true"
    return mirror or any(spec.startswith(b"+") for spec in r.stdout.split())


def push(store: GitStore, remote: str | None, revs: list[str], all_refs: bool = False) -> dict[str, int]:
    """`theta-store push`: send the versions that `revs` (default HEAD) need and the remote lacks.

    The pre-push hook only looks at the commits a push adds; this covers what it could not send
    (a push with THETA_STORE_SKIP_PUSH=1, a version fetched after the commits were pushed).
    """
    name = remote or (remotes(store) or [""])[0]
    if not name:
        raise ThetaStoreError("no remote configured", hint="git remote add origin URL")
    needed = pointers_in(store, ["--branches", "--tags"] if all_refs else (revs or ["HEAD"]))
    return send_versions(store, name, name, needed, progress=on_terminal())


def send_versions(
    store: GitStore, remote: str, target: str, needed: dict[bytes, str], *, dry_run: bool = False, progress: bool = False
) -> dict[str, int]:
    """Push refs/theta/<id> for the versions in `needed` (id -> a path that uses it) that `target` lacks.

    Versions missing here are fetched first from the other remotes. A version that none has makes
    the push fail (the remote's clones could not check it out), unless thetastore.allowIncompletePush
    is set, as with Git LFS's lfs.allowincompletepush.
    """
    if not needed:
        return {"versions": 0}
    full, indexed = remote_refs(store, target)  # one ls-remote: also tells new frames from reused ones
    everything = full | indexed
    on_remote = everything & set(needed)
    todo = sorted(v for v in needed if v not in on_remote)
    absent = {v for v in todo if store.version_commit(v) is None}
    fetched = 0
    if absent and dry_run:
        print(f"theta-store: dry run: {len(absent)} checkpoint version(s) the push needs are not here", file=sys.stderr)
    elif absent:
        try:
            fetched = ensure_versions(store, absent, quiet=True, exclude=(remote, target))
        except VersionsMissing as e:
            fetched = len(absent - e.missing)
            _incomplete(store, remote, {v: needed[v] for v in e.missing}, e.tried)
        if fetched:
            print(f"theta-store: fetched {fetched} checkpoint version(s) that the pushed history needs", file=sys.stderr)
    local = [v for v in todo if store.version_commit(v) is not None]
    if not local:
        return {"versions": 0, "fetched": fetched}
    new_frames = _frames(store, local)
    old_frames: set[bytes] = set()
    for v in everything:
        if store.version_commit(v) is not None:
            old_frames |= set(store.version_frames(v))
    new_bytes = sum(n for cid, n in new_frames.items() if cid not in old_frames)
    reused = sum(n for cid, n in new_frames.items() if cid in old_frames)
    sizes = f"{human_size(new_bytes)} new" + (f", {human_size(reused)} already there" if reused else "")
    if dry_run:
        print(f"theta-store: dry run: would push {len(local)} checkpoint version(s) to {remote}: {sizes}", file=sys.stderr)
        return {"versions": 0, "would_push": len(local), "new_bytes": new_bytes, "reused_bytes": reused}
    if progress:
        print(f"theta-store: pushing {len(local)} checkpoint version(s) to {remote}", file=sys.stderr, flush=True)
    cfg = chunkstore.for_remote(store, remote if remote == target else None)
    refs = [ref_name(v) for v in local]
    where = ""
    if cfg is not None:
        bs = chunkstore.open_store(store, cfg, remote)
        try:
            done = chunkstore.upload(store, bs, local, indexed, progress=progress)
        finally:
            bs.close()
        # The frames are in the store: Git gets the small index records, sent last.
        refs = [index_ref_name(v) for v in local]
        new_bytes = done["bytes"]
        sizes = f"{human_size(new_bytes)} new" + (f", {human_size(reused)} already there" if reused else "")
        where = f" (frames in {cfg.name}: {cfg.url}, {done['objects_sent']} object(s) sent)"
    for i in range(0, len(refs), PUSH_BATCH):
        specs = [f"{r}:{r}" for r in refs[i : i + PUSH_BATCH]]
        # On a terminal, git's own progress (writing objects) shows as it comes, without the ref lines
        args = ["push", "--no-verify", "-q", *(["--progress"] if progress else []), target, *specs]
        with _transport_lock(store):
            rc, err = _run_transport_shown(store, args, progress)
        if rc != 0:
            raise ThetaStoreError(
                f"pushing checkpoint versions to {remote} failed: {err.decode(errors='replace').strip()}",
                hint="set THETA_STORE_SKIP_PUSH=1 to push the commits alone",
            )
    print(f"theta-store: pushed {len(local)} checkpoint version(s) to {remote}: {sizes}{where}", file=sys.stderr)
    return {"versions": len(local), "new_bytes": new_bytes, "reused_bytes": reused, "fetched": fetched}


def _incomplete(store: GitStore, remote: str, missing: dict[bytes, str], tried: list[str]) -> None:
    """Refuse a push that would leave `remote` without versions its history needs, or say it goes anyway."""
    where = ", ".join(tried) or "no other remote"
    lines = [
        f"{path} points to checkpoint version {v.hex()[:16]}, which is not in this repository nor on {where}" for v, path in missing.items()
    ]
    allowed = _git(store, "config", "--bool", "thetastore.allowIncompletePush", check=False).stdout.strip() == b"true"
    if allowed:
        for line in lines:
            print(f"theta-store: warning: {line}", file=sys.stderr)
        print(
            f"theta-store: warning: incomplete push (thetastore.allowIncompletePush): {remote}'s clones cannot check out"
            f" {len(missing)} checkpoint version(s)",
            file=sys.stderr,
        )
        return
    raise IncompletePush(
        "refusing an incomplete push: " + "; ".join(lines),
        hint="fetch the versions from a remote that has them (`theta-store fetch --all REMOTE`), or push anyway with"
        " `git config thetastore.allowIncompletePush true` (the remote's clones will not be able to check them out)",
    )


def check_remote(store: GitStore, remote: str | None, revs: list[str]) -> dict[str, Any]:
    """The commits among `revs` and their history whose checkpoint versions `remote` lacks.

    What `theta-store push --check` and `fsck --remote` report, like `git lfs fsck --pointers`
    for a remote: each missing version with the commits that wrote it and the path.
    """
    name = remote or (remotes(store) or [""])[0]
    if not name:
        raise ThetaStoreError("no remote configured", hint="git remote add origin URL")
    writes = pointer_writes(store, revs)
    needed = {w.version for w in writes} | set(pointers_in(store, revs))
    have = remote_versions(store, name, sorted(needed))
    missing = [
        {"commit": w.commit, "path": w.path, "version": w.version.hex(), "here": store.version_commit(w.version) is not None}
        for w in writes
        if w.version not in have
    ]
    return {"remote": name, "revs": revs, "versions": len(needed), "missing": missing, "ok": needed <= have}


def _frames(store: GitStore, versions: Iterable[bytes]) -> dict[bytes, int]:
    out: dict[bytes, int] = {}
    for v in versions:
        for cid, f in store.version_frames(v).items():
            out[cid] = f.frame_len
    return out


def fetch(store: GitStore, remote: str | None, revs: list[str], all_versions: bool = False) -> dict[str, Any]:
    """`theta-store fetch`: the versions that the trees of `revs` (default HEAD) point to.

    With `all_versions`, the versions that the whole history of `revs` needs (default: of every
    branch, tag and remote-tracking ref), as `git lfs fetch --all` does. A `remote` that names no
    remote or repository is taken as the first revision, as `git lfs fetch` does.
    """
    if remote is not None and not is_remote(store, remote):
        revs = [remote, *revs]
        remote = None
    for rev in revs:
        if _git(store, "rev-parse", "--verify", "-q", f"{rev}^{{tree}}", check=False).returncode != 0:
            raise ThetaStoreError(
                f"{rev}: not a remote, nor a revision of this repository", hint="`git remote -v` lists the remotes, `git log` the revisions"
            )
    if all_versions:
        ids = set(pointers_in(store, revs or [f"--exclude={REF_PREFIX}*", "--all"]))
    else:
        ids = set()
        for rev in revs or (["HEAD"] if _git(store, "rev-parse", "-q", "--verify", "HEAD", check=False).returncode == 0 else []):
            ids |= {p.manifest_id for p in tree_pointers(store, rev).values()}
    missing = {v for v in ids if store.version_commit(v) is None}
    n = ensure_versions(store, ids, remote=remote)
    return {"needed": len(ids), "fetched": n, "versions": sorted(v.hex() for v in missing)}


# Everything git itself keeps (refs but our own, every worktree's HEAD and index, reflogs, older
# stashes): a version is dropped only when git would also prune every pointer to it.
GC_ROOTS = ["--exclude=" + REF_PREFIX + "*", "--all", "--reflog", "--indexed-objects"]


def gc(store: GitStore, dry_run: bool = False, prune: bool = False) -> dict[str, object]:
    """Drop refs/theta versions that no ref (branch, tag, remote-tracking, stash...), reflog or index
    needs; then, if `thetastore.cacheSize` is set and our packs exceed it, evict versions whose
    frames a chunk store holds (an index record is here) and that neither HEAD nor the index uses."""
    with version_lock(store.state_dir, shared=False) if not dry_run else contextlib.nullcontext(True):
        # What nothing needs is decided while no add is between writing a version's ref and
        # staging its pointer: theta-store add holds versions.lock; git (add, commit, merge: the
        # filter stores versions whose pointers git stages at its end) holds index.lock for the
        # whole command, and a version git stores after this wait is not in `versions`.
        versions = store.versions()
        if not dry_run:
            index = Path(store.repo.index_path())
            LockFile(index.with_name(index.name + ".lock"), INDEX_LOCK_WAIT).wait_free()
        needed = set(pointers_in(store, GC_ROOTS))
        drop = [v for v in versions if v not in needed]
        kept = [v for v in versions if v in needed]
        keep_frames = _frames(store, kept)
        drop_frames = _frames(store, drop)
        freed = sum(n for cid, n in drop_frames.items() if cid not in keep_frames)
        limit = cache_limit(store)
        evict = _evictable(store, kept, keep_frames, limit - (_packs_size(store) - freed)) if limit is not None else []
        if evict:
            still = _frames(store, [v for v in kept if v not in evict])
            freed += sum(n for cid, n in _frames(store, evict).items() if cid not in still)
        if not dry_run:
            for v in drop + evict:
                _git(store, "update-ref", "-d", ref_name(v))
                drop_plan(store.state_dir, v)
            store.rebuild_chunk_index()
    if not dry_run:
        if prune or evict:
            packs.prune(store)  # git never prunes from our kept packs
        if prune:
            _git(store, "gc", "--quiet", "--prune=now")
        packs.consolidate(store, limit=None)
    return {
        "versions": len(versions),
        "dropped": [v.hex() for v in drop],
        "evicted": [v.hex() for v in evict],
        "cache_limit": limit,
        "kept": len(versions) - len(drop) - len(evict),
        "freed_bytes": freed,
        "dry_run": dry_run,
        "pruned": (prune or bool(evict)) and not dry_run,
    }


def cache_limit(store: GitStore) -> int | None:
    """`thetastore.cacheSize` in bytes (git's k/m/g suffixes), None if unset."""
    r = _git(store, "config", "--type=int", "thetastore.cacheSize", check=False)
    return int(r.stdout) if r.returncode == 0 and r.stdout.strip() else None


def _packs_size(store: GitStore) -> int:
    return sum(packs.ours(store.pack_dir).values())


def _evictable(store: GitStore, kept: list[bytes], frames: dict[bytes, int], room: int) -> list[bytes]:
    """Versions to drop locally until about `-room` bytes are freed (room >= 0: none), oldest here
    first: only those a chunk store holds and the checkout does not use."""
    if room >= 0:
        return []
    current = {p.manifest_id for rev in ("HEAD", None) for p in _quiet_pointers(store, rev)}
    stored = store.index_records()
    candidates = [v for v in kept if v in stored and v not in current]
    candidates.sort(key=lambda v: _last_used(store, v))
    out: list[bytes] = []
    uses: dict[bytes, int] = {}
    for v in kept:
        for cid in store.version_frames(v):
            uses[cid] = uses.get(cid, 0) + 1
    for v in candidates:
        if room >= 0:
            break
        out.append(v)
        for cid in store.version_frames(v):
            uses[cid] -= 1
            if uses[cid] == 0:
                room += frames.get(cid, 0)
    return out


def _quiet_pointers(store: GitStore, rev: str | None) -> list[Any]:
    try:
        return list(tree_pointers(store, rev).values())
    except ThetaStoreError:
        return []  # no HEAD yet


def _last_used(store: GitStore, v: bytes) -> float:
    """When this repository stored or first read the version (its saved plan's time), else 0."""
    try:
        return os.stat(plan_path(store.state_dir, v)).st_mtime
    except OSError:
        return 0.0
