"""`textconv` (git diff) and `merge-driver` (git merge) for checkpoints stored as pointers.

Git-facing: git starts this (see repo.py for the two parts).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from . import _native
from .errors import FormatError, ThetaStoreError
from .formats import TensorRegion, detect
from .gitstore import GitStore
from .plan import load_manifest
from .pointer import POINTER_MAX, Pointer, looks_like_pointer

if TYPE_CHECKING:
    from .merging import Strategy


def textconv(path: str, out: TextIO | None = None) -> None:
    """One line per tensor (name, dtype, shape, bytes, content digest) after the header's
    `__metadata__` entries, so `git diff` shows what changed: git's line diff then names each
    tensor that changed, came or went. textconv sees one version at a time: how much a tensor
    changed is `theta-store diff`'s to say.

    git hands textconv the working-tree form of both sides (it smudges the old blob into a temporary
    file), so this is usually a real checkpoint: the digests come from hashing it. For a pointer
    (THETA_STORE_SKIP_SMUDGE) they come from the stored manifest. The header's BLAKE3 is the whole
    file's either way, so any change of content shows in the diff.
    """
    w = out or sys.stdout
    with open(path, "rb") as f:
        head = f.read(POINTER_MAX + 1)
    if looks_like_pointer(head):
        p = Pointer.parse(head, path)
        try:
            with GitStore(".") as store:
                m = load_manifest(store, p.manifest_id)
        except ThetaStoreError as e:
            print(f"# theta-store checkpoint: {p.format}, {p.size} bytes, blake3 {p.blake3.hex()[:16]}", file=w)
            print(f"# (tensors not available here: {e.args[0]})", file=w)
            return
        print(
            f"# theta-store checkpoint: {p.format}, {_counts([s.shape for s in m.tensors])}, {p.size} bytes, blake3 {p.blake3.hex()[:16]}",
            file=w,
        )
        _print_metadata(m.metadata, w)
        for s in m.tensors:
            digest = _native.chunk_id(b"".join(c for c, _ in s.chunks)).hex()[:16]
            print(f"{s.name}\t{s.dtype}\t{_shape(s.shape)}\t{s.length}\tchunks:{digest}", file=w)
        return
    try:
        layout = detect(path)
    except ThetaStoreError as e:  # still show that (and how) the bytes changed
        whole, _ = _digests(path, [])
        print(f"# unreadable checkpoint, {os.path.getsize(path)} bytes, blake3 {whole.hex()[:16]}: {e.args[0]}", file=w)
        return
    whole, digests = _digests(path, layout.regions)
    counts = _counts([r.shape for r in layout.regions])
    print(f"# theta-store checkpoint: {layout.format}, {counts}, {layout.size} bytes, blake3 {whole.hex()[:16]}", file=w)
    _print_metadata(layout.metadata, w)
    if layout.format == "torch":
        _print_pickle_entries(path, layout.size, w)
    for r, d in zip(layout.regions, digests, strict=True):
        print(f"{r.name}\t{r.dtype}\t{_shape(r.shape)}\t{r.length}\tblake3:{d.hex()[:16]}", file=w)


def _print_metadata(metadata: dict[str, object], w: TextIO) -> None:
    """A safetensors header's `__metadata__`, one `__metadata__<TAB>KEY<TAB>VALUE` line per key in
    key order, so that `git diff` names the entry that changed (values JSON-quoted: one line each)."""
    import json

    meta = metadata.get("__metadata__")
    if not isinstance(meta, dict):
        return
    for k in sorted(meta):
        print(f"__metadata__\t{k}\t{json.dumps(meta[k], ensure_ascii=False)}", file=w)


def _print_pickle_entries(path: str, size: int, w: TextIO) -> None:
    """A torch.save archive's plain values (an epoch, an optimizer step...), one `pickle<TAB>KEY<TAB>VALUE`
    line per key in key order, like `__metadata__`."""
    import json

    from .formats import torch

    with open(path, "rb") as f:
        found = torch.entries(path, f, size)
    for k in sorted(found):
        print(f"pickle\t{k}\t{json.dumps(found[k], ensure_ascii=False)}", file=w)


def _counts(shapes: list[tuple[int, ...]]) -> str:
    """ "49 tensors, 143616 parameters": the same on both sides of a diff unless a tensor came, went or changed shape."""
    n = 0
    for shape in shapes:
        k = 1
        for d in shape:
            k *= d
        n += k
    return f"{len(shapes)} tensors, {n} parameters"


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape)) or "scalar"


def _digests(path: str, regions: list[TensorRegion]) -> tuple[bytes, list[bytes]]:
    """BLAKE3 of the whole file and of each region (sorted, disjoint), in one pass."""
    whole = _native.Hasher()
    out = []
    # One buffer read into again and again: a fresh 4 MiB bytes object per read costs its pages'
    # faults, more than the hashing.
    buf = memoryview(bytearray(4 << 20))
    with open(path, "rb", buffering=0) as f:

        def feed(n: int, h: _native.Hasher | None) -> None:
            while n > 0:
                got = f.readinto(buf[: min(n, len(buf))])
                if not got:
                    raise FormatError(path, "", "file ended early (changed while being read?)")
                whole.update(buf[:got])
                if h is not None:
                    h.update(buf[:got])
                n -= got

        pos = 0
        for r in regions:
            feed(r.offset - pos, None)
            h = _native.Hasher()
            feed(r.length, h)
            out.append(h.digest())
            pos = r.offset + r.length
        while got := f.readinto(buf):
            whole.update(buf[:got])
    return whole.digest(), out


# As settings spell them (merging.py documents each formula).
STRATEGIES = (
    "ours",
    "theirs",
    "fail",
    "linear[:w]",
    "task-arithmetic[:lambda]",
    "ties[:density]",
    "dare-linear[:density]",
    "dare-ties[:density]",
    "slerp[:t]",
)


def merge_driver(base: str, ours: str, theirs: str, pathname: str) -> int:
    """Three-way merge of a checkpoint's pointers: take the side that changed; both changed -> merge
    tensor by tensor (merge3.py), conflicting tensors by the strategy.

    The strategy is the first of: `-X ours|theirs` given to the git command that runs us (git
    does not pass it to merge drivers: it is read from the process tree, see gitproc),
    $THETA_STORE_MERGE, the path's `thetastore-merge` attribute (.gitattributes), `git config
    thetastore.merge.strategy`; otherwise "fail": exit 1 (a conflict) with a per-tensor report,
    leaving our version in place. "ours" is %A, the branch being merged into (in a rebase: the
    upstream, the commits being replayed are "theirs"). Checkpoints that are not safetensors are
    merged whole: a side, by ours/theirs, or a conflict.
    """
    b, o, t = (Path(p).read_bytes() for p in (base, ours, theirs))
    if o == t or b == t:
        return 0
    if b == o:
        shutil.copyfile(theirs, ours)
        return 0
    strategy, why = merge_strategy(pathname)
    pointers = [Pointer.parse(x, pathname) if looks_like_pointer(x) else None for x in (b, o, t)]
    per_tensor = pointers[1] is not None and pointers[2] is not None and pointers[1].format == pointers[2].format == "safetensors"
    if not per_tensor:
        if strategy.blends:
            print(
                f"theta-store: {pathname}: {strategy} merges safetensors tensor by tensor only; this checkpoint is merged whole",
                file=sys.stderr,
            )
        return _whole_file(strategy.name, why, ours, theirs, pathname)
    from .merge3 import open_version, plan, report, store_result

    with GitStore(".") as store:
        bv = open_version(store, pointers[0], "base", pathname) if pointers[0] is not None and pointers[0].format == "safetensors" else None
        assert pointers[1] is not None and pointers[2] is not None
        sides = [open_version(store, pointers[1], "ours", pathname), open_version(store, pointers[2], "theirs", pathname)]
        out = plan(bv, sides, lambda name: strategy)
        if out.conflicts:
            print(
                f"theta-store: {pathname}: both sides changed the checkpoint: "
                f"{len(out.conflicts)} conflict(s) left for you ({strategy}, {why}):",
                file=sys.stderr,
            )
            for c in out.conflicts:
                print(f"theta-store:   {c}", file=sys.stderr)
            print(
                f"hint: `theta-store merge --strategy linear {pathname}` (or ties, task-arithmetic, ours, theirs...; "
                f"--tensor GLOB=STRATEGY per tensor) resolves it; `git merge --abort` undoes the merge",
                file=sys.stderr,
            )
            print(
                "hint: `git merge -X theirs` (or ours), `git config thetastore.merge.strategy` "
                "or a `thetastore-merge=` attribute sets it for all",
                file=sys.stderr,
            )
            return 1
        pointer = store_result(store, out, sides, pathname)
    Path(ours).write_bytes(pointer.to_bytes())
    if out.both_changed and not out.blended:
        print(f"theta-store: {pathname}: {len(out.both_changed)} tensor(s) changed on both sides; kept {strategy} ({why})", file=sys.stderr)
    for line in report(out, pathname):
        print(line, file=sys.stderr)
    return 0


def _whole_file(strategy: str, why: str, ours: str, theirs: str, pathname: str) -> int:
    """Both sides changed a checkpoint merged whole: keep one side, or leave ours and fail."""
    if strategy == "theirs":
        shutil.copyfile(theirs, ours)
    if strategy in ("ours", "theirs"):
        print(f"theta-store: {pathname}: both sides changed the checkpoint; kept {strategy} ({why})", file=sys.stderr)
        return 0
    print(
        f"theta-store: {pathname}: both sides changed the checkpoint; keep one side with "
        f"`git checkout --ours {pathname}` or `--theirs`, then `git add {pathname}`",
        file=sys.stderr,
    )
    print("hint: `git merge -X theirs` (or ours) or `git config thetastore.merge.strategy theirs` picks a side for all", file=sys.stderr)
    return 1


def merge_strategy(pathname: str | None = None) -> tuple[Strategy, str]:
    """(strategy, where it was set) for a checkpoint both sides changed; raises nothing: a bad
    setting is said and treated as "fail", which leaves the file for the user."""
    import subprocess

    from . import merging
    from .gitproc import favor

    r = subprocess.run(["git", "rev-parse", "--git-dir"], stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
    found = favor(r.stdout.strip() if r.returncode == 0 else None)
    if found is not None:
        return merging.Strategy(found[0]), found[1]
    setting, value = "THETA_STORE_MERGE", os.environ.get("THETA_STORE_MERGE", "").strip()
    if not value and pathname is not None:
        r = subprocess.run(
            ["git", "check-attr", "thetastore-merge", "--", pathname], stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
        )
        got = r.stdout.strip().rsplit(": ", 1)[-1] if r.returncode == 0 else ""
        if got not in ("", "unspecified", "unset", "set"):
            setting, value = f"thetastore-merge attribute of {pathname}", got
    if not value:
        r = subprocess.run(
            ["git", "config", "--get", "thetastore.merge.strategy"], stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
        )
        setting, value = "git config thetastore.merge.strategy", r.stdout.strip()
    if not value:
        return merging.Strategy("fail"), "the default"
    try:
        return merging.parse(value), setting
    except ValueError:
        print(f'theta-store: warning: {setting} is {value!r}, not one of {", ".join(STRATEGIES)}; merging as "fail"', file=sys.stderr)
        return merging.Strategy("fail"), setting
