"""The deletion lifecycle as separate calls: acknowledge (durable, at once, without waiting for a
writer), list what is pending, ask which shards are clean (from another thread or process), apply;
and a deletion acknowledged while another is being applied."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from sisa import RecordError, Sisa, UnknownRecordError

from .conftest import SPEC, assert_exact


def test_acknowledge_then_apply(tmp_path, rows, config):
    sisa = Sisa.train(tmp_path / "store", rows, config, SPEC)
    victim = next(sisa.store.live_records(1)).id
    slice_ = sisa.store.find_records([victim])[victim].slice
    request = sisa.request_deletion([victim])
    assert request.record_ids == [victim] and request.shards == [1]
    # Acknowledged: durable, nothing retrained yet, the shard no longer clean, and no registered
    # checkpoint (nor its files) derives from the record any more.
    assert [p.request_id for p in sisa.pending()] == [request.request_id]
    assert sisa.clean_shards() == {0, 2}
    assert 1 not in sisa.ensemble().shards
    assert [c.slice for c in sisa.store.checkpoints(1)] == list(range(slice_))
    assert sorted(p.name for p in (tmp_path / "store" / "checkpoints" / "shard-001").iterdir()) == \
        sorted((tmp_path / "store" / c.path).name for c in sisa.store.checkpoints(1))
    [receipt] = sisa.apply_pending()
    assert receipt.request_id == request.request_id and not receipt.recovered
    assert receipt.affected_shards[0]["start_slice"] == slice_
    assert sisa.pending() == [] and sisa.clean_shards() == {0, 1, 2}
    assert sisa.store.deletion(request.request_id).status == "applied"
    assert_exact(sisa, [r for r in rows if r["id"] != victim], config, SPEC, tmp_path / "scratch")


def test_bad_requests_change_nothing(tmp_path, rows, config):
    sisa = Sisa.train(tmp_path / "store", rows, config, SPEC)
    with pytest.raises(UnknownRecordError, match="'ghost'"):
        sisa.request_deletion([rows[0]["id"], "ghost"])
    with pytest.raises(RecordError, match="either record ids or a group"):
        sisa.request_deletion()
    with pytest.raises(RecordError, match="no record ids"):
        sisa.request_deletion([])
    assert sisa.pending() == [] and sisa.store.deleted_ids() == set()
    sisa.forget([rows[0]["id"]])
    again = sisa.request_deletion([rows[0]["id"]])
    assert again.request_id == "" and again.already_deleted == [rows[0]["id"]]


def test_acknowledgement_does_not_wait_for_a_writer(tmp_path, rows, config):
    sisa = Sisa.train(tmp_path / "store", rows, config, SPEC)
    victim = rows[5]["id"]
    held, release = threading.Event(), threading.Event()
    answer: dict[str, object] = {}

    def hold_the_writer_lock():
        with sisa.store.writer():  # a retrain in progress, say
            held.set()
            release.wait(timeout=60)

    def acknowledge():
        with Sisa.open(tmp_path / "store", recover=False) as other:
            answer["request"] = other.request_deletion([victim])

    holder = threading.Thread(target=hold_the_writer_lock)
    holder.start()
    held.wait(timeout=60)
    worker = threading.Thread(target=acknowledge)
    worker.start()
    worker.join(timeout=30)
    try:
        assert "request" in answer, "the acknowledgement waited for the writer"
        assert [p.record_ids for p in sisa.pending()] == [[victim]]
    finally:
        release.set()
        holder.join()
    [receipt] = sisa.apply_pending()
    assert receipt.recovered  # acknowledged by another process's manager, applied here
    assert_exact(sisa, [r for r in rows if r["id"] != victim], config, SPEC, tmp_path / "scratch")


def test_another_process_sees_which_shards_are_clean(tmp_path, rows, config):
    sisa = Sisa.train(tmp_path / "store", rows, config, SPEC)
    sisa.request_deletion([next(sisa.store.live_records(2)).id])
    code = ("import sys; from sisa import Sisa; "
            "s = Sisa.open(sys.argv[1], recover=False); print(sorted(s.clean_shards()))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "store")], capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "[0, 1]"


def test_a_deletion_acknowledged_during_a_retrain_is_applied_too(tmp_path, rows, config, monkeypatch):
    import sisa.unlearning as unlearning

    sisa = Sisa.train(tmp_path / "store", rows, config, SPEC)
    first = [next(sisa.store.live_records(0)).id, next(sisa.store.live_records(1)).id]
    late = [r.id for r in sisa.store.live_records(1)][-1]  # the shard still training
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
    ledger = {d.request_id: d for d in sisa.store.deletions()}
    assert receipt.request_id in ledger and acknowledged[0] in ledger
    assert all(d.status == "applied" for d in ledger.values())
    assert sisa.clean_shards() == {0, 1, 2} and sisa.audit().ok
    assert_exact(sisa, [r for r in rows if r["id"] not in {*first, late}], config, SPEC,
                 tmp_path / "scratch")
