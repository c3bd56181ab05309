"""Property tests of the pure partitioner: placement depends only on a record's own id/group."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sisa.partition import order_key, place, place_all, shard_of, slice_of
from sisa.schedule import Member, shard_schedule

ids = st.text(min_size=1, max_size=20)
shards = st.integers(min_value=1, max_value=16)
slices = st.integers(min_value=1, max_value=8)
seeds = st.integers(min_value=0, max_value=2**32)


@given(st.sets(ids, min_size=1, max_size=60), shards, slices, seeds)
def test_every_record_lands_in_exactly_one_valid_cell(record_ids, s, r, seed):
    placements = {i: place(i, None, seed=seed, shards=s, slices=r) for i in record_ids}
    for p in placements.values():
        assert 0 <= p.shard < s and 0 <= p.slice < r
    # A schedule built from all shards holds every record exactly once.
    held: list[str] = []
    for shard in range(s):
        members = [Member(i, "d", p.slice, p.order) for i, p in placements.items() if p.shard == shard]
        held += [m.id for bucket in shard_schedule("cfg", shard, members, r).slices for m in bucket]
    assert sorted(held) == sorted(record_ids)


@given(ids, st.sets(ids, max_size=40), shards, slices, seeds)
def test_placement_is_independent_of_other_records(record_id, others, s, r, seed):
    alone = place(record_id, None, seed=seed, shards=s, slices=r)
    for other in others:  # computing other placements (in any order) never changes this one
        place(other, None, seed=seed, shards=s, slices=r)
    assert place(record_id, None, seed=seed, shards=s, slices=r) == alone


@given(st.lists(st.tuples(ids, st.sampled_from(["alice", "bob", "carol", "dan"])), min_size=1,
                max_size=60, unique_by=lambda t: t[0]), shards, slices, seeds)
def test_groups_never_straddle_shards(pairs, s, r, seed):
    shard_of_group: dict[str, int] = {}
    for record_id, group in pairs:
        shard = place(record_id, group, seed=seed, shards=s, slices=r).shard
        assert shard_of_group.setdefault(group, shard) == shard


@settings(max_examples=50)
@given(st.sets(ids, min_size=2, max_size=40), shards, slices, seeds, st.data())
def test_removing_a_record_moves_nothing_else_and_keeps_earlier_keys(record_ids, s, r, seed, data):
    victim = data.draw(st.sampled_from(sorted(record_ids)))
    placed = {i: place(i, None, seed=seed, shards=s, slices=r) for i in record_ids}
    target = placed[victim]

    def schedule(keep):
        members = [Member(i, "d", p.slice, p.order) for i, p in placed.items()
                   if p.shard == target.shard and i in keep]
        return shard_schedule("cfg", target.shard, members, r)

    before = schedule(record_ids)
    after = schedule(record_ids - {victim})
    # Checkpoints before the victim's slice keep their keys (reusable); later ones change.
    assert before.keys[: target.slice] == after.keys[: target.slice]
    assert all(b != a for b, a in zip(before.keys[target.slice:], after.keys[target.slice:], strict=False))
    # The order of everyone else inside every slice is unchanged.
    for k in range(r):
        assert [m.id for m in before.slices[k] if m.id != victim] == [m.id for m in after.slices[k]]


def test_seed_changes_placement():
    a = [place(f"id{i}", None, seed=1, shards=8, slices=4) for i in range(100)]
    b = [place(f"id{i}", None, seed=2, shards=8, slices=4) for i in range(100)]
    assert a != b


def test_shards_are_roughly_balanced():
    counts = [0] * 8
    for i in range(8000):
        counts[place(f"rec-{i}", None, seed=0, shards=8, slices=1).shard] += 1
    assert min(counts) > 850 and max(counts) < 1150  # 1000 expected per shard


@given(st.sets(ids, min_size=1, max_size=40), st.integers(2, 8), st.integers(2, 8), seeds,
       st.booleans())
def test_deletion_aware_placement_separates_likely_records(record_ids, s, r, seed, likely):
    for i in record_ids:
        late = place(i, None, seed=seed, shards=s, slices=r, likely=likely, strategy="late_slices",
                     late_slices=1)
        assert (late.slice == r - 1) if likely else (late.slice < r - 1)
        dedicated = place(i, None, seed=seed, shards=s, slices=r, likely=likely,
                          strategy="dedicated_shards", dedicated_shards=1)
        assert (dedicated.shard == s - 1) if likely else (dedicated.shard < s - 1)


@given(st.lists(st.tuples(ids, st.one_of(st.none(), ids), st.booleans()), max_size=40),
       st.integers(2, 8), st.integers(2, 8), seeds,
       st.sampled_from(["uniform", "late_slices", "dedicated_shards"]))
def test_placing_many_at_once_equals_the_keyed_draws_record_by_record(records, s, r, seed, strategy):
    """`place_all` (what `place` and the ingestion use) draws what the single-record hashes
    `shard_of`, `slice_of` and `order_key` give, strategy by strategy."""
    together = place_all([i for i, _, _ in records], [g for _, g, _ in records],
                         [f for _, _, f in records], seed=seed, shards=s, slices=r,
                         strategy=strategy, late_slices=1, dedicated_shards=1)
    expected = []
    for i, g, likely in records:
        unit = g if g is not None else i
        shard, slice_ = shard_of(unit, seed, s), slice_of(i, seed, r)
        if strategy == "late_slices":
            slice_ = r - 1 if likely else slice_of(i, seed, r - 1)
        if strategy == "dedicated_shards":
            shard = s - 1 if likely else shard_of(unit, seed, s - 1)
        expected.append((shard, slice_, order_key(i, seed)))
    assert together == expected
    assert [(p.shard, p.slice, p.order) for p in (
        place(i, g, likely=f, seed=seed, shards=s, slices=r, strategy=strategy)
        for i, g, f in records)] == expected


@given(st.lists(st.tuples(ids, st.integers(0, 3)), max_size=40, unique_by=lambda t: t[0]))
def test_schedule_digests_equal_the_digest_of_each_cumulative_set(pairs):
    from sisa.schedule import record_set_digest

    members = [Member(i, f"d{i}", s, i) for i, s in pairs]
    sched = shard_schedule("cfg", 0, members, 4)
    for k in range(4):
        assert sched.set_digests[k] == record_set_digest([m for m in members if m.slice <= k])
