"""Issue 11, items 9-11: honest dtypes (bf16/fp8), errors that say what is wrong, the CLI as git users expect.

End-to-end with the real `git` binary (helpers from test_git_e2e), plus a few CLI-only checks.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tomllib
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import theta_store
from servers import Remote
from test_git_e2e import commit, file_remote, g, global_config, model_bytes, new_repo, pointer_version, ts, write  # noqa: F401
from theta_store.sizes import human_size

FIXTURES = Path(__file__).parent / "fixtures" / "safetensors"


def no_traceback(r: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr


# ---------------------------------------------------------------- item 9: bf16 / fp8 as their real dtypes


def _raw_tensors(path: Path) -> dict[str, tuple[str, list[int], bytes]]:
    """name -> (dtype, shape, bytes), read from the safetensors header by hand (not through theta-store)."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    return {
        k: (v["dtype"], v["shape"], body[v["data_offsets"][0] : v["data_offsets"][1]]) for k, v in header.items() if k != "__metadata__"
    }


def _bf16_values(raw: bytes) -> np.ndarray:
    """bfloat16 is the top half of a float32: widen the bits, no ml_dtypes involved."""
    return (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)


def _e4m3fn_values(raw: bytes) -> np.ndarray:
    """float8_e4m3fn by its definition (bias 7, no infinities, S.1111.111 is NaN)."""
    out = []
    for b in raw:
        sign = -1.0 if b & 0x80 else 1.0
        exp, man = (b >> 3) & 0xF, b & 7
        if exp == 0xF and man == 7:
            out.append(np.nan)
        elif exp == 0:
            out.append(sign * man / 8 * 2.0**-6)
        else:
            out.append(sign * (1 + man / 8) * 2.0 ** (exp - 7))
    return np.array(out, np.float32)


def test_bf16_and_fp8_fixtures_come_back_as_real_dtypes(tmp_path: Path) -> None:
    a = new_repo(tmp_path / "a")
    names = ["bf16.safetensors", "fp8_e4m3fn.safetensors", "mixed_edge.safetensors"]
    for name in names:
        shutil.copy(FIXTURES / name, a / name)
    commit(a, "fixtures")
    checked = 0
    for name in names:
        with theta_store.open(a / name) as f:
            for tensor, (dtype, shape, raw) in _raw_tensors(FIXTURES / name).items():
                expect = {"BF16": _bf16_values, "F8_E4M3": _e4m3fn_values}.get(dtype)
                if expect is None:
                    continue
                got = f.get_tensor(tensor)
                assert got.dtype == {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn}[dtype], (name, tensor, got.dtype)
                assert list(got.shape) == shape
                np.testing.assert_array_equal(got.astype(np.float32).ravel(), expect(raw))
                assert got.tobytes() == raw  # and the bits are the stored ones
                checked += 1
    assert checked >= 4
    # a dependency, so that a fresh install has it: pinned with bounds
    with (Path(__file__).parents[1] / "pyproject.toml").open("rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    assert any(re.fullmatch(r"ml_dtypes>=[\d.]+,<\d+", d) for d in deps), deps


def test_bf16_fp8_round_trip_of_values(tmp_path: Path) -> None:
    """Values written as bf16 / e4m3 / e5m2 read back, through a commit, as those values."""
    rng = np.random.default_rng(7)
    src = (rng.standard_normal((64, 48)) * 3).astype(np.float32)
    kinds = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}
    cast = {name: src.astype(dt) for name, dt in kinds.items()}
    a = new_repo(tmp_path / "a")
    bits = {name: (arr.view(np.uint16 if name == "BF16" else np.uint8), name) for name, arr in cast.items()}
    theta_store.save_safetensors(str(a / "m.safetensors"), bits)
    commit(a, "low precision")
    with theta_store.open("m.safetensors", repo=a) as f:
        for name, dt in kinds.items():
            got = f.get_tensor(name)
            assert got.dtype == dt
            np.testing.assert_array_equal(got.astype(np.float32), cast[name].astype(np.float32))
            # the values are the source's, to the format's precision (not bit patterns read as integers)
            tol = {"BF16": 2**-8, "F8_E4M3": 2**-3, "F8_E5M2": 2**-2}[name]
            np.testing.assert_allclose(got.astype(np.float32), src, rtol=tol, atol=2**-6)
            rows = f.get_slice(name)[10:13]
            assert rows.dtype == dt and rows.tobytes() == cast[name][10:13].tobytes()


def test_bf16_without_ml_dtypes_is_an_error_not_integers(tmp_path: Path) -> None:
    """If ml_dtypes cannot be imported, a bf16 tensor is refused with the reason, never returned as uint16."""
    a = new_repo(tmp_path / "a")
    shutil.copy(FIXTURES / "bf16.safetensors", a / "bf16.safetensors")
    commit(a, "bf16")
    probe = (
        "import sys; sys.modules['ml_dtypes'] = None\n"  # what a failed import of an installed package looks like
        "import theta_store\n"
        f"f = theta_store.open('bf16.safetensors', repo={str(a)!r})\n"
        "try:\n"
        "    t = f.get_tensor('w')\n"
        "    print('returned', t.dtype)\n"
        "except theta_store.ThetaStoreError as e:\n"
        "    print('error', e)\n"
    )
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("error BF16 tensors need the ml_dtypes package"), r.stdout
    assert "pip install" in r.stdout


# ---------------------------------------------------------------- item 10: errors say what is wrong


def _repo_with_model(tmp_path: Path) -> Path:
    a = new_repo(tmp_path / "a")
    write(a / "model.safetensors", model_bytes(0, layers=1, rows=64, cols=64))
    commit(a, "v1")
    return a


def test_unknown_revision_is_named_as_such(tmp_path: Path) -> None:
    a = _repo_with_model(tmp_path)
    for args in (["show", "nosuchrev:model.safetensors"], ["restore", "--source", "nosuchrev", "model.safetensors"]):
        r = ts(a, *args, ok=False)
        assert r.returncode == 1, (args, r.stderr)
        assert r.stderr.startswith("theta-store: error: nosuchrev: unknown revision"), r.stderr
        assert "hint: `git log --oneline --all`" in r.stderr and "theta-store add" not in r.stderr, r.stderr
        no_traceback(r)
    with pytest.raises(theta_store.ObjectNotFound, match="nosuchrev: unknown revision"):
        theta_store.open(a / "model.safetensors", rev="nosuchrev")
    # a path that is not in a real revision keeps the hint to add it
    r = ts(a, "show", "HEAD:other.safetensors", ok=False)
    assert r.returncode == 1 and "other.safetensors: not in HEAD" in r.stderr and "theta-store add" in r.stderr, r.stderr
    no_traceback(r)


def test_open_resolves_a_relative_path_against_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = _repo_with_model(tmp_path)
    (a / "sub").mkdir()
    write(a / "sub" / "inner.safetensors", model_bytes(1, layers=1, rows=8, cols=8))
    commit(a, "inner")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # a directory outside the repository, with no such files
    with theta_store.open("model.safetensors", repo=a) as f:
        assert f.path == "model.safetensors" and f.keys()
    with theta_store.open("inner.safetensors", repo=a / "sub") as f:
        assert f.path == "sub/inner.safetensors"


def test_show_rev_path_is_root_relative_like_git(tmp_path: Path) -> None:
    a = _repo_with_model(tmp_path)
    d = a / "d"
    d.mkdir()
    write(d / "inner.safetensors", model_bytes(1, layers=1, rows=8, cols=8))
    commit(a, "inner")
    first_line = {
        "HEAD:model.safetensors": "model.safetensors:",  # from the top, as `git show HEAD:path`
        "HEAD:d/inner.safetensors": "d/inner.safetensors:",
        "HEAD:./inner.safetensors": "d/inner.safetensors:",  # ./ is relative to the current directory
        "HEAD:../model.safetensors": "model.safetensors:",
        ":model.safetensors": "model.safetensors:",  # the index, from the top too
        "inner.safetensors": "d/inner.safetensors:",  # no REV: a path relative to the current directory
        "../model.safetensors": "model.safetensors:",
    }
    for spec, start in first_line.items():
        out = ts(d, "show", spec).stdout
        assert out.startswith(start), (spec, out)
    r = ts(d, "show", "HEAD:inner.safetensors", ok=False)  # no inner.safetensors at the top
    assert r.returncode == 1 and "inner.safetensors: not in HEAD" in r.stderr, r.stderr
    no_traceback(r)


def _make_loose(repo: Path) -> None:
    """Unpack every pack into loose objects (as a repository that received objects one by one holds them)."""
    packs = repo / ".git" / "objects" / "pack"
    keep = repo.parent / "packs"
    keep.mkdir()
    for p in packs.iterdir():
        shutil.move(p, keep / p.name)
    for p in keep.glob("*.pack"):
        with p.open("rb") as f:
            subprocess.run(["git", "unpack-objects", "-q"], stdin=f, cwd=repo, check=True)
    shutil.rmtree(repo / ".git" / "theta-store" / "plans", ignore_errors=True)


def _corrupt_loose(repo: Path, oid: str) -> Path:
    path = repo / ".git" / "objects" / oid[:2] / oid[2:]
    path.chmod(0o644)
    path.write_bytes(b"not zlib at all")
    return path


def test_fsck_and_checkout_name_a_corrupt_loose_object(tmp_path: Path) -> None:
    a = _repo_with_model(tmp_path)
    version = pointer_version(a, "HEAD:model.safetensors")
    # the pointer blob (loose, as theta-store add and git add write it)
    b = tmp_path / "b"
    shutil.copytree(a, b)
    pointer = g(b, "rev-parse", "HEAD:model.safetensors").stdout.strip()
    _corrupt_loose(b, pointer)
    r = ts(b, "fsck", ok=False)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"model.safetensors: object {pointer}" in r.stdout and "is corrupt" in r.stdout and "1 problems" in r.stdout, r.stdout
    no_traceback(r)

    # a version's manifest, made loose, then damaged
    _make_loose(a)
    manifest = g(a, "rev-parse", f"refs/theta/{version}^{{tree}}:manifest").stdout.strip()
    where = _corrupt_loose(a, manifest)
    r = ts(a, "fsck", ok=False)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"object {manifest}, the manifest of checkpoint version {version[:16]}, at {where} is corrupt" in r.stdout, r.stdout
    no_traceback(r)
    (a / "model.safetensors").unlink()
    r = g(a, "checkout", "--", "model.safetensors", ok=False)
    assert f"object {manifest}, the manifest of checkpoint version {version[:16]}" in r.stderr, r.stderr
    no_traceback(r)


def test_fsck_and_checkout_name_a_corrupt_loose_frame(tmp_path: Path) -> None:
    a = _repo_with_model(tmp_path)
    version = pointer_version(a, "HEAD:model.safetensors")
    _make_loose(a)
    tree = g(a, "ls-tree", "-r", f"refs/theta/{version}").stdout.splitlines()
    frame = next(line.split()[2] for line in tree if line.split("\t")[1] not in ("manifest", "frames"))
    _corrupt_loose(a, frame)
    r = ts(a, "fsck", ok=False)
    assert r.returncode == 1 and f"object {frame} at " in r.stdout and "is corrupt" in r.stdout, r.stdout + r.stderr
    no_traceback(r)
    (a / "model.safetensors").unlink()
    r = g(a, "checkout", "--", "model.safetensors", ok=False)
    assert f"checkpoint version {version[:16]} is damaged" in r.stderr and f"object {frame}" in r.stderr, r.stderr
    assert r.stderr.count("hint:") == 1, r.stderr
    no_traceback(r)


def test_install_outside_a_repository(tmp_path: Path) -> None:
    nowhere = tmp_path / "not-a-repo"
    nowhere.mkdir()
    r = ts(nowhere, "install", ok=False)
    assert r.returncode == 1, r.stderr
    assert "not-a-repo: not a git repository; did you mean --global?" in r.stderr and "hint:" in r.stderr, r.stderr
    no_traceback(r)


def test_bad_dash_C_is_a_usage_error(tmp_path: Path) -> None:
    for bad in (str(tmp_path / "no" / "such" / "dir"), "/etc/hostname"):
        r = ts(tmp_path, "-C", bad, "stats", ok=False)
        assert r.returncode == 2, r.stderr
        assert r.stderr.startswith(f"theta-store: error: cannot change to '{bad}'"), r.stderr
        no_traceback(r)


def test_filter_pinned_to_a_deleted_interpreter(tmp_path: Path) -> None:
    """A virtualenv removed after `theta-store install`: git's error names the interpreter and the fix."""
    a = _repo_with_model(tmp_path)
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    python = venv / "python"
    python.symlink_to(sys.executable)
    r = subprocess.run([str(python), "-m", "theta_store.cli", "install"], cwd=a, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert str(python) in g(a, "config", "--local", "filter.thetastore.process").stdout
    g(a, "status")  # works while it is there
    python.unlink()
    os.utime(a / "model.safetensors")  # git must ask the filter again
    for args in (["status"], ["checkout", "-f", "HEAD", "--", "model.safetensors"]):
        r = g(a, *args, ok=False)
        assert f"theta-store: {python} (the Python git runs theta-store with) is gone: run theta-store install" in r.stderr, r.stderr
    r = g(a, "diff", "HEAD~1", "HEAD", ok=False)  # textconv goes through the same check
    assert f"theta-store: {python} (the Python git runs theta-store with) is gone" in r.stderr, r.stderr
    # the fix the message names
    ts(a, "install")
    g(a, "status")


# ---------------------------------------------------------------- item 11: the CLI as git users expect


def test_version_bare_command_and_help(tmp_path: Path) -> None:
    r = ts(tmp_path, "--version")
    assert r.stdout == f"theta-store {theta_store.__version__}\n" == "theta-store 0.1.0\n"
    r = ts(tmp_path, ok=False)  # as bare `git`: the help on stdout, exit status 1
    assert r.returncode == 1 and r.stdout.startswith("usage: theta-store") and "add " in r.stdout and r.stderr == "", r
    for flag in ("-h", "--help"):
        out = ts(tmp_path, flag).stdout
        assert "==SUPPRESS==" not in out and "filter-process" not in out and "merge-driver" not in out, out
        assert "--version" in out and "stats" in out
    # the plumbing still runs when git calls it
    assert ts(tmp_path, "textconv", "--help").returncode == 0


def test_track_without_patterns_lists_them(tmp_path: Path) -> None:
    a = new_repo(tmp_path / "a", "*.safetensors")
    (a / "ckpt").mkdir()
    (a / "ckpt" / ".gitattributes").write_text("*.pt filter=thetastore diff=thetastore merge=thetastore -text\n*.bin filter=lfs -text\n")
    out = ts(a / "ckpt", "track").stdout
    assert out == "Listing tracked patterns\n    *.safetensors (.gitattributes)\n    *.pt (ckpt/.gitattributes)\n", out
    listed = json.loads(ts(a, "track", "--json").stdout)["tracked"]
    assert listed == [{"file": ".gitattributes", "pattern": "*.safetensors"}, {"file": "ckpt/.gitattributes", "pattern": "*.pt"}]
    empty = tmp_path / "empty"
    empty.mkdir()
    g(empty, "init", "-q")
    assert "no patterns are tracked" in ts(empty, "track").stdout


def test_stats_shows_commits_and_added_bytes(tmp_path: Path) -> None:
    a = new_repo(tmp_path / "a")
    m = a / "model.safetensors"
    write(m, model_bytes(0, layers=2, rows=256, cols=256))
    c1 = commit(a, "v1")
    write(m, model_bytes(0, bias=1.0, layers=2, rows=256, cols=256))  # one small tensor changed
    c2 = commit(a, "v2")
    g(a, "mv", "model.safetensors", "renamed.safetensors")
    c3 = commit(a, "rename")
    s = json.loads(ts(a, "stats", "--json").stdout)
    v1, v2 = s["versions"]  # in commit order
    assert [c["commit"] for c in v1["commits"]] == [c1] and v1["commits"][0]["path"] == "model.safetensors"
    assert [(c["commit"], c["path"]) for c in v2["commits"]] == [(c2, "model.safetensors"), (c3, "renamed.safetensors")]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d.*", v2["commits"][0]["date"])
    assert isinstance(v2["added"], int) and v1["added"] == v1["stored"] > 400_000
    assert 0 < v2["added"] < 20_000 < v2["stored"], v2  # only the frames of the changed bias are new
    out = ts(a, "stats").stdout
    added = re.escape(human_size(v2["added"]))
    assert re.search(rf"^{v2['manifest'][:12]} .* {added} +{c2[:7]} \d{{4}}-\d\d-\d\d \d\d:\d\d model.safetensors$", out, re.M), out
    assert re.search(rf"^ +{c3[:7]} \d{{4}}-\d\d-\d\d \d\d:\d\d renamed.safetensors$", out, re.M), out
    assert human_size(v2["added"]) == f"{v2['added']} B" and "0.00" not in out, out  # a change of bytes says so


def test_human_size() -> None:
    assert [human_size(n) for n in (0, 1, 999, 1000, 4096, 99_949, 99_950, 999_499, 999_500, 12_345_678, 3 * 10**9)] == [
        "0 B",
        "1 B",
        "999 B",
        "1.00 kB",
        "4.10 kB",
        "99.9 kB",
        "100 kB",
        "999 kB",
        "1.00 MB",
        "12.3 MB",
        "3.00 GB",
    ]
    assert human_size(None) == "-"


def test_one_message_per_push_and_install(tmp_path: Path, file_remote: Remote) -> None:  # noqa: F811 (the fixture)
    a = new_repo(tmp_path / "a")
    r = ts(a, "install")
    assert r.stdout.count("\n") == 1 and "filter.thetastore.process" not in r.stdout, r.stdout  # no long command lines
    write(a / "model.safetensors", model_bytes(0, layers=1, rows=64, cols=64))
    commit(a, "v1")
    url = file_remote.url
    r = ts(a, "push", url)
    said = r.stdout + r.stderr
    assert said.count("pushed") == 1 and "version(s) pushed" not in said, said
    assert re.search(r"pushed 1 checkpoint version\(s\) to \S+: [\d.]+ kB new\n", r.stderr), r.stderr
    assert ts(a, "push", url).stdout.startswith("nothing to push")
    write(a / "model.safetensors", model_bytes(0, bias=2.0, layers=1, rows=64, cols=64))
    commit(a, "v2")
    r = g(a, "push", url, "main")
    assert r.stderr.count("checkpoint version") == 1 and "already there" in r.stderr and "0.00 MB" not in r.stderr, r.stderr
