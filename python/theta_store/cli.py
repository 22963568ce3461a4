"""The `theta-store` command (also `git theta-store`).

Every user verb is one call of `theta_store.Repo` (the porcelain), or of install for the
settings outside a repository. The plumbing git starts (filter-process, pre-push, textconv,
merge-driver) goes to the git-facing modules (filterproc, remote.pre_push, gitdrivers).
"""

from __future__ import annotations

import os
import signal
import sys

from .errors import MergeConflict, Terminated, ThetaStoreError
from .sizes import human_size

TYPE_CHECKING = False  # not typing's: see __init__.py
if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence
    from typing import Any

    from .repo import Repo


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def _out(args: argparse.Namespace, obj: Any, text: str) -> None:
    if getattr(args, "json", False):
        import json

        print(json.dumps(obj, indent=2, sort_keys=True))
    elif not args.quiet or args.command in ("show", "stats", "fsck"):
        print(text)


def cmd_add(args: argparse.Namespace) -> int:
    import threading  # not concurrent.futures: its imports would delay the start of the hashing

    from .checkpoint import scan

    hashing = threading.Event()
    opened: dict[str, Any] = {}

    def open_repo() -> None:
        # Only once the hashing runs (in the core, without the GIL): before that, these imports
        # would share the GIL with the main thread's, and the hashing would start later.
        hashing.wait()
        try:
            from .repo import Repo

            opened["repo"] = Repo(args.C)
        except BaseException as e:  # raised on the main thread, below
            opened["error"] = e

    def repo() -> Repo:
        thread.join()
        if "error" in opened:
            raise opened["error"]
        r: Repo = opened["repo"]
        return r

    # The first checkpoint is hashed while the repository opens on a thread (dulwich is slow to
    # import and open).
    first = args.paths[0] if args.paths and os.path.isfile(args.paths[0]) else None
    thread = threading.Thread(target=open_repo, name="theta-open-repo", daemon=True)
    thread.start()
    try:
        scanned = scan(first, progress=args.progress, started=hashing.set) if first is not None else None
    except (ThetaStoreError, OSError):
        hashing.set()
        thread.join()
        if "error" in opened:  # not a repository, say: that comes first
            raise opened["error"] from None
        opened["repo"].close()
        raise
    finally:
        hashing.set()
    from .repo import report_dict

    with repo() as rp:
        reports = rp.add(args.paths, progress=args.progress, scanned=scanned, base=args.base, lora=args.lora, lossy=args.lossy)
    lines = [
        f"{r.path}: {r.format}, {r.tensors} tensors, {human_size(r.size)}"
        f"{f' ({len(r.lossy)} tensors approximated, the file rewritten to match)' if r.lossy else ''}"
        f"; new {human_size(r.new_bytes)} in {r.new_chunks} chunks"
        f"{f' ({r.delta_chunks} as deltas)' if r.delta_chunks else ''}, reused {human_size(r.reused_bytes)} in {r.reused_chunks} chunks"
        for r in reports
    ]
    for r in reports:
        if not r.tracked:
            ext = os.path.splitext(r.path)[1]
            print(
                f"theta-store: warning: {r.path} is not tracked by any .gitattributes pattern: collaborators will get its"
                f" pointer file, not the checkpoint (hint: theta-store track '*{ext or os.path.basename(r.path)}', then commit"
                " .gitattributes)",
                file=sys.stderr,
            )
    _out(args, [report_dict(r) for r in reports], "\n".join(lines))
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from .repo import Repo

    with Repo(args.C) as repo:
        done = repo.restore(args.paths, rev=args.source, progress=args.progress)
    _out(args, {"restored": done}, "\n".join(f"restored {p}" for p in done))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from .repo import Repo

    rev, path = split_rev_path(args.path)
    with Repo(args.C) as repo:
        if rev is not None and not (path in (".", "..") or path.startswith(("./", "../"))):
            path = os.path.join(repo.root, path)  # REV:path is relative to the top, as in git
        info = repo.show(path, rev or None)
    rows = [
        [
            r["name"],
            r["dtype"],
            "x".join(map(str, r["shape"])) or "-",
            human_size(r["bytes"]),
            human_size(r["stored"]) if r["kind"] in ("tensor", "skeleton") else "-",
            f"{r['stored'] / r['bytes']:.3f}" if r["bytes"] and r["kind"] in ("tensor", "skeleton") else "-",
            r["encoding"] + (f" (lossy, r={r['lossy']['rank']}, err {r['lossy']['rel_err']:.1e})" if r["lossy"] else ""),
            r["codec"],
        ]
        for r in info["rows"]
    ]
    head = (
        f"{info['path']}: {info['format']}, {info['tensors']} tensors, {human_size(info['size'])} stored as {human_size(info['stored'])}"
        f" ({info['stored'] / max(info['size'], 1):.3f})\n"
        + (f"manifest {info['manifest']}\n" if info["manifest"] else f"shards {', '.join(s['path'] for s in info.get('shards', []))}\n")
    )
    if info["lossy"]:
        head += (
            f"lossy: {len(info['lossy'])} tensors are low-rank approximations of what was added (theta-store add --lossy);"
            " the others are byte-exact\n"
        )
    columns = ["tensor", "dtype", "shape", "raw", "stored", "ratio", "stored as", "codec (per byte plane)"]
    if info.get("shards"):  # a sharded model: which shard each row is in
        rows = [[*row, r["shard"]] for row, r in zip(rows, info["rows"], strict=True)]
        columns.append("shard")
    _out(args, info, head + _table(rows, columns))
    return 0


def split_rev_path(spec: str) -> tuple[str | None, str]:
    """`REV:path` as git splits it (at the first colon outside `@{...}`); `:path` gives REV "" (the
    index), a spec without a colon REV None (a path relative to the current directory)."""
    depth = 0
    for i, ch in enumerate(spec):
        if ch == "{":
            depth += 1
        elif ch == "}" and depth:
            depth -= 1
        elif ch == ":" and not depth:
            return spec[:i], spec[i + 1 :]
    return None, spec


def cmd_stats(args: argparse.Namespace) -> int:
    from .repo import Repo

    with Repo(args.C) as repo:
        s = repo.stats()
    rows = []
    for v in s["versions"]:
        cells = [v["manifest"][:12], v["format"], str(v["tensors"]), human_size(v["size"]), human_size(v["stored"]), human_size(v["added"])]
        commits = [_commit_cell(c) for c in v["commits"][:STATS_COMMITS]] or ["(no commit)"]
        if len(v["commits"]) > STATS_COMMITS:
            commits.append(f"... {len(v['commits']) - STATS_COMMITS} more (--json lists them)")
        rows.append([*cells, commits[0]])
        rows += [[""] * len(cells) + [c] for c in commits[1:]]
    text = _table(rows, ["version", "format", "tensors", "raw", "stored", "added", "commits that wrote it"])
    if s["checkpoints"]:
        text += "\n\n" + _table(
            [[c["path"], c["manifest"][:12], human_size(c["size"]), human_size(c["stored"])] for c in s["checkpoints"]],
            ["checkpoint (index)", "version", "raw", "stored"],
        )
    text += (
        f"\n\n{len(s['versions'])} versions, {human_size(s['raw_bytes'])} raw in all, {human_size(s['stored_bytes'])} stored "
        f"in {s['unique_chunks']} unique chunks (ratio {s['ratio']:.3f})\n"
        "stored: the frames the version needs; added: those no version before it (in commit order) had"
    )
    _out(args, s, text)
    return 0


STATS_COMMITS = 5  # per version, in the table; --json has them all


def _commit_cell(c: dict[str, str]) -> str:
    """`abc1234 2024-06-01 12:00 path`: short hash, committer date (minutes), path."""
    return f"{c['commit'][:7]} {c['date'][:16].replace('T', ' ')} {c['path']}"


def cmd_fsck(args: argparse.Namespace) -> int:
    from .repo import Repo

    if args.remote is not None:
        return _check_remote(args, args.remote or None, None)
    if args.repair:
        return _repair(args)
    with Repo(args.C) as repo:
        r = repo.fsck(progress=args.progress)
    lines = [f"{p['version'][:12]} {p['object'][:12]} {p['problem']}" for p in r["problems"]]
    for d in r["damaged"]:
        lines.append(f"damaged version {d['version'][:16]}: {', '.join(d['paths']) or 'used by no path'}")
        lines += [f"  {_commit_cell(c)}" for c in d["commits"]]
    lines.append(
        f"{r['versions']} versions, {r['chunks_checked']} chunks checked: " + ("ok" if r["ok"] else f"{len(r['problems'])} problems")
    )
    _out(args, r, "\n".join(lines))
    return 0 if r["ok"] else 1


def _repair(args: argparse.Namespace) -> int:
    from .repo import Repo

    with Repo(args.C) as repo:
        r = repo.repair(remote=args.repair_from, progress=args.progress)
    lines = [f"damaged version {d['version'][:16]}: {', '.join(d['paths']) or 'used by no path'}" for d in r["damaged"]]
    lines += [f"moved aside: {f}" for f in r["moved_aside"]]
    lines += [f"repaired version {v[:16]} (fetched an intact copy)" for v in r["repaired"]]
    lines += [f"not repaired: version {v[:16]} (no remote had an intact copy)" for v in r["not_repaired"]]
    if "error" in r:
        lines.append(f"fetching failed: {r['error']}")
    lines.append("fsck: ok" if r["ok"] else f"fsck: {len(r['fsck']['problems'])} problems remain")
    _out(args, r, "\n".join(lines))
    return 0 if r["ok"] else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.dir, json_out=args.json, quiet=args.quiet)


def cmd_install(args: argparse.Namespace) -> int:
    from .install import config_items, install

    scope = "global" if args.global_ else "local"
    done = install(".", scope)
    keys = tuple(f"{k}=" for k, _ in config_items())
    where = "your global git config" if args.global_ else "this repository's git config"
    # One line for the settings (their values are long command lines); the hook lines say what happened to hooks.
    lines = [f"set theta-store's filter, diff and merge driver in {where} (`git config --{scope} --get-regexp thetastore` lists them)"]
    lines += [d for d in done if not d.startswith(keys)]
    _out(args, {"configured": done}, "\n".join(lines))
    return 0


def cmd_track(args: argparse.Namespace) -> int:
    from .repo import Repo

    if not args.patterns:
        with Repo(args.C) as repo:
            found = repo.tracked()
        text = "\n".join(["Listing tracked patterns", *(f"    {pat} ({name})" for pat, name in found)])
        if not found:
            text = "no patterns are tracked; `theta-store track '*.safetensors'` tracks one"
        _out(args, {"tracked": [{"pattern": p, "file": n} for p, n in found]}, text)
        return 0

    with Repo(args.C) as repo:
        r = repo.track(args.patterns)
    added, configured, staged = r["tracked"], r["configured"], r["staged"]
    lines = [f"tracking {p}" for p in added] or ["already tracked"]
    if staged:
        lines.append(f"staged {staged}; commit it, or clones get pointer files: git commit -m 'track checkpoints' {staged}")
    if configured:
        lines.append("set theta-store's filter in this repository's git config (`theta-store install --global` sets it for all)")
    _out(args, r, "\n".join(lines))
    return 0


def cmd_untrack(args: argparse.Namespace) -> int:
    from .repo import Repo

    with Repo(args.C) as repo:
        removed = repo.untrack(args.patterns)
    _out(args, {"untracked": removed}, "\n".join(f"untracked {p}" for p in removed) or "nothing to untrack")
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    from .repo import Repo

    with Repo(args.C) as repo:
        r = repo.fetch(args.remote, args.revs, all_versions=args.all)
    _out(args, r, f"{r['fetched']} version(s) fetched, {r['needed'] - r['fetched']} already here")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from .repo import Repo

    with Repo(args.C) as repo:
        s = repo.status()
    rows = [
        [
            f["path"],
            {"materialised": "checkpoint", "pointer": "pointer file"}.get(f["worktree"], f["worktree"]),
            human_size(f["size"]),
            f["version"][:12],
            ", ".join(n for n, on in (("staged", f["changed"] or not f["committed"]), ("NOT TRACKED", not f["tracked"])) if on),
        ]
        for f in s["files"]
    ]
    table = _table(rows, ["path", "work tree", "size", "version", ""]) if rows else "no theta-store pointers in HEAD or the index"
    lines = [line.rstrip() for line in table.splitlines()]
    if s["uncovered"]:
        lines += [
            f"warning: {len(s['uncovered'])} pointer(s) under a path no filter=thetastore pattern covers (in the staged"
            " .gitattributes): a clone gets the pointer file, not the checkpoint",
            f"hint: theta-store track {' '.join(s['uncovered'][:3])} (then commit .gitattributes), or git mv it back to a tracked name",
        ]
    if s["pointer_files"]:
        lines.append(f"hint: {len(s['pointer_files'])} file(s) hold only their pointer: `theta-store pull` puts the checkpoints there")
    _out(args, s, "\n".join(lines))
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from .repo import Repo

    with Repo(args.C) as repo:
        remote, paths = args.remote, args.paths
        if remote is not None and not repo.is_remote(remote):  # `pull -- PATH`: argparse drops the `--`
            remote, paths = None, [remote, *paths]
        r = repo.pull(remote, paths, progress=args.progress)
    for s in r["skipped"]:
        if not s["reason"].startswith("already") and not args.json:
            print(f"theta-store: {s['path']}: {s['reason']}", file=sys.stderr)
    lines = [f"restored {p}" for p in r["restored"]]
    lines.append(
        f"{len(r['fetched'])} version(s) fetched, {len(r['restored'])} file(s) restored, "
        f"{sum(s['reason'].startswith('already') for s in r['skipped'])} already there"
    )
    _out(args, r, "\n".join(lines))
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from .repo import Repo

    if args.check:
        return _check_remote(args, args.remote, ["--branches", "--tags"] if args.all else (args.revs or ["HEAD"]))
    with Repo(args.C) as repo:
        r = repo.push(args.remote, args.revs, all_refs=args.all)
    # A push that sent versions has said so on stderr (as the pre-push hook does): say only "nothing".
    if args.json or not r["versions"]:
        what = " ".join(args.revs) or ("every branch and tag" if args.all else "HEAD")
        _out(args, r, f"nothing to push: {args.remote or 'the remote'} has every checkpoint version {what} needs")
    return 0


def _check_remote(args: argparse.Namespace, remote: str | None, revs: list[str] | None) -> int:
    """`push --check` and `fsck --remote`: list the commits whose checkpoint versions the remote lacks."""
    from .repo import Repo

    with Repo(args.C) as repo:
        r = repo.check_remote(remote, revs)
    missing = r["missing"]
    assert isinstance(missing, list)
    lines = [
        f"{m['commit'][:12]} {m['path']}: checkpoint version {m['version'][:16]} is not on {r['remote']}"
        + ("" if m["here"] else " (nor here)")
        for m in missing
    ]
    if r["ok"]:
        lines.append(f"{r['remote']} has all {r['versions']} checkpoint version(s) that {' '.join(map(str, r['revs']))} need")
    else:
        lines.append(
            f"{len(missing)} commit(s) point to checkpoint versions {r['remote']} lacks"
            f" (hint: theta-store push {r['remote']} {' '.join(map(str, r['revs']))} sends the ones this repository has)"
        )
    _out(args, r, "\n".join(lines))
    return 0 if r["ok"] else 1


def cmd_remote(args: argparse.Namespace) -> int:
    from .repo import Repo

    with Repo(args.C) as repo:
        if args.action == "add":
            if len(args.args) != 2:
                raise ThetaStoreError("usage: theta-store remote add NAME URL [--endpoint URL] [--region R]")
            r = repo.store_add(args.args[0], args.args[1], endpoint=args.endpoint, region=args.region, default=not args.no_default)
            _out(args, r, f"chunk store {r['name']}: {r['url']} (in {r['file']}, staged: commit it so clones find it)")
            return 0
        if args.action in ("remove", "rm"):
            if len(args.args) != 1:
                raise ThetaStoreError("usage: theta-store remote remove NAME")
            repo.store_remove(args.args[0])
            _out(args, {"removed": args.args[0]}, f"removed chunk store {args.args[0]} (staged)")
            return 0
        if args.action not in (None, "list"):
            raise ThetaStoreError(f"unknown action {args.action!r}: add, remove or list")
        r = repo.stores()
    lines = [
        f"{c['name']}{' (default)' if c['name'] == r['default'] else ''}\t{c['url']}"
        + (f"\tendpoint {c['endpoint']}" if c["endpoint"] else "")
        for c in r["stores"]
    ] or ["no chunk stores: frames go to the Git remote as Git objects"]
    lines += [f"git remote {name}: frames in {where}" for name, where in r["remotes"].items()]
    _out(args, r, "\n".join(lines))
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from .repo import Repo

    with Repo(args.C) as repo:
        r = repo.gc(dry_run=args.dry_run, prune=args.prune)
    verb = "would drop" if args.dry_run else "dropped"
    dropped = r["dropped"]
    assert isinstance(dropped, list)
    lines = [f"{verb} {v}" for v in dropped]
    evicted = r["evicted"]
    assert isinstance(evicted, list)
    lines += [f"{'would evict' if args.dry_run else 'evicted'} {v} (in the chunk store; fetched again when needed)" for v in evicted]
    freed = r["freed_bytes"]
    assert isinstance(freed, int)
    lines.append(f"{verb} {len(dropped)} of {r['versions']} versions ({human_size(freed)} of frames no other version uses)")
    if not args.dry_run and not args.prune and dropped:
        lines.append("run `git gc --prune=now` (or theta-store gc --prune) to free the disk space")
    _out(args, r, "\n".join(lines))
    return 0


def cmd_delta(args: argparse.Namespace) -> int:
    """`theta-store delta A B [-- PATH...]`: `diff` with both revisions given."""
    return _diff(args, args.base, args.rev, args.paths)


def cmd_diff(args: argparse.Namespace) -> int:
    """`theta-store diff [A [B]] [-- PATH...]`: per file a summary line, then each changed tensor.

    No revision: the index against HEAD if something is staged, else HEAD against HEAD~1 (the
    last commit's change); one: A against the index; two: A against B. An argument that names
    an existing path is a path, as is every one after it.
    """
    from .repo import Repo

    revs: list[str] = []
    paths: list[str] = []
    with Repo(args.C) as repo:
        for a in args.args:
            if not paths and len(revs) < 2 and not os.path.exists(a) and repo.store.has_revision(a):
                revs.append(a)
            else:
                paths.append(a)
        if len(revs) == 2:
            return _diff(args, revs[0], revs[1], paths)
        if len(revs) == 1:
            return _diff(args, revs[0], None, paths)
        if not repo.store.has_revision("HEAD"):
            raise ThetaStoreError(
                "nothing to compare: this repository has no commit yet", hint="commit a checkpoint first, or name two revisions"
            )
        staged = any(st != "unchanged" for _, st in _files_or_none(repo, "HEAD", None, paths))
        if staged:
            return _diff(args, "HEAD", None, paths)
        if not repo.store.has_revision("HEAD~1"):
            raise ThetaStoreError(
                "nothing to compare: nothing is staged and HEAD has no parent", hint="name the revisions: theta-store diff A B"
            )
    return _diff(args, "HEAD~1", "HEAD", paths)


def _files_or_none(repo: Any, base: str, rev: str | None, paths: list[str]) -> list[tuple[str, str]]:
    from .errors import ObjectNotFound

    try:
        found: list[tuple[str, str]] = repo.delta_files(base, rev, paths)
        return found
    except ObjectNotFound:
        return []


def _diff(args: argparse.Namespace, base: str | None, rev: str | None, paths: list[str]) -> int:
    """The one implementation behind `diff` and `delta`."""
    from .diffview import file_report, render_html, render_text
    from .repo import Repo

    picture = getattr(args, "strip", None)
    if picture is None:
        picture = sys.stdout.isatty()
    show_all, rank, html_out = args.all, getattr(args, "rank", False), getattr(args, "html", None)
    new_name = rev or "the index"
    files: list[dict[str, Any]] = []
    lines: list[str] = []
    from .formats.sharded import is_index

    indexes = [p for p in paths if is_index(p)]
    paths = [p for p in paths if not is_index(p)]
    with Repo(args.C) as repo:
        # A sharded model's index is diffed as one model over its shards (it is no pointer).
        for p in indexes:
            with repo.delta(p, base, rev) as deltas:
                report = file_report(deltas, show_all=show_all, rank=rank)
            files.append(report)
            lines += render_text(report, _table, picture=picture)
        for rel, status in repo.delta_files(base, rev, paths) if paths or not indexes else []:
            if status != "changed":
                files.append({"path": rel, "status": status, "tensors": []})
                what = {"added": f"added in {new_name}", "removed": f"removed in {new_name}", "unchanged": "unchanged (the same version)"}
                lines.append(f"{rel}: {what[status]}")
                continue
            with repo.delta(os.path.join(repo.root, rel), base, rev) as deltas:
                report = file_report(deltas, show_all=show_all, rank=rank)
            files.append(report)
            lines += render_text(report, _table, picture=picture)
    if html_out:
        page = render_html(files, f"theta-store diff {base or 'index'} {rev or 'index'}").encode()
        tmp = f"{html_out}.tmp{os.getpid()}"
        with open(tmp, "wb") as fh:  # then renamed: a reader never sees half a page
            fh.write(page)
        os.replace(tmp, html_out)
        lines.append(f"wrote {html_out}")
    _out(args, {"base": base, "rev": rev, "files": files}, "\n".join(lines))
    return 0


def cmd_log(args: argparse.Namespace) -> int:
    """`theta-store log [PATH...]`: each version of each checkpoint, newest first."""
    from .repo import Repo

    with Repo(args.C) as repo:
        r = repo.log(args.paths)
    lines = []
    for f in r["files"]:
        lines.append(f["path"])
        rows = [
            [
                v["commit"][:7],
                v["date"][:16].replace("T", " "),
                human_size(v["size"]),
                human_size(v["stored"]),
                "+" + human_size(v["added"]),
                v["summary_line"],
                v["subject"],
            ]
            for v in f["versions"]
        ]
        lines += ["  " + line for line in _table(rows, ["commit", "date", "size", "stored", "added", "change", "subject"]).splitlines()]
    if not r["files"]:
        lines.append("no theta-store checkpoint in the history of HEAD" + (" under " + " ".join(args.paths) if args.paths else ""))
    _out(args, r, "\n".join(lines))
    return 0


LARGE_ERROR = 0.1  # a module's relative error above this is called out: the adapter misses much of the change


def cmd_extract_lora(args: argparse.Namespace) -> int:
    """`theta-store extract-lora PATH --base A --rev B -o DIR`: a PEFT adapter of what changed."""
    from .repo import Repo

    bad_rank = args.rank is not None and args.rank < 1
    if bad_rank or (args.rtol is not None and not 0 < args.rtol < 1):
        what = f"--rank {args.rank}" if bad_rank else f"--rtol {args.rtol}"
        print(f"theta-store: error: {what}: a rank is 1 or more, a relative tolerance between 0 and 1", file=sys.stderr)
        print("hint: --rank 16, or --rtol 1e-3 to choose each module's rank", file=sys.stderr)
        return 2
    with Repo(args.C) as repo:
        r = repo.extract_lora(
            args.path, args.base, args.rev, rank=args.rank, rtol=args.rtol, out=args.out, modules=args.module, bias=args.bias
        )
    rows = [[m["module"], "x".join(map(str, m["shape"])), m["dtype"], str(m["rank"]), f"{m['rel_error']:.2e}"] for m in r["modules"]]
    lines = [_table(rows, ["module", "shape", "dtype", "rank", "rel error"])] if rows else []
    lines.append(
        f"wrote {r['adapter']} ({len(r['modules'])} modules, r={r['r']}"
        + (f", {len(r['biases'])} biases" if r["biases"] else "")
        + f", {human_size(os.path.getsize(r['adapter']))}) and {r['config']}"
    )
    if r["skipped"]:
        lines.append(f"{len(r['skipped'])} changed tensors left out (--json lists them and why)")
    big = [m["module"] for m in r["modules"] if m["rank"] * sum(m["shape"]) >= m["shape"][0] * m["shape"][1]]
    if big:
        lines.append(f"note: the factors of {', '.join(big)} are as big as the dense difference: a LoRA adapter saves nothing there")
    if not r["modules"]:
        lines.append(f"no changed 2-D weight between {args.base} and {args.rev}: the adapter is empty")
    elif r["max_rel_error"] > LARGE_ERROR:
        lines.append(
            f"note: relative errors up to {r['max_rel_error']:.2g}: a low-rank adapter captures only part of this change"
            " (a full fine-tune changes weights in every direction); a higher --rank or --rtol keeps more"
        )
    _out(args, r, "\n".join(lines))
    return 0


def _delta_verbs(verb: Any) -> None:
    """The parsers of `delta` and `extract-lora` (`verb` as in build_parser)."""
    sp = verb("delta", "what changed in checkpoints between two revisions, tensor by tensor", cmd_delta)
    sp.add_argument("base", metavar="A", help="the base revision")
    sp.add_argument("rev", metavar="B", help="the new revision")
    sp.add_argument("paths", nargs="*", metavar="-- PATH", help="only these files (default: every checkpoint in A or B)")
    sp.add_argument("--all", action="store_true", help="list unchanged tensors too")
    sp = verb(
        "diff",
        "what changed in checkpoints, tensor by tensor: A against B; A against the index; none: the staged change, else the last commit's",
        cmd_diff,
    )
    sp.add_argument("args", nargs="*", metavar="[A [B]] [--] [PATH]", help="revisions, then paths")
    sp.add_argument("--all", action="store_true", help="list unchanged tensors too")
    sp.add_argument("--rank", action="store_true", help="the numerical rank of each changed matrix (an SVD each: slow on big ones)")
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--strip", dest="strip", action="store_true", default=None, help="draw the per-layer strip (default: on a terminal)")
    g.add_argument("--no-strip", dest="strip", action="store_false")
    sp.add_argument("--html", metavar="FILE", help="also write a self-contained HTML page: heatmap by layer and module, and the table")
    sp = verb("log", "the versions of checkpoints in HEAD's history: commit, size, stored bytes added, the change", cmd_log)
    sp.add_argument("paths", nargs="*", metavar="PATH", help="default: every checkpoint")
    sp = verb("extract-lora", "write the changed 2-D weights between two revisions as a PEFT LoRA adapter", cmd_extract_lora)
    sp.add_argument("path", metavar="PATH")
    sp.add_argument("--base", required=True, metavar="A", help="the base model's revision")
    sp.add_argument("--rev", default="HEAD", metavar="B", help="the fine-tuned revision (default HEAD)")
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--rank", type=int, metavar="R", help="rank of every module (default 16)")
    g.add_argument("--rtol", type=float, metavar="T", help="per module, the smallest rank with relative error <= T")
    sp.add_argument("-o", "--out", required=True, metavar="DIR", help="the adapter folder to write")
    sp.add_argument("--module", action="append", metavar="NAME", help="only this module (full name or last part; repeatable)")
    sp.add_argument("--bias", action="store_true", help="also write the new values of changed biases")


def cmd_filter_process(args: argparse.Namespace | None) -> int:
    from .filterproc import run

    return run()


def cmd_pre_push(args: argparse.Namespace) -> int:
    from .gitstore import GitStore
    from .remote import pre_push

    with GitStore(".") as store:
        pre_push(store, args.remote, args.url, sys.stdin.read().splitlines())
    return 0


def cmd_textconv(args: argparse.Namespace) -> int:
    from .gitdrivers import textconv

    textconv(args.file)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """`merge [--strategy S] [--tensor GLOB=S] PATH` (a conflicted file) or `merge A B [C...] -o OUT`."""
    from . import merging

    try:
        per_tensor = []
        for t in args.tensor:
            glob, eq, spec = t.rpartition("=")
            if not eq or not glob:
                raise ValueError(f"--tensor {t!r} is not GLOB=STRATEGY")
            per_tensor.append((glob, merging.parse(spec)))
        default = merging.parse(args.strategy) if args.strategy else None
    except ValueError as e:
        print(f"theta-store merge: error: {e}", file=sys.stderr)
        print(
            "hint: strategies: ours, theirs, fail, linear[:w], task-arithmetic[:lambda], ties[:density], dare-linear, dare-ties, slerp[:t]",
            file=sys.stderr,
        )
        return 2
    if args.output is None and len(args.revs) != 1:
        print("theta-store merge: error: give one conflicted PATH, or revisions A B [C...] with -o OUT", file=sys.stderr)
        print(
            "hint: theta-store merge --strategy linear model.safetensors; theta-store merge main other -o merged.safetensors",
            file=sys.stderr,
        )
        return 2
    if args.output is not None and len(args.revs) < 2:
        print("theta-store merge: error: -o OUT merges two or more revisions: theta-store merge A B [C...] -o OUT", file=sys.stderr)
        print("hint: each revision is REV or REV:PATH (PATH defaults to OUT's place in the repository)", file=sys.stderr)
        return 2
    from .repo import Repo

    split = [split_rev_path(spec) for spec in args.revs]
    base = split_rev_path(args.base) if args.base else None
    with Repo(args.C) as repo:
        try:
            if args.output is None:
                lines = repo.merge_conflicted(args.revs[0], default, per_tensor)
            else:
                lines = repo.merge_revisions(split, args.output, default, per_tensor, base)
        except MergeConflict as e:
            print(f"theta-store: error: {e.args[0]}:", file=sys.stderr)
            for c in e.conflicts:
                print(f"theta-store:   {c}", file=sys.stderr)
            print(f"hint: {e.hint}", file=sys.stderr)
            return 1
    for line in lines:
        print(line, file=sys.stderr)
    return 0


def cmd_merge_driver(args: argparse.Namespace) -> int:
    from .gitdrivers import merge_driver

    return merge_driver(args.base, args.ours, args.theirs, args.pathname)


VERBS = (
    "add",
    "restore",
    "show",
    "stats",
    "status",
    "ls-files",
    "fsck",
    "install",
    "track",
    "untrack",
    "fetch",
    "pull",
    "push",
    "remote",
    "gc",
    "demo",
    "delta",
    "diff",
    "log",
    "extract-lora",
    "merge",
)
PLUMBING = ("filter-process", "pre-push", "textconv", "merge-driver")


def _verb_of(argv: Sequence[str]) -> str | None:
    """The command named in `argv`, if it is one and no help was asked for before it."""
    it = iter(argv)
    for a in it:
        if a == "-C":
            next(it, None)
        elif a in ("-h", "--help"):
            return None
        elif not a.startswith("-"):
            return a if a in VERBS or a in PLUMBING else None
    return None


def _output_options(p: argparse.ArgumentParser, default: Any) -> None:
    """-q, --json, --progress/--no-progress: given to the top-level parser (default None: their real
    defaults) and to every verb's (default argparse.SUPPRESS)."""
    flag = False if default is None else default
    p.add_argument("-q", "--quiet", action="store_true", default=flag, help="no progress, no chatter")
    p.add_argument("--json", action="store_true", default=flag, help="machine-readable output")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--progress", dest="progress", action="store_true", default=default, help="show progress even without a terminal")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=default)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or of the command `only` alone (what a run that names it
    needs: building every sub-parser is a cost each run would pay)."""
    import argparse

    p = argparse.ArgumentParser(prog="theta-store", description="Version ML model checkpoints in ordinary Git.")
    from . import __version__

    p.add_argument("--version", action="version", version=f"theta-store {__version__}")
    p.add_argument("-C", metavar="PATH", default=".", help="run as if started in PATH")
    _output_options(p, None)
    # The same options after the verb (`theta-store stats --json -q`); SUPPRESS: absent there, the
    # sub-parser sets nothing, and a value given before the verb stands.
    shared = argparse.ArgumentParser(add_help=False)
    _output_options(shared, argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    unused = argparse.ArgumentParser(add_help=False, conflict_handler="resolve")  # takes the arguments of commands not built

    def verb(name: str, help: str, fn: Any) -> argparse.ArgumentParser:
        if only is not None and name != only:
            return unused
        sp = sub.add_parser(name, help=help, description=help, parents=[shared])
        sp.set_defaults(fn=fn)
        return sp

    sp = verb("add", "store checkpoints as chunks in .git and stage their pointers", cmd_add)
    sp.add_argument("paths", nargs="+", metavar="PATH")
    sp.add_argument("--base", metavar="REV", help="code changed tensors against the file's version in REV (default: HEAD)")
    sp.add_argument("--lora", metavar="DIR", help="a PEFT adapter folded into the checkpoint: its factors predict the change")
    sp.add_argument(
        "--lossy",
        metavar="low-rank:rtol=T|low-rank:rank=R",
        help="store changed matrices as low-rank approximations (not exact: the file is rewritten to what is stored)",
    )
    sp = verb("restore", "rebuild checkpoints byte-exactly from their pointers (PATH: a file, a directory or a pathspec)", cmd_restore)
    sp.add_argument("paths", nargs="+", metavar="PATH")
    sp.add_argument("--source", "-s", metavar="REV", help="take pointers from this commit instead of the index")
    sp = verb("show", "per-tensor table of a stored checkpoint ([REV:]PATH)", cmd_show)
    sp.add_argument("path", metavar="[REV:]PATH")
    verb("stats", "each stored version: raw, stored and added bytes, the commits that wrote it", cmd_stats)
    sp = verb("fsck", "re-hash every stored object; report missing or corrupt ones", cmd_fsck)
    sp.add_argument(
        "--remote",
        nargs="?",
        const="",
        metavar="REMOTE",
        help="instead: list the commits on REMOTE's branches (as last fetched) whose checkpoint versions REMOTE lacks",
    )
    sp.add_argument(
        "--repair",
        action="store_true",
        help="set damaged packs aside, fetch intact copies of the damaged versions from a remote, rebuild the caches",
    )
    sp.add_argument("--from", dest="repair_from", metavar="REMOTE", help="with --repair: fetch from this remote only")
    sp = verb("install", "configure git to use theta-store (filter, diff, merge drivers, hooks)", cmd_install)
    sp.add_argument("--global", dest="global_", action="store_true", help="in ~/.gitconfig for every repository")
    sp.add_argument("--local", dest="global_", action="store_false", help="in this repository (default)")
    sp = verb("track", "store files matching these patterns with theta-store (.gitattributes); none: list them", cmd_track)
    sp.add_argument("patterns", nargs="*", metavar="PATTERN", help="none: list the tracked patterns")
    sp = verb("untrack", "stop tracking these patterns (other tools' lines are left alone)", cmd_untrack)
    sp.add_argument("patterns", nargs="+", metavar="PATTERN")
    sp = verb(
        "fetch",
        "fetch the checkpoint versions that the trees of REVs (default HEAD) point to; a first argument that is not a remote is a REV",
        cmd_fetch,
    )
    sp.add_argument("remote", nargs="?", default=None, metavar="REMOTE")
    sp.add_argument("revs", nargs="*", metavar="REV")
    sp.add_argument(
        "--all",
        action="store_true",
        help="every version the whole history of REVs needs (default: of every branch, tag and remote-tracking ref)",
    )
    sp = verb(
        "pull",
        "fetch the versions HEAD needs and put the checkpoints in place of pointer files (after a clone"
        " made without theta-store); files with local changes are left as they are",
        cmd_pull,
    )
    sp.add_argument("remote", nargs="?", default=None, metavar="REMOTE", help="default: the upstream remote, then origin")
    sp.add_argument("paths", nargs="*", metavar="-- PATH", help="only the pointers under these paths")
    for name in ("status", "ls-files"):
        verb(
            name,
            "list the pointers in the index and HEAD: checkpoint or pointer file in the work tree, and any outside"
            " a tracked pattern (exit status 0 either way)",
            cmd_status,
        )
    sp = verb("push", "send the checkpoint versions that REVs (default HEAD) need and the remote lacks", cmd_push)
    sp.add_argument("remote", nargs="?", default=None)
    sp.add_argument("revs", nargs="*", metavar="REV")
    sp.add_argument("--all", action="store_true", help="what every branch and tag needs")
    sp.add_argument(
        "--check", action="store_true", help="send nothing: list the commits whose checkpoint versions the remote lacks (exit 1 if any)"
    )
    sp = verb(
        "remote",
        "chunk stores for frames (add NAME s3://bucket/prefix | lfs | https://lfs-url | file:///dir; remove NAME; list),"
        " named in .thetastore",
        cmd_remote,
    )
    sp.add_argument("action", nargs="?", metavar="add|remove|list")
    sp.add_argument("args", nargs="*", metavar="NAME [URL]")
    sp.add_argument("--endpoint", metavar="URL", help="an S3-compatible server's endpoint (default: AWS, or AWS_ENDPOINT_URL)")
    sp.add_argument("--region", metavar="R", help="the bucket's region (default: from the AWS configuration)")
    sp.add_argument("--no-default", action="store_true", help="do not make pushes use this store")
    sp = verb("gc", "drop stored versions that no branch, tag or remote-tracking ref needs", cmd_gc)
    sp.add_argument("--dry-run", "-n", action="store_true", help="only show what would go")
    sp.add_argument("--prune", action="store_true", help="then run git gc --prune=now to free the space")
    sp = verb("demo", "run the built-in example in a temporary directory", cmd_demo)
    sp.add_argument("--dir", help="work in this (new or empty) directory instead of a temporary one")
    _delta_verbs(verb)
    sp = verb(
        "merge",
        "merge a checkpoint tensor by tensor: a conflicted PATH again with other strategies, or revisions A B [C...] into -o OUT",
        cmd_merge,
    )
    sp.add_argument("revs", nargs="+", metavar="PATH | REV[:PATH]")
    sp.add_argument("--strategy", "-s", metavar="S", help="for tensors changed on both sides (default: as configured, else fail)")
    sp.add_argument("--tensor", action="append", default=[], metavar="GLOB=S", help="the strategy for tensors matching GLOB (first match)")
    sp.add_argument("-o", "--output", metavar="OUT", help="merge revisions into this file (not stored, not staged)")
    sp.add_argument("--base", metavar="REV[:PATH]", help="the base of a merge of revisions (default: their merge base)")

    # plumbing that git calls
    def plumbing(name: str, fn: Any) -> argparse.ArgumentParser:
        if only is not None and name != only:
            return unused
        sp = sub.add_parser(name, parents=[shared])  # no help=: argparse lists a subcommand given one, even SUPPRESS
        sp.set_defaults(fn=fn)
        return sp

    plumbing("filter-process", cmd_filter_process)
    sp = plumbing("pre-push", cmd_pre_push)
    sp.add_argument("remote")
    sp.add_argument("url", nargs="?", default="")
    plumbing("textconv", cmd_textconv).add_argument("file")
    sp = plumbing("merge-driver", cmd_merge_driver)
    for a in ("base", "ours", "theirs", "pathname"):
        sp.add_argument(a)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The `theta-store` command. Run as a program (argv None), it ends the process itself."""
    if argv is None:
        signal.signal(signal.SIGTERM, _terminated)
    if (sys.argv[1:] if argv is None else list(argv)) == ["filter-process"]:
        # git starts this on every command that reads the work tree: skip argparse.
        rc = _guarded(cmd_filter_process, None)
    elif not (sys.argv[1:] if argv is None else argv):
        build_parser().print_help()  # as bare `git` does: the help, exit status 1
        rc = 1
    else:
        args = build_parser(_verb_of(sys.argv[1:] if argv is None else argv)).parse_args(argv)
        if args.quiet:
            args.progress = False
        if args.progress is False:  # and for the git commands run on our behalf (their filter, their fetches)
            os.environ["THETA_STORE_PROGRESS"] = "0"
        rc = _chdir(args.C)
        if rc == 0:
            args.C = "."
            rc = _guarded(args.fn, args)
    if argv is None:
        _exit_now(rc)
    return rc


def _chdir(path: str) -> int:
    """Enter `-C PATH`; a bad one is a usage error (exit 2), said in one line."""
    if path == ".":
        return 0
    try:
        os.chdir(path)
    except OSError as e:
        print(f"theta-store: error: cannot change to {path!r}: {e.strerror or e}", file=sys.stderr)
        print("hint: -C takes an existing directory (a repository or a folder inside one)", file=sys.stderr)
        return 2
    return 0


def _exit_now(rc: int) -> None:
    """End the process without the interpreter's teardown (freeing every module and object, a cost
    paid for nothing). Every command has written and closed its files by now; git waits for its
    filter to exit, and the shell for us."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:  # a closed pipe (theta-store show | head): nothing more to say
        pass
    os._exit(rc)


def _guarded(fn: Any, args: argparse.Namespace | None) -> int:
    try:
        rc: int = fn(args)
        return rc
    except ThetaStoreError as e:
        print(f"theta-store: error: {e.args[0] if e.args else e}", file=sys.stderr)
        if e.hint:
            print(f"hint: {e.hint}", file=sys.stderr)
        return 1
    except (OSError, RuntimeError) as e:
        print(f"theta-store: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        signum = e.signum if isinstance(e, Terminated) else signal.SIGINT
        print(f"theta-store: {'terminated' if signum == signal.SIGTERM else 'interrupted'}; nothing was left half-written", file=sys.stderr)
        return 128 + signum


def _terminated(signum: int, frame: object) -> None:
    raise Terminated(signum)


if __name__ == "__main__":
    sys.exit(main())
