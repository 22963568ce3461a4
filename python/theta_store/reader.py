"""Lazy, read-only access to any stored revision of a checkpoint, like safetensors' `safe_open`.

    with theta_store.open("model.safetensors", rev="HEAD~3") as f:
        f.keys()                       # tensor names
        w = f.get_tensor("lm_head.weight")        # numpy array; decodes only that tensor's chunks
        rows = f.get_slice("embed.weight")[100:200]  # decodes only the chunks those rows live in

Values come back as numpy arrays of the stored dtype; bfloat16 and float8 (which numpy lacks)
as `ml_dtypes` arrays (a dependency), so `.astype(np.float32)` gives their values.
Quantized or opaque dtypes (GGUF Q8_0, big-endian data...) come back as uint8.
Missing versions are fetched from the remote (whole versions: git moves refs, not byte ranges).
"""

from __future__ import annotations

import builtins
import io
import os
import zipfile
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _native
from .errors import PointerError, ThetaStoreError
from .gitstore import GitStore
from .manifest import Manifest, Pointer, SpanEntry, looks_like_pointer
from .plan import ReadPlan, load_manifest, native_chunks, plan_for, plan_from_store

if TYPE_CHECKING:
    from .chunkstore import LazyVersion

_NUMPY = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U8": "u1",
    "U16": "<u2",
    "U32": "<u4",
    "U64": "<u8",
    "BOOL": "?",
}
_BITS = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def numpy_dtype(name: str) -> np.dtype[Any]:
    """The numpy dtype a stored dtype name reads as (see the module docstring for bf16/fp8).

    Raises ThetaStoreError for bf16/fp8 if `ml_dtypes` cannot be imported: their raw bit
    patterns as uint16/uint8 would give garbage that looks like data after `.astype(float)`.
    """
    if name in _NUMPY:
        return np.dtype(_NUMPY[name])
    if name in _BITS:
        try:
            import ml_dtypes  # type: ignore[import-not-found,unused-ignore]
        except ImportError as e:
            raise ThetaStoreError(
                f"{name} tensors need the ml_dtypes package, which failed to import: {e}",
                hint="pip install 'ml_dtypes>=0.4' (a dependency of theta-store)",
            ) from None
        found: np.dtype[Any] = np.dtype(getattr(ml_dtypes, _BITS[name]))
        return found
    return np.dtype("u1")


@dataclass(frozen=True)
class TensorView:
    """Where a tensor lives: a region (span) and, for torch views, offset and strides in elements."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    span: SpanEntry | None
    storage_offset: int = 0
    stride: tuple[int, ...] | None = None
    fortran: bool = False
    # An array inside a deflated .npz member (kept in the skeleton): read by inflating that member.
    member: str | None = None


class CheckpointReader:
    """A stored checkpoint revision; tensors are decoded on demand. Use as a context manager."""

    def __init__(
        self,
        store: GitStore,
        manifest_id: bytes,
        manifest: Manifest,
        path: str,
        pointer: Pointer | None = None,
        lazy: LazyVersion | None = None,
    ) -> None:
        self._store = store
        self._id = manifest_id
        self.manifest = manifest
        self.path = path
        self._views = tensor_views(manifest)
        self._pointer = pointer or Pointer(manifest_id, manifest.file_size, manifest.file_blake3, len(manifest.tensors), manifest.format)
        self._plan: ReadPlan | None = None
        # A version whose frames are in a chunk store: each read fetches the frames it needs.
        self._lazy = lazy

    def close(self) -> None:
        if self._lazy is not None:
            self._lazy.close()
        self._store.close()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def keys(self) -> list[str]:
        return list(self._views)

    @property
    def manifest_id(self) -> bytes:
        return self._id

    @property
    def views(self) -> dict[str, TensorView]:
        """Where each tensor lives (name -> TensorView), in the file's order."""
        return self._views

    def metadata(self) -> dict[str, Any]:
        """Format metadata: safetensors' `__metadata__` dict, or the adapter's metadata."""
        meta = self.manifest.metadata
        if self.manifest.format == "safetensors":
            return dict(meta.get("__metadata__") or {})
        return dict(meta)

    def entries(self) -> dict[str, Any]:
        """What a diff compares beside the tensors: safetensors' `__metadata__`; the plain values
        a torch.save archive keeps beside its tensors (an epoch, an optimizer's step...), read
        from the stored pickle (formats.torch.entries); other formats' adapter metadata."""
        if self.manifest.format == "torch":
            from .formats import torch

            return torch.entries(self.path, io.BufferedReader(_VersionFile(self)), self.manifest.size)
        return self.metadata()

    def read_range(self, lo: int, hi: int) -> bytes:
        """Bytes [lo, hi) of the stored file, decoding only the chunks that overlap them."""
        if hi <= lo:
            return b""
        if self._lazy is not None:
            return self._read_lazy(self._lazy, lo, hi)
        if self._plan is not None:
            try:
                return self._read(self._plan, lo, hi)
            except (OSError, ValueError):  # a repack since the plan was made moved the frames: find them again
                self._store.refresh()
        self._plan = plan_for(self._store, self._pointer, manifest=self.manifest, where=self.path)
        return self._read(self._plan, lo, hi)

    def _read_lazy(self, lazy: LazyVersion, lo: int, hi: int) -> bytes:
        """read_range of a version in a chunk store: fetch the frames of the chunks [lo, hi) needs
        (and their bases), then plan again where frames were fetched."""
        if self._plan is None:
            self._plan = plan_from_store(lazy, self._id, self.manifest)
        picked, _ = self._plan.covering(lo, hi)
        if lazy.ensure([c.chunk_id for c in picked]):
            self._plan = plan_from_store(lazy, self._id, self.manifest)
        return self._read(self._plan, lo, hi)

    def _bytes(self, span: SpanEntry, start: int = 0, end: int | None = None) -> bytes:
        """Bytes [start, end) of a span, decoding only the chunks that overlap them."""
        end = span.length if end is None else end
        return self.read_range(span.offset + start, span.offset + end)

    def _read(self, plan: ReadPlan, start: int, end: int) -> bytes:
        """File bytes [start, end), decoding the chunks that hold them."""
        picked, first = plan.covering(start, end)
        data = _native.read_joined(native_chunks(picked), plan.packs, self._store.read_object, plan.native_bases())
        # A whole tensor's chunks start and end with it: the slice is then `data` itself, no copy.
        return data[start - first : end - first]

    def raw_bytes(self, name: str) -> bytes:
        """The bytes of tensor `name` as they lie in the file (its region, whatever its layout)."""
        v = self._view(name)
        if v.span is None:
            raise ThetaStoreError(f"{self.path}: tensor {name!r} is stored inside the skeleton (compressed member); read the file")
        return self._bytes(v.span)

    def _view(self, name: str) -> TensorView:
        try:
            return self._views[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r} (it has {len(self._views)}: see keys())") from None

    def get_tensor(self, name: str) -> np.ndarray[Any, Any]:
        """The tensor as a numpy array (a copy; decodes only the chunks it needs)."""
        v = self._view(name)
        if v.member is not None:
            return self._member_array(v.member)
        dt = numpy_dtype(v.dtype)
        if v.span is None:
            raise ThetaStoreError(f"{self.path}: tensor {name!r} is stored inside the skeleton (compressed member); read the file")
        if v.stride is None:
            raw = self._bytes(v.span)
            if dt.itemsize == 1 and v.dtype not in _NUMPY and v.dtype not in _BITS:
                return np.frombuffer(raw, np.uint8).copy()
            arr = np.frombuffer(raw, dt)
            return arr.reshape(v.shape, order="F" if v.fortran else "C").copy()
        # A torch view: offset and strides (in elements) into its storage.
        count = int(np.prod(v.shape)) if v.shape else 1
        if count == 0:
            return np.zeros(v.shape, dt)
        last = v.storage_offset + sum((d - 1) * s for d, s in zip(v.shape, v.stride, strict=True))
        raw = self._bytes(v.span, v.storage_offset * dt.itemsize, (last + 1) * dt.itemsize)
        base = np.frombuffer(raw, dt)
        strides = tuple(s * dt.itemsize for s in v.stride)
        return np.lib.stride_tricks.as_strided(base, shape=v.shape, strides=strides).copy()

    def _member_array(self, member: str) -> np.ndarray[Any, Any]:
        """The array of a deflated .npz member, inflated from the stored file's bytes (its ZIP
        directory and that member only)."""
        try:
            with zipfile.ZipFile(io.BufferedReader(_VersionFile(self))) as z, z.open(member) as fh:
                arr: np.ndarray[Any, Any] = np.lib.format.read_array(fh, allow_pickle=False)
                return arr
        except (zipfile.BadZipFile, KeyError, ValueError, EOFError, zlib.error) as e:
            raise ThetaStoreError(f"{self.path}: cannot read .npz member {member!r}: {e}") from None

    def get_slice(self, name: str) -> TensorSlice:
        return TensorSlice(self, self._view(name))


class _VersionFile(io.RawIOBase):
    """A stored version as a read-only file: a format adapter reads the few structures it needs
    (a ZIP directory, a pickle) without the whole file being rebuilt."""

    def __init__(self, reader: CheckpointReader) -> None:
        self._r = reader
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = max(0, pos if whence == 0 else self._pos + pos if whence == 1 else self._r.manifest.size + pos)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buf: Any) -> int:
        data = self._r.read_range(self._pos, min(self._pos + len(buf), self._r.manifest.size))
        buf[: len(data)] = data
        self._pos += len(data)
        return len(data)


class TensorSlice:
    """`reader.get_slice(name)[a:b, ...]`: decodes only the chunks holding rows a..b."""

    def __init__(self, reader: CheckpointReader, view: TensorView) -> None:
        self._r = reader
        self._v = view

    def get_shape(self) -> list[int]:
        return list(self._v.shape)

    def __getitem__(self, key: Any) -> np.ndarray[Any, Any]:
        v = self._v
        first = key[0] if isinstance(key, tuple) and key else key
        rest = key[1:] if isinstance(key, tuple) else ()
        if not v.shape or v.stride is not None or v.fortran or v.span is None or not isinstance(first, builtins.slice):
            return np.asarray(self._r.get_tensor(v.name)[key])
        start, stop, step = first.indices(v.shape[0])
        if step != 1 or stop <= start:
            return np.asarray(self._r.get_tensor(v.name)[key])
        dt = numpy_dtype(v.dtype)
        row = int(np.prod(v.shape[1:])) * dt.itemsize
        raw = self._r._bytes(v.span, start * row, stop * row)
        rows = np.frombuffer(raw, dt).reshape((stop - start, *v.shape[1:])).copy()
        return rows[(builtins.slice(None), *rest)] if rest else rows


def tensor_views(m: Manifest) -> dict[str, TensorView]:
    """Every tensor a manifest's file names (name -> TensorView), in the file's order: a torch
    pickle's tensors, tied weights and views included, else one per tensor span."""
    spans = {s.name: s for s in m.tensors}
    out: dict[str, TensorView] = {}
    views = m.metadata.get("views")
    if m.format == "torch" and isinstance(views, list):
        for v in views:
            region = v.get("region")
            out[v["name"]] = TensorView(
                v["name"],
                v["dtype"],
                tuple(v["shape"]),
                spans.get(region) if region is not None else None,
                int(v["storage_offset"]),
                tuple(v["stride"]),
            )
        return out
    arrays = m.metadata.get("arrays") if m.format == "numpy" else None  # flax keeps a count under that key
    listed = [a for a in arrays or [] if isinstance(a, dict) and isinstance(a.get("name"), str)]
    fortran = {a["name"]: bool(a.get("fortran_order")) for a in listed}
    for a in listed:  # an .npz in its directory's order, deflated members included
        if a["name"] in spans:
            s = spans[a["name"]]
            out[s.name] = TensorView(s.name, s.dtype, tuple(s.shape), s, fortran=fortran[s.name])
        elif a.get("compressed") and isinstance(a.get("member"), str):
            out[a["name"]] = TensorView(a["name"], str(a.get("dtype")), tuple(a.get("shape") or ()), None, member=a["member"])
    for s in m.tensors:
        if s.name not in out:
            out[s.name] = TensorView(s.name, s.dtype, tuple(s.shape), s, fortran=fortran.get(s.name, False))
    return out


def is_sharded_model(store: GitStore, rel: str, rev: str | None) -> bool:
    """Whether `rel` at `rev` is a sharded model's index kept as a plain file (an index added as
    a checkpoint of its own is read as that file)."""
    from .formats.sharded import is_index

    if not is_index(rel):
        return False
    try:
        return not looks_like_pointer(store.read_path(rel, rev))
    except ThetaStoreError:
        return True  # absent: the sharded reader says so, naming the index


class ShardedReader:
    """A sharded model (``model.safetensors.index.json`` and its shards) read as one checkpoint:
    the tensors of the index's ``weight_map`` in its order, each read from its shard's stored
    version in the same revision. Shards are opened when first needed. Use as a context manager."""

    def __init__(self, store: GitStore, rel: str, rev: str | None) -> None:
        from .formats.sharded import parse_index, shard_relpath

        self._store = store
        self.path = rel
        self.rev = rev
        where = f"{rel} ({'index' if rev is None else rev})"
        data = store.read_path(rel, rev)
        if looks_like_pointer(data):
            raise PointerError(f"{where}: a sharded-checkpoint index is stored as a theta-store pointer; it should be a plain file")
        self.index = parse_index(data, where)
        self._shard_of = {name: shard_relpath(rel, shard) for name, shard in self.index["weight_map"].items()}
        self.shards = [shard_relpath(rel, s) for s in self.index["shards"]]
        self._readers: dict[str, CheckpointReader] = {}

    def close(self) -> None:
        for r in self._readers.values():
            r.close()
        self._readers.clear()
        self._store.close()

    def __enter__(self) -> ShardedReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def keys(self) -> list[str]:
        return list(self._shard_of)

    def shard_of(self, name: str) -> str:
        """The path of the shard holding tensor `name` (as the index's weight_map says)."""
        try:
            return self._shard_of[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r} in its weight_map (it has {len(self._shard_of)}: see keys())") from None

    def shard(self, rel: str) -> CheckpointReader:
        """The reader of one shard (by its path in the repository), opened once."""
        if rel not in self._readers:
            self._readers[rel] = read_version(GitStore(self._store.worktree), rel, self.rev)
        return self._readers[rel]

    def _reader(self, name: str) -> CheckpointReader:
        r = self.shard(self.shard_of(name))
        if name not in r.views:
            raise ThetaStoreError(f"{self.path}: weight_map puts {name!r} in {r.path}, which has no tensor of that name")
        return r

    @property
    def views(self) -> dict[str, TensorView]:
        """Where each tensor lives (name -> TensorView in its shard), in the weight_map's order."""
        return {name: self._reader(name).views[name] for name in self._shard_of}

    def metadata(self) -> dict[str, Any]:
        """The index's ``metadata`` (``total_size``...)."""
        return dict(self.index["metadata"])

    def get_tensor(self, name: str) -> np.ndarray[Any, Any]:
        return self._reader(name).get_tensor(name)

    def get_slice(self, name: str) -> TensorSlice:
        return self._reader(name).get_slice(name)

    def raw_bytes(self, name: str) -> bytes:
        return self._reader(name).raw_bytes(name)


def open(
    path: str | os.PathLike[str], rev: str | None = "HEAD", repo: str | os.PathLike[str] | None = None
) -> CheckpointReader | ShardedReader:
    """Open the checkpoint stored at `path` in commit `rev` (None: the index) lazily; a sharded
    model's index (``*.safetensors.index.json``) opens all its shards as one (ShardedReader).

    A relative `path` is taken relative to `repo` when it is given (as `git -C repo` would),
    else to the current directory.

    Example:
        >>> import theta_store, tempfile, subprocess, numpy as np
        >>> d = tempfile.mkdtemp(); _ = subprocess.run(["git", "init", "-q", d])
        >>> theta_store.save_safetensors(f"{d}/m.safetensors", {"w": np.arange(6, dtype=np.float32).reshape(2, 3)})
        >>> with theta_store.Repo(d) as r:
        ...     _ = r.add([f"{d}/m.safetensors"])
        >>> with theta_store.open(f"{d}/m.safetensors", rev=None) as f:
        ...     f.get_tensor("w")[1]
        array([3., 4., 5.], dtype=float32)
    """
    store, rel = store_for(path, repo)
    try:
        return ShardedReader(store, rel, rev) if is_sharded_model(store, rel, rev) else read_version(store, rel, rev)
    except BaseException:
        store.close()
        raise


def store_for(path: str | os.PathLike[str], repo: str | os.PathLike[str] | None) -> tuple[GitStore, str]:
    """The store holding `path` and the path relative to its work tree (see `open` for `repo`)."""
    p = os.fspath(path)
    if repo is not None and not os.path.isabs(p):
        p = os.path.join(os.fspath(repo), p)
    store = GitStore(repo if repo is not None else os.path.dirname(os.path.abspath(p)))
    return store, os.path.relpath(os.path.realpath(p), store.worktree).replace(os.sep, "/")


def read_version(store: GitStore, rel: str, rev: str | None) -> CheckpointReader:
    """A reader of the version `rev` (None: the index) holds for `rel`; closing it closes `store`."""
    data = store.read_path(rel, rev)
    if not looks_like_pointer(data):
        raise PointerError(f"{rel}: {'the index' if rev is None else rev} holds a regular file, not a theta-store pointer")
    pointer = Pointer.parse(data, f"{rel} ({rev or 'index'})")
    if store.version_commit(pointer.manifest_id) is None:
        from .remote import ensure_versions, lazy_version

        lazy = lazy_version(store, pointer.manifest_id)
        if lazy is not None:
            manifest = load_manifest(lazy, pointer.manifest_id)
            return CheckpointReader(store, pointer.manifest_id, manifest, rel, pointer, lazy=lazy)
        ensure_versions(store, {pointer.manifest_id}, what=rel)
    manifest = load_manifest(store, pointer.manifest_id)
    return CheckpointReader(store, pointer.manifest_id, manifest, rel, pointer)
