"""What changed in a checkpoint between two revisions, tensor by tensor: `theta_store.delta`.

    with theta_store.delta("model.safetensors", "v1", "v2") as d:
        for name, t in d.items():
            if t.kind != "unchanged":
                print(name, t.kind, t.stats["rel_change"])

Building the mapping reads the two manifests only: a tensor whose chunk ids are equal in both
versions is "unchanged" without reading its data. `kind` reads the frame headers of a changed
tensor's new chunks (how the store encoded it); `dense()`, `indices`, `values` and `stats` read
both tensors.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from functools import cached_property
from typing import Any

import numpy as np

from . import _native
from .encodings import chunk_kinds
from .errors import ObjectNotFound, ThetaStoreError
from .gitstore import GitStore, StoredFrame
from .reader import CheckpointReader, TensorView, numpy_dtype, read_version, store_for

KINDS = ("unchanged", "added", "removed", "reshaped", "bits", "sparse", "low-rank", "dense")
REL_THRESHOLD = 1e-6  # of `stats["fraction_changed_at"]`: |new - base| > REL_THRESHOLD * |base|
_FLOAT64 = ("F32", "F64")
_FLOAT32 = ("F16", "BF16", "F8_E4M3", "F8_E5M2")
_INTEGER = ("I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64", "BOOL")
# What a frame header's "kind" says about the tensor it belongs to; a header without "kind" is a
# frame stored whole.
_FRAME_KINDS = {"plain": "dense", "xor": "bits", "diff": "bits", "sparse": "sparse", "low-rank": "low-rank"}


class _Pair:
    """The two versions a delta compares, sharing one store; frame tables are read once, on demand."""

    def __init__(self, store: GitStore, old: CheckpointReader, new: CheckpointReader) -> None:
        self.store = store
        self.old = old
        self.new = new
        self.old_chunks = old.manifest.chunk_ids()
        self._frames: dict[bytes, StoredFrame] | None = None
        self._info: dict[bytes, dict[str, Any]] = {}

    @property
    def frames(self) -> dict[bytes, StoredFrame]:
        """The new version's frames table: chunk id -> stored frame."""
        if self._frames is None:
            self._frames = self.store.version_frames(self.new.manifest_id)
        return self._frames

    def frame_info(self, cid: bytes) -> dict[str, Any]:
        """How a chunk of the new version is stored: {"kind", "bases"} (encodings.chunk_kinds
        reads the frame's header only when the frames table says it has bases)."""
        if cid not in self._info:
            f = self.frames.get(cid)
            if f is None:
                raise ObjectNotFound(f"{self.new.path}: chunk {cid.hex()[:16]} has no frame in version {self.new.manifest_id.hex()[:16]}")
            self._info[cid] = {"kind": chunk_kinds(self.store, self.frames, [cid])[cid], "bases": list(f.bases)}
        return self._info[cid]

    def read_chunk(self, cid: bytes) -> bytes:
        f = self.frames.get(cid)
        if f is None:
            raise ObjectNotFound(f"{self.new.path}: chunk {cid.hex()[:16]} has no frame in version {self.new.manifest_id.hex()[:16]}")
        return _native.decode_frame(self.store.read_object(f.object_id))


def _chunks(view: TensorView | None) -> tuple[bytes, ...] | None:
    """The ids of the chunks holding a tensor's bytes (None: not knowable from the manifest)."""
    if view is None or view.span is None:
        return None
    if view.stride is None:
        return tuple(cid for cid, _ in view.span.chunks)
    # A torch view: only the chunks its elements fall in, so a sibling view's change is not its own.
    itemsize = numpy_dtype(view.dtype).itemsize
    count = math.prod(view.shape)
    lo = view.storage_offset * itemsize
    hi = (view.storage_offset + sum((d - 1) * s for d, s in zip(view.shape, view.stride, strict=True)) + 1) * itemsize if count else lo
    out, pos = [], 0
    for cid, n in view.span.chunks:
        if pos < hi and pos + n > lo:
            out.append(cid)
        pos += n
    return tuple(out)


def _dense_dtype(dtype: str) -> np.dtype[Any]:
    if dtype in _FLOAT64:
        return np.dtype(np.float64)
    if dtype in _FLOAT32:
        return np.dtype(np.float32)
    if dtype in _INTEGER:
        return np.dtype(np.int64)
    raise ThetaStoreError(f"{dtype} is not a numeric dtype: a difference of its values means nothing", hint="compare the bytes instead")


# Unit roundoff of each float dtype (integers: 0), for the numerical rank's tolerance.
_EPS = {"F64": 2.0**-53, "F32": 2.0**-24, "F16": 2.0**-11, "BF16": 2.0**-8, "F8_E4M3": 2.0**-4, "F8_E5M2": 2.0**-3}
_EPS.update(dict.fromkeys(_INTEGER, 0.0))
# Elements per step of the statistics' sums: under OpenBLAS's 10,000 at which a dot product
# starts threads, which on a shared machine spend more time waiting than summing.
_BLOCK = 8192


def _flat(reader: CheckpointReader, view: TensorView | None) -> np.ndarray[Any, Any] | None:
    """A tensor's values, flat in C order, read once (read-only, no copy for a contiguous one)."""
    if view is None:
        return None
    if view.stride is None and view.span is not None and not view.fortran and view.dtype in _EPS:
        return np.frombuffer(reader.raw_bytes(view.name), numpy_dtype(view.dtype))
    return reader.get_tensor(view.name).reshape(-1)


def _blocks_norm(a: np.ndarray[Any, Any]) -> float:
    return math.sqrt(sum(float(np.dot(b, b)) for b in (a[i : i + _BLOCK].astype(np.float64) for i in range(0, a.size, _BLOCK))))


def _bits(a: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """The bit patterns of an array, flat, as unsigned integers of its item size."""
    return np.ascontiguousarray(a).reshape(-1).view(f"u{a.dtype.itemsize}")


class Delta:
    """How one tensor changed from the base revision to the new one.

    Attributes:
        name: the tensor's name.
        kind: "unchanged" (equal chunk ids, nothing read), "added", "removed", "reshaped" (shape or
            dtype changed), or for a changed tensor how the store holds the new version: "bits"
            (bit-level XOR/difference against the base), "sparse", "low-rank" (factors plus an exact
            residual) or "dense" (stored whole).
        shape, dtype: of the new tensor (None if removed); base_shape, base_dtype: of the base one
            (None if added).
    """

    def __init__(self, pair: _Pair, name: str, old: TensorView | None, new: TensorView | None) -> None:
        self._pair = pair
        self.name = name
        self._old = old
        self._new = new
        self.shape = new.shape if new is not None else None
        self.dtype = new.dtype if new is not None else None
        self.base_shape = old.shape if old is not None else None
        self.base_dtype = old.dtype if old is not None else None
        self._old_chunks = _chunks(old)
        self._new_chunks = _chunks(new)

    def __repr__(self) -> str:
        shape = "x".join(map(str, self.shape if self.shape is not None else self.base_shape or ())) or "scalar"
        return f"<Delta {self.name!r} {self.kind} {self.dtype or self.base_dtype} {shape}>"

    @property
    def _structural(self) -> str | None:
        """The kind known from the manifests alone, or None for a changed tensor."""
        old, new = self._old, self._new
        if old is None:
            return "added"
        if new is None:
            return "removed"
        if old.shape != new.shape or old.dtype != new.dtype:
            return "reshaped"
        if self._old_chunks is not None and self._old_chunks == self._new_chunks:
            return "unchanged"
        return None

    @cached_property
    def kind(self) -> str:
        return self._structural or self._stored[0]

    @cached_property
    def _stored(self) -> tuple[str, bytes | None]:
        """(kind, factors chunk id) of a changed tensor, from the headers of its new frames."""
        fresh = [cid for cid in dict.fromkeys(self._new_chunks or ()) if cid not in self._pair.old_chunks]
        return stored_kind([self._pair.frame_info(cid) for cid in fresh])

    # ---- data ----
    def _arrays(self) -> tuple[np.ndarray[Any, Any] | None, np.ndarray[Any, Any] | None]:
        return self.base(), self.new()

    def base(self) -> np.ndarray[Any, Any] | None:
        """The base tensor (None if added), as `theta_store.open(...).get_tensor` gives it."""
        return self._pair.old.get_tensor(self.name) if self._old is not None else None

    def new(self) -> np.ndarray[Any, Any] | None:
        """The new tensor (None if removed), as `theta_store.open(...).get_tensor` gives it."""
        return self._pair.new.get_tensor(self.name) if self._new is not None else None

    def dense(self) -> np.ndarray[Any, Any]:
        """new - base as a numpy array of the tensor's shape.

        float64 for F32/F64 tensors (for F32 every difference is exact unless the two values
        differ in magnitude by more than 2^29; F64 differences are rounded once), float32 for
        16-bit and 8-bit floats (exact for BF16 unless magnitudes differ by more than 2^16),
        int64 for integer and bool tensors. An added tensor's delta is the tensor, a removed
        one's its negation (the missing side counts as zeros). Raises ThetaStoreError for a
        reshaped tensor (no element-wise difference) or a non-numeric dtype.
        """
        if self.kind == "reshaped":
            raise ThetaStoreError(
                f"{self._pair.new.path}: {self.name} changed shape or dtype ({self.base_dtype} {list(self.base_shape or ())} ->"
                f" {self.dtype} {list(self.shape or ())}): it has no element-wise delta",
                hint="read both versions with theta_store.open",
            )
        return self._diff(*self._arrays())

    def _diff(self, old: np.ndarray[Any, Any] | None, new: np.ndarray[Any, Any] | None) -> np.ndarray[Any, Any]:
        dt = _dense_dtype(self.dtype or self.base_dtype or "")
        if new is None:
            assert old is not None
            neg: np.ndarray[Any, Any] = -old.astype(dt)
            return neg
        if old is None:
            return new.astype(dt)
        diff: np.ndarray[Any, Any] = new.astype(dt) - old.astype(dt)
        return diff

    @cached_property
    def _changed(self) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
        if self.kind == "unchanged":
            dt = _dense_dtype(self.dtype or "")
            return np.zeros(0, np.int64), np.zeros(0, dt)
        old, new = self._arrays()
        d = self.dense().reshape(-1) if self.kind == "reshaped" else self._diff(old, new).reshape(-1)
        if old is None or new is None:
            return np.arange(d.size, dtype=np.int64), d
        idx = np.flatnonzero(_bits(old) != _bits(new)).astype(np.int64)
        return idx, d[idx]

    @property
    def indices(self) -> np.ndarray[Any, Any]:
        """Flat (C-order) positions, int64, where the new tensor's bits differ from the base's
        (every position of an added or removed tensor). -0.0 vs 0.0 and NaN payloads count."""
        return self._changed[0]

    @property
    def values(self) -> np.ndarray[Any, Any]:
        """new - base at `indices`, in `dense()`'s dtype."""
        return self._changed[1]

    @cached_property
    def factors(self) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]] | None:
        """(U, V) as float32 arrays, U rows x rank and V rank x cols, of a stored low-rank delta
        (new ~ base + U @ V; the store keeps the exact residual too); None for other kinds."""
        if self.kind != "low-rank":
            return None
        fid = self._stored[1]
        if fid is None:
            return None
        rows, cols, rank, u, v = _native.parse_factors(self._pair.read_chunk(fid))
        return (np.frombuffer(u, "<f4").reshape(rows, rank).copy(), np.frombuffer(v, "<f4").reshape(rank, cols).copy())

    @cached_property
    def stats(self) -> dict[str, Any]:
        """Statistics of the change, computed in float64 (reads both tensors, except stored_bytes).

        numel; changed (elements whose bits differ); fraction_changed; fraction_changed_at (the
        fraction where |new - base| > 1e-6 * |base|, so rounding-level noise on large weights
        does not count); norm_delta (Frobenius norm of new - base); norm_base; rel_change
        (norm_delta / norm_base, None if the base is all zeros); cosine (between base and new
        flattened, None if either is all zeros); max_abs_delta; stored_bytes (frame bytes of the
        new tensor's chunks that the base version does not have, factors included); rank (of a
        stored low-rank delta, else None). For a reshaped tensor only numel, changed,
        fraction_changed, norm_base and stored_bytes are filled (the rest are None).

        Differences of float tensors are taken in float64: exact for F16, and for F32 and BF16
        unless the two values' magnitudes are more than 2^29 and 2^45 apart (F64 rounds once);
        of integer tensors in int64, then rounded once to float64. Each
        tensor is read once and the figures are summed block by block into float64, so the memory
        this takes is the two tensors plus three small blocks; an unchanged tensor is not read.
        """
        out: dict[str, Any] = {"stored_bytes": self.stored_bytes, "rank": None}
        factors = self.factors
        if factors is not None:
            out["rank"] = int(factors[0].shape[1])
        ref = self._new if self._new is not None else self._old
        assert ref is not None
        numel = math.prod(ref.shape)
        old = _flat(self._pair.old, self._old)
        if self.kind == "unchanged":  # the base is read once (for its norm), the new side is the same
            assert old is not None
            nb = _blocks_norm(old)
            out.update(changed=0, fraction_changed=0.0, fraction_changed_at=0.0, norm_delta=0.0, max_abs_delta=0.0)
            out.update(numel=numel, norm_base=nb, rel_change=0.0, cosine=1.0 if nb else None)
            return out
        if self.kind == "reshaped":
            nb = _blocks_norm(old) if old is not None else 0.0
            out.update(numel=numel, norm_base=nb, changed=numel, fraction_changed=1.0 if numel else 0.0)
            out.update(dict.fromkeys(("fraction_changed_at", "norm_delta", "rel_change", "cosine", "max_abs_delta")))
            return out
        new = _flat(self._pair.new, self._new)
        integer = _dense_dtype(self.dtype or self.base_dtype or "") == np.int64
        changed = changed_at = 0
        sd = sb = sn = dot = mx = 0.0
        # Three block buffers, reused: the base and the new values in float64, then |delta| and
        # 1e-6 |base| in their place, and the comparisons.
        bb, nn, cmp = np.empty(min(numel, _BLOCK)), np.empty(min(numel, _BLOCK)), np.empty(min(numel, _BLOCK), bool)
        for lo in range(0, numel, _BLOCK):
            hi = min(lo + _BLOCK, numel)
            b, n, c = bb[: hi - lo], nn[: hi - lo], cmp[: hi - lo]
            o_part = old[lo:hi] if old is not None else None
            n_part = new[lo:hi] if new is not None else None
            if o_part is None or n_part is None:
                changed += hi - lo
            else:
                np.not_equal(_bits(o_part), _bits(n_part), out=c)
                changed += int(np.count_nonzero(c))
            for part, buf in ((o_part, b), (n_part, n)):
                if part is None:
                    buf.fill(0.0)
                else:
                    buf[...] = part
            sb += float(np.dot(b, b))
            sn += float(np.dot(n, n))
            dot += float(np.dot(b, n))
            if integer:
                n[...] = self._diff(o_part, n_part)
            else:
                np.subtract(n, b, out=n)
            d = n
            sd += float(np.dot(d, d))
            np.abs(d, out=d)
            mx = max(mx, float(d.max()))
            np.abs(b, out=b)
            np.multiply(b, REL_THRESHOLD, out=b)
            np.greater(d, b, out=c)
            changed_at += int(np.count_nonzero(c))
        nd, nb, nnew = math.sqrt(sd), math.sqrt(sb), math.sqrt(sn)
        out.update(
            numel=numel,
            norm_base=nb,
            changed=changed,
            fraction_changed=changed / numel if numel else 0.0,
            fraction_changed_at=changed_at / numel if numel else 0.0,
            norm_delta=nd,
            rel_change=nd / nb if nb else (0.0 if nd == 0 else None),
            cosine=dot / (nb * nnew) if nb and nnew else None,
            max_abs_delta=mx,
        )
        return out

    def numerical_rank(self) -> int | None:
        """The numerical rank of new - base as a matrix (rows: the first dimension), by an SVD:
        the count of singular values above u * (||base|| + ||new - base||), u the unit roundoff
        of the tensor's dtype: a bound on what rounding the sum to that dtype adds, so a rank-r
        update folded into the weights gives r. None for a tensor with no element-wise delta
        (reshaped); 0 for an unchanged one."""
        if self.kind == "unchanged":
            return 0
        if self.kind == "reshaped":
            return None
        d = self.dense()
        if d.size == 0:
            return 0
        m = d.reshape(d.shape[0], -1) if d.ndim else d.reshape(1, 1)
        s = np.linalg.svd(m.astype(np.float64), compute_uv=False)
        st = self.stats
        scale = _EPS.get(self.dtype or "", 0.0) * (st["norm_base"] + st["norm_delta"])
        tol = max(scale, float(s.max(initial=0.0)) * max(m.shape) * float(np.finfo(np.float64).eps))
        return int(np.count_nonzero(s > tol))

    @cached_property
    def stored_bytes(self) -> int:
        """Frame bytes of the new tensor's chunks (and low-rank factors) the base version lacks."""
        if self.kind in ("unchanged", "removed"):
            return 0
        fresh = {cid for cid in self._new_chunks or () if cid not in self._pair.old_chunks}
        if self.kind == "low-rank" and self._stored[1] is not None and self._stored[1] not in self._pair.old_chunks:
            fresh.add(self._stored[1])
        frames = self._pair.frames
        return sum(frames[cid].frame_len for cid in fresh if cid in frames)


def stored_kind(infos: list[Mapping[str, Any]]) -> tuple[str, bytes | None]:
    """(kind, factors chunk id) of a changed tensor from how its new chunks are stored: per chunk
    {"kind": "plain" | "xor" | "diff" | "sparse" | "low-rank" (encodings.chunk_kinds), "bases"}
    (a low-rank frame's second base is its factors chunk). No "kind" is a frame stored whole. One low-rank chunk makes the tensor
    "low-rank"; all-sparse chunks make it "sparse"; any other delta chunk makes it "bits".
    """
    kinds = [_FRAME_KINDS.get(str(i.get("kind", "plain")), "bits") for i in infos]
    if "low-rank" in kinds:
        first = next(i for i, k in zip(infos, kinds, strict=True) if k == "low-rank")
        bases = list(first.get("bases") or [])
        return "low-rank", bytes(bases[1]) if len(bases) > 1 else None
    if kinds and all(k == "sparse" for k in kinds):
        return "sparse", None
    if any(k != "dense" for k in kinds):
        return "bits", None
    return "dense", None


class Deltas(dict[str, Delta]):
    """`{name: Delta}` of one file between two revisions, in the new file's order (removed
    tensors last). Holds the repository open: use it as a context manager, or call close()."""

    def __init__(self, pair: _Pair, path: str, base: str | None, rev: str | None) -> None:
        super().__init__()
        self._pair = pair
        self.path = path
        self.base = base
        self.rev = rev
        old, new = pair.old.views, pair.new.views
        for name, view in new.items():
            self[name] = Delta(pair, name, old.get(name), view)
        for name, view in old.items():
            if name not in new:
                self[name] = Delta(pair, name, view, None)

    @property
    def base_version(self) -> bytes:
        return self._pair.old.manifest_id

    @property
    def version(self) -> bytes:
        return self._pair.new.manifest_id

    def metadata(self) -> dict[str, Any]:
        """The new version's format metadata (safetensors' `__metadata__`)."""
        return self._pair.new.metadata()

    @property
    def metadata_label(self) -> str:
        """What the entries of `metadata_changes` are called: `__metadata__` (safetensors),
        `pickle` (torch.save), else `metadata`."""
        fmt = self._pair.new.manifest.format
        return {"safetensors": "__metadata__", "torch": "pickle"}.get(fmt, "metadata")

    def metadata_changes(self) -> dict[str, Any]:
        """How what the checkpoint keeps beside its tensors changed (`CheckpointReader.entries`:
        safetensors' `__metadata__`, from the manifests; a torch.save pickle's plain values such
        as an epoch or an optimizer step, from the two stored pickles): {"added": {key: value},
        "removed": {key: value}, "changed": {key: [old, new]}}."""
        old, new = self._pair.old.entries(), self._pair.new.entries()
        return {
            "added": {k: new[k] for k in sorted(new) if k not in old},
            "removed": {k: old[k] for k in sorted(old) if k not in new},
            "changed": {k: [old[k], new[k]] for k in sorted(new) if k in old and old[k] != new[k]},
        }

    def summary(self) -> dict[str, Any]:
        """What a one-line summary says, from the manifests and frame headers only (no tensor is
        read): tensors, changed (not unchanged), counts per kind, parameters (elements of the
        new version) and parameters_changed (elements of the tensors that changed, removed ones
        counted at their old size), stored_bytes (new frames of the changed tensors), and
        low_rank_ranks (the rank of each stored low-rank delta)."""
        counts: dict[str, int] = {}
        params = changed_params = stored = 0
        ranks: list[int] = []
        for t in self.values():
            counts[t.kind] = counts.get(t.kind, 0) + 1
            n = math.prod(t.shape) if t.shape is not None else 0
            params += n
            if t.kind == "unchanged":
                continue
            changed_params += n if t.shape is not None else math.prod(t.base_shape or ())
            stored += t.stored_bytes
            f = t.factors
            if f is not None:
                ranks.append(int(f[0].shape[1]))
        return {
            "tensors": len(self),
            "changed": len(self) - counts.get("unchanged", 0),
            "counts": counts,
            "parameters": params,
            "parameters_changed": changed_params,
            "stored_bytes": stored,
            "low_rank_ranks": ranks,
        }

    def close(self) -> None:
        self._pair.store.close()

    def __enter__(self) -> Deltas:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def delta(path: str | os.PathLike[str], a: str | None, b: str | None, *, repo: str | os.PathLike[str] | None = None) -> Deltas:
    """`{name: Delta}`: how the checkpoint at `path` changed from revision `a` to revision `b`.

    `a` and `b` are any git revisions (commits, branches, tags, `HEAD~2`), or None for the index
    (what `git add` or `theta-store add` staged); a relative `path` is
    taken relative to `repo` when given, else to the current directory. Only the two manifests
    are read here; each Delta reads data when asked (see Delta). Raises ObjectNotFound naming the
    path and revision for an unknown revision or a file missing from it, PointerError for a file
    that is not a theta-store pointer there.

    Example:
        >>> import theta_store, tempfile, subprocess, numpy as np
        >>> d = tempfile.mkdtemp(); git = lambda *a: subprocess.run(["git", "-C", d, *a], check=True, capture_output=True)
        >>> _ = git("init", "-q"); _ = git("config", "user.email", "a@b"); _ = git("config", "user.name", "a")
        >>> w = np.zeros((4, 4), np.float32)
        >>> theta_store.save_safetensors(f"{d}/m.safetensors", {"w": w, "b": np.ones(4, np.float32)})
        >>> with theta_store.Repo(d) as r:
        ...     _ = r.add([f"{d}/m.safetensors"])
        >>> _ = git("commit", "-qm", "v1"); _ = git("tag", "v1")
        >>> w[1, 2] = 0.5
        >>> theta_store.save_safetensors(f"{d}/m.safetensors", {"w": w, "b": np.ones(4, np.float32)})
        >>> with theta_store.Repo(d) as r:
        ...     _ = r.add([f"{d}/m.safetensors"])
        >>> _ = git("commit", "-qm", "v2")
        >>> with theta_store.delta(f"{d}/m.safetensors", "v1", "HEAD") as deltas:
        ...     print(deltas["b"].kind, deltas["w"].indices, deltas["w"].values, deltas["w"].stats["changed"])
        unchanged [6] [0.5] 1
    """
    store, rel = store_for(path, repo)
    try:
        readers = []
        for rev in (a, b):
            if rev is not None and not store.has_revision(rev):
                raise ObjectNotFound(
                    f"{rel}: revision {rev!r} is unknown here (no branch, tag or commit of that name)",
                    hint="`git log --oneline --all` lists the commits; `git fetch` brings a remote's branches",
                )
            readers.append(read_version(store, rel, rev))
        return Deltas(_Pair(store, readers[0], readers[1]), rel, a, b)
    except BaseException:
        store.close()
        raise


def between_versions(store: GitStore, path: str, base: bytes, new: bytes) -> Deltas:
    """`{name: Delta}` between two stored versions (manifest ids) of the checkpoint at `path`
    (relative to the work tree). It shares `store` with the caller: do not close it."""
    from .plan import load_manifest

    readers = [CheckpointReader(store, mid, load_manifest(store, mid), path) for mid in (base, new)]
    return Deltas(_Pair(store, readers[0], readers[1]), path, base.hex(), new.hex())
