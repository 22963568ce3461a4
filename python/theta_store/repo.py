"""`Repo`: the porcelain. Every `theta-store` verb is one call here, as dulwich's `porcelain` is
for its command line: the API scripts use is the one the CLI proves.

The package has two sides. Git-facing: what git starts and what sets git up to start it
(filterproc, gitdrivers, the pre-push hook in remote.pre_push; install, hooks, gitproc).
Git-as-storage: git's object database as the chunk store (gitstore: objects and refs; plan:
where each chunk is; remote: the transport; history: which versions commits need). Between
them: the checkpoint core (checkpoint, reader, manifest, formats) and this porcelain.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import stat
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from . import _native, chunkstore, install
from . import remote as transport
from .bases import base_version, delta_depth
from .checkpoint import DEFAULT_CHUNK_BYTES, Factors, Scanned, add_file, restore_to, scan
from .encodings import KINDS, chunk_kinds
from .errors import CorruptObject, FormatError, InvalidArgument, ObjectNotFound, PointerError, ThetaStoreError, VersionsMissing
from .gitstore import GitStore
from .history import pointer_writes, tree_pointers
from .lossy import apply_lossy, parse_spec
from .manifest import SpanEntry
from .plan import INDEX_PREFIX, REF_PREFIX, damaged_chunks, load_manifest, plan_from_store, version_lock
from .pointer import POINTER_MAX, Pointer, looks_like_pointer
from .reader import TensorView, is_sharded_model, numpy_dtype, tensor_views
from .remote import ensure_versions

if TYPE_CHECKING:
    from .deltas import Deltas

FSCK_BATCH = 16


@dataclass
class AddReport:
    path: str
    format: str
    size: int
    tensors: int
    manifest: str
    new_chunks: int
    reused_chunks: int
    new_bytes: int
    reused_bytes: int
    delta_chunks: int = 0  # new chunks stored as deltas against the base version
    base: str = ""  # the base version's manifest id (hex), if there was one
    lossy: dict[str, dict[str, Any]] = field(default_factory=dict)  # tensors stored as approximations
    tracked: bool = True  # a .gitattributes pattern gives the path our filter: clones get the checkpoint


class Repo:
    """A Git repository with theta-store checkpoints.

    Example:
        >>> import theta_store, tempfile, subprocess, numpy as np
        >>> d = tempfile.mkdtemp(); _ = subprocess.run(["git", "init", "-q", d])
        >>> theta_store.save_safetensors(f"{d}/m.safetensors", {"w": np.ones((4, 4), np.float32)})
        >>> with theta_store.Repo(d) as repo:
        ...     report = repo.add([f"{d}/m.safetensors"])[0]
        >>> report.tensors
        1
    """

    def __init__(self, path: str | os.PathLike[str] = ".", *, hooks: bool = True) -> None:
        self.store = GitStore(path)
        self.root = str(self.store.worktree)
        if hooks:  # every command that touches a repository: a push must never go without its versions
            install.ensure_hooks_and_say(self.root)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Repo:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def relpath(self, path: str) -> str:
        full = os.path.realpath(path)
        rel = os.path.relpath(full, self.root)
        if rel.startswith(".."):
            raise ThetaStoreError(f"{path}: outside the repository {self.root}")
        return rel.replace(os.sep, "/")

    # ---- add / restore ----
    def add(
        self,
        paths: Sequence[str],
        *,
        stage: bool = True,
        progress: bool | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        scanned: Scanned | None = None,
        base: str | None = None,
        lora: str | os.PathLike[str] | None = None,
        lossy: str | None = None,
    ) -> list[AddReport]:
        """Store each checkpoint and stage its pointer in the Git index. `scanned`: the scan of
        one of them, done already (`checkpoint.scan`). Changed tensors are stored as deltas
        against the file's version in HEAD, or in revision `base`; `lora`: a PEFT adapter
        folder whose updates were folded into the checkpoint (its factors predict the change);
        `lossy`: "low-rank:rtol=T" or "low-rank:rank=R" stores each changed 2-D float tensor as
        the base plus a low-rank approximation, rewriting the file to match (lossy.py)."""
        # Shared from before the first version is stored until the last pointer is staged: gc
        # (exclusive) never drops a version in between. Taken once a file has been read and parsed.
        with contextlib.ExitStack() as held:
            locked: list[bool] = []

            def lock() -> None:
                if stage and not locked:
                    held.enter_context(version_lock(self.store.state_dir, shared=True))
                    locked.append(True)

            return self._add(paths, stage, progress, chunk_bytes, scanned, base, lora, lossy, lock)

    def _add(
        self,
        paths: Sequence[str],
        stage: bool,
        progress: bool | None,
        chunk_bytes: int,
        scanned: Scanned | None,
        base: str | None,
        lora: str | os.PathLike[str] | None,
        lossy: str | None,
        lock: Callable[[], None],
    ) -> list[AddReport]:
        reports = []
        depth = delta_depth(self.store)
        spec = parse_spec(lossy) if lossy is not None else None
        for path in paths:
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                raise ObjectNotFound(f"{path}: no such file") from None
            if not stat.S_ISREG(st.st_mode):
                from .formats import file_kind  # the adapters load only when a file is stored

                link = stat.S_ISLNK(st.st_mode)
                raise FormatError(
                    path,
                    "",
                    f"is {file_kind(st.st_mode)}, not a regular file: refusing to read it as a checkpoint",
                    hint="git commits a link itself; add the file it points to" if link else "",
                )
            rel = self.relpath(path)
            against = base_version(self.store, rel, base) if depth else None
            factors: dict[str, Factors] = {}
            approximated: dict[str, dict[str, Any]] = {}
            if (lora is not None or spec is not None) and against is None:
                flag = "--lora" if lora is not None else "--lossy"
                raise InvalidArgument(
                    f"{rel}: {flag} needs an earlier version of the file to code against, and {base or 'HEAD'} has none"
                    + ("" if depth else " (thetastore.deltaDepth is 0)"),
                    hint="commit the base model first, or name one with --base REV",
                )
            if lora is not None:
                if scanned is None or scanned.path != path:
                    scanned = scan(path, chunk_bytes, progress)
                from .lora import adapter_factors  # numpy-heavy: only when asked

                factors = adapter_factors(lora, {s.name: s.shape for s in scanned.spans if not s.opaque})
            if spec is not None and against is not None:
                if scanned is None or scanned.path != path:
                    scanned = scan(path, chunk_bytes, progress)
                if scanned.expanded is not None:  # its regions are in the expanded file, not in this one
                    raise InvalidArgument(
                        f"{rel}: --lossy cannot rewrite the arrays of deflated .npz members",
                        hint="save it with np.savez (uncompressed) to store approximations",
                    )
                lossy_factors, approximated = apply_lossy(self.store, scanned, against, spec)
                factors.update(lossy_factors)
                if approximated:
                    scanned = scan(path, chunk_bytes, progress)  # the file was rewritten
            r = add_file(
                self.store,
                path,
                chunk_bytes=chunk_bytes,
                progress=progress,
                scanned=scanned,
                base=against,
                max_depth=depth,
                factors=factors,
                lossy=approximated,
                before_store=lock,
            )
            if stage:
                self.store.stage_blob(rel, r.pointer.to_bytes())
            reports.append(
                AddReport(
                    rel,
                    r.manifest.format,
                    r.raw_bytes,
                    len(r.manifest.tensors),
                    r.pointer.manifest_id.hex(),
                    r.new_chunks,
                    r.reused_chunks,
                    r.new_bytes,
                    r.reused_bytes,
                    r.delta_chunks,
                    against.manifest_id.hex() if against is not None else "",
                    approximated,
                )
            )
        if stage:
            untracked = set(self.untracked(report.path for report in reports))
            for report in reports:
                report.tracked = report.path not in untracked
        return reports

    def untracked(self, paths: Iterable[str]) -> list[str]:
        """The paths (relative to the root) that no staged .gitattributes line gives our filter."""
        filters = self._filter_attributes(list(paths))
        return [p for p, f in filters.items() if f != "thetastore"]

    def pointer(self, path: str, rev: str | None = None) -> Pointer:
        """The pointer stored for `path` in the index (rev None) or at commit `rev`."""
        rel = self.relpath(path)
        data = self.store.read_path(rel, rev)
        if not looks_like_pointer(data):
            raise PointerError(
                f"{rel}: {'the index' if rev is None else rev} holds a regular file, not a theta-store pointer",
                hint="add it with `theta-store add` (or track it with `theta-store track`)",
            )
        return Pointer.parse(data, f"{rel} ({'index' if rev is None else rev})")

    def restore(self, paths: Sequence[str], *, rev: str | None = None, progress: bool | None = None) -> list[str]:
        """Rebuild each checkpoint byte-exactly from its pointer (index or `rev`).

        A path that names a directory (or a pathspec such as `.` or `'*.safetensors'`) restores
        every pointer under it; there, a file that already holds its checkpoint is left alone.
        Versions not here are fetched from the remotes first, as a checkout does.
        """
        todo: dict[str, Pointer] = {}
        for path in paths:
            rel = self.relpath(path)
            under = tree_pointers(self.store, rev, [rel])
            if not under or rel in under:
                todo[rel] = self.pointer(path, rev)  # one file: says why it is not a pointer
                continue
            states = self.worktree_states(under) if rev is None else {}
            todo.update((r, p) for r, p in under.items() if states.get(r) != "materialised")
        ensure_versions(self.store, {p.manifest_id for p in todo.values()}, what=", ".join(sorted(todo)[:3]))
        for rel, p in sorted(todo.items()):
            self._restore_one(rel, p, stage=rev is None, progress=progress)
        return sorted(todo)

    def _restore_one(self, rel: str, p: Pointer, *, stage: bool, progress: bool | None) -> None:
        path = os.path.join(self.root, rel)
        restore_to(self.store, p, path, progress=progress)
        if stage:
            # Record the new file's stat data: git would otherwise call a pointer-sized index
            # entry "modified" by its size alone, without running the clean filter. The file
            # is dated one second back: an index written in the second the file was written
            # in makes its entry "racily clean" for git, and the next git command would hash
            # the file again (stage_blob would rather wait out that second).
            st = os.stat(path)
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - 1_000_000_000))
            self.store.stage_blob(rel, p.to_bytes())

    def worktree_states(self, pointers: dict[str, Pointer]) -> dict[str, str]:
        """For each index pointer (root-relative path -> pointer), what its work-tree file holds:
        "materialised" (its checkpoint), "pointer" (the pointer file itself), "modified" or "missing".

        Cheap: sizes first; a file whose stat data still matches the index is what git last
        cleaned to that pointer; only a checkpoint-sized file git has not seen since is hashed
        (in the core, mapped, not read through Python).
        """
        if not pointers:
            return {}
        dirty = set(self.store.git("diff-files", "--name-only", "-z").decode(errors="surrogateescape").split("\0"))
        out = {}
        for rel, p in pointers.items():
            path = os.path.join(self.root, rel)
            try:
                size = os.stat(path).st_size
            except (FileNotFoundError, NotADirectoryError):
                out[rel] = "missing"
                continue
            if size <= POINTER_MAX:  # the pointer file itself, or a checkpoint as small as one
                with open(path, "rb") as f:
                    data = f.read()
                if data == p.to_bytes():
                    out[rel] = "pointer"
                else:
                    out[rel] = "materialised" if size == p.size and _native.chunk_id(data) == p.blake3 else "modified"
            elif size != p.size:
                out[rel] = "modified"
            elif rel not in dirty or file_blake3(path) == p.blake3:
                out[rel] = "materialised"
            else:
                out[rel] = "modified"
        return out

    # ---- getting files ----
    def pull(self, remote: str | None = None, paths: Sequence[str] = (), *, progress: bool | None = None) -> dict[str, Any]:
        """Fetch the versions HEAD's tree (and the index) need, then materialise every pointer file
        in the work tree whose index entry is that pointer (all, or those under `paths`).

        Files that already hold their checkpoint are skipped; files with local changes are never
        overwritten; a file missing from the work tree is written (as `git lfs pull` does).
        Returns {"fetched": [version...], "restored": [path...], "skipped": [{path, reason}]}.
        Raises VersionsMissing (after restoring what it could) if some version is on no remote.
        """
        specs = [self.relpath(p) for p in paths]
        head = tree_pointers(self.store, "HEAD", specs) if self._has_head() else {}
        index = tree_pointers(self.store, None, specs)
        if specs and not head and not index:
            raise ObjectNotFound(
                f"{', '.join(paths)}: no theta-store pointer there, in HEAD or in the index", hint="`theta-store status` lists the pointers"
            )
        needed = {p.manifest_id for p in (*head.values(), *index.values())}
        absent = {v for v in needed if self.store.version_commit(v) is None}
        missing: VersionsMissing | None = None
        try:
            ensure_versions(self.store, needed, remote=remote, what="HEAD")
        except VersionsMissing as e:
            missing = e
        fetched = sorted(v.hex() for v in absent if self.store.version_commit(v) is not None)
        states = self.worktree_states(index)
        restored: list[str] = []
        skipped: list[dict[str, str]] = []
        for rel, p in sorted(index.items()):
            state = states[rel]
            if state == "materialised":
                skipped.append({"path": rel, "reason": "already materialised"})
            elif state == "modified":
                skipped.append({"path": rel, "reason": "local changes (left as is; `theta-store restore` discards them)"})
            elif missing is not None and p.manifest_id in missing.missing:
                skipped.append({"path": rel, "reason": f"version {p.manifest_id.hex()[:16]} is not on any remote"})
            else:
                self._restore_one(rel, p, stage=True, progress=progress)
                restored.append(rel)
        if missing is not None:
            raise VersionsMissing(missing.missing, missing.tried, ", ".join(s["path"] for s in skipped if "remote" in s["reason"]))
        return {"fetched": fetched, "restored": restored, "skipped": skipped}

    # ---- remotes ----
    def is_remote(self, name: str) -> bool:
        """Whether `name` is a configured remote or names a repository (URL, scp-like, a path)."""
        return transport.is_remote(self.store, name)

    def fetch(self, remote: str | None = None, revs: Sequence[str] = (), *, all_versions: bool = False) -> dict[str, Any]:
        """Fetch the checkpoint versions the trees of `revs` (default HEAD) point to; with
        `all_versions`, every version their history needs (default: of every branch, tag and
        remote-tracking ref). A `remote` that names no remote is taken as the first revision.
        Returns {"needed": n, "fetched": n, "versions": [hex...]} (those that were not here)."""
        return transport.fetch(self.store, remote, list(revs), all_versions=all_versions)

    def push(self, remote: str | None = None, revs: Sequence[str] = (), *, all_refs: bool = False) -> dict[str, int]:
        """Send the versions `revs` (default HEAD; `all_refs`: every branch and tag) need and
        `remote` (default: the first remote) lacks. What a plain `git push` does through the
        pre-push hook, for what it could not send. Returns counts: versions, new_bytes, reused_bytes."""
        return transport.push(self.store, remote, list(revs), all_refs=all_refs)

    def check_remote(self, remote: str | None = None, revs: Sequence[str] | None = None) -> dict[str, Any]:
        """The commits among `revs` and their history whose versions `remote` lacks (`push --check`).
        `revs` None: the remote's branches as last fetched (`fsck --remote`)."""
        if revs is None:
            name = remote or "origin"
            tracking = self.store.git("for-each-ref", "--format=%(refname)", f"refs/remotes/{name}/").split()
            if not tracking:
                raise ThetaStoreError(f"no remote-tracking branches of {name!r} here", hint=f"git fetch {name}")
            remote, revs = name, [f"--remotes={name}"]
        return transport.check_remote(self.store, remote, list(revs))

    def gc(self, *, dry_run: bool = False, prune: bool = False) -> dict[str, object]:
        """Drop the stored versions that no ref, reflog or index needs; `prune`: then free their
        frames' space (git gc --prune=now)."""
        return transport.gc(self.store, dry_run=dry_run, prune=prune)

    # ---- chunk stores ----
    def store_add(
        self, name: str, url: str, *, endpoint: str | None = None, region: str | None = None, default: bool = True
    ) -> dict[str, Any]:
        """Name a chunk store in `.thetastore` (staged: commit it so clones find it); `default`:
        pushes keep frames there. Returns {"name", "url", "file"}."""
        path = chunkstore.add_store(self.store, name, url, endpoint=endpoint, region=region, default=default)
        return {"name": name, "url": url, "endpoint": endpoint, "file": str(path), "default": default}

    def store_remove(self, name: str) -> None:
        """Remove a chunk store from `.thetastore` (staged). Versions already there stay there."""
        chunkstore.remove_store(self.store, name)

    def stores(self) -> dict[str, Any]:
        """The chunk stores `.thetastore` names, the default one, and which Git remote uses which."""
        found, default = chunkstore.stores(self.store)
        remotes = {}
        for name in transport.remotes(self.store):
            cfg = chunkstore.for_remote(self.store, name)
            remotes[name] = cfg.name if cfg else "git"
        return {"stores": [asdict(c) for c in found.values()], "default": default, "remotes": remotes}

    # ---- tracking ----
    def track(self, patterns: Sequence[str]) -> dict[str, Any]:
        """Track `patterns` (.gitattributes lines giving them our filter), configure the filter
        here if it is not set, and stage .gitattributes. Returns {"tracked", "configured", "staged"}."""
        added = install.track(list(patterns), self.root)
        configured = install.ensure_filter(self.root)
        return {"tracked": added, "configured": configured, "staged": install.stage_attributes(self.root)}

    def untrack(self, patterns: Sequence[str]) -> list[str]:
        """Remove our .gitattributes lines for `patterns` (other tools' lines stay); returns those removed."""
        return install.untrack(list(patterns), self.root)

    def tracked(self) -> list[tuple[str, str]]:
        """(pattern, .gitattributes file) of every tracked pattern."""
        return install.tracked(self.root)

    def _has_head(self) -> bool:
        r = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD^{tree}"], cwd=self.root, capture_output=True, check=False)
        return r.returncode == 0

    # ---- inspect ----
    def status(self) -> dict[str, Any]:
        """Every pointer in the index and in HEAD: its version, what the work tree holds for it, and
        whether a `filter=thetastore` attribute of the staged .gitattributes covers its path.

        A pointer under a path no pattern covers (`git mv model.safetensors model.bin`, or a
        .gitattributes never committed) reaches a clone as the pointer file itself.
        Returns {"files": [...], "uncovered": [path...], "pointer_files": [path...]}.
        """
        index = tree_pointers(self.store, None)
        head = tree_pointers(self.store, "HEAD") if self._has_head() else {}
        paths = sorted(set(index) | set(head))
        filters = self._filter_attributes(paths)
        states = self.worktree_states(index)
        files = []
        for rel in paths:
            p = index.get(rel) or head[rel]
            files.append(
                {
                    "path": rel,
                    "version": p.manifest_id.hex(),
                    "size": p.size,
                    "format": p.format,
                    "staged": rel in index,
                    "committed": rel in head,
                    "changed": rel in index and rel in head and index[rel] != head[rel],
                    "worktree": states.get(rel, "deleted"),
                    "tracked": filters.get(rel) == "thetastore",
                }
            )
        return {
            "files": files,
            "uncovered": [f["path"] for f in files if not f["tracked"]],
            "pointer_files": [f["path"] for f in files if f["worktree"] == "pointer"],
        }

    def _filter_attributes(self, paths: list[str]) -> dict[str, str]:
        """path -> its `filter` attribute as the staged .gitattributes (what a commit carries) set it."""
        if not paths:
            return {}
        out = self.store.git(
            "check-attr", "--cached", "-z", "--stdin", "filter", input="\0".join(paths).encode(errors="surrogateescape") + b"\0"
        )
        fields = out.decode(errors="surrogateescape").split("\0")
        return {fields[i]: fields[i + 2] for i in range(0, len(fields) - 2, 3)}

    def show(self, path: str, rev: str | None = None) -> dict[str, Any]:
        """Per-tensor table of a stored checkpoint: name, dtype, shape, raw and stored bytes, codec.
        A sharded model's index (``*.safetensors.index.json``) shows its shards' rows, each with
        its ``shard``."""
        if is_sharded_model(self.store, self.relpath(path), rev):
            return self._show_sharded(path, rev)
        p = self.pointer(path, rev)
        m = load_manifest(self.store, p.manifest_id)
        frames = self.store.version_frames(p.manifest_id)
        kinds = chunk_kinds(self.store, frames, (c for s in m.spans for c, _ in s.chunks))
        rows: list[dict[str, Any]] = []
        views: dict[str, list[TensorView]] = {}
        members = []
        for v in tensor_views(m).values():
            if v.span is not None:
                views.setdefault(v.span.name, []).append(v)
            elif v.member is not None:
                members.append(v)
        for s in m.spans:
            stored = sum(frames[c].frame_len for c, _ in s.chunks if c in frames)
            codecs = sorted({frames[c].planes for c, _ in s.chunks if c in frames})
            used = {kinds[c] for c, _ in s.chunks if c in kinds}
            rows.append(
                {
                    "name": s.name if s.kind == "tensor" else "(skeleton)",
                    "kind": s.kind,
                    "dtype": s.dtype,
                    "shape": list(s.shape),
                    "offset": s.offset,
                    "bytes": s.length,
                    "stored": stored,
                    "chunks": len(s.chunks),
                    "codec": ",".join(codecs),
                    "encoding": "+".join(k for k in KINDS if k in used) or "plain",
                    "lossy": m.lossy.get(s.name) if s.kind == "tensor" else None,
                }
            )
            if s.kind == "tensor":
                rows.extend(_view_rows(s, views.get(s.name, [])))
        # Arrays of deflated .npz members: their bytes are in the skeleton, compressed.
        rows.extend(_member_row(v) for v in members)
        unique = {c for s in m.spans for c, _ in s.chunks}
        return {
            "path": self.relpath(path),
            "format": m.format,
            "size": m.file_size,
            "blake3": m.file_blake3.hex(),
            "manifest": p.manifest_id.hex(),
            "tensors": len(tensor_views(m)),
            "stored": sum(frames[c].frame_len for c in unique if c in frames),
            "rows": rows,
            "note": m.note,
            "lossy": m.lossy,
        }

    def _show_sharded(self, path: str, rev: str | None) -> dict[str, Any]:
        from .reader import ShardedReader

        rel = self.relpath(path)
        with ShardedReader(GitStore(self.store.worktree), rel, rev) as sharded:
            shards = sharded.shards
            listed = set(sharded.keys())
        infos = [self.show(os.path.join(self.root, s), rev) for s in shards]
        rows = [r | {"shard": info["path"]} for info in infos for r in info["rows"]]
        named = [r for r in rows if r["kind"] != "skeleton"]
        return {
            "path": rel,
            "format": "sharded " + "+".join(sorted({i["format"] for i in infos})),
            "size": sum(i["size"] for i in infos),
            "manifest": "",
            "shards": [{k: v for k, v in i.items() if k != "rows"} for i in infos],
            "tensors": sum(i["tensors"] for i in infos),
            "stored": sum(i["stored"] for i in infos),
            "rows": rows,
            "not_in_weight_map": [r["name"] for r in named if r["name"] not in listed],
            "note": "; ".join(f"{i['path']}: {i['note']}" for i in infos if i["note"]),
            "lossy": {k: v for i in infos for k, v in i["lossy"].items()},
        }

    def stats(self) -> dict[str, Any]:
        """Raw vs stored bytes per checkpoint in the index, and for every stored version.

        Versions come in the order of the first commit that wrote them (versions no commit
        points to last); each one's `added` is the bytes of the frames no version before it had.
        """
        frame_len: dict[bytes, int] = {}
        versions: list[dict[str, Any]] = []
        commits: dict[bytes, list[dict[str, str]]] = {}
        for w in pointer_writes(self.store, [f"--exclude={REF_PREFIX}*", "--all"], oldest_first=True):
            commits.setdefault(w.version, []).append({"commit": w.commit, "date": w.date, "path": w.path})
        stored = self.store.versions()
        have = set(stored)
        for mid in [v for v in commits if v in have] + [v for v in stored if v not in commits]:
            m = load_manifest(self.store, mid)
            fr = self.store.version_frames(mid)
            added = sum(f.frame_len for cid, f in fr.items() if cid not in frame_len)
            for cid, f in fr.items():
                frame_len[cid] = f.frame_len
            ids = m.chunk_ids()
            versions.append(
                {
                    "manifest": mid.hex(),
                    "format": m.format,
                    "size": m.file_size,
                    "tensors": len(m.tensors),
                    "stored": sum(fr[c].frame_len for c in ids if c in fr),
                    "added": added,
                    "chunks": len(ids),
                    "commits": commits.get(mid, []),
                }
            )
        checkpoints = []
        for rel, oid in self.store.iter_paths(None):
            data = self.store.read_object(oid)
            if looks_like_pointer(data):
                p = Pointer.parse(data, rel)
                v = next((v for v in versions if v["manifest"] == p.manifest_id.hex()), None)
                checkpoints.append({"path": rel, "size": p.size, "manifest": p.manifest_id.hex(), "stored": v["stored"] if v else None})
        raw_total = sum(v["size"] for v in versions)
        stored_total = sum(frame_len.values())
        return {
            "versions": versions,
            "checkpoints": checkpoints,
            "raw_bytes": raw_total,
            "stored_bytes": stored_total,
            "unique_chunks": len(frame_len),
            "ratio": stored_total / raw_total if raw_total else 0.0,
        }

    def fsck(self, progress: bool | None = None) -> dict[str, Any]:
        """Re-hash every stored object; report missing and corrupt ones (never raises for them)."""
        problems: list[dict[str, str]] = []
        # By (chunk, object): a version whose tree gives a chunk the wrong object is checked on its own.
        checked: set[tuple[bytes, bytes]] = set()
        bad: dict[tuple[bytes, bytes], str] = {}  # what is wrong with each damaged one
        versions = self.store.versions()
        for mid in versions:
            try:
                m = load_manifest(self.store, mid)
                plan = plan_from_store(self.store, mid, m)
                chunks = list({(c.chunk_id, c.object_id): c for c in plan.chunks if (c.chunk_id, c.object_id) not in checked}.values())
            except (ObjectNotFound, CorruptObject, KeyError) as e:
                problems.append({"version": mid.hex(), "object": "", "problem": str(e)})
                continue
            shared = {(c.chunk_id, c.object_id) for c in plan.chunks} & bad.keys()  # with a version checked before
            for key in sorted(shared):
                problems.append({"version": mid.hex(), "object": key[1].hex(), "problem": bad[key]})
            for key, why in damaged_chunks(chunks, plan, self.store.read_object, FSCK_BATCH).items():
                bad[key] = why
                problems.append({"version": mid.hex(), "object": key[1].hex(), "problem": why})
            checked.update((c.chunk_id, c.object_id) for c in chunks)
        for rel, oid in self.store.iter_paths(None):
            try:
                data = self.store.read_object(oid)
            except (ObjectNotFound, CorruptObject) as e:
                problems.append({"version": "", "object": oid.hex(), "problem": f"{rel}: {e}"})
                continue
            if looks_like_pointer(data):
                try:
                    p = Pointer.parse(data, rel)
                    if p.manifest_id not in set(versions):
                        problems.append(
                            {"version": p.manifest_id.hex(), "object": "", "problem": f"{rel}: its version is not in this repository"}
                        )
                except PointerError as e:
                    problems.append({"version": "", "object": oid.hex(), "problem": str(e)})
        return {
            "versions": len(versions),
            "chunks_checked": len(checked),
            "problems": problems,
            "damaged": self._damaged_versions(problems),
            "ok": not problems,
        }

    def repair(self, remote: str | None = None, progress: bool | None = None) -> dict[str, Any]:
        """`fsck --repair`: set aside what is damaged, keep what of it is intact, fetch intact
        copies of the damaged versions from `remote` (None: every remote), rebuild the caches."""
        import shutil
        import time

        from .plan import ref_name

        before = self.fsck(progress=progress)
        out: dict[str, Any] = {"damaged": before["damaged"], "moved_aside": [], "repaired": [], "not_repaired": [], "salvaged_packs": 0}
        store = self.store
        if before["ok"]:
            self._rebuild_caches()
            return {**out, "fsck": before, "ok": True}
        bad_ids = {bytes.fromhex(p["object"]) for p in before["problems"] if p["object"]}
        # A version whose commit, tree or manifest cannot be read: the pack of its commit is the suspect.
        unread = {bytes.fromhex(p["version"]) for p in before["problems"] if p["version"] and not p["object"]}
        bad_ids |= {c for v in unread if (c := store.version_commit(v)) is not None}
        bad = sorted(bad_ids)
        paths, where = store.locate(bad)
        files = sorted({paths[loc.pack] for loc in where if loc is not None})
        loose = [store.objects_dir / oid.hex()[:2] / oid.hex()[2:] for oid, loc in zip(bad, where, strict=True) if loc is None]
        files += [str(f) for f in loose if f.is_file()]
        # Git must stop reading a damaged pack (a fetch would compare the objects it receives with
        # the damaged ones it holds): it goes to .git/theta-store/damaged/, kept for inspection.
        aside = store.state_dir / "damaged" / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside.mkdir(parents=True, exist_ok=True)
        moved: list[str] = []
        for f in files:
            stem = f.removesuffix(".pack")
            parts = [stem + ext for ext in (".pack", ".idx", ".keep", ".rev", ".mtimes", ".bitmap")] if f.endswith(".pack") else [f]
            for part in parts:
                if os.path.exists(part):
                    dest = aside / os.path.basename(part)
                    shutil.move(part, dest)
                    moved.append(str(dest))
        out["moved_aside"] = moved
        self.store.close()
        self.store = store = GitStore(self.root)
        # The intact objects of a moved pack are written back (loose): versions only here keep them.
        for f in moved:
            if f.endswith(".pack"):
                with open(f, "rb") as stdin:  # its errors are the damaged objects, which the fsck below names again
                    subprocess.run(["git", "unpack-objects", "-r", "-q"], cwd=self.root, stdin=stdin, capture_output=True, check=False)
                out["salvaged_packs"] += 1
        store.refresh()
        middle = self.fsck(progress=progress)
        targets = sorted({bytes.fromhex(d["version"]) for d in [*before["damaged"], *middle["damaged"]]})
        old = {v: store.version_commit(v) for v in targets}
        for v in targets:
            if old[v] is not None:
                store.git("update-ref", "-d", ref_name(v))
        try:
            ensure_versions(store, set(targets), quiet=True, remote=remote)
        except VersionsMissing as e:
            for v in sorted(e.missing):
                c = old[v]
                if c is not None:  # nothing better found: the damaged version stays as it was, still listed
                    store.git("update-ref", ref_name(v), c.hex())
        except ThetaStoreError as e:
            for v, c in old.items():
                if c is not None and store.version_commit(v) is None:
                    store.git("update-ref", ref_name(v), c.hex())
            out["error"] = str(e)
        store.refresh()
        self._rebuild_caches()
        after = self.fsck(progress=progress)
        still = {d["version"] for d in after["damaged"]}
        out["repaired"] = [v.hex() for v in targets if v.hex() not in still]
        out["not_repaired"] = sorted(still)
        return {**out, "fsck": after, "ok": after["ok"]}

    def _rebuild_caches(self) -> None:
        """The chunk index from the version trees; saved plans dropped (the next checkout of each version writes it again)."""
        from .plan import drop_plan

        self.store.rebuild_chunk_index()
        for v in self.store.versions():
            drop_plan(self.store.state_dir, v)

    def _damaged_versions(self, problems: list[dict[str, str]]) -> list[dict[str, Any]]:
        """Each version fsck found damaged or missing, with the paths and commits that wrote a pointer to it."""
        damaged: dict[str, dict[str, Any]] = {}
        for p in problems:
            if p["version"]:
                d = damaged.setdefault(p["version"], {"version": p["version"], "paths": [], "commits": [], "problems": []})
                d["problems"].append(p["problem"])
        if not damaged:
            return []
        # Every branch, tag, remote branch and stash; not the version refs, which hold no pointers.
        revs = [f"--exclude={REF_PREFIX}*", f"--exclude={INDEX_PREFIX}*", "--all"]
        for w in pointer_writes(self.store, revs) if self.store.has_revision("HEAD") else []:
            hit = damaged.get(w.version.hex())
            if hit is not None:
                if w.path not in hit["paths"]:
                    hit["paths"].append(w.path)
                hit["commits"].append({"commit": w.commit, "date": w.date, "path": w.path})
        for rel, ptr in tree_pointers(self.store, None).items():
            hit = damaged.get(ptr.manifest_id.hex())
            if hit is not None and rel not in hit["paths"]:
                hit["paths"].append(rel)  # staged, not committed yet
        return [damaged[v] for v in sorted(damaged)]

    # ---- merges ----
    def merge_conflicted(self, path: str, default: Any | None, per_tensor: Sequence[tuple[str, Any]] = ()) -> list[str]:
        """Merge the conflicted checkpoint at `path` again from the index's stages, with strategy
        `default` (None: the configured one) and per-tensor choices [(GLOB, strategy)]; stage it.
        Returns the report's lines; raises MergeConflict when tensors still conflict."""
        from .merge3 import chooser, report, resolve_conflict

        rel = self.relpath(path)
        out = resolve_conflict(self.store, rel, chooser(self._merge_default(rel, default), per_tensor))
        return [*report(out, rel), f"theta-store: {rel}: merged and staged; `git commit` concludes the merge"]

    def merge_revisions(
        self,
        specs: Sequence[tuple[str | None, str]],
        output: str,
        default: Any | None,
        per_tensor: Sequence[tuple[str, Any]] = (),
        base: tuple[str | None, str] | None = None,
    ) -> list[str]:
        """Merge checkpoints [(rev, path)] (path from the top; rev None: the spec was a bare
        revision, whose path is that another spec names, else `output`'s place in the
        repository) into the file `output`; the base is `base` or their merge base."""
        from .merge3 import chooser, merge_revisions, report

        named = [p for r, p in specs if r is not None]
        rel = named[0] if named else os.path.relpath(os.path.realpath(output), self.root).replace(os.sep, "/")
        pairs = [(rev, path) if rev is not None else (path, rel) for rev, path in specs]
        based = None if base is None else (base if base[0] is not None else (base[1], rel))
        choose = chooser(self._merge_default(rel, default), per_tensor)
        out = merge_revisions(
            self.store, [(str(r), p) for r, p in pairs], None if based is None else (str(based[0]), based[1]), choose, output
        )
        return report(out, output)

    @staticmethod
    def _merge_default(rel: str, default: Any | None) -> Any:
        if default is not None:
            return default
        from .gitdrivers import merge_strategy

        strategy, _ = merge_strategy(rel)
        return strategy

    # ---- deltas between revisions ----
    def delta_files(self, base: str | None, rev: str | None, paths: Sequence[str] = ()) -> list[tuple[str, str]]:
        """(path, status) of each checkpoint in revision `base` or `rev` (None: the index), under
        `paths` if given: "added", "removed", "unchanged" (the same version) or "changed" (`delta`
        tells how)."""
        for r in (base, rev):
            if r is not None and not self.store.has_revision(r):
                raise ObjectNotFound(
                    f"{r}: unknown revision (no branch, tag or commit of that name here)",
                    hint="`git log --oneline --all` lists the commits",
                )
        specs = [self.relpath(p) for p in paths]
        old, new = tree_pointers(self.store, base, specs), tree_pointers(self.store, rev, specs)
        if not old and not new:
            where = " under " + " ".join(paths) if paths else ""
            raise ObjectNotFound(
                f"no theta-store checkpoints{where} in {base or 'the index'} or {rev or 'the index'}",
                hint="`theta-store status` lists the tracked checkpoints; give a path that was added with theta-store",
            )
        out = []
        for rel in sorted(set(old) | set(new)):
            if rel not in old or rel not in new:
                out.append((rel, "added" if rel not in old else "removed"))
            else:
                out.append((rel, "unchanged" if old[rel].manifest_id == new[rel].manifest_id else "changed"))
        return out

    def delta(self, path: str, base: str | None, rev: str | None) -> Deltas:
        """`theta_store.delta` of `path` (relative to the current directory) in this repository."""
        from .deltas import delta

        return delta(os.path.join(self.root, self.relpath(path)), base, rev, repo=self.root)

    def log(self, paths: Sequence[str] = ()) -> dict[str, Any]:
        """The versions of the checkpoints under `paths` (default: all) in HEAD's history, newest
        first, with their commits, sizes, stored bytes added and a one-line summary of the change."""
        from .diffview import version_log

        return version_log(self.store, [self.relpath(p) for p in paths])

    def extract_lora(self, path: str, base: str, rev: str, **options: Any) -> dict[str, Any]:
        """`theta_store.extract_lora` of `path` (relative to the current directory) in this repository."""
        from .lora import extract_lora

        return extract_lora(os.path.join(self.root, self.relpath(path)), base, rev, repo=self.root, **options)


def _view_rows(span: SpanEntry, views: list[TensorView]) -> list[dict[str, Any]]:
    """`show` rows of the tensors a torch pickle builds on the storage stored as `span`, other
    than the one that is the span itself: tied weights and views, each an offset, shape and
    strides (in elements) into that one stored region, which holds their bytes once."""
    rows = []
    for v in views:
        if v.name == span.name and v.shape == span.shape and v.storage_offset == 0 and v.stride in (None, _c_strides(v.shape)):
            continue
        itemsize = numpy_dtype(v.dtype).itemsize
        rows.append(
            {
                "name": v.name,
                "kind": "view",
                "dtype": v.dtype,
                "shape": list(v.shape),
                "offset": span.offset + v.storage_offset * itemsize,
                "bytes": math.prod(v.shape) * itemsize,
                "stored": 0,
                "chunks": 0,
                "codec": "",
                "encoding": f"view of {span.name}"
                + ("" if v.stride is None else f" (offset {v.storage_offset}, stride {'x'.join(map(str, v.stride)) or '-'})"),
                "lossy": None,
                "view_of": span.name,
                "storage_offset": v.storage_offset,
                "stride": list(v.stride) if v.stride is not None else None,
            }
        )
    return rows


def _member_row(v: TensorView) -> dict[str, Any]:
    return {
        "name": v.name,
        "kind": "member",
        "dtype": v.dtype,
        "shape": list(v.shape),
        "offset": None,
        "bytes": math.prod(v.shape) * numpy_dtype(v.dtype).itemsize,
        "stored": 0,
        "chunks": 0,
        "codec": "",
        "encoding": f"in deflated member {v.member} (skeleton)",
        "lossy": None,
        "member": v.member,
    }


def _c_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    out, n = [], 1
    for d in reversed(shape):
        out.append(n)
        n *= d
    return tuple(reversed(out))


def file_blake3(path: str) -> bytes:
    """BLAKE3 of a file's bytes, hashed by the core over a read-only mapping of it."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return _native.chunk_id(b"")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return _native.chunk_id(m)


def report_dict(r: AddReport) -> dict[str, Any]:
    return asdict(r)
