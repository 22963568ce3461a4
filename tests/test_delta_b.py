"""theta_store.delta, extract_lora and their CLI verbs, over versions committed with plain git."""

from __future__ import annotations

import doctest
import importlib
import json
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

import theta_store
from test_git_e2e import commit, g, global_config, new_repo, ts  # noqa: F401
from theta_store.deltas import stored_kind

CHANGED = {"bits", "sparse", "low-rank", "dense"}
BF16 = ml_dtypes.bfloat16


def _versions() -> tuple[dict[str, Any], dict[str, Any], dict[str, np.ndarray[Any, Any]]]:
    """v1 and v2 of a small model, and the rank-4 updates folded into v2 (module -> B @ A)."""
    rng = np.random.default_rng(7)

    def mat(rows: int, cols: int) -> np.ndarray[Any, Any]:
        return (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)

    v1: dict[str, Any] = {
        "layers.0.q.weight": mat(128, 64),
        "layers.0.q.bias": np.zeros(128, np.float32),
        "layers.0.k.weight": mat(96, 64),
        "layers.0.k.bias": np.full(96, 0.5, np.float32),
        "layers.0.v.weight": mat(256, 256),
        "layers.0.o.weight": mat(64, 64),
        "mlp.up.weight": mat(192, 64).astype(BF16),
        "gone.weight": mat(8, 8),
        "resize.weight": mat(16, 16),
    }
    v2 = dict(v1)
    updates = {}
    for module, scale in (("layers.0.q", 0.01), ("layers.0.k", 0.03)):
        w = v1[f"{module}.weight"]
        b, a = mat(w.shape[0], 4) * scale * 50, mat(4, w.shape[1]) * 50
        updates[module] = b @ a
        v2[f"{module}.weight"] = w + b @ a  # W += B @ A in numpy fp32, as a LoRA folded in
    v = v1["layers.0.v.weight"].copy()
    v.reshape(-1)[rng.choice(v.size, v.size // 100, replace=False)] += 0.01
    v2["layers.0.v.weight"] = v
    v2["layers.0.q.bias"] = np.linspace(-1, 1, 128, dtype=np.float32)
    up = v1["mlp.up.weight"].astype(np.float32)
    updates["mlp.up"] = mat(192, 4) @ mat(4, 64) * 100
    v2["mlp.up.weight"] = (up + updates["mlp.up"]).astype(BF16)
    del v2["gone.weight"]
    v2["new.weight"] = mat(4, 4)
    v2["resize.weight"] = mat(16, 32)
    return v1, v2, updates


def _save(path: Path, tensors: dict[str, Any]) -> None:
    theta_store.save_safetensors(
        str(path), {k: (v.view(np.uint16), "BF16") if v.dtype == BF16 else v for k, v in tensors.items()}, {"step": "1"}
    )


@pytest.fixture
def repo(tmp_path: Path) -> tuple[Path, dict[str, Any], dict[str, Any], dict[str, np.ndarray[Any, Any]]]:
    """A repository with model.safetensors at tags v1 and v2 (committed through git's filter)."""
    r = new_repo(tmp_path / "repo")
    v1, v2, updates = _versions()
    _save(r / "model.safetensors", v1)
    (r / "notes.txt").write_text("a regular file\n")
    commit(r, "v1")
    g(r, "tag", "v1")
    _save(r / "model.safetensors", v2)
    commit(r, "v2")
    g(r, "tag", "v2")
    return r, v1, v2, updates


def _bits(a: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    return np.ascontiguousarray(a).reshape(-1).view(f"u{a.dtype.itemsize}")


def test_kinds_dense_indices_stats(repo: tuple[Path, dict[str, Any], dict[str, Any], Any]) -> None:
    r, v1, v2, _ = repo
    with theta_store.delta("model.safetensors", "v1", "v2", repo=r) as d:
        assert list(d) == [*sorted(v2), "gone.weight"]  # the new file's order, removed ones last
        kinds = {name: t.kind for name, t in d.items()}
        assert kinds["layers.0.o.weight"] == kinds["layers.0.k.bias"] == "unchanged"
        assert (kinds["new.weight"], kinds["gone.weight"], kinds["resize.weight"]) == ("added", "removed", "reshaped")
        for name in ("layers.0.q.weight", "layers.0.k.weight", "layers.0.v.weight", "layers.0.q.bias", "mlp.up.weight"):
            assert kinds[name] in CHANGED, name
        assert d["resize.weight"].base_shape == (16, 16) and d["resize.weight"].shape == (16, 32)
        assert d["gone.weight"].shape is None and d["new.weight"].base_dtype is None

        for name in ("layers.0.q.weight", "layers.0.v.weight"):
            t, old, new = d[name], v1[name], v2[name]
            dense = t.dense()
            assert dense.dtype == np.float64 and dense.shape == old.shape
            assert np.array_equal(dense, new.astype(np.float64) - old.astype(np.float64))
            assert np.array_equal(_bits((old.astype(np.float64) + dense).astype(np.float32)), _bits(new))  # exact
            idx = np.flatnonzero(_bits(old) != _bits(new))
            assert np.array_equal(t.indices, idx) and np.array_equal(t.values, dense.reshape(-1)[idx])
            s = t.stats
            assert s["numel"] == old.size and s["changed"] == idx.size and s["fraction_changed"] == idx.size / old.size
            delta64 = new.astype(np.float64) - old.astype(np.float64)
            assert s["norm_delta"] == pytest.approx(np.linalg.norm(delta64), rel=1e-12)
            assert s["norm_base"] == pytest.approx(np.linalg.norm(old.astype(np.float64)), rel=1e-12)
            assert s["rel_change"] == pytest.approx(s["norm_delta"] / s["norm_base"], rel=1e-12)
            assert s["max_abs_delta"] == pytest.approx(np.abs(delta64).max(), rel=1e-12)
            o64, n64 = old.reshape(-1).astype(np.float64), new.reshape(-1).astype(np.float64)
            cos = np.dot(o64, n64) / np.linalg.norm(o64) / np.linalg.norm(n64)
            assert s["cosine"] == pytest.approx(cos, rel=1e-9)
            assert 0 < s["stored_bytes"] <= old.nbytes + 4096
        # What the store chose: the folded rank-4 update as factors, the 1% change as positions.
        q = d["layers.0.q.weight"]
        assert (q.kind, q.stats["rank"]) == ("low-rank", 4), (q.kind, q.stats["rank"])
        assert q.factors is not None
        u, w = q.factors
        assert u.shape == (v1["layers.0.q.weight"].shape[0], 4) and w.shape == (4, v1["layers.0.q.weight"].shape[1])
        dq = q.dense()
        assert np.linalg.norm(u.astype(np.float64) @ w - dq) <= 1e-3 * np.linalg.norm(dq)
        assert q.stats["stored_bytes"] < v1["layers.0.q.weight"].nbytes / 4
        assert d["layers.0.v.weight"].kind == "sparse" and d["layers.0.v.weight"].stats["rank"] is None
        assert d["layers.0.v.weight"].factors is None
        v = d["layers.0.v.weight"].stats
        assert v["changed"] == v1["layers.0.v.weight"].size // 100
        assert v["fraction_changed"] == pytest.approx(0.01, abs=1e-4) and v["fraction_changed_at"] == v["fraction_changed"]

        unchanged = d["layers.0.o.weight"]
        assert unchanged.indices.size == 0 and not unchanged.dense().any()
        assert unchanged.stats["changed"] == 0 and unchanged.stats["stored_bytes"] == 0 and unchanged.stats["cosine"] == pytest.approx(1)
        up = d["mlp.up.weight"]
        assert up.dtype == "BF16" and up.dense().dtype == np.float32
        assert np.array_equal(up.dense(), v2["mlp.up.weight"].astype(np.float32) - v1["mlp.up.weight"].astype(np.float32))
        assert np.array_equal(d["new.weight"].dense(), v2["new.weight"]) and np.array_equal(d["gone.weight"].dense(), -v1["gone.weight"])
        with pytest.raises(theta_store.ThetaStoreError, match=r"resize\.weight changed shape"):
            d["resize.weight"].dense()
        assert d["resize.weight"].stats["changed"] == 16 * 32 and d["resize.weight"].stats["rel_change"] is None
        assert d.metadata() == {"step": "1"} and all(t.factors is None for t in d.values() if t.kind != "low-rank")


def test_stored_kind_reads_the_delta_frame_contract() -> None:
    """The one kind-dependent function, on the headers the core's delta frames will carry."""
    plain = {"codec": 1, "bases": []}
    assert stored_kind([plain, {**plain, "kind": "plain"}]) == ("dense", None)
    assert stored_kind([{"kind": "xor", "bases": [b"a" * 32]}, plain]) == ("bits", None)
    assert stored_kind([{"kind": "diff", "bases": [b"a" * 32]}]) == ("bits", None)
    assert stored_kind([{"kind": "sparse", "bases": [b"a" * 32]}] * 2) == ("sparse", None)
    assert stored_kind([{"kind": "sparse", "bases": []}, {"kind": "xor", "bases": []}]) == ("bits", None)
    assert stored_kind([{"kind": "xor"}, {"kind": "low-rank", "bases": [b"a" * 32, b"f" * 32]}]) == ("low-rank", b"f" * 32)


def test_extract_lora_recovers_folded_updates(repo: tuple[Path, dict[str, Any], dict[str, Any], Any], tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.numpy import load_file

    r, v1, v2, updates = repo
    out = tmp_path / "adapter"
    rep = theta_store.extract_lora(r / "model.safetensors", "v1", "v2", rank=4, out=out)
    mods = {m["module"]: m for m in rep["modules"]}
    assert set(mods) == {"layers.0.q", "layers.0.k", "layers.0.v", "mlp.up"}
    assert mods["layers.0.q"]["rel_error"] <= 1e-6 and mods["layers.0.k"]["rel_error"] <= 1e-6
    assert mods["layers.0.v"]["rel_error"] > 0.5  # a 1% scatter is not low-rank, and says so
    assert mods["mlp.up"]["rel_error"] < 0.05  # bf16 rounding of the new weights is the rest
    assert rep["max_rel_error"] == max(m["rel_error"] for m in mods.values())
    skipped = {s["tensor"]: s["reason"] for s in rep["skipped"]}
    assert set(skipped) == {"layers.0.q.bias", "new.weight", "gone.weight", "resize.weight"}
    assert "bias=True" in skipped["layers.0.q.bias"] and skipped["resize.weight"].startswith("reshaped")

    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert set(tensors) == {f"base_model.model.{m}.lora_{x}.weight" for m in mods for x in "AB"}
    for module in updates:
        a, b = tensors[f"base_model.model.{module}.lora_A.weight"], tensors[f"base_model.model.{module}.lora_B.weight"]
        w = v1[f"{module}.weight"]
        assert a.dtype == b.dtype == np.float32 and a.shape == (4, w.shape[1]) and b.shape == (w.shape[0], 4)
        got = (b.astype(np.float64) @ a) + w.astype(np.float64)
        want = v2[f"{module}.weight"].astype(np.float64)
        err = np.linalg.norm(got - want) / np.linalg.norm(want - w.astype(np.float64))
        assert err == pytest.approx(mods[module]["rel_error"], rel=1e-3, abs=1e-7)  # the reported error is the real one
    with safe_open(str(out / "adapter_model.safetensors"), framework="np") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and meta["theta_store.base"] == "v1" and meta["theta_store.rev"] == "v2"

    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == cfg["lora_alpha"] == 4 and cfg["bias"] == "none"
    assert cfg["target_modules"] == ["k", "q", "up", "v"] and cfg["rank_pattern"] == cfg["alpha_pattern"] == {}
    assert cfg["fan_in_fan_out"] is False and cfg["use_rslora"] is False and cfg["task_type"] is None
    assert cfg["inference_mode"] is True and cfg["modules_to_save"] is None


def test_extract_lora_rtol_modules_bias(repo: tuple[Path, dict[str, Any], dict[str, Any], Any], tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    r, _, v2, _ = repo
    rep = theta_store.extract_lora(
        "model.safetensors", "v1", "v2", rtol=1e-5, out=tmp_path / "a", repo=r, modules=["q", "layers.0.k", "v"], bias=True
    )
    ranks = {m["module"]: m["rank"] for m in rep["modules"]}
    assert ranks["layers.0.q"] == ranks["layers.0.k"] == 4  # the smallest rank within rtol
    assert ranks["layers.0.v"] > 100 and rep["r"] == 4  # the most common rank is r; others go in rank_pattern
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] == cfg["alpha_pattern"] == {"layers.0.v": ranks["layers.0.v"]}
    assert cfg["bias"] == "all" and rep["biases"] == ["layers.0.q.bias"]
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert np.array_equal(tensors["base_model.model.layers.0.q.bias"], v2["layers.0.q.bias"])
    assert not any("up" in k for k in tensors)
    with pytest.raises(ValueError, match="rank must be 1 or more"):
        theta_store.extract_lora("model.safetensors", "v1", "v2", rank=0, out=tmp_path / "b", repo=r)


def test_errors_name_path_and_revision(repo: tuple[Path, dict[str, Any], dict[str, Any], Any]) -> None:
    r = repo[0]
    with pytest.raises(theta_store.ObjectNotFound, match=r"model\.safetensors: revision 'v9' is unknown") as e:
        theta_store.delta("model.safetensors", "v9", "v2", repo=r)
    assert "git log" in e.value.hint
    g(r, "rm", "-q", "--cached", "model.safetensors")
    g(r, "commit", "-qm", "drop")
    with pytest.raises(theta_store.ObjectNotFound, match=r"model\.safetensors: not in HEAD"):
        theta_store.delta("model.safetensors", "v1", "HEAD", repo=r)
    with pytest.raises(theta_store.PointerError, match=r"notes\.txt: v1 holds a regular file"):
        theta_store.delta("notes.txt", "v1", "v2", repo=r)


def test_cli_delta_and_extract_lora(repo: tuple[Path, dict[str, Any], dict[str, Any], Any], tmp_path: Path) -> None:
    r = repo[0]
    out = ts(r, "delta", "v1", "v2").stdout
    lines = out.splitlines()
    assert lines[0].startswith("model.safetensors: 8 of 10 tensors changed (1 added, ") and "% of parameters, stored " in lines[0]
    v_row = next(line.split() for line in lines if line.strip().startswith("layers.0.v.weight"))
    assert v_row[1] in CHANGED and v_row[2] == "256x256" and v_row[3] == "0.009995"
    assert "layers.0.o.weight" not in out and "layers.0.o.weight" in ts(r, "delta", "v1", "v2", "--all").stdout
    assert ts(r, "delta", "v1", "v1").stdout == "model.safetensors: unchanged (the same version)\n"
    js = json.loads(ts(r, "delta", "--json", "v1", "v2", "--", "model.safetensors").stdout)
    (f,) = js["files"]
    assert f["counts"]["unchanged"] == 2 and f["counts"]["added"] == 1
    assert {t["name"] for t in f["tensors"]} == {n for n in _versions()[1] if n != "layers.0.o.weight" and n != "layers.0.k.bias"} | {
        "gone.weight"
    }

    bad = ts(r, "delta", "v1", "nope", ok=False)
    first = "theta-store: error: nope: unknown revision (no branch, tag or commit of that name here)"
    assert bad.returncode == 1 and bad.stderr.splitlines()[0] == first
    assert bad.stderr.splitlines()[1].startswith("hint: ") and len(bad.stderr.splitlines()) == 2
    bad = ts(r, "delta", "v1", "v2", "--", "nothing.safetensors", ok=False)
    assert bad.returncode == 1 and "no theta-store checkpoints under nothing.safetensors" in bad.stderr

    res = ts(r, "extract-lora", "model.safetensors", "--base", "v1", "--rev", "v2", "--rank", "4", "-o", str(tmp_path / "ad"))
    rows = {line.split()[0]: line.split() for line in res.stdout.splitlines()}
    assert rows["layers.0.q"][3] == "4" and float(rows["layers.0.q"][4]) <= 1e-6
    assert float(rows["layers.0.v"][4]) > 0.5 and "note: relative errors up to" in res.stdout
    assert (tmp_path / "ad" / "adapter_config.json").exists()
    bad = ts(r, "extract-lora", "model.safetensors", "--base", "v1", "--rank", "0", "-o", str(tmp_path / "x"), ok=False)
    assert bad.returncode == 2 and bad.stderr.startswith("theta-store: error: --rank 0") and "hint:" in bad.stderr
    bad = ts(r, "extract-lora", "model.safetensors", "--base", "v0", "-o", str(tmp_path / "x"), ok=False)
    assert bad.returncode == 1 and "revision 'v0' is unknown" in bad.stderr and "Traceback" not in bad.stderr


def test_peft_loads_the_adapter(repo: tuple[Path, dict[str, Any], dict[str, Any], Any], tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    r, v1, v2, _ = repo
    theta_store.extract_lora("model.safetensors", "v1", "v2", rank=4, out=tmp_path / "ad", repo=r, modules=["q", "k"])

    root = torch.nn.Module()
    for name, w in v1.items():
        if not name.endswith(".weight") or w.ndim != 2 or w.dtype == BF16 or name.startswith(("gone", "resize")):
            continue
        parent = root
        *path, leaf, _ = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        lin.weight.data = torch.from_numpy(w.copy())
        parent.add_module(leaf, lin)
    model = peft.PeftModel.from_pretrained(root, str(tmp_path / "ad")).merge_and_unload()
    for name in ("layers.0.q.weight", "layers.0.k.weight"):
        got = dict(model.named_parameters())[name].detach().numpy()
        assert np.allclose(got, v2[name], rtol=0, atol=1e-6), name
    assert np.array_equal(dict(model.named_parameters())["layers.0.o.weight"].detach().numpy(), v1["layers.0.o.weight"])


@pytest.mark.parametrize("module", ["theta_store.deltas", "theta_store.lora"])
def test_docstring_examples(module: str) -> None:
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_factorize_big_matrix_randomized() -> None:
    """Past the exact-SVD size the randomized SVD (fixed seed) still finds a folded low rank, the
    same factors on every call, and rtol picks the rank."""
    from theta_store.lora import _FULL_SVD_MAX, factorize

    rng = np.random.default_rng(3)
    m, n = _FULL_SVD_MAX + 200, _FULL_SVD_MAX + 100
    d = (rng.standard_normal((m, 5)) @ rng.standard_normal((5, n))).astype(np.float32)
    d += rng.standard_normal((m, n)).astype(np.float32) * 1e-4
    b, a, err = factorize(d, 5, None)
    assert b.shape == (m, 5) and a.shape == (5, n) and err < 1e-3
    b2, a2, _ = factorize(d, 5, None)
    assert np.array_equal(b, b2) and np.array_equal(a, a2)
    b, a, err = factorize(d, None, 1e-2)
    assert b.shape[1] == 5 and err <= 1e-2
    _, _, err4 = factorize(d, 4, None)
    assert err4 > 0.1  # one direction short: the error says so
    d40 = (rng.standard_normal((m, 40)) @ rng.standard_normal((40, n))).astype(np.float32)
    b, _, err = factorize(d40, None, 1e-5)  # past the first randomized guess (32): the search widens
    assert b.shape[1] == 40 and err <= 1e-5
