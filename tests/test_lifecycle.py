"""The deletion lifecycle as separate calls: acknowledge (durable, at once, without waiting for a
writer), list what is pending, ask which shards are clean (from another thread or process), apply;
and a deletion acknowledged while another is being applied."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from sisa import RecordError, Sisa, UnknownRecordError

from .conftest import SPEC, assert_exact, writer_held


def test_acknowledge_then_apply(tmp_path, rows, config):
    sisa = Sisa.train(tmp_path / "store", rows, config, SPEC)
    victim = next(sisa.live_records(1)).id
    slice_ = sisa.records([victim])[victim].slice
    request = sisa.request_deletion([victim])
    assert request.record_ids == [victim] and request.shards == [1]
    # Acknowledged: durable, nothing retrained yet, the shard no longer clean, and no registered
    # checkpoint (nor its files) derives from the record any more.
    assert [p.request_id for p in sisa.pending()] == [request.request_id]
    assert sisa.clean_shards() == {0, 2}
    assert 1 not in sisa.ensemble().shards
    assert [c.slice for c in sisa.checkpoints(1)] == list(range(slice_))
    assert sorted(p.name for p in (tmp_path / "store" / "checkpoints" / "shard-001").iterdir()) == \
        sorted((tmp_path / "store" / c.path).name for c in sisa.checkpoints(1))
    [receipt] = sisa.apply_pending()
    assert receipt.request_id == request.request_id and not receipt.recovered
    assert receipt.affected_shards[0]["start_slice"] == slice_
    assert sisa.pending() == [] and sisa.clean_shards() == {0, 1, 2}
    assert sisa.deletion(request.request_id).status == "applied"
    assert_exact(sisa, [r for r in rows if r["id"] != victim], config, SPEC, tmp_path / "scratch")


def test_bad_requests_change_nothing(tmp_path, rows, config):
    sisa = Sisa.train(tmp_path / "store", rows, config, SPEC)
    with pytest.raises(UnknownRecordError, match="'ghost'"):
        sisa.request_deletion([rows[0]["id"], "ghost"])
    with pytest.raises(RecordError, match="either record ids or a group"):
        sisa.request_deletion()
    with pytest.raises(RecordError, match="no record ids"):
        sisa.request_deletion([])
    assert sisa.pending() == [] and sisa.deletions() == [] and sisa.status().deleted_records == 0
    sisa.forget([rows[0]["id"]])
    again = sisa.request_deletion([rows[0]["id"]])
    assert again.request_id == "" and again.already_deleted == [rows[0]["id"]]


def test_acknowledgement_does_not_wait_for_a_writer(tmp_path, rows, config):
    sisa = Sisa.train(tmp_path / "store", rows, config, SPEC)
    victim = rows[5]["id"]
    answer: dict[str, object] = {}

    def acknowledge():
        with Sisa.open(tmp_path / "store", recover=False) as other:
            answer["request"] = other.request_deletion([victim])

    with writer_held(tmp_path / "store"):  # a retrain in progress, say
        worker = threading.Thread(target=acknowledge)
        worker.start()
        worker.join(timeout=30)
        assert "request" in answer, "the acknowledgement waited for the writer"
        assert [p.record_digests for p in sisa.pending()] == [[sisa.id_digest(victim)]]
    [receipt] = sisa.apply_pending()
    assert receipt.recovered  # acknowledged by another process's manager, applied here
    assert_exact(sisa, [r for r in rows if r["id"] != victim], config, SPEC, tmp_path / "scratch")


def test_another_process_sees_which_shards_are_clean(tmp_path, rows, config):
    sisa = Sisa.train(tmp_path / "store", rows, config, SPEC)
    sisa.request_deletion([next(sisa.live_records(2)).id])
    code = ("import sys; from sisa import Sisa; "
            "s = Sisa.open(sys.argv[1], recover=False); print(sorted(s.clean_shards()))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "store")], capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "[0, 1]"


def test_a_deletion_acknowledged_during_a_retrain_is_applied_too(tmp_path, rows, config, monkeypatch):
    import sisa.unlearning as unlearning

    sisa = Sisa.train(tmp_path / "store", rows, config, SPEC)
    first = [next(sisa.live_records(0)).id, next(sisa.live_records(1)).id]
    late = [r.id for r in sisa.live_records(1)][-1]  # the shard still training
    real = unlearning.run_jobs
    acknowledged: list[str] = []

    def jobs_with_a_deletion_midway(jobs, execution, backend=None):
        for result in real(jobs, execution, backend):
            if not acknowledged:  # another process acknowledges while shard 1 trains
                with Sisa.open(tmp_path / "store", recover=False) as other:
                    acknowledged.append(other.request_deletion([late]).request_id)
            yield result

    monkeypatch.setattr(unlearning, "run_jobs", jobs_with_a_deletion_midway)
    receipt = sisa.forget(first)
    ledger = {d.request_id: d for d in sisa.deletions()}
    assert receipt.request_id in ledger and acknowledged[0] in ledger
    assert all(d.status == "applied" for d in ledger.values())
    assert sisa.clean_shards() == {0, 1, 2} and sisa.audit().ok
    assert_exact(sisa, [r for r in rows if r["id"] not in {*first, late}], config, SPEC,
                 tmp_path / "scratch")


def test_a_deletion_acknowledged_while_a_store_is_created_is_not_trained_on(tmp_path, rows, config,
                                                                           monkeypatch):
    import sisa.unlearning as unlearning

    victim = rows[7]["id"]
    real = unlearning.DeletionManager.update

    def acknowledged_first(self, *args, **kwargs):
        with Sisa.open(tmp_path / "store", recover=False) as other:  # the store is complete now
            other.request_deletion([victim])
        monkeypatch.undo()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(unlearning.DeletionManager, "update", acknowledged_first)
    sisa = Sisa.train(tmp_path / "store", rows, config, SPEC)
    monkeypatch.undo()
    assert sisa.pending() == [] and sisa.audit().ok
    assert_exact(sisa, [r for r in rows if r["id"] != victim], config, SPEC, tmp_path / "scratch")


def test_a_deletion_between_planning_and_the_jobs_is_planned_again(tmp_path, rows, config, monkeypatch):
    """The jobs use the records they were planned with, and a resume checkpoint that a deletion
    removed meanwhile sends its shard back to planning instead of failing the run."""
    import sisa.unlearning as unlearning

    sisa = Sisa.train(tmp_path / "store", rows, config, SPEC)
    in_slice = {(r.shard, r.slice): r.id for r in sisa.live_records()}
    first = [in_slice[(0, 1)], in_slice[(1, 2)], in_slice[(2, 1)]]
    # While shard 0's job is built: a deletion removes the checkpoint shard 1 resumes from (its
    # slice 1), and another changes shard 2's records after its resume checkpoint (slice 0).
    late = [in_slice[(1, 0)], in_slice[(2, 2)]]
    real = unlearning.read_checkpoint
    injected: list[str] = []

    def read_with_a_deletion(store, row):
        if not injected:  # shard 0's job reads its resume checkpoint: the others are not built yet
            with Sisa.open(tmp_path / "store", recover=False) as other:
                injected.append(other.request_deletion(late).request_id)
        return real(store, row)

    monkeypatch.setattr(unlearning, "read_checkpoint", read_with_a_deletion)
    receipt = sisa.forget(first)
    monkeypatch.undo()
    assert {d.request_id for d in sisa.deletions()} == {receipt.request_id, *injected}
    assert sisa.pending() == [] and sisa.audit().ok
    assert_exact(sisa, [r for r in rows if r["id"] not in {*first, *late}], config, SPEC,
                 tmp_path / "scratch")
