"""Issue 14, merge: checkpoint commits replayed by real `git rebase` and `git cherry-pick`, merged by
theta-store's driver with the strategy from `thetastore.merge.strategy`, `.gitattributes` or `-X`.

git accepts only its own words after -X (`-X task-arithmetic` is "unknown strategy option"), so
-X picks a side (ours/theirs) and blending strategies come from the settings. In a rebase "ours"
is the branch being rebased onto and "theirs" the commit being replayed.
"""

from __future__ import annotations

from pathlib import Path

from test_git_e2e import clean_status, commit, g, global_config, new_repo, ts, write  # noqa: F401
from test_merge_e import f32, load, st

BASE = {"w": f32(1, 1, 1), "b": f32(0)}
UPSTREAM = {"w": f32(3, 1, 1), "b": f32(0)}  # main changed w[0]
FEATURE = {"w": f32(1, 5, 1), "b": f32(7)}  # the replayed commit changed w[1] and b


def branches(tmp_path: Path) -> Path:
    """main (upstream) and `feature` both changed w since their fork; feature also changed b and
    holds a second commit (notes.txt) after the checkpoint one."""
    a = new_repo(tmp_path / "a")
    write(a / "m.safetensors", st(BASE))
    commit(a, "base")
    g(a, "switch", "-q", "-c", "feature")
    write(a / "m.safetensors", st(FEATURE))
    commit(a, "feature: fine-tune")
    write(a / "notes.txt", b"notes\n")
    commit(a, "feature: notes")
    g(a, "switch", "-q", "main")
    write(a / "m.safetensors", st(UPSTREAM))
    commit(a, "main: fine-tune")
    return a


def values(path: Path) -> dict[str, list[float]]:
    return {k: v.tolist() for k, v in load(path)[0].items()}


def test_rebase_blends_by_the_configured_strategy(tmp_path: Path) -> None:
    a = branches(tmp_path)
    g(a, "config", "thetastore.merge.strategy", "linear:0.25")
    r = g(a, "rebase", "main", "feature")
    assert "blended w (linear:0.25)" in r.stderr, r.stderr
    # w both changed: 0.25 * ours (main) + 0.75 * theirs (the replayed commit); b only theirs changed
    assert values(a / "m.safetensors") == {"w": [1.5, 4.0, 1.0], "b": [7.0]}
    assert g(a, "log", "--format=%s", "main..feature").stdout.split("\n")[:2] == ["feature: notes", "feature: fine-tune"]
    assert g(a, "rev-parse", "feature~2").stdout == g(a, "rev-parse", "main").stdout  # replayed on top of main
    clean_status(a)
    ts(a, "fsck")


def test_cherry_pick_blends_by_the_attribute_and_x_picks_a_side(tmp_path: Path) -> None:
    a = branches(tmp_path)
    (a / ".gitattributes").write_text((a / ".gitattributes").read_text() + "m.safetensors thetastore-merge=task-arithmetic\n")
    commit(a, "blend checkpoints")
    g(a, "config", "thetastore.merge.strategy", "linear")  # the attribute comes first
    r = g(a, "cherry-pick", "feature~1")
    assert "blended w (task-arithmetic)" in r.stderr, r.stderr
    assert values(a / "m.safetensors") == {"w": [3.0, 5.0, 1.0], "b": [7.0]}  # base + both task vectors
    clean_status(a)
    g(a, "reset", "-q", "--hard", "HEAD~1")
    r = g(a, "cherry-pick", "-X", "theirs", "feature~1")  # -X comes before any setting
    assert "kept theirs (git cherry-pick -X theirs)" in r.stderr, r.stderr
    assert values(a / "m.safetensors") == {"w": [1.0, 5.0, 1.0], "b": [7.0]}
    g(a, "reset", "-q", "--hard", "HEAD~1")
    r = g(a, "cherry-pick", "-X", "ours", "feature~1")
    assert values(a / "m.safetensors") == {"w": [3.0, 1.0, 1.0], "b": [7.0]}  # b: only theirs changed it, so taken
    clean_status(a)


def test_rebase_continue_reads_x_from_the_rebase_state(tmp_path: Path) -> None:
    """`git rebase -i -X theirs` stopped by a `break` before its first pick: `git rebase
    --continue`, whose command line has no -X, replays the checkpoint commit with the -X the
    rebase keeps in .git/rebase-merge/strategy_opts."""
    a = branches(tmp_path)
    g(a, "rebase", "-i", "-X", "theirs", "main", "feature", env={"GIT_SEQUENCE_EDITOR": "sed -i '1i break'"})
    state = a / ".git" / "rebase-merge"
    assert "theirs" in (state / "strategy_opts").read_text()
    assert values(a / "m.safetensors") == {"w": [3.0, 1.0, 1.0], "b": [0.0]}  # stopped on main, nothing replayed yet
    r = g(a, "rebase", "--continue")
    assert "kept theirs (git rebase -X theirs)" in r.stderr, r.stderr
    assert values(a / "m.safetensors") == {"w": [1.0, 5.0, 1.0], "b": [7.0]}
    assert not state.exists() and (a / "notes.txt").exists()
    clean_status(a)


def test_a_conflicting_rebase_stops_cleanly_and_abort_restores_the_file(tmp_path: Path) -> None:
    a = branches(tmp_path)
    g(a, "switch", "-q", "feature")
    mine = (a / "m.safetensors").read_bytes()
    head = g(a, "rev-parse", "HEAD").stdout
    r = g(a, "rebase", "main", ok=False)
    assert "w: changed on both sides" in r.stderr and "b:" not in r.stderr, r.stderr
    assert "CONFLICT" in r.stdout + r.stderr
    # the working file is "ours" (in a rebase: main's), whole, and git knows the three stages
    assert (a / "m.safetensors").read_bytes() == st(UPSTREAM)
    assert len(g(a, "ls-files", "-u", "m.safetensors").stdout.splitlines()) == 3
    g(a, "rebase", "--abort")
    assert (a / "m.safetensors").read_bytes() == mine and g(a, "rev-parse", "HEAD").stdout == head
    assert g(a, "branch", "--show-current").stdout.strip() == "feature"
    clean_status(a)
