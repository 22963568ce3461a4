"""The read plan's home (plan.py), the package's import graph, errors in errors.py, and the porcelain."""

from __future__ import annotations

import ast
import builtins
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import theta_store
from servers import Remote
from test_filter_errors import FilterClient
from test_git_e2e import commit, file_remote, g, global_config, model_bytes, new_repo, write
from theta_store import errors, plan
from theta_store.checkpoint import restore_to
from theta_store.errors import PointerError
from theta_store.plan import Location, PlannedChunk, ReadPlan, load_plan, native_chunks, plan_path, save_plan
from theta_store.pointer import Pointer
from theta_store.reader import CheckpointReader

__all__ = ["file_remote", "global_config"]  # fixtures; global_config is autouse

PACKAGE = Path(theta_store.__file__).parent


# ---------------------------------------------------------------- the import graph


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the package's modules it imports, counting every import statement (function-local
    ones and those only for type checkers too). A package's __init__ only hands names on: not a node."""
    top = root.parent
    mods = {p: ".".join(p.relative_to(top).with_suffix("").parts) for p in root.rglob("*.py")}
    names = {m.removesuffix(".__init__"): m for m in mods.values()}
    graph: dict[str, set[str]] = {}
    for path, mod in mods.items():
        base = mod.removesuffix(".__init__") if mod.endswith("__init__") else mod.rsplit(".", 1)[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                parts = base.split(".")[: len(base.split(".")) - node.level + 1]
                target = ".".join(parts + ([node.module] if node.module else []))
                cands = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                target = node.module or ""
                cands = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                cands = [a.name for a in node.names]
            else:
                continue
            deps |= {names[c] for c in cands if c in names and names[c] != mod}
        graph[mod] = {d for d in deps if not d.endswith("__init__")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found: list[list[str]] = []
    done: set[str] = set()
    stack: list[str] = []

    def visit(n: str) -> None:
        if n in stack:
            found.append([*stack[stack.index(n) :], n])
            return
        if n in done:
            return
        done.add(n)
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            visit(d)
        stack.pop()

    for n in sorted(graph):
        visit(n)
    return found


def test_no_import_cycle_in_the_package() -> None:
    found = cycles(import_graph(PACKAGE))
    assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in found)


def test_the_cycle_check_sees_function_local_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import f\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n    return a\n")
    (pkg / "c.py").write_text("import pkg.a\n")
    assert cycles(import_graph(pkg)) == [["pkg.a", "pkg.b", "pkg.a"]]


def test_the_filter_imports_no_dulwich_and_no_heavy_modules() -> None:
    code = (
        "import sys, theta_store.filterproc, theta_store.plan\n"
        "bad = [m for m in ('dulwich', 'typing', 'dataclasses', 're', 'pathlib', 'msgpack', 'numpy') if m in sys.modules]\n"
        "print(','.join(bad))"
    )
    # -S as git starts the filter (_launch.py); the package's folder as _launch.py finds it
    env = {**os.environ, "PYTHONPATH": str(Path(theta_store.__file__).parent.parent)}
    r = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, check=False, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ""


# ---------------------------------------------------------------- the typed plan


def _plan(state: Path, n: int = 3) -> tuple[ReadPlan, Pointer]:
    """A plan of version state/../ (`state` is its <git dir>/theta-store), packs in its pack folder."""
    packs = []
    for i in range(2):
        p = state.parent / "objects" / "pack" / f"pack-{i}.pack"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"P" * (100 + i))
        packs.append(str(p))
    chunks = [PlannedChunk(10 + i, bytes([i]) * 32, bytes([i]) * 20, Location(i % 2, 12 + i)) for i in range(n)]
    size = sum(c.length for c in chunks)
    ptr = Pointer(b"\x07" * 32, size, b"\x08" * 32, 1, "raw")
    return ReadPlan(packs, chunks, size, ptr.blake3), ptr


def test_native_form_is_spelled_in_one_place() -> None:
    chunks = [PlannedChunk(5, b"c" * 32, b"o" * 20, Location(3, 77)), PlannedChunk(6, b"d" * 32, b"p" * 20, None)]
    assert native_chunks(chunks) == [(5, 3 << 48 | 77, b"c" * 32, b"o" * 20), (6, (1 << 64) - 1, b"d" * 32, b"p" * 20)]
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        if path.name != "plan.py":
            assert "<< 48" not in text and "1 << 64" not in text and "2**64" not in text, path


def test_saved_plan_round_trip_and_cache_rules(tmp_path: Path) -> None:
    state = tmp_path / "theta-store"
    p, ptr = _plan(state)
    save_plan(state, ptr, p)
    assert load_plan(state, ptr) == p
    # another file (size or BLAKE3) than the pointer names: not this plan
    assert load_plan(state, Pointer(ptr.manifest_id, ptr.size + 1, ptr.blake3, 1, "raw")) is None
    # a pack that changed size since: the offsets may not hold
    Path(p.packs[1]).write_bytes(b"longer" * 100)
    assert load_plan(state, ptr) is None
    # a plan with a chunk outside any pack is not saved (read through the object store each time)
    q, ptr2 = _plan(tmp_path / "x" / "theta-store")
    q.chunks[0].location = None
    save_plan(tmp_path / "x" / "theta-store", ptr2, q)
    assert not os.path.exists(plan_path(tmp_path / "x" / "theta-store", ptr2.manifest_id))


@pytest.mark.parametrize(
    "damage",
    [
        lambda v: b"\x93garbage",
        lambda v: b"",
        lambda v: {"not": "a list"},
        lambda v: [1, *v[1:]],  # an older plan version
        lambda v: [*v[:4], [[r[0], 2, *r[2:]] for r in v[4]]],  # pack number out of range
        lambda v: [*v[:4], [[r[0], -1, *r[2:]] for r in v[4]]],
        lambda v: [*v[:4], [[r[0], r[1], -5, *r[3:]] for r in v[4]]],
        lambda v: [*v[:4], [[*r[:3], r[3][:31], r[4]] for r in v[4]]],  # short chunk id
        lambda v: [*v[:4], [[*r[:3], r[3], "x" * 20] for r in v[4]]],  # object id not bytes
        lambda v: [*v[:4], v[4][:-1]],  # a chunk missing: lengths do not add up to the size
        lambda v: [*v[:4], [[str(r[0]), *r[1:]] for r in v[4]]],
        lambda v: [*v[:3], [["/nonexistent/pack", 1]], v[4]],
        lambda v: v[:4],
    ],
)
def test_damaged_saved_plans_are_ignored(tmp_path: Path, damage: object) -> None:
    import msgpack

    state = tmp_path / "theta-store"
    p, ptr = _plan(state)
    save_plan(state, ptr, p)
    path = plan_path(state, ptr.manifest_id)
    with open(path, "rb") as f:
        saved = msgpack.unpackb(f.read())
    assert callable(damage)
    bad = damage(saved)
    with open(path, "wb") as f:
        f.write(bad if isinstance(bad, bytes) else msgpack.packb(bad, use_bin_type=True))
    assert load_plan(state, ptr) is None


def test_covering_picks_the_chunks_of_a_byte_range(tmp_path: Path) -> None:
    p, _ = _plan(tmp_path, 4)  # chunk lengths 10, 11, 12, 13 at 0, 10, 21, 33
    c = p.chunks
    assert p.covering(0, 10) == ([c[0]], 0)
    assert p.covering(9, 11) == ([c[0], c[1]], 0)
    assert p.covering(10, 21) == ([c[1]], 10)
    assert p.covering(21, 46) == ([c[2], c[3]], 21)
    assert p.covering(45, 46) == ([c[3]], 33)
    assert p.covering(5, 5) == ([], 5)


def test_refs_are_named_in_one_place() -> None:
    vid = bytes(range(32))
    assert plan.ref_name(vid) == "refs/theta/" + vid.hex()
    assert plan.version_of_ref(plan.ref_name(vid)) == vid
    for name in ("refs/heads/main", "refs/theta/xyz", "refs/theta/" + "g" * 64, "refs/theta/" + vid.hex() + "00"):
        assert plan.version_of_ref(name) is None
    for path in PACKAGE.rglob("*.py"):
        if path.name == "plan.py":
            continue
        tree = ast.parse(path.read_text())
        docs = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
        for n in ast.walk(tree):
            if isinstance(n, ast.Constant) and isinstance(n.value, str | bytes) and id(n) not in docs:
                assert "refs/theta" not in str(n.value), f"{path.name}:{n.lineno}"


# ---------------------------------------------------------------- one plan for restore, smudge and lazy reads


def test_pointer_and_manifest_disagree_is_one_error(tmp_path: Path) -> None:
    a = new_repo(tmp_path / "a")
    write(a / "model.safetensors", model_bytes(0, layers=1))
    commit(a, "v1")
    good = Pointer.parse(g(a, "cat-file", "blob", "HEAD:model.safetensors").stdout.encode())
    bad = Pointer(good.manifest_id, good.size + 4, good.blake3, good.tensors, good.format)
    messages = []
    with theta_store.Repo(a) as repo:
        with pytest.raises(PointerError, match="disagree on the file") as e:
            restore_to(repo.store, bad, str(a / "restored.safetensors"))
        messages.append(str(e.value))
        assert not (a / "restored.safetensors").exists()
        manifest = plan.load_manifest(repo.store, good.manifest_id)
    reader = CheckpointReader(theta_store.Repo(a).store, good.manifest_id, manifest, "model.safetensors", bad)
    with reader, pytest.raises(PointerError, match="disagree on the file") as e:
        reader.get_tensor("layers.0.weight")
    messages.append(str(e.value))
    (a / ".git/theta-store/plans" / good.manifest_id.hex()).unlink()  # the smudge asks the store
    client = FilterClient(a, tmp_path / "stderr")
    assert client.request("smudge", "model.safetensors", bad.to_bytes())[0] == "error"
    assert client.close() == 0
    messages.append((tmp_path / "stderr").read_text())
    core = f"pointer and stored version {good.manifest_id.hex()[:16]} disagree on the file (size {bad.size} vs {good.size}"
    assert all(core in m for m in messages), messages


def test_lazy_reads_find_the_chunks_again_after_a_repack(tmp_path: Path) -> None:
    a = new_repo(tmp_path / "a")
    write(a / "model.safetensors", model_bytes(0))
    commit(a, "v1")
    write(a / "model.safetensors", model_bytes(0, bias=2.0))
    commit(a, "v2")
    with theta_store.open(a / "model.safetensors", rev="HEAD~1") as f:
        w0 = f.get_tensor("layers.0.weight")
        g(a, "repack", "-a", "-d", "-q")  # every pack the reader's plan names is gone
        w1 = f.get_tensor("layers.1.weight")
        rows = f.get_slice("layers.2.weight")[3:5]
        bias = f.get_tensor("layers.0.bias")
    rng = np.random.default_rng(0)
    expect = [(rng.standard_normal((512, 1024)) * 0.02).astype(np.float32) for _ in range(3)]
    assert np.array_equal(w0, expect[0]) and np.array_equal(w1, expect[1]) and np.array_equal(rows, expect[2][3:5])
    assert not bias.any()


# ---------------------------------------------------------------- errors live in errors.py


def test_every_public_exception_lives_in_errors_py() -> None:
    ours = {n.name for n in ast.walk(ast.parse((PACKAGE / "errors.py").read_text())) if isinstance(n, ast.ClassDef)}
    builtin = {n for n in dir(builtins) if n.endswith(("Error", "Exception"))}
    for path in PACKAGE.rglob("*.py"):
        if path.name == "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                bases = {b.id if isinstance(b, ast.Name) else b.attr if isinstance(b, ast.Attribute) else "" for b in node.bases}
                assert not bases & (ours | builtin | {"Exception", "BaseException"}), f"{path.name}: {node.name}"
    from theta_store import remote

    assert remote.VersionsMissing is errors.VersionsMissing and remote.IncompletePush is errors.IncompletePush
    assert issubclass(errors.VersionsMissing, errors.ObjectNotFound) and issubclass(errors.IncompletePush, errors.ThetaStoreError)


# ---------------------------------------------------------------- one porcelain


USER_VERBS_OUTSIDE_A_REPO = {"cmd_install", "cmd_demo"}


def test_cli_verbs_call_the_porcelain() -> None:
    """Each user verb goes through Repo: none reaches into the store, the transport or install."""
    tree = ast.parse((PACKAGE / "cli.py").read_text())
    for fn in tree.body:
        if not (isinstance(fn, ast.FunctionDef) and fn.name.startswith("cmd_")) or fn.name in USER_VERBS_OUTSIDE_A_REPO:
            continue
        if fn.name in ("cmd_filter_process", "cmd_pre_push", "cmd_textconv", "cmd_merge_driver"):
            continue  # plumbing git runs: the git-facing modules
        for node in ast.walk(fn):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.module in ("repo", "checkpoint", None), f"{fn.name} imports .{node.module}"


def test_porcelain_push_fetch_check_gc(tmp_path: Path, file_remote: Remote) -> None:
    a = new_repo(tmp_path / "a")
    write(a / "model.safetensors", model_bytes(0, layers=1))
    commit(a, "v1")
    g(a, "remote", "add", "origin", file_remote.url)
    g(a, "push", "-q", "origin", "main", env={"THETA_STORE_SKIP_PUSH": "1"})
    with theta_store.Repo(a) as repo:
        assert repo.is_remote("origin") and not repo.is_remote("HEAD")
        assert not repo.check_remote("origin", ["HEAD"])["ok"]
        assert repo.push("origin")["versions"] == 1
        assert repo.check_remote("origin", ["HEAD"])["ok"]
        g(a, "fetch", "-q", "origin")
        assert repo.check_remote("origin")["ok"]  # the remote's branches as last fetched
    b = tmp_path / "b"
    g(tmp_path, "clone", "-q", file_remote.url, str(b), env={"THETA_STORE_SKIP_SMUDGE": "1"})
    with theta_store.Repo(b) as repo:
        assert repo.fetch()["fetched"] == 1
        assert repo.pull()["restored"] == ["model.safetensors"]
    assert (b / "model.safetensors").read_bytes() == model_bytes(0, layers=1)
    write(a / "model.safetensors", model_bytes(1, layers=1))
    commit(a, "v2")
    g(a, "reset", "-q", "--hard", "HEAD~1")
    g(a, "reflog", "expire", "--expire=now", "--all")
    with theta_store.Repo(a) as repo:
        dry = repo.gc(dry_run=True)
        assert len(dry["dropped"]) == 1 and dry["dry_run"]
        assert repo.gc()["dropped"] == dry["dropped"]
        assert len(repo.store.versions()) == 1
        assert not os.path.exists(plan_path(repo.store.state_dir, bytes.fromhex(dry["dropped"][0])))
        assert repo.track(["*.bin"])["tracked"] == ["*.bin"]
        assert ("*.bin", ".gitattributes") in repo.tracked()
        assert repo.untrack(["*.bin"]) == ["*.bin"]
