"""Reading and validating input records: clear errors that name the offending rows."""

from __future__ import annotations

import json

import pytest

from sisa.config import DataSpec
from sisa.errors import RecordError
from sisa.records import load_records, records_from_rows

from .conftest import SPEC, make_rows, write_csv


def test_valid_rows_become_records(rows):
    records = records_from_rows(rows, SPEC)
    assert [r.id for r in records] == [r["id"] for r in rows]
    assert records[0].group == "u0" and records[0].target == "0"
    assert len(records[0].input) == 4


def test_digest_changes_with_content(rows):
    a = records_from_rows(rows[:1], SPEC)[0]
    changed = [{**rows[0], "f0": rows[0]["f0"] + 1.0}]
    assert records_from_rows(changed, SPEC)[0].digest != a.digest


def test_duplicate_ids_are_named_with_rows(rows):
    rows[5]["id"] = rows[2]["id"]
    with pytest.raises(RecordError, match=r"duplicate ids.*'r0002' \(positions 2, 5\)"):
        records_from_rows(rows, SPEC)


def test_empty_ids_and_missing_labels_are_reported_together(rows):
    rows[3]["id"] = "  "
    rows[7]["label"] = None
    with pytest.raises(RecordError) as info:
        records_from_rows(rows, SPEC)
    assert "empty ids" in str(info.value) and "positions: 3" in str(info.value)
    assert "missing labels" in str(info.value) and "7" in str(info.value)


def test_missing_column_names_the_columns(rows):
    spec = DataSpec(id_column="uid", label_column="label", feature_columns=("f0",))
    with pytest.raises(RecordError, match=r"no column.*'uid'"):
        records_from_rows(rows, spec)


def test_non_numeric_feature_is_named(rows):
    rows[4]["f1"] = "abc"
    with pytest.raises(RecordError, match=r"non-numeric values in feature column .f1. at positions: 4"):
        records_from_rows(rows, SPEC)


def test_csv_keeps_ids_as_strings(tmp_path):
    rows = [{"id": "007", "label": 1, "f0": 0.5, "f1": 1, "f2": 2, "f3": 3, "user": "010"},
            {"id": "7", "label": 0, "f0": 0.1, "f1": 1, "f2": 2, "f3": 3, "user": "10"}]
    path = write_csv(tmp_path / "data.csv", rows)
    records = load_records(path, SPEC)
    assert [r.id for r in records] == ["007", "7"]
    assert [r.group for r in records] == ["010", "10"]


def test_jsonl_and_parquet_load(tmp_path, rows):
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows[:10]))
    assert len(load_records(jsonl, SPEC)) == 10
    import datasets

    parquet = tmp_path / "data.parquet"
    datasets.Dataset.from_list(rows[:12]).to_parquet(str(parquet))
    assert len(load_records(parquet, SPEC)) == 12
    assert len(load_records(datasets.Dataset.from_list(rows[:5]), SPEC)) == 5


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(RecordError, match="does not exist"):
        load_records(tmp_path / "nope.csv", SPEC)
    bad = tmp_path / "data.txt"
    bad.write_text("x")
    with pytest.raises(RecordError, match=r"use a \.csv"):
        load_records(bad, SPEC)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"id": "a", "label": 1\nnot json\n')
    with pytest.raises(RecordError, match="cannot read"):
        load_records(broken, SPEC)


def test_text_records():
    spec = DataSpec(id_column="id", label_column="y", text_column="text")
    records = records_from_rows([{"id": "a", "y": "pos", "text": "good"},
                                 {"id": "b", "y": "neg", "text": ""}][:1], spec)
    assert records[0].input == "good"
    with pytest.raises(RecordError, match="empty texts in column 'text' at positions: 0"):
        records_from_rows([{"id": "b", "y": "neg", "text": ""}], spec)
    with pytest.raises(RecordError, match="non-text values in text column 'text' at positions: 0"):
        records_from_rows([{"id": "b", "y": "neg", "text": None}], spec)


def test_rows_fixture_is_valid():
    assert len(records_from_rows(make_rows(30), SPEC)) == 30
