"""`install`, `track`, `untrack`: git configuration, hooks that chain, .gitattributes lines.

Git-facing: what makes git call us (see repo.py for the two parts).
"""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

from .errors import NotARepository, ThetaStoreError
from .hooks import CHAINED_SUFFIX, HOOK_MARK

TYPE_CHECKING = False  # not typing's: the filter process imports this module (see __init__.py)
if TYPE_CHECKING:
    from .gitstore import GitStore

ATTRS = "filter=thetastore diff=thetastore merge=thetastore -text"
# Our version trees name frames <2 hex>/<62 hex>: never let git waste time on delta search for them.
NO_DELTA_LINE = "??/" + "?" * 62 + " -delta"


def launcher() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "_launch.py")


def command() -> str:
    """How git should call us: this Python, without `site`, on our launcher (see _launch.py),
    through a line of `sh` that says what is wrong if either has gone (a deleted virtualenv).

    By absolute paths: git then starts us without a PATH lookup through version-manager shims (a
    pyenv shim cost 0.13 s per start) and without the .pth files of site-packages (39-56 ms here, hyperfine).
    Without the check, git reports a filter that cannot start as "the remote end hung up unexpectedly".
    """
    return f"sh -c {shlex.quote(_CHECK)} {shlex.quote(sys.executable)} {shlex.quote(launcher())}"


# $0: the interpreter, $1: the launcher, then git's arguments. One simple command, so that callers
# can append arguments and redirections to it (the pre-push hook does).
_CHECK = (
    '[ -x "$0" ] || { echo "theta-store: $0 (the Python git runs theta-store with) is gone: run theta-store install'
    ' (or install --global) again with the theta-store you use now" >&2; exit 127; }; '
    '[ -f "$1" ] || { echo "theta-store: $1 is gone (theta-store was uninstalled or moved): run theta-store install'
    ' (or install --global) again with the theta-store you use now" >&2; exit 127; }; '
    'l=$1; shift; exec "$0" -S -P "$l" "$@"'
)


def config_items() -> list[tuple[str, str]]:
    cmd = command()
    return [
        ("filter.thetastore.process", f"{cmd} filter-process"),
        ("filter.thetastore.required", "true"),
        ("diff.thetastore.textconv", f"{cmd} textconv"),
        # `git log -p` would otherwise rebuild and hash both checkpoints of every commit, each time
        ("diff.thetastore.cachetextconv", "true"),
        ("merge.thetastore.name", "theta-store checkpoint merge"),
        ("merge.thetastore.driver", f"{cmd} merge-driver %O %A %B %P"),
    ]


def install(path: str = ".", scope: str = "local") -> list[str]:
    """Set the git config (local: this repo; global: ~/.gitconfig) and, for a repo, the hooks."""
    done = []
    cwd = path if scope == "local" else None
    if scope == "local":
        try:
            git_dirs(path)
        except NotARepository:
            raise NotARepository(
                f"{os.path.abspath(path)}: not a git repository; did you mean --global?",
                hint="run `theta-store install` inside a repository, or `theta-store install --global` to set it up for every one",
            ) from None
    for key, value in config_items():
        r = subprocess.run(["git", "config", f"--{scope}", key, value], cwd=cwd, capture_output=True, text=True)
        if r.returncode != 0:
            raise ThetaStoreError(f"git config --{scope} {key} failed: {r.stderr.strip()}", hint="check that git can write its config file")
        done.append(f"{key}={value}")
    if scope == "local":
        done += ensure_hooks(path)
    return done


def ensure_filter(path: str = ".") -> list[str]:
    """Set this repository's git config if no level of git config names our filter yet.

    A `.gitattributes` line naming a filter git has no config for is silently ignored: the
    checkpoint would go into the history as a plain blob (all of it, zlib-compressed, every
    version). `track` calls this, so tracking is enough in a repository never `install`ed."""
    r = subprocess.run(["git", "config", "--get", "filter.thetastore.process"], cwd=path, capture_output=True, text=True)
    if r.returncode == 0 and r.stdout.strip():
        return []
    return install(path, "local")


def git_dirs(where: str | os.PathLike[str]) -> tuple[Path, Path]:
    """The hooks directory and the common git directory of the repository at `where` (absolute)."""
    args = ["git", "rev-parse", "--path-format=absolute", "--git-path", "hooks", "--git-common-dir"]
    r = subprocess.run(args, cwd=where, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise NotARepository(f"{os.path.abspath(where)}: not inside a Git repository", hint="run git init first")
    hooks, common = r.stdout.splitlines()[:2]
    return Path(hooks), Path(common)


def hook_script() -> str:
    cmd = command()
    missing = (
        f"  [ -f {shlex.quote(launcher())} ] || {{ echo >&2 \"theta-store is no longer installed where this repository's"
        " pre-push hook looks for it; install it again and run theta-store install, or push the commits alone with"
        ' THETA_STORE_SKIP_PUSH=1"; exit 2; }\n'
    )
    return f"""#!/bin/sh
{HOOK_MARK}: sends the checkpoint versions the pushed commits need.
# A hook that was here before is kept as pre-push{CHAINED_SUFFIX} and runs after this one.
input=$(mktemp) || exit 1
trap 'rm -f "$input"' EXIT
cat > "$input"
if [ "${{THETA_STORE_SKIP_PUSH:-}}" != 1 ]; then
{missing}  {cmd} pre-push "$@" < "$input" || exit $?
fi
if [ -x "$0{CHAINED_SUFFIX}" ]; then
  "$0{CHAINED_SUFFIX}" "$@" < "$input" || exit $?
fi
# Git LFS installs its pre-push hook lazily and silently gives up when one is already here:
# if LFS is set up and its hook is not chained, run what its hook would have run.
if ! grep -qs "git lfs pre-push" "$0{CHAINED_SUFFIX}" && command -v git-lfs >/dev/null 2>&1 &&
  git config --get filter.lfs.process >/dev/null 2>&1; then
  git lfs pre-push "$@" < "$input" || exit $?
fi
"""


def ensure_hooks(where: str | os.PathLike[str] = ".") -> list[str]:
    """Install the pre-push hook (idempotent); a foreign hook found in its place is kept and chained.

    Every command that touches a repository calls this, and so does the filter process: another
    tool may have replaced our hook (`git lfs update --force` does), and a push without it would
    send commits without their checkpoint versions. Returns what it did to another tool's hook, in
    words for the user (nothing when there was none or ours was there). Raises ThetaStoreError if a foreign hook is here and a
    different one is already chained.
    """
    done: list[str] = []
    hooks, common = git_dirs(where)
    hooks.mkdir(parents=True, exist_ok=True)
    ours_before = _no_delta_attributes(common)  # written with our first hook: this repository had it
    hook = hooks / "pre-push"
    chained = hooks / ("pre-push" + CHAINED_SUFFIX)
    script = hook_script()
    if hook.exists():
        current = hook.read_text(errors="replace")
        if current == script:
            return done
        if HOOK_MARK not in current:
            if not chained.exists():
                os.replace(hook, chained)
            elif chained.read_text(errors="replace") != current:
                # e.g. `git lfs update --force` over ours, after a first foreign hook was chained
                raise ThetaStoreError(
                    f"{hook} is not theta-store's and {chained.name} is another hook: theta-store's pre-push hook is not installed,"
                    " so a git push would send commits without their checkpoint versions",
                    hint=f"merge {hook.name} into {chained.name} by hand, delete {hook.name}, then run `theta-store install`",
                )
            # else: the hook here is the one already chained (re-installed over ours): just put ours back
            if ours_before:
                done.append(
                    f"restored theta-store's pre-push hook in {hooks}: another tool had replaced it (theirs runs from {chained.name})"
                )
            else:
                done.append(f"installed theta-store's pre-push hook in {hooks}; kept the existing pre-push hook as {chained.name}")
    tmp = hook.with_name("pre-push.theta-tmp")
    tmp.write_text(script)
    tmp.chmod(tmp.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    os.replace(tmp, hook)
    return done


def ensure_hooks_and_say(where: str | os.PathLike[str] = ".") -> None:
    """ensure_hooks, telling the user on stderr what changed; a hook that cannot be set is a warning."""
    try:
        done = ensure_hooks(where)
    except (ThetaStoreError, OSError) as e:
        done = [f"warning: {e}"]
    for line in done:
        print(f"theta-store: {line}", file=sys.stderr)


def _no_delta_attributes(common_dir: Path) -> bool:
    """Keep git's delta search off our frames; returns whether the line was there already."""
    info = common_dir / "info" / "attributes"
    lines = info.read_text().splitlines() if info.exists() else []
    if NO_DELTA_LINE in lines:
        return True
    info.parent.mkdir(parents=True, exist_ok=True)
    info.write_text("\n".join([*lines, NO_DELTA_LINE]) + "\n")
    return False


def _attributes(store: GitStore) -> Path:
    return store.worktree / ".gitattributes"


def track(patterns: list[str], path: str = ".") -> list[str]:
    """Add `PATTERN filter=thetastore ...` lines to .gitattributes (idempotent)."""
    from .gitstore import GitStore

    with GitStore(path) as store:
        ensure_hooks_and_say(store.worktree)
        f = _attributes(store)
        lines = f.read_text().splitlines() if f.exists() else []
        added = []
        for pat in patterns:
            if any(" " in pat for pat in patterns):
                raise ThetaStoreError(f"pattern {pat!r} has a space; quote it as git does ([[:space:]])")
            line = f"{pat} {ATTRS}"
            if line not in lines:
                lines.append(line)
                added.append(pat)
        if added:
            f.write_text("\n".join(lines) + "\n")
        return added


def stage_attributes(path: str = ".") -> str | None:
    """`git add .gitattributes` (the root one, where `track` writes); returns its path, or None if
    it is absent or already staged as it is.

    Without it in the commits, every clone gets pointer files and a clean `git status`.
    """
    from .gitstore import GitStore

    with GitStore(path) as store:
        if not _attributes(store).exists():
            return None

        def run(*args: str) -> subprocess.CompletedProcess[bytes]:
            return subprocess.run(["git", *args], cwd=store.worktree, stdin=subprocess.DEVNULL, capture_output=True, check=False)

        changed = run("diff", "--quiet", "--", ".gitattributes").returncode != 0
        if not changed and run("ls-files", "--error-unmatch", "--", ".gitattributes").returncode == 0:
            return None
        r = run("add", "--", ".gitattributes")
        if r.returncode != 0:
            raise ThetaStoreError(f"git add .gitattributes failed: {r.stderr.decode(errors='replace').strip()}")
        return os.path.relpath(_attributes(store))


def tracked(path: str = ".") -> list[tuple[str, str]]:
    """(pattern, file) of every line that gives a pattern our filter, in the work tree's
    .gitattributes files and the repository's info/attributes, as `git lfs track` lists them."""
    from .gitstore import GitStore

    with GitStore(path) as store:
        listed = store.git("ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", ":(glob)**/.gitattributes")
        files = [(store.worktree / name, name) for name in sorted({n.decode() for n in listed.split(b"\0") if n})]
        files.append((store.common_dir / "info" / "attributes", ".git/info/attributes"))
        found = []
        for full, name in files:
            try:
                text = full.read_text(errors="replace")
            except OSError:  # listed in the index, deleted from the work tree
                continue
            for line in text.splitlines():
                fields = line.split()
                if fields and not fields[0].startswith("#") and "filter=thetastore" in fields[1:]:
                    found.append((fields[0], name))
        return found


def untrack(patterns: list[str], path: str = ".") -> list[str]:
    """Remove our lines for these patterns; lines of other tools (filter=lfs, filter=theta) stay."""
    from .gitstore import GitStore

    with GitStore(path) as store:
        f = _attributes(store)
        if not f.exists():
            return []
        lines = f.read_text().splitlines()
        keep = [ln for ln in lines if not (ln.split(" ", 1)[0] in patterns and "filter=thetastore" in ln.split())]
        removed = [ln.split(" ", 1)[0] for ln in lines if ln not in keep]
        f.write_text("\n".join(keep) + ("\n" if keep else ""))
        return removed
