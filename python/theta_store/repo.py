"""`Repo`: what the CLI does, as a Python API."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from . import _native
from .checkpoint import DEFAULT_CHUNK_BYTES, Scanned, add_file, chunk_tuples, load_manifest, restore_to
from .errors import CorruptObject, ObjectNotFound, PointerError, ThetaStoreError
from .gitstore import GitStore
from .pointer import POINTER_MAX, Pointer, looks_like_pointer

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

    def __init__(self, path: str | os.PathLike[str] = ".") -> None:
        self.store = GitStore(path)
        self.root = str(self.store.worktree)

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
    ) -> list[AddReport]:
        """Store each checkpoint and stage its pointer in the Git index. `scanned`: the scan of
        one of them, done already (`checkpoint.scan`)."""
        reports = []
        for path in paths:
            rel = self.relpath(path)
            if not os.path.isfile(path):
                raise ObjectNotFound(f"{path}: no such file")
            r = add_file(self.store, path, chunk_bytes=chunk_bytes, progress=progress, scanned=scanned)
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
                )
            )
        return reports

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
        """Rebuild each checkpoint byte-exactly from its pointer (index or `rev`)."""
        done = []
        for path in paths:
            p = self.pointer(path, rev)
            restore_to(self.store, p, path, progress=progress)
            if rev is None:
                # Record the new file's stat data: git would otherwise call a pointer-sized index
                # entry "modified" by its size alone, without running the clean filter. The file
                # is dated one second back: an index written in the second the file was written
                # in makes its entry "racily clean" for git, and the next git command would hash
                # the file again (stage_blob would rather wait out that second: 0.5 s on average).
                st = os.stat(path)
                os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - 1_000_000_000))
                self.store.stage_blob(self.relpath(path), p.to_bytes())
            done.append(self.relpath(path))
        return done

    # ---- inspect ----
    def show(self, path: str, rev: str | None = None) -> dict[str, Any]:
        """Per-tensor table of a stored checkpoint: name, dtype, shape, raw and stored bytes, codec."""
        p = self.pointer(path, rev)
        m = load_manifest(self.store, p.manifest_id)
        frames = self.store.version_frames(p.manifest_id)
        rows = []
        for s in m.spans:
            stored = sum(frames[c].frame_len for c, _ in s.chunks if c in frames)
            codecs = sorted({frames[c].planes for c, _ in s.chunks if c in frames})
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
                }
            )
        unique = {c for s in m.spans for c, _ in s.chunks}
        return {
            "path": self.relpath(path),
            "format": m.format,
            "size": m.size,
            "blake3": m.blake3.hex(),
            "manifest": p.manifest_id.hex(),
            "tensors": len(m.tensors),
            "stored": sum(frames[c].frame_len for c in unique if c in frames),
            "rows": rows,
            "note": m.note,
        }

    def stats(self) -> dict[str, Any]:
        """Raw vs stored bytes per checkpoint in the index, and for every stored version.

        Versions come in the order of the first commit that wrote them (versions no commit
        points to last); each one's `added` is the bytes of the frames no version before it had.
        """
        frame_len: dict[bytes, int] = {}
        versions: list[dict[str, Any]] = []
        commits = commits_by_version(self.store)
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
                    "size": m.size,
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
        checked: set[bytes] = set()
        versions = self.store.versions()
        for mid in versions:
            try:
                m = load_manifest(self.store, mid)
                todo = [(c, n) for s in m.spans for c, n in s.chunks if c not in checked]
                todo = list(dict(todo).items())
                packs, tuples = chunk_tuples(self.store, mid, todo)
            except (ObjectNotFound, CorruptObject, KeyError) as e:
                problems.append({"version": mid.hex(), "object": "", "problem": str(e)})
                continue
            for i in range(0, len(tuples), FSCK_BATCH):
                batch = tuples[i : i + FSCK_BATCH]
                try:
                    _native.read_chunks(batch, packs, self.store.read_object)
                except (ObjectNotFound, CorruptObject, OSError):
                    for t in batch:  # find which ones
                        try:
                            _native.read_chunks([t], packs, self.store.read_object)
                        except (ObjectNotFound, CorruptObject, OSError) as e:
                            problems.append({"version": mid.hex(), "object": t[3].hex(), "problem": str(e)})
                checked.update(t[2] for t in batch)
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
        return {"versions": len(versions), "chunks_checked": len(checked), "problems": problems, "ok": not problems}


def commits_by_version(store: GitStore) -> dict[bytes, list[dict[str, str]]]:
    """For each version, the commits that wrote a pointer to it (added or changed a path to it),
    oldest first, over every branch, tag and remote-tracking ref: {"commit", "date", "path"}."""
    log = store.git(
        "log", "--exclude=refs/theta/*", "--all", "--reverse", "--date-order", "--no-renames",
        "--format=%x01%H %cI", "--raw", "--no-abbrev", "-z",
    )  # fmt: skip
    wrote: list[tuple[str, str, str, str]] = []  # commit, date, path, blob
    for record in log.split(b"\x01")[1:]:
        head, _, raw = record.partition(b"\0")
        commit, _, date = head.decode().partition(" ")
        fields = raw.lstrip(b"\n").split(b"\0")
        for meta, name in zip(fields[0::2], fields[1::2], strict=False):
            parts = meta.split()
            if len(parts) == 5 and parts[4] != b"D" and parts[1] in (b"100644", b"100755"):
                wrote.append((commit, date, name.decode(errors="replace"), parts[3].decode()))
    blobs = sorted({b for *_, b in wrote})
    if not blobs:
        return {}
    sizes = store.git("cat-file", "--batch-check=%(objectname) %(objectsize)", input="\n".join(blobs).encode() + b"\n")
    listed = (line.decode().partition(" ") for line in sizes.splitlines())
    small = [oid for oid, _, size in listed if size.isdigit() and int(size) <= POINTER_MAX]
    contents = store.git("cat-file", "--batch", input="\n".join(small).encode() + b"\n") if small else b""
    version_of: dict[str, bytes] = {}
    pos = 0
    for oid in small:
        header_end = contents.index(b"\n", pos)
        header = contents[pos:header_end].split()
        if len(header) != 3:  # "<oid> missing": a partial clone, say
            pos = header_end + 1
            continue
        size = int(header[2])
        data = contents[header_end + 1 : header_end + 1 + size]
        pos = header_end + 1 + size + 1
        if looks_like_pointer(data):
            try:
                version_of[oid] = Pointer.parse(data, oid).manifest_id
            except PointerError:
                continue
    out: dict[bytes, list[dict[str, str]]] = {}
    for commit, date, path, blob in wrote:
        if blob in version_of:
            out.setdefault(version_of[blob], []).append({"commit": commit, "date": date, "path": path})
    return out


def report_dict(r: AddReport) -> dict[str, Any]:
    return asdict(r)
