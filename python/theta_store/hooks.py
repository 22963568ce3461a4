"""Our pre-push hook's mark, and the check the filter process makes of it without starting git.

Git-facing: for what git starts (see repo.py for the two parts).

Kept apart from install.py and free of heavy imports: git starts the filter process on every
`git status` that re-cleans a checkpoint, and the filter checks the hook each time (another tool
may have replaced it, and a push without it sends commits without their checkpoint versions).
"""

from __future__ import annotations

import os

HOOK_MARK = "# theta-store pre-push hook"
CHAINED_SUFFIX = ".before-theta-store"


def looks_installed(common_dir: str) -> bool:
    """True if `<common_dir>/hooks/pre-push` is ours and executable, and no git config names
    core.hooksPath (which would move the hooks elsewhere). False means "not sure": ask git
    (install.ensure_hooks)."""
    hook = os.path.join(common_dir, "hooks", "pre-push")
    try:
        with open(hook, "rb") as f:
            if HOOK_MARK.encode() not in f.read(4096):
                return False
    except OSError:
        return False
    if not os.access(hook, os.X_OK):
        return False
    env = os.environ
    if "hookspath" in env.get("GIT_CONFIG_PARAMETERS", "").lower() or any(
        k.startswith("GIT_CONFIG_KEY_") and v.lower() == "core.hookspath" for k, v in env.items()
    ):
        return False
    home = env.get("HOME", "")
    files = [
        os.path.join(common_dir, "config"),
        os.path.join(common_dir, "config.worktree"),
        env.get("GIT_CONFIG_GLOBAL") or os.path.join(home, ".gitconfig"),
        os.path.join(env.get("XDG_CONFIG_HOME") or os.path.join(home, ".config"), "git", "config"),
    ]
    if not env.get("GIT_CONFIG_NOSYSTEM"):
        files.append(env.get("GIT_CONFIG_SYSTEM") or "/etc/gitconfig")
    for path in files:
        try:
            with open(path, "rb") as f:
                text = f.read().lower()
        except OSError:
            continue
        if b"hookspath" in text or b"[include" in text:  # an included file could name it: ask git
            return False
    return True
