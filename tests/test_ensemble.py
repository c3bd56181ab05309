"""The aggregator: soft voting is the mean of shard probabilities; hard voting is a majority, and
`predict` is always the argmax of `predict_proba`."""

from __future__ import annotations

import numpy as np
import pytest

from sisa import ClassificationTask, Sisa

from .conftest import SPEC


def test_soft_voting_is_the_mean_of_shard_probabilities(tmp_path, rows, config):
    sisa = Sisa.train(tmp_path / "store", rows, config, SPEC)
    _, inputs, _ = sisa.load_inputs(rows[:40])
    per_shard = sisa.ensemble().shard_proba(inputs)
    assert sorted(per_shard) == [0, 1, 2]
    np.testing.assert_allclose(sisa.predict_proba(inputs), np.mean(list(per_shard.values()), axis=0))
    assert sisa.predict_proba(inputs).sum(axis=1) == pytest.approx(np.ones(40))
    assert set(sisa.predict(inputs)) <= set(sisa.classes_)


def test_hard_voting_majority_and_tie_break():
    a = np.array([[0.9, 0.1], [0.4, 0.6]])
    b = np.array([[0.6, 0.4], [0.45, 0.55]])
    c = np.array([[0.2, 0.8], [0.7, 0.3]])
    proba = ClassificationTask.predict_proba({0: a, 1: b, 2: c}, "hard")
    assert list(proba.argmax(1)) == [0, 1]  # two of three shards vote for each
    assert proba.sum(axis=1) == pytest.approx([1.0, 1.0])
    # Two shards tie 1-1: the mean probability decides, in predict and predict_proba alike.
    tie = {0: np.array([[0.9, 0.1]]), 1: np.array([[0.4, 0.6]])}
    assert ClassificationTask.predict(tie, "hard")[0] == 0
    assert ClassificationTask.predict_proba(tie, "hard").argmax() == 0


def test_hard_voting_store_predicts_the_majority_and_agrees_with_its_probabilities(tmp_path, rows, config):
    hard = config.replace(voting="hard")
    sisa = Sisa.train(tmp_path / "store", rows, hard, SPEC)
    _, inputs, _ = sisa.load_inputs(rows[:30])
    per_shard = sisa.ensemble().shard_proba(inputs)
    shard_votes = np.stack([p.argmax(1) for p in per_shard.values()])
    predicted = [sisa.classes_.index(p) for p in sisa.predict(inputs)]
    assert predicted == list(sisa.predict_proba(inputs).argmax(1))
    for i in range(len(inputs)):
        counts = np.bincount(shard_votes[:, i], minlength=3)
        assert counts[predicted[i]] == counts.max()


def test_evaluate_reports_ensemble_and_every_shard(tmp_path, rows, config):
    sisa = Sisa.train(tmp_path / "store", rows, config, SPEC)
    result = sisa.evaluate(rows)
    assert result.examples == len(rows)
    assert set(result.shards) == {"0", "1", "2"}
    assert 0.5 < result.ensemble.accuracy <= 1.0  # well above chance (1/3) on training data
    assert 0.0 <= result.ensemble.macro_f1 <= 1.0
    assert result.to_dict()["ensemble"]["accuracy"] == result.ensemble.accuracy


def test_the_ensemble_reloads_when_the_live_checkpoints_change(tmp_path, rows, config):
    sisa = Sisa.train(tmp_path / "store", rows, config, SPEC)
    first = sisa.ensemble()
    assert sisa.ensemble() is first  # nothing changed: the same models
    victim = next(sisa.live_records(1)).id
    other = Sisa.open(tmp_path / "store")  # another process forgets
    other.forget([victim])
    other.close()
    second = sisa.ensemble()
    assert second is not first and second.version != first.version
    assert second.version == sisa.status().model_version
