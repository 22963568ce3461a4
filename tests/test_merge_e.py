"""Issue 14, merge: real `git merge` of real branches, merged tensor by tensor by the merge driver;
the strategies against hand-computed vectors and a numpy reference; `theta-store merge`."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

from servers import Remote
from test_git_e2e import clean_status, clone, commit, g, global_config, new_repo, ts, write  # noqa: F401
from test_git_e2e import file_remote as file_remote  # a fixture asked for by name

Arr = np.ndarray[Any, Any]
BF16 = np.dtype(ml_dtypes.bfloat16)
_ST = {"F32": np.float32, "F16": np.float16, "BF16": BF16, "I64": np.int64}


def st(tensors: dict[str, Arr], meta: dict[str, str] | None = None) -> bytes:
    """A safetensors file's bytes, tensors in the order given (bf16 arrays stored as BF16)."""
    header: dict[str, Any] = {"__metadata__": meta} if meta else {}
    blobs, pos = [], 0
    for name, a in tensors.items():
        dt = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", BF16: "BF16", np.dtype(np.int64): "I64"}[a.dtype]
        b = np.ascontiguousarray(a).tobytes()
        header[name] = {"dtype": dt, "shape": list(a.shape), "data_offsets": [pos, pos + len(b)]}
        blobs.append(b)
        pos += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(blobs)


def load(path: Path) -> tuple[dict[str, Arr], dict[str, str]]:
    """(tensors in file order, __metadata__) of a safetensors file."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    meta = header.pop("__metadata__", {})
    out = {}
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        a, b = info["data_offsets"]
        out[name] = np.frombuffer(data[8 + n + a : 8 + n + b], _ST[info["dtype"]]).reshape(info["shape"])
    return out, meta


def f32(*v: float) -> Arr:
    return np.array(v, np.float32)


def diverge(tmp_path: Path, base: bytes, ours: bytes, theirs: bytes, name: str = "m.safetensors") -> Path:
    """A repository whose main (ours) and `other` (theirs) both changed `name` since `base`."""
    a = new_repo(tmp_path / "a")
    write(a / name, base)
    commit(a, "base")
    g(a, "switch", "-q", "-c", "other")
    write(a / name, theirs)
    commit(a, "theirs")
    g(a, "switch", "-q", "main")
    write(a / name, ours)
    commit(a, "ours")
    return a


# ---------------------------------------------------------------- taken with no prompt


def test_every_no_prompt_case_merges_without_a_strategy(tmp_path: Path) -> None:
    base = {"one": f32(1, 1), "two": f32(2, 2), "same": f32(3, 3), "gone_t": f32(4), "gone_both": f32(5), "gone_o": f32(6), "keep": f32(7)}
    meta = {"k_o": "0", "k_t": "0", "k_same": "0", "k_keep": "x"}
    ours = {"one": f32(1, 1), "two": f32(2, 9), "same": f32(8, 8), "gone_t": f32(4), "keep": f32(7), "new_o": f32(10)}
    theirs = {"one": f32(1, 5), "two": f32(2, 2), "same": f32(8, 8), "gone_o": f32(6), "keep": f32(7), "new_t": f32(11, 12)}
    a = diverge(
        tmp_path,
        st(base, meta),
        st(ours, {**meta, "k_o": "1", "k_same": "2"}),
        st(theirs, {**meta, "k_t": "1", "k_same": "2", "k_new": "y"}),
    )
    r = g(a, "merge", "--no-edit", "other")
    assert "merged tensor by tensor" in r.stderr, r.stderr
    tensors, got_meta = load(a / "m.safetensors")
    # ours' order, then what only theirs has
    assert list(tensors) == ["one", "two", "same", "keep", "new_o", "new_t"]
    want = {"one": f32(1, 5), "two": f32(2, 9), "same": f32(8, 8), "keep": f32(7), "new_o": f32(10), "new_t": f32(11, 12)}
    for k, v in want.items():
        assert tensors[k].tobytes() == v.tobytes(), k
    assert got_meta == {"k_o": "1", "k_t": "1", "k_same": "2", "k_keep": "x", "k_new": "y"}
    assert len(g(a, "rev-list", "--parents", "-n1", "HEAD").stdout.split()) == 3
    clean_status(a)
    ts(a, "fsck")


def test_both_changed_fails_by_default_names_the_tensors_and_aborts_cleanly(tmp_path: Path) -> None:
    base = {"w": f32(1, 2), "b": f32(0), "c": f32(1)}
    ours = st({"w": f32(3, 2), "b": f32(1), "c": f32(1)})
    a = diverge(tmp_path, st(base), ours, st({"w": f32(1, 4), "b": f32(2), "c": f32(2)}))
    head = g(a, "rev-parse", "HEAD").stdout
    r = g(a, "merge", "--no-edit", "other", ok=False)
    assert "CONFLICT" in r.stdout
    assert "w: changed on both sides" in r.stderr and "b: changed on both sides" in r.stderr, r.stderr
    assert "c:" not in r.stderr  # taken from theirs, not a conflict
    assert (a / "m.safetensors").read_bytes() == ours
    g(a, "merge", "--abort")
    assert (a / "m.safetensors").read_bytes() == ours and g(a, "rev-parse", "HEAD").stdout == head
    clean_status(a)


def test_shape_conflicts_and_added_on_both_sides_are_reported_never_guessed(tmp_path: Path) -> None:
    base = {"w": f32(1, 2)}
    ours = st({"w": f32(1, 2, 3), "new": f32(1)})
    theirs = st({"w": f32(5, 6), "new": f32(2)})
    a = diverge(tmp_path, st(base), ours, theirs)
    g(a, "config", "thetastore.merge.strategy", "linear")
    r = g(a, "merge", "--no-edit", "other", ok=False)
    assert "w: shape or dtype differs between the sides" in r.stderr, r.stderr
    assert "new: added on both sides with different values" in r.stderr, r.stderr
    assert (a / "m.safetensors").read_bytes() == ours
    g(a, "merge", "--abort")
    g(a, "merge", "--no-edit", "-X", "theirs", "other")  # a side picked on purpose: taken
    assert (a / "m.safetensors").read_bytes() == theirs
    clean_status(a)


# ---------------------------------------------------------------- strategies: hand-computed vectors

# w: B = [1, 1, 1, 1, 1], ours = [3, 1, 0, 2, 5], theirs = [5, 1, 2, -1, 1]
#    task vectors: ours [2, 0, -1, 1, 4], theirs [4, 0, 1, -2, 0]
# v: B = [0, 0], ours = [3, 0], theirs = [0, 3]
HAND = [
    ("ours", [3, 1, 0, 2, 5], [3, 0]),
    ("theirs", [5, 1, 2, -1, 1], [0, 3]),
    ("linear", [4, 1, 1, 0.5, 3], [1.5, 1.5]),  # 0.5 ours + 0.5 theirs
    ("linear:0.25", [4.5, 1, 1.5, -0.25, 2], [0.75, 2.25]),
    ("task-arithmetic", [7, 1, 1, 0, 5], [3, 3]),
    ("task-arithmetic:0.5", [4, 1, 1, 0.5, 3], [1.5, 1.5]),
    # k = floor(0.5 * 5) = 2 per side: ours keeps 2 and 4, theirs 4 and -2; signs + + + - +;
    # means: (2 + 4) / 2, 0, 0, -2, 4. v: k = 1, each keeps its 3.
    ("ties:0.5", [4, 1, 1, -1, 5], [3, 3]),
    ("dare-linear:1", [7, 1, 1, 0, 5], [3, 3]),  # density 1 drops nothing: task arithmetic
    # density 1: TIES without the trim; signs of the sum [6, 0, 0, -1, 4]: + + + - +
    ("dare-ties:1", [4, 1, 2, -1, 5], [3, 3]),
    ("slerp", None, [3 / np.sqrt(2), 3 / np.sqrt(2)]),  # a quarter turn, halfway
]


@pytest.mark.parametrize(("strategy", "want_w", "want_v"), HAND, ids=[h[0] for h in HAND])
def test_strategy_against_hand_computed_vectors(tmp_path: Path, strategy: str, want_w: list[float] | None, want_v: list[float]) -> None:
    base = st({"w": f32(1, 1, 1, 1, 1), "v": f32(0, 0)})
    a = diverge(tmp_path, base, st({"w": f32(3, 1, 0, 2, 5), "v": f32(3, 0)}), st({"w": f32(5, 1, 2, -1, 1), "v": f32(0, 3)}))
    g(a, "config", "thetastore.merge.strategy", strategy)
    g(a, "merge", "--no-edit", "other")
    tensors, _ = load(a / "m.safetensors")
    if want_w is not None:
        assert tensors["w"].tolist() == want_w
    assert tensors["v"].tobytes() == np.array(want_v, np.float64).astype(np.float32).tobytes()
    clean_status(a)


def test_linear_of_2_and_4_is_3(tmp_path: Path) -> None:
    a = diverge(tmp_path, st({"w": f32(0)}), st({"w": f32(2)}), st({"w": f32(4)}))
    g(a, "merge", "--no-edit", "other", env={"THETA_STORE_MERGE": "linear:0.5"})
    assert load(a / "m.safetensors")[0]["w"].tolist() == [3.0]


# ---------------------------------------------------------------- strategies: a numpy reference


def _ref_trim(t: Arr, density: float) -> Arr:
    k = int(np.floor(density * t.size))
    order = np.argsort(-np.abs(t), kind="stable")  # ties: the lower index first
    out = np.zeros_like(t)
    out[order[:k]] = t[order[:k]]
    return out


def _ref_dare(t: Arr, density: float, name: str, side: int) -> Arr:
    seed = int.from_bytes(hashlib.blake2b(f"theta-store dare\0{name}\0{side}".encode(), digest_size=8).digest(), "little")
    keep = np.random.Generator(np.random.PCG64(seed)).random(t.size) < density
    return np.where(keep, t, t.dtype.type(0)) * t.dtype.type(1 / density)


def _ref_elect_mean(ts_: list[Arr]) -> Arr:
    s = np.where(ts_[0] + ts_[1] >= 0, 1.0, -1.0)
    agree = [np.sign(t) == s for t in ts_]
    total = np.where(agree[0], ts_[0], 0) + np.where(agree[1], ts_[1], 0)
    return total / np.maximum(agree[0].astype(ts_[0].dtype) + agree[1], 1)


def reference(strategy: str, name: str, b: Arr, o: Arr, t: Arr) -> Arr:
    """The documented formula, written again independently of theta_store.merging."""
    ct = np.float64 if o.dtype == np.float32 else np.float32
    mb, mo, mt = (x.astype(ct).ravel() for x in (b, o, t))
    to, tt = mo - mb, mt - mb
    kind, _, p = strategy.partition(":")
    if kind == "linear":
        w = float(p or 0.5)
        r = w * mo + (1 - w) * mt
    elif kind == "task-arithmetic":
        r = mb + float(p or 1) * (to + tt)
    elif kind == "ties":
        r = mb + _ref_elect_mean([_ref_trim(to, float(p or 0.2)), _ref_trim(tt, float(p or 0.2))])
    elif kind in ("dare-linear", "dare-ties"):
        d = [_ref_dare(x, float(p or 0.5), name, i) for i, x in enumerate((to, tt))]
        r = mb + (d[0] + d[1] if kind == "dare-linear" else _ref_elect_mean(d))
    else:
        tt_ = float(p or 0.5)
        na, nb = np.sqrt(np.sum(mo.astype(np.float64) ** 2)), np.sqrt(np.sum(mt.astype(np.float64) ** 2))
        c = float(np.clip(np.dot(mo / ct(na), mt / ct(nb)), -1, 1))
        th = np.arccos(c)
        r = ct(np.sin((1 - tt_) * th) / np.sin(th)) * mo + ct(np.sin(tt_ * th) / np.sin(th)) * mt
    return r.astype(o.dtype).reshape(o.shape)


RANDOM = ["linear", "linear:0.3", "task-arithmetic:0.7", "ties", "ties:0.35", "dare-linear", "dare-ties:0.3", "slerp:0.3"]


@pytest.fixture
def random_branches(tmp_path: Path) -> tuple[Path, dict[str, tuple[Arr, Arr, Arr]]]:
    rng = np.random.default_rng(7)
    values: dict[str, tuple[Arr, Arr, Arr]] = {}
    for name, dt in (("f32", np.float32), ("f16", np.float16), ("bf16", BF16)):
        b = rng.standard_normal((33, 31))
        values[name] = (
            b.astype(dt),
            (b + rng.standard_normal(b.shape) * 0.1).astype(dt),
            (b + rng.standard_normal(b.shape) * 0.1).astype(dt),
        )
    a = diverge(tmp_path, *(st({k: v[i] for k, v in values.items()}) for i in range(3)))
    return a, values


@pytest.mark.parametrize("strategy", RANDOM)
def test_strategy_matches_the_numpy_reference_byte_for_byte(random_branches: tuple[Path, dict[str, Any]], strategy: str) -> None:
    a, values = random_branches
    ts(a, "merge", "main:m.safetensors", "other", "-o", "out.safetensors", "--strategy", strategy)
    got, _ = load(a / "out.safetensors")
    for name, (b, o, t) in values.items():
        want = reference(strategy, name, b, o, t)
        assert got[name].dtype == o.dtype
        assert got[name].tobytes() == want.tobytes(), f"{strategy} {name}: {np.abs(got[name].astype(float) - want.astype(float)).max()}"
        assert got[name].tobytes() != o.tobytes() and got[name].tobytes() != t.tobytes()


def test_dare_reruns_give_identical_bytes(random_branches: tuple[Path, dict[str, Any]]) -> None:
    a, _ = random_branches
    ts(a, "merge", "main:m.safetensors", "other", "-o", "one.safetensors", "-s", "dare-ties")
    ts(a, "merge", "main:m.safetensors", "other", "-o", "two.safetensors", "-s", "dare-ties")
    assert (a / "one.safetensors").read_bytes() == (a / "two.safetensors").read_bytes()
    # and through git's merge driver: the same bytes as the command
    g(a, "merge", "--no-edit", "other", env={"THETA_STORE_MERGE": "dare-ties"})
    assert (a / "m.safetensors").read_bytes() == (a / "one.safetensors").read_bytes()


# ---------------------------------------------------------------- configuration and the command


def test_gitattributes_sets_the_strategy_per_path(tmp_path: Path) -> None:
    a = new_repo(tmp_path / "a")
    (a / ".gitattributes").write_text((a / ".gitattributes").read_text() + "avg.safetensors thetastore-merge=task-arithmetic\n")
    for name in ("avg.safetensors", "keep.safetensors"):
        write(a / name, st({"w": f32(1)}))
    commit(a, "base")
    g(a, "switch", "-q", "-c", "other")
    for name in ("avg.safetensors", "keep.safetensors"):
        write(a / name, st({"w": f32(2)}))
    commit(a, "theirs")
    g(a, "switch", "-q", "main")
    for name in ("avg.safetensors", "keep.safetensors"):
        write(a / name, st({"w": f32(4)}))
    commit(a, "ours")
    r = g(a, "merge", "--no-edit", "other", ok=False)
    assert "Merge conflict in keep.safetensors" in r.stdout and "Merge conflict in avg.safetensors" not in r.stdout
    assert load(a / "avg.safetensors")[0]["w"].tolist() == [1 + 1 + 3]  # base + both task vectors
    assert load(a / "keep.safetensors")[0]["w"].tolist() == [4]
    # the command re-resolves the conflicted file; --tensor picks per tensor
    r = ts(a, "merge", "--strategy", "ours", "--tensor", "w=linear:0.75", "keep.safetensors")
    assert "blended w (linear:0.75)" in r.stderr, r.stderr
    assert load(a / "keep.safetensors")[0]["w"].tolist() == [0.75 * 4 + 0.25 * 2]
    g(a, "commit", "-q", "--no-edit")
    clean_status(a)


def test_merge_command_of_revisions_and_its_usage_errors(tmp_path: Path) -> None:
    base = st({"w": f32(0, 0)})
    a = diverge(tmp_path, base, st({"w": f32(2, 0)}), st({"w": f32(4, 6)}))
    ts(a, "merge", "main:m.safetensors", "other", "-o", "out.safetensors", "-s", "linear")
    assert load(a / "out.safetensors")[0]["w"].tolist() == [3, 3]  # the mean of [2, 0] and [4, 6]
    ts(a, "merge", "HEAD:m.safetensors", "other", "HEAD~1", "-o", "avg.safetensors", "-s", "linear")  # three: their mean
    assert load(a / "avg.safetensors")[0]["w"].tobytes() == np.array([2.0, 2.0], np.float64).astype(np.float32).tobytes()
    # theirs as the base: only ours changed
    ts(a, "merge", "main:m.safetensors", "other", "-o", "x.safetensors", "-s", "ties", "--base", "other")
    assert load(a / "x.safetensors")[0]["w"].tolist() == [2, 0]
    r = ts(a, "merge", "main", "-o", "x.safetensors", ok=False)
    assert r.returncode == 2 and "two or more revisions" in r.stderr
    r = ts(a, "merge", "main", "other", "-o", "x.safetensors", "-s", "average", ok=False)
    assert r.returncode == 2 and "'average' is not a merge strategy" in r.stderr and "Traceback" not in r.stderr
    r = ts(a, "merge", "m.safetensors", ok=False)
    assert r.returncode == 1 and "not a file both sides of a merge changed" in r.stderr and "hint:" in r.stderr


def test_a_blended_merge_commit_pushes_and_clones_back_byte_exactly(tmp_path: Path, file_remote: Remote) -> None:
    rng = np.random.default_rng(3)
    w = rng.standard_normal((256, 64)).astype(np.float32)
    a = diverge(
        tmp_path,
        st({"w": w, "b": f32(0)}),
        st({"w": w + 0.01, "b": f32(1)}),
        st({"w": w - 0.02, "b": f32(0)}),
    )
    g(a, "remote", "add", "origin", file_remote.url)
    g(a, "merge", "--no-edit", "other", env={"THETA_STORE_MERGE": "ties:0.5"})
    merged = (a / "m.safetensors").read_bytes()
    assert merged not in (st({"w": w + 0.01, "b": f32(1)}), st({"w": w - 0.02, "b": f32(0)}))
    g(a, "push", "-q", "origin", "main")
    b = tmp_path / "b"
    clone(file_remote.url, b)
    assert (b / "m.safetensors").read_bytes() == merged
    clean_status(b)
    ts(b, "fsck")


# ---------------------------------------------------------------- tensors of many blocks, read once


@pytest.fixture
def big_branches(tmp_path: Path) -> tuple[Path, dict[str, tuple[Arr, Arr, Arr]]]:
    """Tensors of several of merging.BLOCK elements; task vectors on a grid of 1/8, so many
    magnitudes tie at a TIES cut and the ties span blocks."""
    rng = np.random.default_rng(11)
    values: dict[str, tuple[Arr, Arr, Arr]] = {}
    for name, dt, shape in (("f32", np.float32, (300, 110)), ("bf16", BF16, (5, 9000)), ("f16", np.float16, (20000,))):
        b = np.round(rng.standard_normal(shape) * 8) / 8
        values[name] = tuple((b + np.round(rng.standard_normal(shape) * s) / 8).astype(dt) for s in (0, 3, 2))  # type: ignore[assignment]
    a = diverge(tmp_path, *(st({k: v[i] for k, v in values.items()}) for i in range(3)))
    return a, values


MANY = ["linear:0.3", "task-arithmetic:0.7", "ties", "ties:0.35", "dare-linear", "dare-ties:0.3", "slerp:0.3"]


@pytest.mark.parametrize("strategy", MANY)
def test_blends_of_many_blocks_match_the_numpy_reference(big_branches: tuple[Path, dict[str, Any]], strategy: str) -> None:
    from theta_store import merging

    a, values = big_branches
    assert all(v[0].size > 2 * merging.BLOCK for v in values.values())
    ts(a, "merge", "main:m.safetensors", "other", "-o", "out.safetensors", "--strategy", strategy)
    got, _ = load(a / "out.safetensors")
    for name, (b, o, t) in values.items():
        want = reference(strategy, name, b, o, t)
        if strategy.startswith("slerp"):  # its sums add up in another order: at most one unit in the last place
            bits = {1: np.int8, 2: np.int16, 4: np.int32}[o.dtype.itemsize]
            assert np.abs(got[name].view(bits).astype(np.int64) - want.view(bits)).max() <= 1, name
        else:
            assert got[name].tobytes() == want.tobytes(), f"{strategy} {name}"


def test_a_merge_reads_each_input_of_a_tensor_once(big_branches: tuple[Path, dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    import theta_store
    from theta_store import merging
    from theta_store.reader import CheckpointReader

    a, values = big_branches
    read: list[str] = []
    raw, get = CheckpointReader.raw_bytes, CheckpointReader.get_tensor

    def count_raw(self: Any, name: str) -> bytes:
        read.append(name)
        return raw(self, name)

    def count_get(self: Any, name: str) -> Any:
        read.append(name)
        return get(self, name)

    monkeypatch.setattr(CheckpointReader, "raw_bytes", count_raw)
    monkeypatch.setattr(CheckpointReader, "get_tensor", count_get)
    sides = [("main", "m.safetensors"), ("other", "m.safetensors")]
    with theta_store.Repo(a) as r:
        r.merge_revisions(sides, str(a / "ta.safetensors"), merging.parse("task-arithmetic"))
        assert sorted(read) == sorted([*values] * 3)  # base, ours, theirs: nothing read twice to compare
        read.clear()
        r.merge_revisions(sides, str(a / "lin.safetensors"), merging.parse("linear"))
        assert sorted(read) == sorted([*values] * 2)  # linear needs no base


def test_ties_of_three_revisions_matches_the_reference(tmp_path: Path) -> None:
    rng = np.random.default_rng(12)
    b = rng.standard_normal((40, 50))
    sides = [(b + rng.standard_normal(b.shape) * 0.1).astype(np.float32) for _ in range(3)]
    base = b.astype(np.float32)
    a = diverge(tmp_path, st({"w": base}), st({"w": sides[0]}), st({"w": sides[1]}))
    g(a, "switch", "-q", "-c", "third", "main~1")
    write(a / "m.safetensors", st({"w": sides[2]}))
    commit(a, "third")
    g(a, "switch", "-q", "main")
    ts(a, "merge", "main:m.safetensors", "other", "third", "-o", "out.safetensors", "-s", "ties:0.4")
    trimmed = [_ref_trim(s.astype(np.float64).ravel() - base.astype(np.float64).ravel(), 0.4) for s in sides]
    elected = np.where(sum(trimmed) >= 0, 1.0, -1.0)
    agree = [np.sign(t) == elected for t in trimmed]
    mean = sum(np.where(ok, t, 0) for ok, t in zip(agree, trimmed, strict=True)) / np.maximum(sum(ok.astype(np.float64) for ok in agree), 1)
    want = (base.astype(np.float64).ravel() + mean).astype(np.float32).reshape(b.shape)
    assert load(a / "out.safetensors")[0]["w"].tobytes() == want.tobytes()
