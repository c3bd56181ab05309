"""Durability: an acknowledged deletion survives a crash, and pending shards are never served."""

from __future__ import annotations

import pytest

from shard_store import ShardStore
from sisa import ShardTrainingError, Sisa
from sisa.training import shard_trainer

from .conftest import SPEC, assert_exact, writer_held


def test_crash_after_acknowledgement_is_recovered_on_open(tmp_path, rows, config, monkeypatch):
    sisa = Sisa.train(tmp_path / "store", rows, config, SPEC)
    victim_shard = 1
    victim = next(iter(sisa.live_records(victim_shard))).id

    # Crash: the retrain dies after the deletion was recorded (acknowledged).
    def boom(job, backend=None):
        raise RuntimeError("simulated crash during retraining")

    monkeypatch.setattr("sisa.training.shard_trainer.train_shard", boom)
    with pytest.raises(ShardTrainingError, match="shard 1"):
        sisa.forget([victim])
    sisa.close()
    monkeypatch.undo()

    reopened = Sisa.open(tmp_path / "store", recover=False)
    assert {s for d in reopened.pending() for s in d.shards} == {victim_shard}
    assert victim_shard not in reopened.servable()  # never served while pending
    assert reopened.ensemble().shards == [0, 2]
    assert not reopened.audit().ok
    assert reopened.clean_shards() == {0, 2}
    assert [p.record_digests for p in reopened.pending()] == [[reopened.id_digest(victim)]]
    reopened.close()

    recovered = Sisa.open(tmp_path / "store")  # recovery runs on open
    # Recovered by another process: the ids in clear are gone, their keyed digests stay.
    assert [r.record_digests for r in recovered.recovered_] == [[recovered.id_digest(victim)]]
    assert recovered.recovered_[0].record_ids == []
    assert recovered.recovered_[0].recovered
    assert recovered.deletions("pending") == []
    assert recovered.audit().ok
    assert_exact(recovered, [r for r in rows if r["id"] != victim], config, SPEC, tmp_path / "scratch")


def test_crash_between_checkpoint_write_and_swap(tmp_path, rows, config, monkeypatch):
    sisa = Sisa.train(tmp_path / "store", rows, config, SPEC)
    victim = rows[20]["id"]

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies just before the live swap

    monkeypatch.setattr(ShardStore, "commit", crash)
    with pytest.raises(KeyboardInterrupt):
        sisa.forget([victim])
    monkeypatch.undo()
    (sisa.root / "checkpoints" / ".tmp-leftover").mkdir()  # and a half-written directory
    sisa.close()
    recovered = Sisa.open(tmp_path / "store")
    assert not (recovered.root / "checkpoints" / ".tmp-leftover").exists()
    assert recovered.audit().ok
    assert_exact(recovered, [r for r in rows if r["id"] != victim], config, SPEC, tmp_path / "scratch")


def test_interrupted_add_is_completed_by_recovery(tmp_path, rows, config, monkeypatch):
    sisa = Sisa.train(tmp_path / "store", rows[:120], config, SPEC)

    def boom(job, backend=None):
        raise RuntimeError("crash")

    monkeypatch.setattr("sisa.training.shard_trainer.train_shard", boom)
    with pytest.raises(ShardTrainingError):
        sisa.add(rows[120:])
    sisa.close()
    monkeypatch.undo()
    recovered = Sisa.open(tmp_path / "store")
    assert recovered.audit().ok
    assert_exact(recovered, rows, config, SPEC, tmp_path / "scratch")


def test_transient_failure_is_retried(tmp_path, rows, config, monkeypatch):
    calls = {"n": 0}
    real = shard_trainer.train_shard

    def flaky(job, backend=None):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("transient")
        return real(job, backend)

    monkeypatch.setattr("sisa.training.shard_trainer.train_shard", flaky)
    report = Sisa.train(tmp_path / "store", rows, config, SPEC).training_report_
    assert report.retrained[0].attempts == 2
    assert all(r.attempts == 1 for r in report.retrained[1:])


def test_final_error_names_shard_and_carries_traceback(tmp_path, rows, config, monkeypatch):
    def boom(job, backend=None):
        raise ValueError(f"bad thing in shard {job.shard}")

    monkeypatch.setattr("sisa.training.shard_trainer.train_shard", boom)
    with pytest.raises(ShardTrainingError) as info:
        Sisa.train(tmp_path / "store", rows, config, SPEC)
    err = info.value
    assert err.shard == 0 and err.attempts == config.execution.max_retries + 1
    assert "Traceback" in err.traceback_text and "bad thing in shard 0" in str(err)
    import copy

    # Ray rebuilds exceptions in the driver through __reduce__; deepcopy takes the same path.
    again = copy.deepcopy(err)
    assert again.shard == 0 and again.traceback_text == err.traceback_text


def test_writers_are_serialised_by_the_store_lock(tmp_path, rows, config):
    import threading

    sisa = Sisa.train(tmp_path / "store", rows, config, SPEC)
    finished = threading.Event()

    def forget():
        with Sisa.open(tmp_path / "store") as other:  # a writer: opening it recovers first
            other.forget([rows[0]["id"]])
        finished.set()

    with writer_held(tmp_path / "store"):
        worker = threading.Thread(target=forget)
        worker.start()
        worker.join(timeout=1.0)
        assert not finished.is_set()  # blocked while the other writer holds the lock
        assert sisa.deletions("pending") == []  # and nothing was recorded yet
    worker.join(timeout=120)
    assert finished.is_set()
