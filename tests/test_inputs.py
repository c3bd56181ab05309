"""Bad input values give one clean error line and change nothing: option values, labels, JSON value
types, partitions the data cannot fill, extra columns, unreadable files; property tests drive the
CLI with arbitrary values and check it never crashes and never touches a store when it fails."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from sisa import cli
from sisa.api import Sisa
from sisa.cli import app
from sisa.config import DataSpec, PartitionConfig
from sisa.errors import ConfigError, RecordError
from sisa.records import (
    check_partition,
    empty_shards,
    load_records,
    records_from_rows,
    refuse_new_columns,
    unused_columns,
)
from sisa.tasks import ClassificationTask

from .conftest import SPEC, make_rows, small_config, store_snapshot, write_csv

runner = CliRunner()
COLUMNS = ["--id-column", "id", "--label-column", "label", "--feature-columns", "f0,f1,f2,f3",
           "--group-column", "user"]
TRAIN = [*COLUMNS, "--shards", "2", "--slices", "1", "--epochs", "1", "--hidden-sizes", "4",
         "--no-progress"]
ROOT = Path(__file__).resolve().parents[1]


def invoke(*args: str) -> Any:
    return runner.invoke(app, list(args))


def assert_no_crash(result: Any) -> None:
    """Exit 0, 1 or 2 through the CLI's own handling: no exception escaped, no traceback shown,
    and a failure says why on stderr, starting with `error:`."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code in (0, 1, 2), result.output
    assert "Traceback" not in result.output
    if result.exit_code != 0:
        assert result.stderr.startswith("error: ") or result.stderr == "", result.stderr


def assert_clean_error(result: Any, code: int = 1, *fragments: str) -> str:
    """The command failed with `code`, printing one `error:` line (and at most a `hint:` line)."""
    assert_no_crash(result)
    assert result.exit_code == code, result.output
    lines = result.stderr.splitlines()
    assert lines and lines[0].startswith("error: "), result.stderr
    assert len(lines) <= 2 and all(line.startswith("hint: ") for line in lines[1:]), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """One tiny store for the module (30 records, 3 users, 2 shards, 1 slice), and its data."""
    root = tmp_path_factory.mktemp("inputs")
    data = write_csv(root / "train.csv", make_rows(30))
    store = root / "store"
    result = invoke("train", "--store", str(store), "--data", str(data), *TRAIN)
    assert result.exit_code == 0, result.output
    return store, data


@pytest.fixture
def store(trained, tmp_path) -> Path:
    """A private copy of the module's store, for a test whose command may change it."""
    return Path(shutil.copytree(trained[0], tmp_path / "store"))


# 1. Float options: finite and in range; JSON output: never bare NaN ------------------------------

# The CLI's messages name its flags, not the config's field names.
BAD_FLOATS = [
    ("--learning-rate", "inf", "--learning-rate must be a finite number, got inf"),
    ("--learning-rate", "nan", "--learning-rate must be a finite number, got nan"),
    ("--learning-rate", "1e300", "--learning-rate must be > 0 and <= 10"),
    ("--learning-rate", "0", "--learning-rate must be > 0 and <= 10"),
    ("--weight-decay", "-inf", "--weight-decay must be a finite number, got -inf"),
    ("--weight-decay", "5000", "--weight-decay * --learning-rate must be <= 1"),
    ("--prior-threshold", "nan", "--prior-threshold must be a finite number, got nan"),
    ("--prior-threshold", "-inf", "--prior-threshold must be a finite number, got -inf"),
    ("--cpus-per-shard", "nan", "--cpus-per-shard must be a finite number, got nan"),
    ("--cpus-per-shard", "1.5", "--cpus-per-shard must be a whole number when above 1"),
    ("--gpus-per-shard", "-0.5", "--gpus-per-shard must be >= 0, got -0.5"),
]


@pytest.mark.parametrize(("flag", "value", "message"), BAD_FLOATS, ids=[f"{f}={v}" for f, v, _ in BAD_FLOATS])
def test_float_options_must_be_finite_and_in_range(trained, tmp_path, flag, value, message):
    result = invoke("train", "--store", str(tmp_path / "s"), "--data", str(trained[1]), *TRAIN,
                    f"{flag}={value}")
    assert_clean_error(result, 1, message)
    assert not (tmp_path / "s").exists()


def test_json_output_is_valid_json_even_for_non_finite_numbers(capsys):
    payload = {"p": [math.nan, math.inf, -math.inf, 0.5], "nested": {"x": (np.float32("nan"), 1)},
               "array": np.array([np.nan, 2.0]), "ok": True, "n": 3, "name": "nan"}
    cli._emit(True, payload)
    text = capsys.readouterr().out

    def refuse(constant: str) -> None:
        raise AssertionError(f"bare {constant} in JSON output")

    assert json.loads(text, parse_constant=refuse) == {
        "p": [None, None, None, 0.5], "nested": {"x": [None, 1]}, "array": [None, 2.0], "ok": True,
        "n": 3, "name": "nan"}


def test_predict_json_of_a_diverged_model_prints_null(trained, monkeypatch):
    store, data = trained

    def diverged(self: Sisa, inputs: list[Any]) -> np.ndarray:
        return np.full((len(inputs), len(self.classes_)), np.nan)

    monkeypatch.setattr(Sisa, "_proba", diverged)
    result = invoke("predict", "--store", str(store), "--data", str(data), "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout, parse_constant=lambda c: pytest.fail(f"bare {c} in the output"))
    assert len(rows) == 30 and all(v is None for r in rows for v in r["probabilities"].values())


# 2. A stray text label among numeric ones ---------------------------------------------------------

def test_a_stray_text_label_among_numbers_is_refused_with_its_record_and_row():
    rows = make_rows(12)
    rows[5]["label"] = "cat"
    with pytest.raises(RecordError) as info:
        records_from_rows(rows, SPEC)
    assert "labels in column 'label' mix numbers and text: text label(s) 'cat' (record 'r0005', " \
           "position 5) among 11 numeric ones" in str(info.value)
    words = [{**row, "label": ["pos", "neg"][i % 2]} for i, row in enumerate(make_rows(12))]
    words[3]["label"] = 7  # a stray number among text labels is named the same way
    with pytest.raises(RecordError, match=r"numeric label\(s\) '7' \(record 'r0003', position 3\)"):
        records_from_rows(words, SPEC)
    assert {r.target for r in records_from_rows(words[:3], SPEC)} == {"pos", "neg"}  # text only: fine
    with pytest.raises(RecordError, match="labels mix numbers and text: 'cat' among numeric ones"):
        ClassificationTask.fit(["0", "1", "2", "cat"])


def test_a_stray_text_label_in_a_csv_is_refused_by_train(tmp_path):
    rows = make_rows(30)
    rows[7]["label"] = "cat"
    data = write_csv(tmp_path / "train.csv", rows)
    result = invoke("train", "--store", str(tmp_path / "s"), "--data", str(data), *TRAIN)
    assert_clean_error(result, 1, "'cat' (record 'r0007', line 9)")
    assert not (tmp_path / "s" / "store.db").exists()


# 3. Booleans, lists and objects are neither numbers nor text --------------------------------------

PRIOR_SPEC = DataSpec(id_column="id", label_column="label", feature_columns=("f0", "f1", "f2", "f3"),
                      group_column="user", prior_column="prior")
# Named by kind: a message never quotes a record's content.
ODD_VALUES = [("label", True, "boolean"), ("label", False, "boolean"),
              ("id", True, "boolean"), ("user", [1, 2], "list"),
              ("prior", False, "boolean"), ("f2", True, "boolean"),
              ("f0", {"a": 1}, "object"), ("label", [0], "list")]


@pytest.mark.parametrize(("column", "value", "shown"), ODD_VALUES,
                         ids=[f"{c}={v!r}" for c, v, _ in ODD_VALUES])
def test_booleans_lists_and_objects_are_refused_naming_column_and_record(column, value, shown):
    rows = [{**row, "prior": 0.1} for row in make_rows(6)]
    rows[4][column] = value
    with pytest.raises(RecordError) as info:
        records_from_rows(rows, PRIOR_SPEC)
    record = "position 4" if column == "id" else "record 'r0004' (position 4)"
    assert f"column {column!r} holds values that are neither numbers nor text" in str(info.value)
    assert f"{record}: {shown}" in str(info.value)


def test_json_booleans_are_refused_and_numbers_and_strings_still_read(tmp_path):
    rows = make_rows(6)
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({**r, "label": r["label"] == 1}) + "\n" for r in rows))
    with pytest.raises(RecordError, match="column 'label' holds values that are neither numbers nor "
                                          r"text.*record 'r0000' \(line 1\): boolean,"):
        load_records(path, SPEC)
    path.write_text("".join(json.dumps({**r, "id": i, "label": str(r["label"])}) + "\n"
                            for i, r in enumerate(rows)))
    assert [r.id for r in load_records(path, SPEC)] == [str(i) for i in range(6)]


def test_a_json_boolean_label_is_refused_by_train(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({**r, "label": r["label"] == 1}) + "\n" for r in make_rows(30)))
    result = invoke("train", "--store", str(tmp_path / "s"), "--data", str(path), *TRAIN)
    assert_clean_error(result, 1, "column 'label'", "record 'r0000' (line 1): boolean,")


def test_features_beyond_float32_are_refused():
    rows = make_rows(6)
    rows[2]["f1"] = 1e300  # finite, but the model computes in float32: it would be inf
    with pytest.raises(RecordError, match=r"beyond float32's range .* feature column 'f1' at positions: 2"):
        records_from_rows(rows, SPEC)


# 4. A partition the data cannot fill --------------------------------------------------------------

def test_more_shards_than_records_or_groups_is_refused():
    ungrouped = DataSpec(id_column="id", label_column="label", feature_columns=("f0",))
    five = records_from_rows(make_rows(5), ungrouped)
    with pytest.raises(ConfigError, match=r"shards=20 is more than the data can fill: there are 5 "
                                          r"records; give shards <= 5"):
        check_partition(five, small_config(shards=20))
    check_partition(five, PartitionConfig(shards=5, slices=5))
    with pytest.raises(ConfigError, match=r"slices=6 is more than the 5 records"):
        check_partition(five, PartitionConfig(shards=1, slices=6))
    grouped = records_from_rows(make_rows(30), SPEC)  # 3 users: a user stays in one shard
    with pytest.raises(ConfigError, match=r"30 records in 3 placement units \(3 groups"):
        check_partition(grouped, small_config(shards=4))
    check_partition(grouped, small_config(shards=3))


def test_empty_shards_are_the_ones_no_record_was_placed_in():
    assert empty_shards([0, 0, 2], 4) == [1, 3]
    assert empty_shards([], 2) == [0, 1]
    assert empty_shards([1, 0], 2) == []


def test_train_refuses_more_shards_than_records(tmp_path):
    data = write_csv(tmp_path / "train.csv", make_rows(5))
    args = [a for a in TRAIN if a not in ("--group-column", "user")]
    result = invoke("train", "--store", str(tmp_path / "s"), "--data", str(data), *args, "--shards=20")
    assert_clean_error(result, 1, "there are 5 records")


# 5. Columns the data spec does not read -----------------------------------------------------------

def test_unused_columns_are_found_in_rows_and_tables():
    rows = [{**r, "note": "x"} for r in make_rows(3)]
    rows[1]["late"] = 1  # rows need not share keys: their union counts
    assert unused_columns(rows, SPEC) == ["note", "late"]
    assert unused_columns(make_rows(3), SPEC) == []
    import datasets

    table = datasets.Dataset.from_list([{**r, "late": 1} for r in rows])
    assert unused_columns(table, SPEC) == ["note", "late"]
    with pytest.raises(RecordError, match="input has column\\(s\\) 'late' that the store's data spec "
                                          "does not read"):
        refuse_new_columns(rows, SPEC, known=["note"])
    refuse_new_columns(rows, SPEC, known=["note", "late"])


def test_add_refuses_a_column_the_store_does_not_read(store, tmp_path):
    new = write_csv(tmp_path / "new.csv", [{**r, "extra": 1} for r in make_rows(3, prefix="n")])
    before = store_snapshot(store)
    result = invoke("add", "--store", str(store), "--data", str(new), "--no-progress")
    assert_clean_error(result, 1, "'extra'")
    assert store_snapshot(store) == before


# 6. A non-empty directory that is not a store ------------------------------------------------------

def test_train_into_a_non_empty_directory_is_refused_and_leaves_it_as_it_was(trained, tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me\n")
    before = store_snapshot(target)
    result = invoke("train", "--store", str(target), "--data", str(trained[1]), *TRAIN)
    assert_clean_error(result, 1, "is not empty and holds no store")
    assert store_snapshot(target) == before


# 7. Unreadable files and odd --store paths: an error line, no traceback ----------------------------

@pytest.mark.parametrize("kind", ["missing", "directory", "latin-1"])
def test_an_unreadable_ids_file_is_a_usage_error(store, tmp_path, kind):
    path = {"missing": tmp_path / "nothing.txt", "directory": tmp_path}[kind] if kind != "latin-1" \
        else tmp_path / "ids.txt"
    if kind == "latin-1":
        path.write_bytes("r0001\ncaf\u00e9\n".encode("latin-1"))
    before = store_snapshot(store)
    result = invoke("forget", "--store", str(store), "--ids-file", str(path), "--no-progress")
    reason = {"missing": "No such file or directory", "directory": "Is a directory",
              "latin-1": "it is not UTF-8 text (byte 0xe9 at offset 9); save it as UTF-8"}[kind]
    assert_clean_error(result, 2, "cannot read ids file", reason)
    assert store_snapshot(store) == before


def test_a_bom_does_not_hide_the_first_id_and_only_newlines_end_lines(store, tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_bytes("\ufeffr0001\r\nr0002\n\n".encode())
    result = invoke("forget", "--store", str(store), "--ids-file", str(ids), "--json", "--no-progress")
    assert result.exit_code == 0, result.output
    assert sorted(json.loads(result.stdout)["record_ids"]) == ["r0001", "r0002"]
    assert cli._read_lines(ids, "--ids-file", "ids file") == ["r0001", "r0002", "", ""]
    odd = tmp_path / "odd.txt"
    odd.write_text("a\u2028b\nc\x85d\n", encoding="utf-8")  # not line ends: part of the ids
    assert cli._read_ids(odd) == ["a\u2028b", "c\x85d"]


def test_hidden_sizes_that_are_not_integers_are_one_error(trained, tmp_path):
    result = invoke("train", "--store", str(tmp_path / "s"), "--data", str(trained[1]), *TRAIN,
                    "--hidden-sizes", "a,b")
    assert_clean_error(result, 1, "--hidden-sizes takes comma-separated integers, got 'a,b'")


@pytest.mark.parametrize("command", ["status", "audit", "predict", "forget", "train", "add"])
def test_a_store_that_is_a_regular_file_is_one_error(trained, tmp_path, command):
    path = tmp_path / "store"
    path.write_text("not a store\n")
    data = ["--data", str(trained[1])]
    extra = {"predict": data, "add": [*data, "--no-progress"], "forget": ["r0001", "--no-progress"],
             "train": [*data, *TRAIN]}.get(command, [])
    result = invoke(command, "--store", str(path), *extra)
    assert_clean_error(result, 1, str(path))
    assert path.read_text() == "not a store\n"


def test_a_usage_error_is_one_line(trained):
    result = invoke("train", "--store", "x", "--data", str(trained[1]), "--shards", "many")
    assert_clean_error(result, 2, "Invalid value for '--shards'")
    assert "hint: `" in result.stderr and "--help` lists the options" in result.stderr


def test_an_output_file_that_cannot_be_written_is_one_error(trained, tmp_path):
    store, data = trained
    result = invoke("predict", "--store", str(store), "--data", str(data), "--output",
                    str(tmp_path / "no" / "such" / "dir.jsonl"))
    assert_clean_error(result, 1, "No such file or directory")


def test_ids_that_look_like_markup_print_as_typed(tmp_path):
    rows = make_rows(30)
    rows[0]["id"], rows[1]["id"] = "[/]", "[bold]x"
    data = write_csv(tmp_path / "train.csv", rows)
    store = str(tmp_path / "s")
    assert invoke("train", "--store", store, "--data", str(data), *TRAIN).exit_code == 0
    predicted = invoke("predict", "--store", store, "--data", str(data))
    assert_no_crash(predicted)
    assert "[/]" in predicted.stdout and "[bold]x" in predicted.stdout
    assert invoke("forget", "--store", store, "[/]", "--no-progress").exit_code == 0
    again = invoke("forget", "--store", store, "[/]", "--no-progress")
    assert_no_crash(again)
    assert "already deleted (no-op): [/]" in again.stderr


# 8. Long errors stay on one line when stderr is not a terminal -------------------------------------

LONG_COLUMNS = ",".join(f"a_feature_column_with_a_long_name_{i}" for i in range(8))


def test_a_long_error_is_one_line_in_the_cli_runner(trained, tmp_path):
    result = invoke("train", "--store", str(tmp_path / "s"), "--data", str(trained[1]), *TRAIN,
                    "--feature-columns", LONG_COLUMNS)
    line = assert_clean_error(result, 1, "input has no column(s)")
    assert len(line) > 300 and all(c in line for c in LONG_COLUMNS.split(","))


def test_a_long_error_is_one_line_on_a_piped_stderr(trained, tmp_path):
    env = {**os.environ, "COLUMNS": "80", "TERM": "xterm"}
    command = [sys.executable, "-m", "sisa.cli", "train", "--store", str(tmp_path / "s"), "--data",
               str(trained[1]), *TRAIN, "--feature-columns", LONG_COLUMNS]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.splitlines()
    assert lines[0].startswith("error: input has no column(s)") and len(lines[0]) > 300
    assert all(c in lines[0] for c in LONG_COLUMNS.split(","))
    assert lines[1:] and all(line.startswith("hint: ") for line in lines[1:])


# 9. Property tests: arbitrary values never crash the CLI, and a failure changes nothing -----------

FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
FLOAT_FLAGS = ["--learning-rate", "--weight-decay", "--prior-threshold", "--cpus-per-shard",
               "--gpus-per-shard"]
INT_FLAGS = ["--shards", "--slices", "--epochs", "--batch-size", "--seed", "--torch-threads",
             "--max-retries", "--hidden-sizes"]  # their valid values kept small: see _small


def _small(text: str) -> bool:
    """Not a large integer (a valid --epochs 10**9 or --shards 10**9 would run for ever: such
    values are valid, not bad input)."""
    try:
        return all(int(part) <= 3 for part in text.split(",") if part.strip())
    except ValueError:
        return True


floats_as_text = st.floats(allow_nan=True, allow_infinity=True).map(repr)
int_values = st.one_of(st.text(max_size=12), st.integers(max_value=3).map(str),
                       floats_as_text).filter(_small)
float_values = st.one_of(floats_as_text, st.text(max_size=12), st.integers().map(str))
options = st.one_of(st.tuples(st.sampled_from(FLOAT_FLAGS), float_values),
                    st.tuples(st.sampled_from(INT_FLAGS), int_values),
                    st.tuples(st.just("--seed"), st.integers(min_value=2**63).map(str)))


@FAST
@given(option=options)
def test_train_never_crashes_on_an_option_value(trained, tmp_path, option):
    flag, value = option
    target = tmp_path / uuid.uuid4().hex
    result = invoke("train", "--store", str(target), "--data", str(trained[1]), *TRAIN, f"{flag}={value}")
    assert_no_crash(result)
    if result.exit_code != 0:
        assert store_snapshot(target) == {}, "a failed train left files behind"


ids_files = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=80).map(lambda t: t.encode("utf-8")),
    st.text(max_size=80).map(lambda t: t.encode("utf-8-sig")),  # with a BOM
    st.lists(st.sampled_from(["r0001", "ghost", " ", "\u00e9", "\u2028", "\x00", "r0001\r"]),
             max_size=5).map(lambda ids: "\n".join(ids).encode("utf-8")),
)


@FAST
@given(content=ids_files, args=st.lists(st.text(min_size=1, max_size=20), max_size=3))
def test_forget_never_crashes_and_a_failure_changes_nothing(store, tmp_path, content, args):
    ids = tmp_path / "ids.txt"
    ids.write_bytes(content)
    before = store_snapshot(store)
    result = invoke("forget", "--store", str(store), "--ids-file", str(ids), "--no-progress", "--", *args)
    assert_no_crash(result)
    if result.exit_code != 0:
        assert store_snapshot(store) == before


@FAST
@given(content=st.binary(max_size=300),
       suffix=st.sampled_from([".csv", ".json", ".jsonl", ".parquet", ".txt"]),
       command=st.sampled_from(["predict", "evaluate", "add"]))
def test_random_bytes_as_data_never_crash_and_change_nothing(store, tmp_path, content, suffix, command):
    data = tmp_path / f"data{suffix}"
    data.write_bytes(content)
    before = store_snapshot(store)
    result = invoke(command, "--store", str(store), "--data", str(data),
                    *(["--no-progress"] if command == "add" else []))
    assert_no_crash(result)
    assert result.exit_code != 0 and store_snapshot(store) == before


cells = st.one_of(st.none(), st.text(max_size=8), st.floats(allow_nan=True, allow_infinity=True),
                  st.integers(min_value=-5, max_value=5), st.booleans())


@st.composite
def odd_tables(draw: Any) -> tuple[list[dict[str, Any]], str]:
    """New rows for `add`, damaged: columns dropped or renamed, extra ones, odd cells."""
    rows = make_rows(4, seed=draw(st.integers(0, 9)), prefix=draw(st.sampled_from(["n", "r"])))
    names = list(rows[0])
    renamed = {n: draw(st.sampled_from([n, n, draw(st.text(min_size=1, max_size=10))])) for n in names}
    extra = draw(st.lists(st.text(min_size=1, max_size=10), max_size=2))
    table = []
    for row in rows:
        new = {renamed[k]: v for k, v in row.items()}
        new.update({name: draw(cells) for name in extra})
        if draw(st.booleans()):
            new[draw(st.sampled_from(list(new)))] = draw(cells)
        table.append(new)
    return table, draw(st.sampled_from(["csv", "jsonl"]))


@FAST
@given(table=odd_tables())
def test_add_of_odd_rows_never_crashes_and_a_failure_changes_nothing(store, tmp_path, table):
    rows, kind = table
    data = tmp_path / f"new.{kind}"
    if kind == "csv":
        write_csv(data, rows)
    else:
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = store_snapshot(store)
    result = invoke("add", "--store", str(store), "--data", str(data), "--no-progress")
    assert_no_crash(result)
    if result.exit_code != 0:
        assert store_snapshot(store) == before


# Paths: a command line cannot hold NUL, so neither do these names.
names = st.text(min_size=1, max_size=40).map(lambda t: t.replace("\x00", "_").replace("/", "_")).filter(
    lambda t: t not in (".", ".."))


@FAST
@given(name=names, kind=st.sampled_from(["absent", "file", "empty dir", "dir with a file"]),
       command=st.sampled_from(["status", "audit", "predict", "forget", "recover"]))
def test_an_odd_store_path_is_one_error(trained, tmp_path, name, kind, command):
    path = tmp_path / uuid.uuid4().hex / name
    path.parent.mkdir()
    if kind == "file":
        path.write_text("x")
    elif kind != "absent":
        path.mkdir()
        if kind == "dir with a file":
            (path / "f").write_text("x")
    before = store_snapshot(path.parent)
    extra = {"predict": ["--data", str(trained[1])], "forget": ["r0001", "--no-progress"],
             "recover": ["--no-progress"]}.get(command, [])
    result = invoke(command, "--store", str(path), *extra)
    assert_no_crash(result)
    assert result.exit_code != 0 and store_snapshot(path.parent) == before
