"""The git command that runs us (a filter, a merge driver): its verb and options, read from the process tree.

Git-facing: for what git starts (see repo.py for the two parts).

git tells a filter or a merge driver nothing about the command that started it: not `-q`, not
`-X theirs`. Its command line is in the process tree (the nearest ancestor that is git), which
is what these helpers read. Imported by the filter process: os and sys only.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # not typing's: see __init__.py
if TYPE_CHECKING:
    from collections.abc import Callable

# git's options before the verb that take the next argument as their value
_GLOBAL_WITH_VALUE = ("-C", "-c", "--git-dir", "--work-tree", "--namespace", "--super-prefix", "--config-env", "--list-cmds")
_MAX_DEPTH = 6  # driver <- sh -c <- git, and a few more for a wrapper (git pull -> git merge is nearer)


def _proc_parent(pid: int) -> tuple[int, list[str]] | None:
    """(parent pid, argv) of a process, from /proc (Linux)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ")"
    fields = stat[stat.rfind(b")") + 2 :].split()
    argv = [a.decode(errors="surrogateescape") for a in cmdline.split(b"\0")[:-1]]
    return int(fields[1]), argv


def _ps_parent(pid: int) -> tuple[int, list[str]] | None:
    """(parent pid, argv split at spaces) from ps, where there is no /proc (macOS, BSDs)."""
    import subprocess

    try:
        r = subprocess.run(["ps", "-o", "ppid=", "-o", "args=", "-p", str(pid)], stdin=subprocess.DEVNULL, capture_output=True, check=False)
    except OSError:
        return None
    parts = r.stdout.decode(errors="surrogateescape").split()
    if r.returncode != 0 or not parts or not parts[0].isdigit():
        return None
    return int(parts[0]), parts[1:]


def git_command(start: int | None = None) -> tuple[str, list[str]] | None:
    """(verb, the arguments after it) of the nearest git process above this one, or None."""
    read: Callable[[int], tuple[int, list[str]] | None] = _proc_parent if os.path.isdir("/proc/self") else _ps_parent
    pid = os.getppid() if start is None else start
    for _ in range(_MAX_DEPTH):
        if pid <= 1:
            return None
        got = read(pid)
        if got is None:
            return None
        ppid, argv = got
        parsed = parse_git_argv(argv)
        if parsed is not None:
            return parsed
        pid = ppid
    return None


def parse_git_argv(argv: list[str]) -> tuple[str, list[str]] | None:
    """("merge", ["-X", "theirs", "other"]) for `git -c a=b merge -X theirs other`; None if not git."""
    if not argv:
        return None
    name = os.path.basename(argv[0]).removesuffix(".exe")
    if name.startswith("git-"):  # a dashed command from git's exec path
        return name[4:], argv[1:]
    if name != "git":
        return None
    i = 1
    while i < len(argv) and argv[i].startswith("-"):
        i += 2 if argv[i] in _GLOBAL_WITH_VALUE else 1
    if i >= len(argv):
        return None
    return argv[i], argv[i + 1 :]


def _options(args: list[str]) -> list[str]:
    return args[: args.index("--")] if "--" in args else args


def is_quiet(args: list[str]) -> bool:
    """-q, --quiet or --no-progress among a git command's options (-q also in a cluster: -qf)."""
    for a in _options(args):
        if a in ("--quiet", "--no-progress"):
            return True
        if a.startswith("-") and not a.startswith("--") and a[1:].isalpha() and "q" in a[1:]:
            return True
    return False


def push_flags(args: list[str] | None) -> tuple[bool, bool]:
    """(dry run, forced) as `git push` reads `args`; not known (None) -> (False, True), the safe guess."""
    if args is None:
        return False, True
    dry = forced = False
    options = True
    for a in args:
        if options and a == "--":
            options = False
        elif options and a.startswith("--"):
            dry |= a == "--dry-run"
            forced |= a.startswith(("--force", "--mirror"))
        elif options and a.startswith("-") and len(a) > 1:
            for ch in a[1:]:  # bundled short options; -o takes the rest as its value
                if ch == "o":
                    break
                dry |= ch == "n"
                forced |= ch == "f"
        else:
            forced |= a.startswith("+")
    return dry, forced


def strategy_options(args: list[str]) -> list[str]:
    """The -X / --strategy-option values of a git command, in order."""
    out = []
    opts = _options(args)
    for i, a in enumerate(opts):
        if a in ("-X", "--strategy-option") and i + 1 < len(opts):
            out.append(opts[i + 1])
        elif a.startswith("--strategy-option="):
            out.append(a.split("=", 1)[1])
        elif a.startswith("-X") and len(a) > 2:
            out.append(a[2:])
    return out


def rebase_strategy_options(git_dir: str) -> list[str]:
    """The -X values an interrupted rebase keeps for its next picks (`git rebase --continue`)."""
    try:
        with open(os.path.join(git_dir, "rebase-merge", "strategy_opts"), encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return []
    return [w.strip("'\"").lstrip("-") for w in text.split()]


def favor(git_dir: str | None = None) -> tuple[str, str] | None:
    """("theirs", "git rebase -X theirs") when the git command above us was given -X ours or -X theirs."""
    cmd = git_command()
    if cmd is None:
        return None
    verb, args = cmd
    found = [v for v in strategy_options(args) if v in ("ours", "theirs")]
    if not found and verb == "rebase" and git_dir is not None:
        found = [v for v in rebase_strategy_options(git_dir) if v in ("ours", "theirs")]
    if not found:
        return None
    return found[-1], f"git {verb} -X {found[-1]}"
