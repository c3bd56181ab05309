"""The aggregator: soft voting is the mean of shard probabilities; hard voting is a majority."""

from __future__ import annotations

import numpy as np
import pytest

from sisa.api import Sisa
from sisa.ensemble import Ensemble

from .conftest import SPEC


def test_soft_voting_is_the_mean_of_shard_probabilities(tmp_path, rows, config):
    sisa, _ = Sisa.train(tmp_path / "store", rows, config, SPEC)
    _, inputs, _ = sisa.load_inputs(rows[:40])
    ens = sisa.ensemble()
    per_shard = ens.shard_proba(inputs)
    assert sorted(per_shard) == [0, 1, 2]
    np.testing.assert_allclose(ens.predict_proba(inputs), np.mean(list(per_shard.values()), axis=0))
    assert ens.predict_proba(inputs).sum(axis=1) == pytest.approx(np.ones(40))
    assert set(sisa.predict(inputs)) <= set(sisa.classes)


def test_hard_voting_majority_and_tie_break():
    a = np.array([[0.9, 0.1], [0.4, 0.6]])
    b = np.array([[0.6, 0.4], [0.45, 0.55]])
    c = np.array([[0.2, 0.8], [0.7, 0.3]])
    votes = Ensemble.aggregate({0: a, 1: b, 2: c}, "hard")
    np.testing.assert_allclose(votes, [[2 / 3, 1 / 3], [1 / 3, 2 / 3]])
    # Two shards tie 1-1: the mean probability decides.
    tie = Ensemble.aggregate({0: np.array([[0.9, 0.1]]), 1: np.array([[0.4, 0.6]])}, "hard")
    soft = Ensemble.aggregate({0: np.array([[0.9, 0.1]]), 1: np.array([[0.4, 0.6]])}, "soft")
    assert (tie + soft / 3).argmax() == 0


def test_hard_voting_store_predicts_the_majority(tmp_path, rows, config):
    hard = config.replace(voting="hard")
    sisa, _ = Sisa.train(tmp_path / "store", rows, hard, SPEC)
    _, inputs, _ = sisa.load_inputs(rows[:30])
    ens = sisa.ensemble()
    per_shard = ens.shard_proba(inputs)
    shard_votes = np.stack([p.argmax(1) for p in per_shard.values()])
    predicted = ens.predict(inputs)
    for i in range(len(inputs)):
        counts = np.bincount(shard_votes[:, i], minlength=3)
        assert counts[predicted[i]] == counts.max()


def test_evaluate_reports_ensemble_and_every_shard(tmp_path, rows, config):
    sisa, _ = Sisa.train(tmp_path / "store", rows, config, SPEC)
    result = sisa.evaluate(rows)
    assert result["examples"] == len(rows)
    assert set(result["shards"]) == {"0", "1", "2"}
    assert 0.5 < result["ensemble"]["accuracy"] <= 1.0  # well above chance (1/3) on training data
    assert 0.0 <= result["ensemble"]["macro_f1"] <= 1.0
