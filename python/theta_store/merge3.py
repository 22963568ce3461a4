"""Three-way (and n-way) merge of stored safetensors versions, tensor by tensor and `__metadata__`
key by key.

For each tensor name, with B its value in the base and M_1..M_n its values on the sides (M_1 is
"ours"; a value may be "absent"):
- no side differs from B, or every side that differs has the same value: that value is taken
  (a one-sided change, the same change on both sides, an addition on one side, a removal on one
  side with the other unchanged, a removal on both);
- otherwise the tensor conflicts and its strategy decides (merging.py): `ours` / `theirs` take
  that side's value (or absence); `fail` reports it; a blending strategy computes a value when
  every side has the tensor with one dtype and shape (and the base too, for the strategies that
  use it), and reports it otherwise: a removal against a change, a shape or dtype conflict, a
  tensor added on both sides with different values, a non-float tensor are never guessed.
`__metadata__` keys merge the same way; a key both sides set differently takes ours' value under
a blending strategy (a string cannot be averaged) and is said on stderr.

Equal values are known without reading data when their chunk ids are equal, and unequal ones
when the chunks have the same lengths but other ids. A blended tensor is computed as the result
is written, one tensor at a time and block by block, so memory stays about the sides plus the
base of the largest tensor.
The merged file keeps the tensor order of ours (tensors only the others have follow, in their
order) and the format; it is stored as a version with deltas against ours.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import merging
from .errors import MergeConflict, ThetaStoreError
from .gitstore import GitStore
from .manifest import Pointer, SpanEntry
from .reader import CheckpointReader, numpy_dtype

Chooser = Callable[[str], merging.Strategy]


@dataclass
class Version:
    """One input of a merge: a reader of a stored version, and the label messages give it."""

    label: str
    reader: CheckpointReader

    @property
    def pointer(self) -> Pointer:
        return self.reader._pointer

    def span(self, name: str) -> SpanEntry | None:
        v = self.reader.views.get(name)
        return v.span if v is not None else None

    def meta(self) -> dict[str, Any]:
        return self.reader.metadata()


@dataclass
class Outcome:
    """What a merge found: conflicts (nothing written then), else the result's parts."""

    conflicts: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    blended: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # "ours", "theirs"...: tensors taken as is from a side
    both_changed: list[str] = field(default_factory=list)  # what the strategy decided
    same_as: int | None = None  # the result is this side's version, byte for byte
    items: list[tuple[str, int | Blend]] = field(default_factory=list)  # (name, the side it is taken from, or its blend)
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Blend:
    """A tensor the strategy computes from the sides (and the base), when the result is written."""

    strategy: merging.Strategy
    base: Version | None


def open_version(store: GitStore, pointer: Pointer, label: str, path: str) -> Version:
    """A reader of `pointer`'s version in `store`, fetched from the remote if it is not here."""
    from .plan import load_manifest

    if store.version_commit(pointer.manifest_id) is None:
        from .remote import ensure_versions

        ensure_versions(store, {pointer.manifest_id}, what=f"{path} ({label})", quiet=True)
    manifest = load_manifest(store, pointer.manifest_id)
    return Version(label, CheckpointReader(store, pointer.manifest_id, manifest, path, pointer))


def _describe(v: Version, name: str) -> str:
    s = v.span(name)
    return "absent" if s is None else f"{s.dtype} {list(s.shape)}"


class _Equal:
    """Whether two inputs hold the same value for a tensor: by chunk ids, then (same dtype,
    shape and length but other chunks) by bytes."""

    def __init__(self) -> None:
        self._memo: dict[tuple[int, int, str], bool] = {}

    def __call__(self, a: Version | None, b: Version | None, name: str) -> bool:
        sa = a.span(name) if a is not None else None
        sb = b.span(name) if b is not None else None
        if sa is None or sb is None:
            return sa is None and sb is None
        if (sa.dtype, sa.shape, sa.length) != (sb.dtype, sb.shape, sb.length):
            return False
        if sa.chunks == sb.chunks:
            return True
        if [n for _, n in sa.chunks] == [n for _, n in sb.chunks]:
            return False  # the same cuts, another chunk id: other bytes
        assert a is not None and b is not None
        key = (id(a), id(b), name)
        if key not in self._memo:
            self._memo[key] = a.reader.raw_bytes(name) == b.reader.raw_bytes(name)
        return self._memo[key]


def plan(base: Version | None, sides: list[Version], choose: Chooser) -> Outcome:
    """Decide every tensor and metadata key (blending those the strategy blends). Reads only
    the tensors that need it."""
    out = Outcome()
    eq = _Equal()
    names: list[str] = []
    seen: set[str] = set()
    for v in sides:
        for n in _in_file_order(v):
            if n not in seen:
                seen.add(n)
                names.append(n)
    labels = [v.label for v in sides]
    for name in names:
        changed = [i for i, v in enumerate(sides) if not eq(v, base, name)]
        if not changed:
            pick: int | None = 0
        else:
            first = changed[0]
            pick = first if all(eq(sides[i], sides[first], name) for i in changed[1:]) else None
        if pick is None:
            pick = _conflict(out, name, base, sides, choose(name))
            if pick is None or pick < 0:
                continue
        if sides[pick].span(name) is None:
            continue  # removed
        out.items.append((name, pick))
    _merge_metadata(out, base, sides, choose)
    if out.conflicts:
        return out
    for _, src in out.items:
        if isinstance(src, int):
            out.counts[labels[src]] = out.counts.get(labels[src], 0) + 1
    out.same_as = _same_as(out, sides, eq)
    return out


def _in_file_order(v: Version) -> list[str]:
    return [s.name for s in sorted((s for s in v.reader.manifest.tensors), key=lambda s: s.offset)]


def _conflict(out: Outcome, name: str, base: Version | None, sides: list[Version], s: merging.Strategy) -> int | None:
    """The side a conflicting tensor is taken from, -1 after it was blended (out.items gets it),
    None when it is reported."""
    what = ", ".join(f"{v.label} {_describe(v, name)}" for v in sides)
    base_desc = "added on both sides" if base is None or base.span(name) is None else f"base {_describe(base, name)}"
    if s.name == "ours" or (s.name == "theirs" and len(sides) == 2):
        out.both_changed.append(name)
        return 0 if s.name == "ours" else 1
    if s.name == "fail" or s.name == "theirs":
        kind = "added on both sides with different values" if base is None or base.span(name) is None else "changed on both sides"
        out.conflicts.append(f"{name}: {kind} ({base_desc}; {what})")
        return None
    spans = [v.span(name) for v in sides]
    bspan = base.span(name) if base is not None else None
    problem = ""
    if any(sp is None for sp in spans):
        problem = "removed on one side, changed on another"
    elif len({(sp.dtype, sp.shape) for sp in spans if sp is not None}) > 1:
        problem = "shape or dtype differs between the sides"
    elif base is None and s.needs_base:
        problem = f"{s.name} needs the base version, and there is none (give one: --base REV)"
    elif bspan is None and (s.needs_base or base is not None):
        problem = "added on both sides with different values"
    elif s.needs_base and bspan is not None and spans[0] is not None and (bspan.dtype, bspan.shape) != (spans[0].dtype, spans[0].shape):
        problem = f"shape or dtype differs from the base, which {s.name} needs"
    elif merging.compute_dtype(numpy_dtype(spans[0].dtype if spans[0] is not None else "BYTES")) is None:
        problem = f"{spans[0].dtype if spans[0] is not None else '?'} values cannot be blended by {s.name}"
    if problem:
        out.conflicts.append(f"{name}: {problem} ({base_desc}; {what}); strategy {s} cannot merge it")
        return None
    out.items.append((name, Blend(s, base if s.needs_base else None)))
    out.blended.append(f"{name} ({s})")
    out.both_changed.append(name)
    return -1


def _merge_metadata(out: Outcome, base: Version | None, sides: list[Version], choose: Chooser) -> None:
    bm = base.meta() if base is not None else {}
    ms = [v.meta() for v in sides]
    missing = object()
    result: dict[str, Any] = {}
    keys: list[str] = []
    for m in ms:
        keys += [k for k in m if k not in keys]
    for k in keys:
        vals = [m.get(k, missing) for m in ms]
        b = bm.get(k, missing)
        changed = [i for i, v in enumerate(vals) if v != b]
        if not changed or all(vals[i] == vals[changed[0]] for i in changed):
            v = vals[changed[0]] if changed else vals[0]
        else:
            s = choose(f"__metadata__.{k}")
            if s.name == "ours" or (s.name == "theirs" and len(sides) == 2):
                v = vals[0 if s.name == "ours" else 1]
            elif s.name in ("fail", "theirs"):
                shown = ", ".join(f"{sides[i].label} {_show(vals[i], missing)}" for i in range(len(sides)))
                out.conflicts.append(f"__metadata__ {k!r}: changed on both sides (base {_show(b, missing)}; {shown})")
                continue
            else:
                v = vals[0]
                out.notes.append(
                    f"__metadata__ {k!r}: both sides changed it; kept {sides[0].label}'s {_show(v, missing)} ({s} blends tensors only)"
                )
        if v is not missing:
            result[k] = v
    out.metadata = result


def _show(v: object, missing: object) -> str:
    return "absent" if v is missing else json.dumps(v)


def _same_as(out: Outcome, sides: list[Version], eq: _Equal) -> int | None:
    """The side whose version the result is exactly (same tensors, order and metadata), if any."""
    for i, v in enumerate(sides):
        if out.metadata != v.meta():
            continue
        if [n for n, _ in out.items] != _in_file_order(v):
            continue
        if all(isinstance(src, int) and eq(sides[src], v, n) for n, src in out.items):
            return i
    return None


def write_safetensors(out: Outcome, sides: list[Version], dest: str) -> None:
    """Write the merged checkpoint to `dest` (a temporary file beside it, then a rename)."""
    header: dict[str, Any] = {}
    if out.metadata:
        header["__metadata__"] = out.metadata
    pos = 0
    for name, src in out.items:
        sp = sides[src if isinstance(src, int) else 0].span(name)  # a blend's sides share dtype and shape
        assert sp is not None
        dtype, shape, length = sp.dtype, list(sp.shape), sp.length
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + length]}
        pos += length
    h = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    h += b" " * (-len(h) % 8)
    tmp = f"{dest}.theta-merge-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(h)))
            f.write(h)
            for name, src in out.items:
                if isinstance(src, int):
                    f.write(sides[src].reader.raw_bytes(name))
                else:
                    _write_blend(f, name, src, sides)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _write_blend(f: Any, name: str, blend: Blend, sides: list[Version]) -> None:
    """Compute a blended tensor block by block into `f`; its inputs are freed on return."""
    sp = sides[0].span(name)
    assert sp is not None
    dt = numpy_dtype(sp.dtype)
    values = [np.frombuffer(v.reader.raw_bytes(name), dt) for v in sides]
    base = np.frombuffer(blend.base.reader.raw_bytes(name), dt) if blend.base is not None else None
    for block in merging.blend(blend.strategy, name, values, base):
        f.write(block.view(np.uint8))


def store_result(store: GitStore, out: Outcome, sides: list[Version], path: str) -> Pointer:
    """The merged version, stored (deltas against ours); its pointer."""
    if out.same_as is not None:
        return sides[out.same_as].pointer
    from .checkpoint import add_file

    store.state_dir.mkdir(parents=True, exist_ok=True)
    tmp = str(store.state_dir / f"merge-{os.getpid()}-{os.path.basename(path)}")
    try:
        write_safetensors(out, sides, tmp)
        return add_file(store, tmp, progress=False, base=sides[0].pointer).pointer
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def chooser(default: merging.Strategy, per_tensor: Sequence[tuple[str, merging.Strategy]] = ()) -> Chooser:
    """The strategy of a tensor name: the first GLOB that matches it, else `default`."""

    def choose(name: str) -> merging.Strategy:
        for glob, s in per_tensor:
            if fnmatch.fnmatchcase(name, glob):
                return s
        return default

    return choose


def report(out: Outcome, path: str) -> list[str]:
    """The lines saying what a successful merge took, blended and kept."""
    took = ", ".join(f"{n} from {label}" for label, n in out.counts.items())
    lines = [
        f"theta-store: {path}: merged tensor by tensor: {took or 'nothing'} taken as is"
        + (f", {len(out.blended)} blended" if out.blended else "")
    ]
    lines += [f"theta-store: {path}: blended {b}" for b in out.blended]
    lines += [f"theta-store: {path}: {n}" for n in out.notes]
    return lines


def _pointer_of(data: bytes, where: str) -> Pointer:
    from .errors import PointerError
    from .pointer import looks_like_pointer

    if not looks_like_pointer(data):
        raise PointerError(f"{where} is not a theta-store pointer", hint="only checkpoints stored by theta-store merge tensor by tensor")
    p = Pointer.parse(data, where)
    if p.format != "safetensors":
        raise ThetaStoreError(
            f"{where} is a {p.format} checkpoint: tensor-by-tensor merges are for safetensors",
            hint="keep one side with `git checkout --ours PATH` (or --theirs), then `git add PATH`",
        )
    return p


def resolve_conflict(store: GitStore, rel: str, choose: Chooser) -> Outcome:
    """Merge the conflicted `rel` again from the index's stages (1 base, 2 ours, 3 theirs) and,
    when nothing conflicts, stage the result and put it in the work tree. Raises MergeConflict."""
    stages: dict[int, tuple[str, str]] = {}
    for entry in store.git("ls-files", "-u", "-z", "--", rel).split(b"\0"):
        if entry:
            info, _, path = entry.decode().partition("\t")
            mode, sha, stage = info.split()
            if path == rel:
                stages[int(stage)] = (mode, sha)
    if 2 not in stages or 3 not in stages:
        raise ThetaStoreError(
            f"{rel}: not a file both sides of a merge changed (`git ls-files -u` lists no ours and theirs for it)",
            hint="run it after a `git merge` that stopped with a conflict on this file",
        )

    def version(stage: int, label: str) -> Version:
        p = _pointer_of(store.git("cat-file", "blob", stages[stage][1]), f"{rel} ({label}, index stage {stage})")
        return open_version(store, p, label, rel)

    base = version(1, "base") if 1 in stages else None
    sides = [version(2, "ours"), version(3, "theirs")]
    out = plan(base, sides, choose)
    if out.conflicts:
        raise MergeConflict(rel, out.conflicts, hint="choose for these with --tensor GLOB=STRATEGY (ours, theirs, linear...)")
    pointer = store_result(store, out, sides, rel)
    sha = store.git("hash-object", "-w", "--stdin", input=pointer.to_bytes()).decode().strip()
    store.git("update-index", "--cacheinfo", f"{stages[2][0]},{sha},{rel}")
    store.git("checkout-index", "-f", "--", rel)
    return out


def merge_revisions(store: GitStore, specs: list[tuple[str, str]], base: tuple[str, str] | None, choose: Chooser, dest: str) -> Outcome:
    """Merge the checkpoints at (rev, path) `specs` (the first is "ours") into the file `dest`.
    `base`: (rev, path) of the base; None: their merge base, if they have one. Raises MergeConflict."""
    if base is None:
        import subprocess

        r = subprocess.run(
            ["git", "-C", str(store.worktree), "merge-base", "--octopus", *[rev for rev, _ in specs]], capture_output=True, check=False
        )
        if r.returncode == 0 and r.stdout.strip():  # none (unrelated histories): merged without a base
            base = (r.stdout.decode().split()[0], specs[0][1])

    def version(rev: str, path: str, label: str) -> Version:
        return open_version(store, _pointer_of(store.read_path(path, rev), f"{rev}:{path}"), label, path)

    sides = [version(rev, path, rev) for rev, path in specs]
    bv = None
    if base is not None:
        try:
            bv = version(base[0], base[1], f"base {base[0][:12]}")
        except FileNotFoundError:  # the file is new since the merge base
            bv = None
    out = plan(bv, sides, choose)
    if out.conflicts:
        raise MergeConflict(dest, out.conflicts, hint="choose for these with --tensor GLOB=STRATEGY, or another --strategy")
    write_safetensors(out, sides, dest)
    return out
