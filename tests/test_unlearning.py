"""Exactness: after forget/add, every live shard equals a store trained from scratch on what remains."""

from __future__ import annotations

import pytest

from shard_store import ShardStore
from sisa import DataSpec, MLPConfig, PartitionConfig, RecordError, Sisa, SisaConfig, UnknownRecordError
from sisa.records import records_from_rows
from sisa.schedule import Member, shard_schedule
from sisa.unlearning import expected_retrain_fraction, expected_speedup, plan_shard

from .conftest import SPEC, assert_exact, live_shas, make_rows


def pick_spread(sisa: Sisa, per_shard: int = 1, shards=(0, 1, 2)) -> list[str]:
    chosen = []
    for shard in shards:
        ids = [r.id for r in sisa.live_records(shard)]
        chosen += ids[len(ids) // 2: len(ids) // 2 + per_shard]
    return chosen


def test_forget_equals_scratch_and_leaves_other_shards_alone(tmp_path, rows, config):
    sisa = Sisa.train(tmp_path / "store", rows, config, SPEC)
    untouched_shard = 2
    victims = pick_spread(sisa, per_shard=2, shards=(0, 1))
    before_files = {
        c.path: (sisa.root / c.path / "weights.safetensors").read_bytes()
        for c in sisa.checkpoints(untouched_shard)
    }
    placements = sisa.records(victims)
    receipt = sisa.forget(victims)

    assert sorted(receipt.record_ids) == sorted(victims)
    assert [a["shard"] for a in receipt.affected_shards] == [0, 1]
    for a in receipt.affected_shards:  # restart from the earliest affected slice, not earlier
        earliest = min(p.slice for p in placements.values() if p.shard == a["shard"])
        assert a["start_slice"] == earliest
    assert set(receipt.checkpoints_changed) == {"0", "1"}
    assert set(receipt.checkpoints_unchanged) == {"2"}
    after_files = {
        c.path: (sisa.root / c.path / "weights.safetensors").read_bytes()
        for c in sisa.checkpoints(untouched_shard)
    }
    assert after_files == before_files  # not retrained, byte-identical

    remaining = [r for r in rows if r["id"] not in set(victims)]
    assert_exact(sisa, remaining, config, SPEC, tmp_path / "scratch")
    assert sisa.audit().ok


def test_batch_touching_one_shard_retrains_it_once(tmp_path, rows, config):
    sisa = Sisa.train(tmp_path / "store", rows, config, SPEC)
    victims = [r.id for r in sisa.live_records(1)][:4]
    receipt = sisa.forget(victims)
    assert [a["shard"] for a in receipt.affected_shards] == [1]
    counts = sisa.schedules([1])[1].cumulative_counts()
    start = receipt.affected_shards[0]["start_slice"]
    epochs = config.training.epochs_per_slice
    assert receipt.samples_retrained == sum(counts[k] * epochs for k in range(start, len(counts)))


def test_repeated_id_is_a_noop_and_unknown_id_changes_nothing(tmp_path, rows, config):
    sisa = Sisa.train(tmp_path / "store", rows, config, SPEC)
    victim = rows[10]["id"]
    sisa.forget([victim])
    live_before = live_shas(sisa)
    again = sisa.forget([victim])
    assert again.already_deleted == [victim] and again.record_ids == []
    assert again.samples_retrained == 0
    with pytest.raises(UnknownRecordError, match="'nope'"):
        sisa.forget([rows[11]["id"], "nope"])
    assert sisa.records([rows[11]["id"]])[rows[11]["id"]].deleted_at is None  # nor the valid id
    assert live_shas(sisa) == live_before
    assert len(sisa.deletions()) == 1
    with pytest.raises(KeyError):  # UnknownRecordError is also a KeyError
        sisa.forget_group("no-such-user")


def test_forget_group_retrains_one_shard(tmp_path, rows, config):
    sisa = Sisa.train(tmp_path / "store", rows, config, SPEC)
    receipt = sisa.forget_group("u3")
    assert sorted(receipt.record_ids) == [r["id"] for r in rows if r["user"] == "u3"]
    assert len(receipt.affected_shards) == 1
    assert_exact(sisa, [r for r in rows if r["user"] != "u3"], config, SPEC, tmp_path / "scratch")


def test_deleted_content_is_purged_and_stale_checkpoints_removed(tmp_path, rows, config):
    sisa = Sisa.train(tmp_path / "store", rows, config, SPEC)
    victim = rows[0]["id"]
    sisa.forget([victim])
    row = sisa.records([victim])[victim]
    assert row.target is None and row.deleted_at is not None
    store = ShardStore.open(sisa.root)  # the record's row, read directly
    content = store.conn.execute(
        "SELECT text, features, target, group_id, digest FROM records WHERE id = ?",
        [sisa.id_digest(victim)]).fetchone()
    assert content[:3] == (None, None, None)
    # The tombstone keeps keyed digests only: not the id, the group or the content digest.
    user = next(r["user"] for r in rows if r["id"] == victim)
    assert content[3] != user and content[4] != next(
        r.digest for r in records_from_rows(rows, SPEC) if r.id == victim)
    assert store.conn.execute("SELECT COUNT(*) FROM records WHERE id = ?", [victim]).fetchone()[0] == 0
    for c in sisa.checkpoints():
        manifest = (sisa.root / c.path / "manifest.json").read_text()
        assert f'"{victim}"' not in manifest
    # No checkpoint directory on disk is left over from before the deletion.
    on_disk = {str(p.relative_to(sisa.root))
               for p in (sisa.root / "checkpoints").glob("*/*")}
    assert on_disk == {c.path for c in sisa.checkpoints()}


def test_add_equals_training_on_the_union(tmp_path, rows, config):
    sisa = Sisa.train(tmp_path / "store", rows[:120], config, SPEC)
    report = sisa.add(rows[120:])
    assert report.retrained
    # The checkpoints the new records made stale are gone from the database and the disk.
    assert report.checkpoints_dropped > 0
    assert report.checkpoints_written >= report.checkpoints_dropped
    assert_exact(sisa, rows, config, SPEC, tmp_path / "scratch")
    with pytest.raises(RecordError, match="already in the store"):
        sisa.add(rows[:2])
    with pytest.raises(RecordError, match="not among the store's classes"):
        sisa.add([{**make_rows(1, prefix="new")[0], "label": 9}])


def test_forget_after_add_then_scratch(tmp_path, rows, config):
    sisa = Sisa.train(tmp_path / "store", rows[:100], config, SPEC)
    sisa.add(rows[100:])
    victims = pick_spread(sisa)
    sisa.forget(victims)
    assert_exact(sisa, [r for r in rows if r["id"] not in set(victims)], config, SPEC,
                 tmp_path / "scratch")


def test_plan_resumes_from_newest_matching_checkpoint():
    members = [Member(f"r{i}", "d", i % 4, f"{i:04d}") for i in range(20)]
    sched = shard_schedule("cfg", 0, members, 4)
    assert plan_shard(sched, 3, set(sched.keys)).start_slice is None
    plan = plan_shard(sched, 3, set(sched.keys[:2]))
    assert (plan.start_slice, plan.resume_key, plan.version) == (2, sched.keys[1], 3)
    plan = plan_shard(sched, 3, set())
    assert plan.start_slice == 0 and plan.resume_key is None
    assert expected_retrain_fraction(4, 4) == pytest.approx((9 / 12) / 4)
    assert expected_speedup(8, 4) == pytest.approx(3 * 4 * 8 / 9)


@pytest.mark.parametrize("placement", ["late_slices", "dedicated_shards"])
def test_deletion_aware_placement_stays_exact(tmp_path, placement):
    rows = make_rows(120)
    for i, row in enumerate(rows):
        row["consent"] = 0.9 if i % 5 == 0 else 0.1  # every fifth record is likely to be deleted
    spec = DataSpec(id_column="id", label_column="label", feature_columns=SPEC.feature_columns,
                    prior_column="consent")
    config = SisaConfig(
        partition=PartitionConfig(shards=3, slices=3, seed=2, placement=placement),
        training=MLPConfig(epochs_per_slice=1, batch_size=8, hidden_sizes=(8,)),
    )
    sisa = Sisa.train(tmp_path / "store", rows, config, spec)
    likely = [r["id"] for r in rows if r["consent"] > 0.5]
    placed = sisa.records(likely)
    if placement == "late_slices":
        assert {p.slice for p in placed.values()} == {2}
    else:
        assert {p.shard for p in placed.values()} == {2}
    receipt = sisa.forget(likely[:3])
    if placement == "late_slices":
        assert all(a["start_slice"] == 2 for a in receipt.affected_shards)
    else:
        assert [a["shard"] for a in receipt.affected_shards] == [2]
    assert_exact(sisa, [r for r in rows if r["id"] not in likely[:3]], config, spec,
                 tmp_path / "scratch")


def test_dedicated_shards_refuses_a_group_split_by_its_prior(tmp_path, rows):
    for i, row in enumerate(rows):
        row["p"] = 0.9 if i % 7 == 0 else 0.0
    spec = DataSpec(id_column="id", label_column="label", feature_columns=SPEC.feature_columns,
                    group_column="user", prior_column="p")
    config = SisaConfig(partition=PartitionConfig(shards=3, slices=2, placement="dedicated_shards"))
    with pytest.raises(RecordError, match="groups mix both"):
        Sisa.train(tmp_path / "s", rows, config, spec)
    assert not (tmp_path / "s").exists()
