"""Columnar ingestion: files read in chunks through Arrow give exactly the records the same rows give
in memory; problems anywhere in a file are named by row, and leave nothing written; prediction
streams its output."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import sisa.sources
from sisa.api import Sisa
from sisa.cli import app
from sisa.errors import RecordError
from sisa.records import Ingest, load_records, records_from_rows

from .conftest import SPEC, make_rows, small_config, store_snapshot, write_csv

COLUMNS = ["--id-column", "id", "--label-column", "label", "--group-column", "user",
           "--feature-columns", "f0,f1,f2,f3"]


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of a few hundred bytes, so a small file is read in many."""
    monkeypatch.setattr(sisa.sources, "CHUNK_BYTES", 600)
    monkeypatch.setattr(sisa.sources, "CHUNK_ROWS", 7)


def records_as_tuples(records):
    return [(r.id, r.group, r.target, r.input, r.digest, r.input_digest, r.features) for r in records]


def test_a_csv_read_in_many_chunks_gives_the_records_of_its_rows(tmp_path, small_chunks):
    rows = make_rows(120)
    path = write_csv(tmp_path / "data.csv", rows)
    chunks = list(Ingest(path, SPEC))
    assert len(chunks) > 5  # the chunked path is what is tested
    from_file = [r for batch in chunks for r in batch.records()]
    assert records_as_tuples(from_file) == records_as_tuples(records_from_rows(rows, SPEC))


def test_parquet_arrow_tables_and_datasets_give_the_same_records(tmp_path, small_chunks):
    import datasets

    rows = make_rows(40)
    expected = records_as_tuples(records_from_rows(rows, SPEC))
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, tmp_path / "data.parquet")
    assert records_as_tuples(load_records(tmp_path / "data.parquet", SPEC)) == expected
    assert records_as_tuples(load_records(table, SPEC)) == expected
    assert records_as_tuples(load_records(datasets.Dataset.from_list(rows), SPEC)) == expected


def test_duplicates_and_bad_values_in_later_chunks_are_named_by_row(tmp_path, small_chunks):
    rows = make_rows(60)
    rows[55]["id"] = rows[3]["id"]  # a duplicate far from its first occurrence
    rows[41]["f2"] = "n/a"  # text in a numeric column, in a later chunk
    path = write_csv(tmp_path / "data.csv", rows)
    with pytest.raises(RecordError) as info:
        load_records(path, SPEC)
    message = str(info.value)
    # CSV lines: the header is line 1, data row i is line i + 2
    assert f"duplicate ids in column 'id': '{rows[3]['id']}' (lines 5, 57)" in message
    assert "missing or non-numeric values in feature column 'f2' at lines: 43" in message


def test_numbers_arrow_does_not_parse_are_read_as_python_reads_them(tmp_path, small_chunks):
    rows = make_rows(30)
    path = tmp_path / "data.csv"
    write_csv(path, rows)
    text = path.read_text().replace(f"{rows[20]['f1']!r}", " 2.5 ", 1)  # Python's float() takes it
    path.write_text(text)
    records = {r.id: r for r in load_records(path, SPEC)}
    assert records[rows[20]["id"]].input[1] == 2.5


def test_json_lines_whose_types_change_midway_are_read_on_in_python(tmp_path, small_chunks):
    rows = make_rows(50)
    path = tmp_path / "data.jsonl"
    lines = [json.dumps(r) for r in rows]
    lines[45] = json.dumps({**rows[45], "user": 7})  # a number where the column held text
    path.write_text("\n".join(lines) + "\n")
    got = {r.id: r for r in load_records(path, SPEC)}
    expected = {r.id: r for r in records_from_rows([*rows[:45], {**rows[45], "user": 7}, *rows[46:]], SPEC)}
    assert records_as_tuples(got.values()) == records_as_tuples(expected.values())
    assert got[rows[45]["id"]].group == "7"


def test_bad_input_at_the_end_of_a_large_file_leaves_no_store(tmp_path, small_chunks):
    rows = make_rows(90)
    rows[-1]["label"] = None
    path = write_csv(tmp_path / "data.csv", rows)
    with pytest.raises(RecordError, match="missing labels in column 'label' at lines: 91"):
        Sisa.train(tmp_path / "new", path, small_config(), SPEC)
    assert not (tmp_path / "new").exists()
    made = tmp_path / "made"
    made.mkdir()
    with pytest.raises(RecordError):
        Sisa.train(made, path, small_config(), SPEC)
    assert list(made.iterdir()) == []  # a directory the user made: left as it was, empty


def test_bad_input_at_the_end_of_an_added_file_writes_nothing(tmp_path, small_chunks):
    sisa = Sisa.train(tmp_path / "store", make_rows(60), small_config(), SPEC)
    before = store_snapshot(tmp_path / "store")
    new = make_rows(40, prefix="n")
    new[-1]["f0"] = float("nan")
    with pytest.raises(RecordError, match="feature column 'f0' at lines: 41"):
        sisa.add(write_csv(tmp_path / "new.csv", new))
    assert store_snapshot(tmp_path / "store") == before
    report = sisa.add(write_csv(tmp_path / "good.csv", make_rows(40, prefix="g")))
    assert report.ingest_seconds > 0 and sisa.status().live_records == 100


def test_predict_streams_to_its_output_and_writes_nothing_for_bad_input(tmp_path, small_chunks):
    runner = CliRunner()
    store = str(tmp_path / "store")
    data = str(write_csv(tmp_path / "t.csv", make_rows(90)))
    train = runner.invoke(app, ["train", "--store", store, "--data", data, *COLUMNS, "--shards", "2",
                                "--slices", "2", "--epochs", "1", "--no-progress"])
    assert train.exit_code == 0, train.output
    test_rows = make_rows(40, seed=3, prefix="q")
    out = tmp_path / "predictions.jsonl"
    queries = str(write_csv(tmp_path / "q.csv", test_rows))
    done = runner.invoke(app, ["predict", "--store", store, "--data", queries, "--output", str(out)])
    assert done.exit_code == 0, done.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    with Sisa.open(store, recover=False, read_only=True) as sisa:
        ids, inputs, _ = sisa.load_inputs(test_rows)
        expected = sisa.predict(inputs)
    assert [(x["id"], x["prediction"]) for x in lines] == list(zip(ids, expected, strict=True))
    test_rows[-1]["f1"] = "n/a"
    out.unlink()
    bad_file = str(write_csv(tmp_path / "b.csv", test_rows))
    bad = runner.invoke(app, ["predict", "--store", store, "--data", bad_file, "--output", str(out)])
    assert bad.exit_code == 1 and "feature column 'f1' at lines: 41" in bad.output
    assert not out.exists() and not list(tmp_path.glob(".predictions.jsonl*"))


def test_an_empty_csv_and_a_header_only_csv_say_so(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(RecordError, match="the file is empty"):
        load_records(tmp_path / "empty.csv", SPEC)
    (tmp_path / "header.csv").write_text("id,label,user,f0,f1,f2,f3\n")
    with pytest.raises(RecordError, match="no records in the input"):
        load_records(tmp_path / "header.csv", SPEC)


def test_the_process_set_up_makes_torch_deterministic():
    import torch

    from sisa.training.shard_trainer import setup_process

    assert setup_process(1, "cpu") == "cpu"
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.is_deterministic_algorithms_warn_only_enabled()  # on the CPU: warn, never fail
    assert torch.get_num_threads() == 1


def test_a_column_some_rows_lack_is_missing_in_those_rows(tmp_path):
    rows = make_rows(12)
    del rows[0]["user"]  # the first JSON line lacks the (optional) group: the column still exists
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = {r.id: r for r in load_records(path, SPEC)}
    assert records[rows[0]["id"]].group is None and records[rows[1]["id"]].group == "u0"
    del rows[5]["label"]  # a row without its label, in a list of dicts
    with pytest.raises(RecordError, match="missing labels in column 'label' at positions: 5"):
        records_from_rows(rows, SPEC)
