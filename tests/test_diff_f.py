"""`theta-store diff`, `log`, the strip, the HTML page and git's textconv, over versions committed with plain git.

The model is BERT-shaped and small; v2 folds a rank-4 LoRA into two matrices (S2), v3 changes 1%
of one matrix (S3), v4 one bias (S4); the figures are checked against numpy.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import theta_store
from test_git_e2e import commit, g, global_config, new_repo, ts  # noqa: F401
from theta_store.diffview import SHADES, file_report, layer_module
from theta_store.reader import CheckpointReader

H, INTER, LAYERS = 64, 128, 4
MODULES = {
    "attention.self.query": (H, H),
    "attention.self.key": (H, H),
    "attention.self.value": (H, H),
    "attention.output.dense": (H, H),
    "intermediate.dense": (INTER, H),
    "output.dense": (H, INTER),
}
LORA = ("encoder.layer.1.attention.self.query.weight", "encoder.layer.1.attention.self.value.weight")
SPARSE = "encoder.layer.2.intermediate.dense.weight"
BIAS = "encoder.layer.3.output.dense.bias"


def model(stage: int) -> tuple[dict[str, np.ndarray[Any, Any]], dict[str, str]]:
    rng = np.random.default_rng(0)
    t = {"embeddings.word_embeddings.weight": (rng.standard_normal((100, H)) * 0.02).astype(np.float32)}
    for layer in range(LAYERS):
        for m, shape in MODULES.items():
            t[f"encoder.layer.{layer}.{m}.weight"] = (rng.standard_normal(shape) * 0.02).astype(np.float32)
            t[f"encoder.layer.{layer}.{m}.bias"] = np.zeros(shape[0], np.float32)
    meta = {"step": "1"}
    r2 = np.random.default_rng(1)
    if stage >= 2:
        for name in LORA:
            b, a = (r2.standard_normal((H, 4)) * 0.02).astype(np.float32), (r2.standard_normal((4, H)) * 0.02).astype(np.float32)
            t[name] = t[name] + b @ a
        meta = {"step": "2", "epoch": "1"}
    if stage >= 3:
        w = t[SPARSE].copy()
        w.reshape(-1)[r2.choice(w.size, w.size // 100, replace=False)] += 0.01
        t[SPARSE] = w
    if stage >= 4:
        t[BIAS] = np.full(H, 0.5, np.float32)
    return t, meta


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    r = new_repo(tmp_path / "repo")
    for stage in (1, 2, 3, 4):
        tensors, meta = model(stage)
        theta_store.save_safetensors(str(r / "m.safetensors"), tensors, meta)
        commit(r, f"v{stage} subject")
        g(r, "tag", f"v{stage}")
    return r


def test_json_figures_match_numpy(repo: Path) -> None:
    js = json.loads(ts(repo, "diff", "v1", "v4", "--json", "--rank").stdout)
    (f,) = js["files"]
    old, new = model(1)[0], model(4)[0]
    listed = {t["name"]: t for t in f["tensors"]}
    assert set(listed) == {*LORA, SPARSE, BIAS}  # unchanged tensors are counted, not listed
    assert f["counts"]["unchanged"] == len(new) - 4 and f["summary"]["tensors"] == len(new)
    for name, t in listed.items():
        check_stats(t["stats"], old[name], new[name])
        assert t["shape"] == t["base_shape"] == list(new[name].shape) and t["dtype"] == "F32"
    for name in LORA:
        assert listed[name]["numerical_rank"] == 4
        assert listed[name]["kind"] in ("low-rank", "bits", "dense", "sparse")
        if listed[name]["kind"] == "low-rank":
            assert listed[name]["stats"]["rank"] == 4
    assert listed[SPARSE]["stats"]["fraction_changed"] == pytest.approx(0.01, abs=0.001)
    assert listed[BIAS]["numerical_rank"] == 1
    assert f["metadata"] == {"added": {"epoch": "1"}, "removed": {}, "changed": {"step": ["1", "2"]}}
    changed = sum(t["stats"]["changed"] for t in listed.values())
    total = sum(v.size for v in new.values())
    line = f["summary_line"]
    assert line.startswith("4 of 49 tensors changed (") and f", {100 * changed / total:.2g}% of parameters, stored " in line, line
    if f["counts"].get("low-rank"):
        assert line.endswith(f"low-rank r=4 on {f['counts']['low-rank']}")
    text = ts(repo, "diff", "v1", "v4", "--no-strip").stdout.splitlines()
    assert text[0] == f"m.safetensors: {line}"
    assert '  __metadata__ + epoch: "1"' in text and '  __metadata__ ~ step: "1" -> "2"' in text
    row = next(ln.split() for ln in text if ln.strip().startswith(SPARSE))
    assert row[1] == listed[SPARSE]["kind"] and row[2] == "128x64" and float(row[3]) == pytest.approx(0.01, abs=0.001)
    assert len([ln for ln in ts(repo, "diff", "v1", "v4", "--all", "--no-strip").stdout.splitlines() if ln.startswith("  encoder.")]) == 48


def check_stats(st: dict[str, Any], old: np.ndarray[Any, Any], new: np.ndarray[Any, Any]) -> None:
    """A changed tensor's figures in `diff --json` against numpy in float64."""
    a, b = old.astype(np.float64).ravel(), new.astype(np.float64).ravel()
    d = b - a
    bits = f"u{old.dtype.itemsize}"
    assert st["numel"] == a.size and st["changed"] == int(np.count_nonzero(old.ravel().view(bits) != new.ravel().view(bits)))
    assert st["fraction_changed"] == pytest.approx(st["changed"] / a.size)
    assert st["fraction_changed_at"] == pytest.approx(np.count_nonzero(np.abs(d) > 1e-6 * np.abs(a)) / a.size)
    assert st["norm_delta"] == pytest.approx(np.linalg.norm(d), rel=1e-9)
    assert st["max_abs_delta"] == pytest.approx(np.abs(d).max(), rel=1e-12)
    if np.linalg.norm(a):
        assert st["norm_base"] == pytest.approx(np.linalg.norm(a), rel=1e-9)
        assert st["rel_change"] == pytest.approx(np.linalg.norm(d) / np.linalg.norm(a), rel=1e-9)
        assert st["cosine"] == pytest.approx(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)), rel=1e-9)
    else:
        assert st["rel_change"] is None and st["cosine"] is None
    assert st["stored_bytes"] > 0


# Each scenario on its own: what changed from the previous version, and the metadata change.
STEPS = [
    ("v1", "v2", set(LORA), {"added": {"epoch": "1"}, "removed": {}, "changed": {"step": ["1", "2"]}}),
    ("v2", "v3", {SPARSE}, {"added": {}, "removed": {}, "changed": {}}),
    ("v3", "v4", {BIAS}, {"added": {}, "removed": {}, "changed": {}}),
]


@pytest.mark.parametrize(("a", "b", "names", "meta"), STEPS, ids=["S2", "S3", "S4"])
def test_json_figures_of_each_scenario_match_numpy(repo: Path, a: str, b: str, names: set[str], meta: dict[str, Any]) -> None:
    js = json.loads(ts(repo, "diff", a, b, "--json").stdout)
    (f,) = js["files"]
    old, new = model(int(a[1]))[0], model(int(b[1]))[0]
    listed = {t["name"]: t for t in f["tensors"]}
    assert set(listed) == names and f["metadata"] == meta and f["counts"]["unchanged"] == len(new) - len(names)
    for name, t in listed.items():
        check_stats(t["stats"], old[name], new[name])
    assert f["summary"]["elements_changed"] == sum(t["stats"]["changed"] for t in listed.values())


def test_figures_of_16_bit_and_integer_tensors_match_numpy(tmp_path: Path) -> None:
    """Differences of F16 and BF16 values are taken in float64 (exact), of integers in int64."""
    import ml_dtypes

    r = new_repo(tmp_path / "d")
    rng = np.random.default_rng(4)
    bf = ml_dtypes.bfloat16
    v1 = {
        "h": rng.standard_normal((40, 300)).astype(np.float16),
        "b": rng.standard_normal((9000,)).astype(bf),
        "i": rng.integers(-(2**40), 2**40, 5000),
    }
    v2 = {
        "h": (v1["h"] + rng.standard_normal(v1["h"].shape) * 1e-2).astype(np.float16),
        "b": np.where(rng.random(9000) < 0.3, v1["b"].astype(np.float32) * 1.01, v1["b"].astype(np.float32)).astype(bf),
        "i": v1["i"] + rng.integers(-3, 4, 5000),
    }

    def save(tensors: dict[str, np.ndarray[Any, Any]]) -> None:
        out = {k: (v.view(np.uint16), "BF16") if v.dtype == bf else v for k, v in tensors.items()}
        theta_store.save_safetensors(str(r / "m.safetensors"), out)

    save(v1)
    commit(r, "v1")
    save(v2)
    commit(r, "v2")
    (f,) = json.loads(ts(r, "diff", "HEAD~1", "HEAD", "--json").stdout)["files"]
    listed = {t["name"]: t for t in f["tensors"]}
    assert {n: t["dtype"] for n, t in listed.items()} == {"h": "F16", "b": "BF16", "i": "I64"}
    for name, t in listed.items():
        check_stats(t["stats"], v1[name], v2[name])


def test_unchanged_tensors_are_not_read(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    read: list[str] = []
    reader = CheckpointReader
    raw, get = reader.raw_bytes, reader.get_tensor

    def count_raw(self: Any, name: str) -> bytes:
        read.append(name)
        return raw(self, name)

    def count_get(self: Any, name: str) -> Any:
        read.append(name)
        return get(self, name)

    monkeypatch.setattr(reader, "raw_bytes", count_raw)
    monkeypatch.setattr(reader, "get_tensor", count_get)
    with theta_store.delta("m.safetensors", "v3", "v4", repo=repo) as d:
        report = file_report(d, rank=False)
    assert [t["name"] for t in report["tensors"]] == [BIAS]
    assert read == [BIAS, BIAS]  # each version of the one changed tensor, once
    read.clear()
    with theta_store.delta("m.safetensors", "v1", "v3", repo=repo) as d:
        file_report(d)
    assert sorted(read) == sorted([*LORA, *LORA, SPARSE, SPARSE])


def test_textconv_through_git_diff_and_log(repo: Path) -> None:
    out = g(repo, "diff", "v3", "v4").stdout
    changed = [ln for ln in out.splitlines() if ln[:1] in "+-" and ln[:3] not in ("+++", "---")]
    assert [ln[0] + ln[1:].split("\t")[0] for ln in changed[2:]] == [f"-{BIAS}", f"+{BIAS}"], changed
    assert changed[0].startswith("-# theta-store checkpoint: safetensors, 49 tensors, ") and " parameters, " in changed[0]
    old, new = changed[2].split("\t"), changed[3].split("\t")
    assert old[1:4] == new[1:4] == ["F32", "64", "256"] and old[4] != new[4]
    log = g(repo, "log", "-p", "--format=commit %s", "v1..v2").stdout
    names = [ln[1:].split("\t")[0] for ln in log.splitlines() if ln and ln[0] in "+-" and ln[:3] not in ("+++", "---") and ln[1:2] != "#"]
    assert names == ["__metadata__", "__metadata__", "__metadata__", LORA[0], LORA[0], LORA[1], LORA[1]], names
    shown = g(repo, "show", "v3").stdout
    assert f"-{SPARSE}\tF32\t128x64\t" in shown and f"+{SPARSE}\tF32\t128x64\t" in shown


def test_strip_rows_and_columns(repo: Path) -> None:
    assert layer_module("model.layers.3.self_attn.q_proj.weight") == ("model.layers.3", "self_attn.q_proj")
    assert layer_module("h.11.attn.c_attn.bias") == ("h.11", "attn.c_attn")
    assert layer_module("lm_head.weight") == (None, "lm_head")
    out = ts(repo, "diff", "v1", "v4", "--strip").stdout.splitlines()
    start = next(i for i, ln in enumerate(out) if ln.strip().startswith("a  b"))
    letters = out[start].split()
    assert letters == ["a", "b", "c", "d", "e", "f"]
    rows = out[start + 1 : start + 1 + LAYERS]
    assert [r.split()[0] for r in rows] == [f"encoder.layer.{i}" for i in range(LAYERS)]
    legend = out[start + 1 + LAYERS].split()
    columns = dict(zip(legend[0::2], legend[1::2], strict=True))
    assert set(columns.values()) == {"query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"}
    col = {name: letters.index(x) for x, name in columns.items()}

    def cell(row: int, name: str) -> str:
        line = out[start + 1 + row]
        first = line.index(f"encoder.layer.{row}") + len(f"encoder.layer.{row}") + 2  # the cells start after the name and 2 spaces
        return line.ljust(first + 3 * len(letters))[first + 3 * col[name]]

    want = {(1, "query"), (1, "value"), (2, "intermediate.dense"), (3, "output.dense")}
    for r in range(LAYERS):
        for name in col:
            assert (cell(r, name) != " ") == ((r, name) in want), (r, name, out)
    assert cell(3, "output.dense") == SHADES[4]  # a zero bias set to 0.5: no relative change, "new"
    assert cell(1, "query") == SHADES[3]  # |dW|/|W| ~ 0.03
    assert "--strip" not in ts(repo, "diff", "v1", "v4").stdout and "a attention" not in ts(repo, "diff", "v1", "v4").stdout


def test_html_page_renders_in_chromium(repo: Path, tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    out = ts(repo, "diff", "v1", "v4", "--html", str(page)).stdout
    assert f"wrote {page}" in out
    text = page.read_text()
    assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text  # nothing fetched
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (.ci/run installs it)")
    base = [browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*base, "--dump-dom", str(page)], capture_output=True, text=True, timeout=120, check=True).stdout
    assert 'data-rendered="yes"' in dom  # the inline script ran
    assert dom.count('class="cell"') == LAYERS * len(MODULES) and f'data-cells="{LAYERS * len(MODULES)}"' in dom
    assert dom.count('data-rel=""') == LAYERS * len(MODULES) - 4  # only the four changed cells carry a value
    assert SPARSE in dom and "epoch" in dom
    shot = tmp_path / "shot.png"
    subprocess.run([*base, f"--screenshot={shot}", "--window-size=900,700", str(page)], capture_output=True, timeout=120, check=True)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000  # a blank page compresses to far less


def test_log_lists_versions_with_summaries(repo: Path) -> None:
    js = json.loads(ts(repo, "log", "--json").stdout)
    (f,) = js["files"]
    assert f["path"] == "m.safetensors"
    vs = f["versions"]
    assert [v["subject"] for v in vs] == ["v4 subject", "v3 subject", "v2 subject", "v1 subject"]
    assert [v["commit"] for v in vs] == [g(repo, "rev-parse", f"v{i}").stdout.strip() for i in (4, 3, 2, 1)]
    assert vs[0]["summary_line"].startswith("1 of 49 tensors changed (") and vs[-1]["summary_line"] == "added: 49 tensors"
    assert vs[2]["summary"]["changed"] == 2 and vs[1]["summary"]["parameters_changed"] == INTER * H
    size = (repo / "m.safetensors").stat().st_size
    assert all(v["size"] == size for v in vs[:3]) and vs[-1]["size"] == size - 8  # v1's metadata is 8 bytes shorter
    assert vs[-1]["added"] > 100 * vs[0]["added"] > 0
    text = ts(repo, "log", "m.safetensors").stdout.splitlines()
    assert text[0] == "m.safetensors" and text[2].split()[0] == vs[0]["commit"][:7] and text[2].endswith("v4 subject")
    assert "holding " in text[2] and math.isfinite(float(text[2].split("holding ")[1].split("%")[0]))


def test_default_revisions(repo: Path) -> None:
    # nothing staged: the last commit's change
    js = json.loads(ts(repo, "diff", "--json").stdout)
    assert (js["base"], js["rev"]) == ("HEAD~1", "HEAD") and [t["name"] for t in js["files"][0]["tensors"]] == [BIAS]
    tensors, meta = model(4)
    tensors["embeddings.word_embeddings.weight"] = tensors["embeddings.word_embeddings.weight"] * 2
    theta_store.save_safetensors(str(repo / "m.safetensors"), tensors, meta)
    g(repo, "add", "m.safetensors")
    js = json.loads(ts(repo, "diff", "--json").stdout)  # something staged: the index against HEAD
    assert (js["base"], js["rev"]) == ("HEAD", None) and [t["name"] for t in js["files"][0]["tensors"]] == [
        "embeddings.word_embeddings.weight"
    ]
    js = json.loads(ts(repo, "diff", "v3", "m.safetensors", "--json").stdout)  # one revision: against the index
    assert {t["name"] for t in js["files"][0]["tensors"]} == {BIAS, "embeddings.word_embeddings.weight"}
    bad = ts(repo, "diff", "v1", "v4", "nothing.safetensors", ok=False)
    assert bad.returncode == 1 and "no theta-store checkpoints under nothing.safetensors" in bad.stderr and "hint:" in bad.stderr


def test_frame_heads_from_packs_git_deltas_and_loose_objects(repo: Path, tmp_path: Path) -> None:
    """How each chunk is stored is read from its frame's first bytes, whether the frame lies whole
    in a pack, as a git delta in one, or loose."""
    from theta_store import _native
    from theta_store.encodings import chunk_kinds
    from theta_store.gitstore import GitStore

    def check() -> tuple[set[str], int]:
        """The kinds found, and how many heads needed the object read whole."""
        with GitStore(repo) as s:
            frames = {cid: f for mid in s.versions() for cid, f in s.version_frames(mid).items()}
            want = {cid: _native.frame_info(s.read_object(f.object_id))["kind"] for cid, f in frames.items()}
            heads = {f.object_id: s.read_object(f.object_id)[:64] for f in frames.values()}
            whole_reads = []
            read_object = s.read_object
            s.read_object = lambda oid: whole_reads.append(oid) or read_object(oid)  # type: ignore[method-assign]
            assert {oid: s.read_object_head(oid, 64) for oid in heads} == heads
            assert chunk_kinds(s, frames, frames) == want
            return set(want.values()), len(whole_reads)

    kinds, whole = check()
    assert kinds - {"plain"} and whole == 0  # delta frames, their heads read alone
    # One pack of every object, in which a delta frame is a git delta against a larger near-copy
    # of it (theta-store marks frames -delta; another tool's repack need not).
    with GitStore(repo) as s:
        frames = {cid: f for mid in s.versions() for cid, f in s.version_frames(mid).items()}
        oid = next(f.object_id for f in frames.values() if f.bases)
        padded = s.read_object(oid) + b"padding" * 100
    written = subprocess.run(["git", "hash-object", "-w", "--stdin"], cwd=repo, input=padded, capture_output=True, check=True)
    copy = written.stdout.decode().strip()
    listed = g(repo, "rev-list", "--objects", "--all").stdout.splitlines()
    path = next(ln.split(" ", 1)[1] for ln in listed if ln.startswith(oid.hex()))
    old_packs = list((repo / ".git/objects/pack").glob("pack-*"))
    todo = "\n".join([*listed, f"{copy} {path}"]) + "\n"  # the same path: git compares the two
    subprocess.run(["git", "pack-objects", "-q", "--window=1000", ".git/objects/pack/pack"], cwd=repo, input=todo.encode(), check=True)
    for p in old_packs:
        p.unlink()
    g(repo, "prune-packed")
    packed = g(repo, "verify-pack", "-v", *map(str, (repo / ".git/objects/pack").glob("*.idx"))).stdout
    assert any(ln.startswith(oid.hex()) and len(ln.split()) == 7 for ln in packed.splitlines()), packed  # a git delta
    assert check()[1] >= 2  # a git delta is read whole (for the test's head and for its kind)
    for pack in (repo / ".git/objects/pack").glob("*.pack"):
        moved = tmp_path / pack.name
        pack.rename(moved)
        pack.with_suffix(".idx").unlink()
        with open(moved, "rb") as f:
            subprocess.run(["git", "unpack-objects", "-q"], cwd=repo, stdin=f, check=True)
    assert not list((repo / ".git/objects/pack").glob("*.pack"))
    assert check() == (kinds, 0)


def torch_checkpoint(w: np.ndarray[Any, Any], epoch: int, step: int) -> bytes:
    """A torch.save archive, built by hand (torch is not needed): {"model": {"w": w}, "epoch": epoch,
    "optimizer": {"step": step, "lr": 0.1}}."""
    import struct

    from test_formats import p_int, p_state_dict, p_str, p_tensor, torch_zip

    model = p_state_dict([("w", p_tensor("FloatStorage", "0", w.size, 0, w.shape, (w.shape[1], 1)))])[2:-1]
    optimizer = b"}(" + p_str("step") + p_int(step) + p_str("lr") + b"G" + struct.pack(">d", 0.1) + b"u"
    pkl = b"\x80\x02}(" + p_str("model") + model + p_str("epoch") + p_int(epoch) + p_str("optimizer") + optimizer + b"u."
    return torch_zip(pkl, {"0": w.astype(np.float32).tobytes()})


def test_a_torch_checkpoints_epoch_and_step_show_in_diff_and_git_diff(tmp_path: Path) -> None:
    r = new_repo(tmp_path / "t", "*.pt")
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    (r / "ck.pt").write_bytes(torch_checkpoint(w, 1, 100))
    commit(r, "epoch 1")
    w[0, 0] = 0.5
    (r / "ck.pt").write_bytes(torch_checkpoint(w, 2, 200))
    commit(r, "epoch 2")
    js = json.loads(ts(r, "diff", "HEAD~1", "HEAD", "--json").stdout)
    (f,) = js["files"]
    assert f["metadata"] == {"added": {}, "removed": {}, "changed": {"epoch": [1, 2], "optimizer.step": [100, 200]}}
    assert f["metadata_label"] == "pickle" and [t["name"] for t in f["tensors"]] == ["model.w"]
    text = ts(r, "diff", "HEAD~1", "HEAD", "--no-strip").stdout.splitlines()
    assert "  pickle ~ epoch: 1 -> 2" in text and "  pickle ~ optimizer.step: 100 -> 200" in text
    changed = [ln for ln in g(r, "log", "-p", "-1", "--format=").stdout.splitlines() if ln[:1] in "+-" and ln[:3] not in ("+++", "---")]
    pickled = sorted(ln for ln in changed if ln[1:].startswith("pickle\t"))
    assert pickled == ["+pickle\tepoch\t2", "+pickle\toptimizer.step\t200", "-pickle\tepoch\t1", "-pickle\toptimizer.step\t100"], changed
    assert any(ln.startswith("-model.w\t") for ln in changed)  # and the tensor's line


def test_summary_line_percentages() -> None:
    from theta_store.diffview import summary_line

    def pct(part: int) -> str:
        s = {"counts": {"bits": 1}, "parameters": 1000, "elements_changed": part, "parameters_changed": part}
        line = summary_line({**s, "changed": 1, "tensors": 2, "stored_bytes": 0, "low_rank_ranks": []})
        return line.split(", ")[1].split("%")[0]

    assert [pct(p) for p in (0, 21, 123, 999, 1000)] == ["0", "2.1", "12.3", "99.9", "100"]
