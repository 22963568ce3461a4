"""`textconv` (git diff) and `merge-driver` (git merge) for checkpoints stored as pointers.

Git-facing: git starts this (see repo.py for the two parts).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import TextIO

from . import _native
from .errors import FormatError, ThetaStoreError
from .formats import TensorRegion, detect
from .gitstore import GitStore
from .plan import load_manifest
from .pointer import POINTER_MAX, Pointer, looks_like_pointer


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
    with open(path, "rb") as f:

        def feed(n: int, h: _native.Hasher | None) -> None:
            while n > 0:
                block = f.read(min(n, 4 << 20))
                if not block:
                    raise FormatError(path, "", "file ended early (changed while being read?)")
                whole.update(block)
                if h is not None:
                    h.update(block)
                n -= len(block)

        pos = 0
        for r in regions:
            feed(r.offset - pos, None)
            h = _native.Hasher()
            feed(r.length, h)
            out.append(h.digest())
            pos = r.offset + r.length
        while block := f.read(4 << 20):
            whole.update(block)
    return whole.digest(), out


STRATEGIES = ("ours", "theirs", "fail")


def merge_driver(base: str, ours: str, theirs: str, pathname: str) -> int:
    """Whole-file three-way merge of pointers: take the side that changed; both changed -> the strategy.

    When both sides changed, the first of these says which side to keep: `-X ours|theirs` given
    to the git command that runs us (git does not pass it to merge drivers: it is read from the
    process tree, see gitproc), $THETA_STORE_MERGE, `git config thetastore.merge.strategy`;
    otherwise "fail": exit 1 (a conflict), leaving our version in place. "ours" is %A, the branch
    being merged into (in a rebase: the upstream, the commits being replayed are "theirs").
    Per-tensor merging comes with the merge issue.
    """
    b, o, t = (Path(p).read_bytes() for p in (base, ours, theirs))
    if o == t or b == t:
        return 0
    if b == o:
        shutil.copyfile(theirs, ours)
        return 0
    strategy, why = merge_strategy()
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


def merge_strategy() -> tuple[str, str]:
    """(strategy, where it was set) for a checkpoint both sides changed; raises nothing: a bad
    setting is said and treated as "fail", which leaves the file for the user."""
    import subprocess

    from .gitproc import favor

    r = subprocess.run(["git", "rev-parse", "--git-dir"], stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
    found = favor(r.stdout.strip() if r.returncode == 0 else None)
    if found is not None:
        return found
    env = os.environ.get("THETA_STORE_MERGE", "").strip()
    if env:
        setting, value = "THETA_STORE_MERGE", env
    else:
        r = subprocess.run(
            ["git", "config", "--get", "thetastore.merge.strategy"], stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
        )
        setting, value = "git config thetastore.merge.strategy", r.stdout.strip()
    if not value:
        return "fail", "the default"
    if value not in STRATEGIES:
        print(f'theta-store: warning: {setting} is {value!r}, not one of {", ".join(STRATEGIES)}; merging as "fail"', file=sys.stderr)
        return "fail", setting
    return value, setting
