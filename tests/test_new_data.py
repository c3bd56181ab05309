"""Asking a trained model about new data: the inputs scikit-learn and pandas users pass (columns
matched by name, widths checked, sisa errors that say what was expected), files without id or
group, rows named as the user finds them (a file's lines), and the library's smaller promises
(pending ids, a warning on uneven grouped shards)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from sisa import Sisa
from sisa.errors import ColumnError, InputKindError, RecordError
from sisa.inputs import model_input
from sisa.records import load_records
from sisa.service import Service, ServiceConfig, create_app

from .conftest import SPEC, TEXT_SPEC, live_shas, make_rows, small_config, write_csv

FEATURES = list(SPEC.feature_columns)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, list[dict]]:
    rows = make_rows(90)
    root = tmp_path_factory.mktemp("inputs") / "store"
    Sisa.train(root, rows, small_config(), SPEC).close()
    return root, rows


@pytest.fixture(scope="module")
def model(trained):
    with Sisa.open(trained[0], read_only=True, recover=False) as sisa:
        yield sisa


@pytest.fixture(scope="module")
def frame(trained) -> pd.DataFrame:
    return pd.DataFrame(make_rows(12, seed=5))


def test_a_data_frame_is_matched_by_name_whatever_its_column_order(model, frame):
    expected = model.predict(frame[FEATURES].to_numpy())
    assert model.feature_names_in_ == FEATURES and model.n_features_in_ == len(FEATURES)
    assert model.predict(frame[FEATURES]) == expected
    assert model.predict(frame[FEATURES[::-1]]) == expected  # reordered: the same answers
    assert model.predict(frame) == expected  # the spec's id, label and group columns are ignored
    assert model.predict(frame[FEATURES].to_dict("records")) == expected
    assert model.predict(frame[FEATURES].to_numpy().tolist()) == expected
    np.testing.assert_array_equal(model.predict_proba(frame[FEATURES[::-1]]),
                                  model.predict_proba(frame[FEATURES].to_numpy()))


@pytest.mark.parametrize("change, error, words", [
    (lambda f: f[FEATURES[:-1]], ColumnError, ["no column(s) 'f3'", "feature_names_in_"]),
    (lambda f: f[FEATURES].assign(colour=1.0), ColumnError, ["does not read: 'colour'"]),
    (lambda f: f[FEATURES].to_numpy()[:, :3], InputKindError, ["rows of 4 numbers", "shape 12x3"]),
    (lambda f: f[FEATURES].to_numpy()[0], InputKindError, ["1-D array of 4 values", "reshape(1, -1)"]),
    (lambda f: [[1.0, 2.0], [3.0]], InputKindError, ["rows of different lengths"]),
    (lambda f: ["a text"], InputKindError, ["values that are not numbers"]),
    (lambda f: "a text", InputKindError, ["list of inputs"]),
    (lambda f: f[FEATURES].assign(f2="n/a"), RecordError, ["feature column 'f2'", "positions: 0, 1"]),
    (lambda f: f[FEATURES].to_numpy() * 1e39, RecordError, ["float32", "'f0'"]),
])
def test_wrong_inputs_are_sisa_errors_that_say_what_was_expected(model, frame, change, error, words):
    with pytest.raises(error) as caught:
        model.predict(change(frame))
    for word in words:
        assert word in str(caught.value)


def test_text_inputs_by_list_array_frame_or_dicts():
    texts = ["a good film", "dull"]
    assert model_input(texts, TEXT_SPEC) == texts
    assert model_input(np.array(texts), TEXT_SPEC) == texts
    assert model_input(pd.DataFrame({"text": texts, "id": ["a", "b"]}), TEXT_SPEC) == texts
    assert model_input([{"text": t} for t in texts], TEXT_SPEC) == texts
    with pytest.raises(RecordError, match="empty texts at positions 1"):
        model_input(["fine", "  "], TEXT_SPEC)
    with pytest.raises(RecordError, match="not texts at positions 0"):
        model_input([3.5], TEXT_SPEC)
    with pytest.raises(ColumnError, match="no column\\(s\\) 'text'"):
        model_input(pd.DataFrame({"message": texts}), TEXT_SPEC)


def test_training_from_a_data_frame_is_training_from_its_rows(trained, tmp_path):
    root, rows = trained
    with Sisa.train(tmp_path / "frame", pd.DataFrame(rows), small_config(), SPEC) as sisa, \
            Sisa.open(root, read_only=True, recover=False) as same:
        assert live_shas(sisa) == live_shas(same)


def test_a_file_with_only_the_models_columns_is_predicted_with_rows_numbered(model, frame, tmp_path):
    path = write_csv(tmp_path / "new.csv", frame[FEATURES].to_dict("records"))
    got = [p for chunk in model.predictions(path) for p in chunk]
    assert [p["row"] for p in got] == list(range(2, 14))  # file lines, the header being line 1
    assert [p["prediction"] for p in got] == model.predict(frame[FEATURES])
    with_ids = write_csv(tmp_path / "ids.csv", frame[["id", *FEATURES]].to_dict("records"))
    assert [p["id"] for chunk in model.predictions(with_ids) for p in chunk] == list(frame["id"])
    with pytest.raises(ColumnError, match="no label column 'label'"):
        model.evaluate(path)


def test_the_cli_predicts_a_file_without_id_or_group(trained, frame, tmp_path):
    from typer.testing import CliRunner

    from sisa.cli import app

    path = write_csv(tmp_path / "new.csv", frame[FEATURES[::-1]].to_dict("records"))
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(app, ["predict", "--store", str(trained[0]), "--data", str(path),
                                      "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["row"] for line in out.read_text().splitlines()] == list(range(2, 14))
    table = CliRunner().invoke(app, ["predict", "--store", str(trained[0]), "--data", str(path)])
    assert table.exit_code == 0 and "┃ row " in table.stdout and "┃ id " not in table.stdout
    status = CliRunner().invoke(app, ["status", "--store", str(trained[0]), "--json"])
    assert json.loads(status.stdout)["reads"] == FEATURES  # where a user finds the columns
    short = write_csv(tmp_path / "short.csv", frame[FEATURES[:2]].to_dict("records"))
    refused = CliRunner().invoke(app, ["predict", "--store", str(trained[0]), "--data", str(short),
                                       "--json"])
    assert refused.exit_code == 1
    error = json.loads(refused.stdout)["error"]  # the error alone: no array was begun
    assert error["code"] == "column" and "'f2', 'f3'" in error["message"]
    assert "`sisa status --store DIR` names them" in error["hint"]


def test_messages_name_file_lines_and_the_bad_column_and_quote_no_content(tmp_path):
    rows = make_rows(8)
    rows[2]["f1"] = "abc"
    rows[5]["id"] = rows[1]["id"]
    path = write_csv(tmp_path / "bad.csv", rows)
    with pytest.raises(RecordError) as caught:
        load_records(path, SPEC)
    message = str(caught.value)
    assert f"'{rows[1]['id']}' (lines 3, 7)" in message  # data rows 1 and 5, after the header
    assert "missing or non-numeric values in feature column 'f1' at lines: 4" in message
    lines = tmp_path / "bad.jsonl"
    lines.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(RecordError, match="'f1' at lines: 3"):
        load_records(lines, SPEC)
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("id,label,f0,f1,f2,f3,user\nr1,0,1,2,3,4,u\nr2,0,1,2,3,4,u,secret-value\n")
    with pytest.raises(RecordError) as caught:
        load_records(ragged, SPEC)
    assert "line 3 has 8 fields where the header has 7" in str(caught.value)
    assert "secret-value" not in str(caught.value)
    texts = tmp_path / "texts.csv"
    texts.write_text("id,label,text,user\na,x,fine,u\nb,y,,u\n")
    with pytest.raises(RecordError, match="empty texts in column 'text' at lines: 3"):
        load_records(texts, TEXT_SPEC)


def test_pending_lists_the_ids_this_object_acknowledged(trained, tmp_path):
    root, rows = trained
    shutil.copytree(root, tmp_path / "store")
    with Sisa.open(tmp_path / "store") as sisa:
        request = sisa.request_deletion(group=rows[0]["user"])
        [pending] = sisa.pending()
        assert pending.record_ids == request.record_ids and len(request.record_ids) == 10
    with Sisa.open(tmp_path / "store", recover=False, read_only=True) as other:
        assert [p.record_ids for p in other.pending()] == [[]]  # the ledger keeps digests only


def test_uneven_grouped_shards_get_a_warning_with_the_sizes(tmp_path):
    rows = make_rows(90)
    for r in rows[:60]:
        r["user"] = "big"  # one group of 60 records: its shard holds at least 60 of the 90
    with Sisa.train(tmp_path / "store", rows, small_config(), SPEC) as sisa:
        [warning] = [w for w in sisa.training_report_.warnings if "uneven" in w]
        sizes = [int(part.split(": ")[1]) for part in
                 warning.split("records per shard ")[1].split(";")[0].split(", ")]
        assert sorted(sizes) == sorted(len(list(sisa.live_records(s))) for s in range(3))
    with Sisa.train(tmp_path / "even", make_rows(90), small_config(shards=3), SPEC) as sisa:
        counts = [len(list(sisa.live_records(s))) for s in range(3)]
        uneven = max(counts) > 2 * min(counts)
        assert any("uneven" in w for w in sisa.training_report_.warnings) == uneven


def test_the_service_matches_objects_by_name_and_echoes_none_of_them(trained, frame):
    service = Service(trained[0], ServiceConfig(token="t0ken-for-tests-only-0123456789"),
                      worker=False).start()
    try:
        client = TestClient(create_app(service))
        objects = frame[FEATURES[::-1]].to_dict("records")
        by_name = client.post("/v1/predict", json={"inputs": objects})
        by_rows = client.post("/v1/predict", json={"inputs": frame[FEATURES].to_numpy().tolist()})
        assert by_name.status_code == 200 and by_name.json()["predictions"] == by_rows.json()["predictions"]
        extra = client.post("/v1/predict", json={"inputs": [{**objects[0], "zz-secret-key": 1.0}]})
        missing = client.post("/v1/predict", json={"inputs": [{"f0": 1.0}]})
        text = client.post("/v1/predict", json={"inputs": [{**objects[0], "f1": "zz-secret-value"}]})
        for answer in (extra, missing, text):
            assert answer.status_code == 422 and "zz-secret" not in answer.text
        assert "'f1'" in missing.text and "'f1'" in text.text
    finally:
        service.close()


def test_json_output_leaves_stderr_quiet(tmp_path):
    """Under --json, stdout is the document and no progress bar is drawn on stderr."""
    import subprocess
    import sys

    data = write_csv(tmp_path / "train.csv", make_rows(60))
    proc = subprocess.run([sys.executable, "-m", "sisa.cli", "train", "--store", str(tmp_path / "s"),
                           "--data", str(data), "--id-column", "id", "--label-column", "label",
                           "--feature-columns", ",".join(FEATURES), "--shards", "2", "--slices", "2",
                           "--json"], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "COLUMNS": "80"})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["records"] == 60 and proc.stderr == ""


def test_line_numbers_count_blank_lines_and_fields_that_span_lines(tmp_path):
    rows = make_rows(6)
    header = ",".join(rows[0])
    lines = [",".join(str(v) for v in r.values()) for r in rows]
    lines[1] = lines[1].replace(rows[1]["user"], '"a user\nwho spans two lines"')  # line 3 and 4
    lines[4] = lines[4].replace(f",{rows[4]['f1']},", ",n/a,")  # data row 4
    path = tmp_path / "odd.csv"
    path.write_text(header + "\n\n" + "\n".join(lines[:3]) + "\n\n" + "\n".join(lines[3:]) + "\n")
    # line 1 header, 2 blank, 3 row 0, 4-5 row 1, 6 row 2, 7 blank, 8 row 3, 9 row 4
    with pytest.raises(RecordError, match=r"feature column 'f1' at lines: 9$"):
        load_records(path, SPEC)
    jsonl = tmp_path / "odd.jsonl"
    bad = [dict(r) for r in rows]
    bad[2]["f0"] = None
    jsonl.write_text("\n".join(json.dumps(r) for r in bad[:2]) + "\n\n" +
                     "\n".join(json.dumps(r) for r in bad[2:]) + "\n")
    with pytest.raises(RecordError, match=r"feature column 'f0' at lines: 4$"):
        load_records(jsonl, SPEC)


def test_prediction_input_refuses_what_it_cannot_show_or_read(model, frame):
    with pytest.raises(RecordError, match=r"control characters .* at positions: 1"):
        model.predict(frame[["id", *FEATURES]].assign(id=["a", "b\x1b]0;x\x07", *frame["id"][2:]]))
    with pytest.raises(InputKindError, match="values that are not numbers"):
        model.predict([[True, False, True, True]])
    with pytest.raises(InputKindError, match="values that are not numbers"):
        model.predict([["1.5", "2", "3", "4"]])
    keyed = [{j: row[f] for j, f in enumerate(FEATURES)} for row in frame.to_dict("records")]
    with pytest.raises(ColumnError, match="no column\\(s\\) 'f0'"):  # keys are names, as text
        model.predict(keyed)
    big = frame[FEATURES].assign(f0=2**53 + 1)  # beyond float64's integers: rounded, as float() does
    assert model.predict(big) == model.predict(big.astype(float).to_numpy())


def test_config_errors_name_flags_but_leave_paths_alone():
    from sisa.options import in_flags

    message = "model directory '/srv/top_k_layers/m' is missing; top_k_layers must be >= 1"
    assert in_flags(message) == ("model directory '/srv/top_k_layers/m' is missing; --top-k-layers "
                                 "must be >= 1")
