"""The store layout: our packs kept and consolidated in tiers, per-subtree frames tables.

Plain git with theta-store installed, as in test_git_e2e: many small versions keep the pack count
bounded, old versions check out after any consolidation, git's own gc and maintenance leave
everything readable, and `theta-store gc --prune` frees a dropped version's frames from kept packs.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import msgpack
import pytest
from dulwich.objects import Blob, Commit, Tree

from test_git_e2e import commit, g, global_config, model_bytes, new_repo, pointer_version, ts, write
from theta_store import packs
from theta_store.gitstore import GitStore

__all__ = ["global_config"]


def model(bias: float) -> bytes:
    return model_bytes(0, bias=bias, layers=2, rows=256)


def our_packs(repo: Path) -> dict[str, int]:
    return packs.ours(repo / ".git" / "objects" / "pack")


def all_packs(repo: Path) -> set[str]:
    return {p.name for p in (repo / ".git" / "objects" / "pack").glob("pack-*.pack")}


def versions_of(repo: Path, n: int) -> list[str]:
    """The checkpoint version of each of the last n commits, oldest first."""
    return [pointer_version(repo, f"HEAD~{k}:model.safetensors") for k in range(n - 1, -1, -1)]


def add_versions(repo: Path, biases: list[float]) -> None:
    m = repo / "model.safetensors"
    for b in biases:
        write(m, model(b))
        commit(repo, f"bias {b}")


def assert_every_version_checks_out(repo: Path, biases: list[float]) -> None:
    m = repo / "model.safetensors"
    n = len(biases)
    for k, b in enumerate(biases):
        g(repo, "checkout", f"HEAD~{n - 1 - k}", "--", "model.safetensors")
        assert m.read_bytes() == model(b), f"version with bias {b} does not check out"
    g(repo, "checkout", "HEAD", "--", "model.safetensors")


# ---------------------------------------------------------------- the tier policy, alone


def test_tier_is_an_exact_integer_log() -> None:
    f = packs.FANOUT
    assert [packs.tier(s) for s in (0, 1, f - 1, f, f * f - 1, f * f)] == [0, 0, 0, 1, 1, 2]
    for k in (10, 20, 30):
        assert packs.tier(f**k - 1) == k - 1 and packs.tier(f**k) == k


def test_rollup_takes_the_lowest_full_tier_within_the_limit() -> None:
    f = packs.FANOUT
    small = {f"s{i}": 100 for i in range(f - 1)}
    assert packs.rollup(small) == []
    small["s-last"] = 100
    assert sorted(packs.rollup(small)) == sorted(small)
    big = {f"b{i}": 100 << 20 for i in range(f)}
    assert packs.rollup(big) == []  # 800 MiB: left to `theta-store gc`
    assert sorted(packs.rollup(big, limit=None)) == sorted(big)
    assert sorted(packs.rollup({**big, **small})) == sorted(small)


def test_rollups_rewrite_each_byte_a_few_times_and_keep_few_packs() -> None:
    """The policy on 2,000 simulated adds of varying size after one big first add: bytes
    rewritten stay within log8 of the growth per byte, and the pack count within 8 per tier."""
    rnd = random.Random(0)
    sizes = {"first": 330 << 20}
    new = written = 0
    most = 0
    for i in range(2000):
        s = rnd.randint(10_000, 60_000)
        sizes[f"v{i}"] = s
        new += s
        while names := packs.rollup(sizes, limit=None):
            total = sum(sizes.pop(n) for n in names)
            written += total
            sizes[f"r{i}-{len(sizes)}"] = total
        most = max(most, len(sizes))
        assert sizes["first"] == 330 << 20  # the first add's pack never moves
    assert written <= new * math.ceil(math.log(2000, packs.FANOUT))
    tiers = {packs.tier(s) for s in sizes.values()}
    assert most <= (packs.FANOUT - 1) * len(tiers) + 1


# ---------------------------------------------------------------- with git


def test_pack_count_stays_bounded_and_old_versions_check_out(tmp_path: Path) -> None:
    a = new_repo(tmp_path / "a")
    biases = [float(i) for i in range(2 * packs.FANOUT + 2)]
    counts = []
    m = a / "model.safetensors"
    for b in biases:
        write(m, model(b))
        commit(a, f"bias {b}")
        counts.append(len(all_packs(a)))
        assert all_packs(a) == set(our_packs(a)), "every pack the adds wrote is kept"
    # without consolidation each add leaves at least one more pack
    assert max(counts) < len(biases)
    assert counts[-1] <= 2 * (packs.FANOUT - 1) + 1
    assert_every_version_checks_out(a, biases)
    ts(a, "fsck")


def test_old_version_checks_out_after_every_kind_of_consolidation(tmp_path: Path) -> None:
    """A saved read plan names packs: after a rollup (in an add, in `theta-store gc`) some of
    those are gone, and the checkout must find the frames again."""
    a = new_repo(tmp_path / "a")
    m = a / "model.safetensors"
    add_versions(a, [0.0, 1.0])
    v = versions_of(a, 1)[0]
    plan = a / ".git" / "theta-store" / "plans" / v
    named = {p for p, _ in msgpack.unpackb(plan.read_bytes())[3]}
    assert len(named) == 2  # the first add's frames, and this add's bias frame in a small pack
    add_versions(a, [float(i) for i in range(2, packs.FANOUT + 2)])
    assert not all(Path(p).exists() for p in named), "a rollup replaced the small pack"
    n = packs.FANOUT + 2
    g(a, "checkout", f"HEAD~{n - 2}", "--", "model.safetensors")
    assert m.read_bytes() == model(1.0)
    assert all(Path(p).exists() for p, _ in msgpack.unpackb(plan.read_bytes())[3]), "the stale plan was replaced"
    g(a, "checkout", "HEAD", "--", "model.safetensors")
    # theta-store gc consolidates without the add's size limit: everything still reads
    ts(a, "gc")
    assert_every_version_checks_out(a, [float(i) for i in range(n)])


def test_git_gc_and_maintenance_leave_our_packs_and_everything_readable(tmp_path: Path) -> None:
    a = new_repo(tmp_path / "a")
    biases = [float(i) for i in range(packs.FANOUT + 3)]
    add_versions(a, biases)
    ours = our_packs(a)
    g(a, "gc", "-q")
    assert our_packs(a) == ours, "git gc rewrote kept packs"
    g(a, "maintenance", "run")
    g(a, "maintenance", "run", "--task=loose-objects", "--task=incremental-repack", "--task=pack-refs")
    g(a, "gc", "-q", "--aggressive", "--prune=now")
    assert set(ours) <= set(our_packs(a)), "git's maintenance removed a pack we keep"
    assert_every_version_checks_out(a, biases)
    ts(a, "fsck")
    # our consolidation after git's: a multi-pack index git wrote must not name removed packs
    add_versions(a, [float(i) for i in range(100, 100 + packs.FANOUT)])
    g(a, "fsck", "--no-dangling")
    g(a, "multi-pack-index", "verify")
    ts(a, "fsck")


def test_gc_prune_frees_a_dropped_versions_frames_from_kept_packs(tmp_path: Path) -> None:
    a = new_repo(tmp_path / "a")
    m = a / "model.safetensors"
    biases = [float(i) for i in range(packs.FANOUT + 2)]
    add_versions(a, biases[:3])
    # a version nothing needs: staged, then thrown away
    write(m, model(-1.0))
    g(a, "add", "model.safetensors")
    dropped = pointer_version(a, ":model.safetensors")
    g(a, "reset", "-q", "--hard")
    add_versions(a, biases[3:])  # enough adds for the dropped version's pack to be rolled up
    with GitStore(a) as store:
        keep = set()
        for v in store.versions():
            if v.hex() != dropped:
                keep |= {f.object_id for f in store.version_frames(v).values()}
        only = [f.object_id for f in store.version_frames(bytes.fromhex(dropped)).values() if f.object_id not in keep]
        paths, _ = store.locate(only)
    assert only, "the dropped version has frames of its own"
    assert all(Path(p).with_suffix(".keep").exists() for p in paths), "they lie in kept packs"
    g(a, "reflog", "expire", "--expire=now", "--all")
    ts(a, "gc", "--prune")
    for oid in only:
        assert g(a, "cat-file", "-e", oid.hex(), ok=False).returncode != 0, "a dropped frame is still stored"
    with GitStore(a) as store:
        assert dropped not in {v.hex() for v in store.versions()}
    assert all_packs(a) >= set(our_packs(a)) and our_packs(a), "what is left stays kept"
    assert_every_version_checks_out(a, biases)
    ts(a, "fsck")


# ---------------------------------------------------------------- version metadata


def test_a_one_bias_version_writes_few_objects(tmp_path: Path) -> None:
    """Version metadata costs O(changed chunks): the root, one subtree and its table, the manifest
    and the commit, however many tensors the model has."""
    a = new_repo(tmp_path / "a")
    big = model_bytes(0, bias=0.0, layers=24, rows=256)
    write(a / "model.safetensors", big)
    commit(a, "v1")
    before = set(all_packs(a))
    write(a / "model.safetensors", model_bytes(0, bias=1.0, layers=24, rows=256))
    commit(a, "v2")
    new = all_packs(a) - before
    pack_dir = a / ".git" / "objects" / "pack"
    objects = sum(len(packs.pack_objects(pack_dir / (n[: -len(".pack")] + ".idx"))) for n in new)
    # 1 frame + manifest + root + subtree + table + commit (at most a few more if a chunk's
    # subtree already held another changed chunk); the model has 25 tensors
    assert objects <= 8, f"{objects} objects written for a one-bias version"


def _old_layout(store: GitStore, manifest_id: bytes) -> None:
    """Rewrite a version's commit in the layout written before the per-subtree tables (one
    `frames` blob at the top), as an older theta-store left it."""
    frames = store.version_frames(manifest_id)
    objects = []
    mblob = Blob.from_string(store.read_manifest_bytes(manifest_id))
    table = {cid: [f.frame_len, f.planes] for cid, f in sorted(frames.items())}
    fblob = Blob.from_string(msgpack.packb(table, use_bin_type=True))
    fan: dict[str, Tree] = {}
    for cid, f in sorted(frames.items()):
        fan.setdefault(cid.hex()[:2], Tree()).add(cid.hex()[2:].encode(), 0o100644, f.object_id.hex().encode())
    root = Tree()
    root.add(b"manifest", 0o100644, mblob.id)
    root.add(b"frames", 0o100644, fblob.id)
    for prefix, sub in fan.items():
        objects.append(sub)
        root.add(prefix.encode(), 0o040000, sub.id)
    c = Commit()
    c.tree = root.id
    c.author = c.committer = b"theta-store <theta-store@localhost>"
    c.author_time = c.commit_time = 0
    c.author_timezone = c.commit_timezone = 0
    c.message = f"theta-store version {manifest_id.hex()}\n".encode()
    for o in [mblob, fblob, *objects, root, c]:
        store.repo.object_store.add_object(o)
    store.repo.refs[b"refs/theta/" + manifest_id.hex().encode()] = c.id


def test_versions_in_the_old_layout_still_read(tmp_path: Path) -> None:
    a = new_repo(tmp_path / "a")
    add_versions(a, [0.0, 1.0])
    v1 = bytes.fromhex(versions_of(a, 2)[0])
    with GitStore(a) as store:
        want = store.version_frames(v1)
        _old_layout(store, v1)
        tree = store._version_tree(v1)
        assert b"frames" in tree and all(b"frames" not in store.repo[e.sha] for e in tree.items() if e.mode == 0o040000)
        assert store.version_frames(v1) == want
        assert store.rebuild_chunk_index() >= len(want)
    (a / ".git" / "theta-store" / "plans" / v1.hex()).unlink()
    g(a, "checkout", "HEAD~1", "--", "model.safetensors")
    assert (a / "model.safetensors").read_bytes() == model(0.0)
    ts(a, "fsck")
    # a new version sharing most frames with the old-layout one is written in the new layout
    add_versions(a, [2.0])
    with GitStore(a) as store:
        v3 = bytes.fromhex(versions_of(a, 1)[0])
        assert b"frames" not in store._version_tree(v3)
        assert set(store.version_frames(v3)) & set(want)


@pytest.mark.parametrize("bad", ["not msgpack", "not a map", "bad entry"])
def test_a_damaged_subtree_table_is_a_clear_error(tmp_path: Path, bad: str) -> None:
    from theta_store.errors import CorruptObject

    a = new_repo(tmp_path / "a")
    add_versions(a, [0.0])
    v = bytes.fromhex(versions_of(a, 1)[0])
    ref = b"refs/theta/" + v.hex().encode()
    with GitStore(a) as store:
        root = store._version_tree(v)
        entry = next(e for e in root.items() if e.mode == 0o040000)
        sub = store.repo[entry.sha]
        assert isinstance(sub, Tree)
        cid = bytes.fromhex((entry.path + next(e.path for e in sub.items() if e.path != b"frames")).decode())
        data = {"not msgpack": b"\x93garbage", "not a map": msgpack.packb([1, 2]), "bad entry": msgpack.packb({cid: "no"})}[bad]
        blob = Blob.from_string(data)
        sub.add(b"frames", 0o100644, blob.id)
        root.add(entry.path, 0o040000, sub.id)
        c = store.repo[store.repo.refs[ref]]
        assert isinstance(c, Commit)
        c.tree = root.id
        for o in (blob, sub, root, c):
            store.repo.object_store.add_object(o)
        store.repo.refs[ref] = c.id
        with pytest.raises(CorruptObject, match="frames table"):
            store.version_frames(v)
