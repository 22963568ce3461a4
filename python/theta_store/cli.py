"""The `theta-store` command (also `git theta-store`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from .errors import ThetaStoreError
from .repo import Repo, report_dict


def _mb(n: int | float | None) -> str:
    return "-" if n is None else f"{n / 1e6:,.2f} MB"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def _out(args: argparse.Namespace, obj: Any, text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(obj, indent=2, sort_keys=True))
    elif not args.quiet or args.command in ("show", "stats", "fsck"):
        print(text)


def cmd_add(args: argparse.Namespace) -> int:
    with Repo(args.C) as repo:
        reports = repo.add(args.paths, progress=args.progress)
    lines = [
        f"{r.path}: {r.format}, {r.tensors} tensors, {_mb(r.size)}; new {_mb(r.new_bytes)} in {r.new_chunks} chunks, "
        f"reused {_mb(r.reused_bytes)} in {r.reused_chunks} chunks"
        for r in reports
    ]
    _out(args, [report_dict(r) for r in reports], "\n".join(lines))
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    with Repo(args.C) as repo:
        done = repo.restore(args.paths, rev=args.source, progress=args.progress)
    _out(args, {"restored": done}, "\n".join(f"restored {p}" for p in done))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    rev, _, path = args.path.rpartition(":") if ":" in args.path else (None, "", args.path)
    with Repo(args.C) as repo:
        info = repo.show(path, rev or None)
    rows = [[r["name"], r["dtype"], "x".join(map(str, r["shape"])) or "-", _mb(r["bytes"]), _mb(r["stored"]),
             f"{r['stored'] / r['bytes']:.3f}" if r["bytes"] else "-", r["codec"]] for r in info["rows"]]
    head = (f"{info['path']}: {info['format']}, {info['tensors']} tensors, {_mb(info['size'])} stored as {_mb(info['stored'])}"
            f" ({info['stored'] / max(info['size'], 1):.3f})\nmanifest {info['manifest']}\n")
    _out(args, info, head + _table(rows, ["tensor", "dtype", "shape", "raw", "stored", "ratio", "codec (per byte plane)"]))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    with Repo(args.C) as repo:
        s = repo.stats()
    rows = [[v["manifest"][:12], v["format"], str(v["tensors"]), _mb(v["size"]), _mb(v["stored"])] for v in s["versions"]]
    text = _table(rows, ["version", "format", "tensors", "raw", "stored (all its chunks)"])
    if s["checkpoints"]:
        text += "\n\n" + _table([[c["path"], c["manifest"][:12], _mb(c["size"]), _mb(c["stored"])] for c in s["checkpoints"]],
                                ["checkpoint (index)", "version", "raw", "stored"])
    text += (f"\n\n{len(s['versions'])} versions, {_mb(s['raw_bytes'])} raw in all, {_mb(s['stored_bytes'])} stored "
             f"in {s['unique_chunks']} unique chunks (ratio {s['ratio']:.3f})")
    _out(args, s, text)
    return 0


def cmd_fsck(args: argparse.Namespace) -> int:
    with Repo(args.C) as repo:
        r = repo.fsck(progress=args.progress)
    lines = [f"{p['version'][:12]} {p['object'][:12]} {p['problem']}" for p in r["problems"]]
    lines.append(f"{r['versions']} versions, {r['chunks_checked']} chunks checked: " + ("ok" if r["ok"] else f"{len(r['problems'])} problems"))
    _out(args, r, "\n".join(lines))
    return 0 if r["ok"] else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.dir, json_out=args.json, quiet=args.quiet)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="theta-store", description="Version ML model checkpoints in ordinary Git.")
    p.add_argument("-C", metavar="PATH", default=".", help="run as if started in PATH")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress, no chatter")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--progress", dest="progress", action="store_true", default=None, help="show progress even if stderr is not a terminal")
    g.add_argument("--no-progress", dest="progress", action="store_false")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def verb(name: str, help: str, fn: Any, json_flag: bool = True) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(fn=fn)
        if json_flag:
            sp.add_argument("--json", action="store_true", help="machine-readable output")
        return sp

    sp = verb("add", "store checkpoints as chunks in .git and stage their pointers", cmd_add)
    sp.add_argument("paths", nargs="+", metavar="PATH")
    sp = verb("restore", "rebuild checkpoints byte-exactly from their pointers", cmd_restore)
    sp.add_argument("paths", nargs="+", metavar="PATH")
    sp.add_argument("--source", "-s", metavar="REV", help="take pointers from this commit instead of the index")
    sp = verb("show", "per-tensor table of a stored checkpoint ([REV:]PATH)", cmd_show)
    sp.add_argument("path", metavar="[REV:]PATH")
    verb("stats", "raw vs stored bytes, dedup, per checkpoint", cmd_stats)
    verb("fsck", "re-hash every stored object; report missing or corrupt ones", cmd_fsck)
    sp = verb("demo", "run the built-in example in a temporary directory", cmd_demo)
    sp.add_argument("--dir", help="work in this (new or empty) directory instead of a temporary one")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quiet:
        args.progress = False
    if args.C != ".":
        os.chdir(args.C)
        args.C = "."
    try:
        rc: int = args.fn(args)
        return rc
    except ThetaStoreError as e:
        print(f"theta-store: error: {e.args[0] if e.args else e}", file=sys.stderr)
        if e.hint:
            print(f"hint: {e.hint}", file=sys.stderr)
        return 1
    except (OSError, RuntimeError) as e:
        print(f"theta-store: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("theta-store: interrupted; nothing was left half-written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
