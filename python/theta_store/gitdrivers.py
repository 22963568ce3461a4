"""`textconv` (git diff) and `merge-driver` (git merge) for checkpoints stored as pointers."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import TextIO

from . import _native
from .checkpoint import load_manifest
from .errors import ThetaStoreError
from .formats import detect
from .gitstore import GitStore
from .manifest import Pointer, looks_like_pointer


def textconv(path: str, out: TextIO | None = None) -> None:
    """One line per tensor (name, dtype, shape, content digest), so `git diff` shows what changed."""
    w = out or sys.stdout
    with open(path, "rb") as f:
        head = f.read(2048)
    if looks_like_pointer(head):
        p = Pointer.parse(head, path)
        print(f"# theta-store checkpoint: {p.format}, {p.size} bytes, blake3 {p.blake3.hex()[:16]}", file=w)
        try:
            with GitStore(".") as store:
                m = load_manifest(store, p.manifest_id)
        except ThetaStoreError as e:
            print(f"# (tensors not available here: {e.args[0]})", file=w)
            return
        for s in m.spans:
            digest = _native.chunk_id(b"".join(c for c, _ in s.chunks)).hex()[:16]
            name = s.name if s.kind == "tensor" else "(skeleton)"
            shape = "x".join(map(str, s.shape)) or "scalar"
            print(f"{name}\t{s.dtype}\t{shape if s.kind == 'tensor' else ''}\t{s.length}\t{digest}", file=w)
        return
    layout = detect(path)
    print(f"# {layout.format} file, {layout.size} bytes (not stored by theta-store yet)", file=w)
    for r in layout.regions:
        print(f"{r.name}\t{r.dtype}\t{'x'.join(map(str, r.shape)) or 'scalar'}\t{r.length}", file=w)


def merge_driver(base: str, ours: str, theirs: str, pathname: str) -> int:
    """Whole-file three-way merge of pointers: take the side that changed; both changed -> conflict.

    Per-tensor merging strategies (ours/theirs/average/task-arithmetic/ties) come with the merge
    issue; until then a true conflict exits 1 and leaves our version in place.
    """
    b, o, t = (Path(p).read_bytes() for p in (base, ours, theirs))
    if o == t or b == t:
        return 0
    if b == o:
        shutil.copyfile(theirs, ours)
        return 0
    print(
        f"theta-store: {pathname}: both sides changed the checkpoint; keep one side with "
        f"`git checkout --ours {pathname}` or `--theirs`, then `git add {pathname}`",
        file=sys.stderr,
    )
    return 1
