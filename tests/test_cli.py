"""The CLI end to end on a small CSV: train, status, forget, audit, predict, evaluate, add."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from sisa.cli import app, cli_reference
from sisa.options import markdown_table

from .conftest import make_rows, write_csv

runner = CliRunner()
README = Path(__file__).resolve().parents[1] / "README.md"
COMMANDS = sorted(
    [c.name or c.callback.__name__ for c in app.registered_commands]  # type: ignore[union-attr]
    + [f"{g.name} {c.name}" for g in app.registered_groups
       for c in g.typer_instance.registered_commands])  # type: ignore[union-attr]
TRAIN = ["--id-column", "id", "--label-column", "label", "--feature-columns", "f0,f1,f2,f3",
         "--group-column", "user", "--shards", "3", "--slices", "2", "--epochs", "2", "--seed", "3",
         "--backend", "mlp", "--executor", "local", "--no-progress"]


def run(*args: str, ok: bool = True):
    result = runner.invoke(app, list(args))
    if ok:
        assert result.exit_code == 0, result.output
    return result


def as_json(result) -> object:
    return json.loads(result.stdout)


def test_the_command_list_comes_from_the_app():
    assert {"train", "add", "predict", "evaluate", "forget", "status", "audit", "recover", "repair",
            "demo", "receipts verify", "receipts show"} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_and_is_documented(command):
    result = run(*command.split(), "--help")
    assert "Usage" in result.output and len(result.output) > 200
    assert f"sisa {command}" in README.read_text(), f"README does not document `sisa {command}`"


def test_the_cli_reference_is_the_generated_one():
    reference = (README.parent / "docs" / "cli.md").read_text()
    assert markdown_table() in reference
    assert cli_reference() == reference, \
        "docs/cli.md is stale: regenerate it (its first paragraph says how)"


def test_the_readme_is_a_front_page():
    assert len(README.read_text().splitlines()) <= 200


def test_an_option_of_another_backend_is_refused(tmp_path):
    data = write_csv(tmp_path / "train.csv", make_rows(30))
    result = run("train", "--store", str(tmp_path / "s"), "--data", str(data), *TRAIN, "--lora-r", "4",
                 ok=False)
    assert result.exit_code == 1 and "--lora-r do(es) not apply to --backend mlp" in result.stderr
    bad = run("train", "--store", str(tmp_path / "s"), "--data", str(data), *TRAIN, "--hidden-sizes",
              "a,b", ok=False)
    assert bad.exit_code == 1 and "comma-separated integers" in bad.stderr
    assert not (tmp_path / "s").exists()


@pytest.fixture
def trained(tmp_path):
    data = write_csv(tmp_path / "train.csv", make_rows(90))
    store = tmp_path / "store"
    result = run("train", "--store", str(store), "--data", str(data), *TRAIN, "--json")
    assert as_json(result)["records"] == 90
    return store, tmp_path


def test_status_json_names_checkpoints_and_counts(trained):
    store, _ = trained
    status = as_json(run("status", "--store", str(store), "--json"))
    assert len(status["shards"]) == 3 and status["live_records"] == 90
    for shard in status["shards"]:
        assert shard["live_slice"] == 1
        assert Path(shard["weights_path"]).is_file()
        assert re.fullmatch(r"[0-9a-f]{64}", shard["sha256"])
        assert shard["deleted_records"] == 0 and shard["live_records"] > 0


def test_forget_by_ids_file_and_group_then_audit(trained):
    store, tmp = trained
    receipt = as_json(run("forget", "--store", str(store), "r0001", "r0002", "--json", "--no-progress"))
    assert sorted(receipt["record_ids"]) == ["r0001", "r0002"]
    assert receipt["affected_shards"] and receipt["samples_retrained"] > 0
    ids_file = tmp / "ids.txt"
    ids_file.write_text("\ufeffr0003\nr0001\n")  # a BOM is not part of the first id
    again = as_json(run("forget", "--store", str(store), "--ids-file", str(ids_file), "--json",
                        "--no-progress"))
    assert again["record_ids"] == ["r0003"] and again["already_deleted"] == ["r0001"]
    group = as_json(run("forget", "--store", str(store), "--group", "u5", "--json", "--no-progress"))
    assert len(group["record_ids"]) == 10 and len(group["affected_shards"]) == 1
    status = as_json(run("status", "--store", str(store), "--json"))
    assert status["deleted_records"] == 13
    audit = as_json(run("audit", "--store", str(store), "--json"))
    assert audit["ok"] and audit["checkpoints_checked"] == 6
    unreadable = run("forget", "--store", str(store), "--ids-file", str(tmp), ok=False)
    assert unreadable.exit_code == 2 and "cannot read ids file" in unreadable.output


def test_unknown_id_is_a_clean_error(trained):
    store, _ = trained
    result = run("forget", "--store", str(store), "r0001", "ghost", ok=False)
    assert result.exit_code == 1
    assert "unknown record id" in result.stderr and "'ghost'" in result.stderr
    assert "Traceback" not in result.output
    huge = run("forget", "--store", str(store), "x" * 1_000_000, ok=False)
    assert huge.exit_code == 1 and "(1,000,002 characters)" in huge.stderr  # the quoted length
    assert len(huge.stderr) < 2_000  # an error never echoes a huge input back
    missing = run("status", "--store", str(store.parent / "elsewhere"), ok=False)
    assert "no store at" in missing.stderr and "hint: create one with `sisa train" in missing.stderr
    assert as_json(run("status", "--store", str(store), "--json"))["deleted_records"] == 0


def test_audit_fails_on_a_corrupt_checkpoint(trained):
    store, _ = trained
    status = as_json(run("status", "--store", str(store), "--json"))
    weights = Path(status["shards"][0]["weights_path"])
    weights.write_bytes(b"\x00" * 64)
    result = run("audit", "--store", str(store), "--json", ok=False)
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert not report["ok"] and str(weights) in report["violations"][0]["problem"]


def test_predict_evaluate_and_add(trained):
    store, tmp = trained
    test_rows = make_rows(30, seed=99, prefix="t")
    test_csv = write_csv(tmp / "test.csv", test_rows)
    out = tmp / "pred.jsonl"
    run("predict", "--store", str(store), "--data", str(test_csv), "--output", str(out))
    preds = [json.loads(line) for line in out.read_text().splitlines()]
    assert [p["id"] for p in preds] == [r["id"] for r in test_rows]
    assert all(abs(sum(p["probabilities"].values()) - 1) < 1e-4 for p in preds)
    evaluation = as_json(run("evaluate", "--store", str(store), "--data", str(test_csv), "--json"))
    assert evaluation["examples"] == 30 and set(evaluation["shards"]) == {"0", "1", "2"}
    new = write_csv(tmp / "new.csv", make_rows(20, seed=5, prefix="n"))
    added = as_json(run("add", "--store", str(store), "--data", str(new), "--json", "--no-progress"))
    assert added["shards_retrained"]
    assert as_json(run("status", "--store", str(store), "--json"))["live_records"] == 110


def test_config_file_supplies_options(tmp_path):
    data = write_csv(tmp_path / "train.csv", make_rows(60))
    config = tmp_path / "sisa.toml"
    config.write_text(f'store = "{tmp_path / "store"}"\ndata = "{data}"\nshards = 2\nslices = 1\n'
                      'feature-columns = "f0,f1,f2,f3"\nepochs = 1\nno-progress = true\n')
    result = run("--config", str(config), "train", "--json")
    assert as_json(result)["shards"] == 2
    status = as_json(run("--config", str(config), "status", "--json"))
    assert len(status["shards"]) == 2


def test_bad_input_file_is_named_and_no_store_is_left(tmp_path):
    rows = make_rows(20)
    rows[4]["id"] = rows[3]["id"]
    data = write_csv(tmp_path / "dup.csv", rows)
    result = run("train", "--store", str(tmp_path / "s"), "--data", str(data), *TRAIN, ok=False)
    assert result.exit_code == 1 and "duplicate ids" in result.stderr and "r0003" in result.stderr
    assert not (tmp_path / "s" / "store.db").exists()


def test_demo_json(tmp_path):
    result = run("demo", "--backend", "mlp", "--shards", "2", "--slices", "2", "--epochs", "1",
                 "--forget-count", "2", "--json", "--no-progress")
    figures = as_json(result)
    assert figures["audit_ok"] and len(figures["forgotten"]) == 2
    assert 0 < figures["forget_samples"] <= figures["sisa_train_samples"]
    assert 0.5 < figures["sisa_accuracy"] <= 1.0


def test_text_backend_end_to_end(tmp_path, tiny_model):
    from .conftest import make_text_rows

    data = write_csv(tmp_path / "reviews.csv", make_text_rows(40))
    store = tmp_path / "store"
    trained = as_json(run("train", "--store", str(store), "--data", str(data), "--id-column", "id",
                          "--label-column", "label", "--text-column", "text", "--backend", "head",
                          "--model", tiny_model, "--hidden-sizes", "", "--shards", "2", "--slices",
                          "2", "--epochs", "1", "--no-progress", "--json"))
    assert trained["records"] == 40
    status = as_json(run("status", "--store", str(store), "--json"))
    assert status["embeddings_cached"] == len({r["text"] for r in make_text_rows(40)})
    receipt = as_json(run("forget", "--store", str(store), "t003", "--json", "--no-progress"))
    assert receipt["record_ids"] == ["t003"]
    assert as_json(run("audit", "--store", str(store), "--json"))["ok"]
    evaluation = as_json(run("evaluate", "--store", str(store), "--data", str(data), "--json"))
    assert evaluation["examples"] == 40


@pytest.fixture(scope="module")
def forgotten(tmp_path_factory) -> tuple[Path, str]:
    """A small store with one deletion applied (so it holds a receipt), and that deletion's id."""
    root = tmp_path_factory.mktemp("forgotten")
    data = write_csv(root / "train.csv", make_rows(30))
    run("train", "--store", str(root / "s"), "--data", str(data), *TRAIN)
    receipt = as_json(run("forget", "--store", str(root / "s"), "r0004", "--no-progress", "--json"))
    return root / "s", receipt["request_id"]


def in_a_fresh_process(args: list[str]) -> tuple[str, list[str]]:
    """`sisa ARGS` run in a new interpreter: what it printed, and which of torch, transformers and
    ray it had imported by the end."""
    code = ("import json, sys; from sisa.cli import app\n"
            f"code = app({args!r}, standalone_mode=False)\n"
            "print(json.dumps([code, [m for m in ('torch', 'transformers', 'ray') if m in sys.modules]]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    *output, last = proc.stdout.strip().splitlines()
    exit_code, loaded = json.loads(last)
    assert exit_code in (None, 0), proc.stderr
    return "\n".join(output), loaded


# The commands that run no model, as `sisa ...` on the `forgotten` store ({store}, {request}).
QUICK = {
    "status": ["status", "--store", "{store}", "--json"],
    "audit": ["audit", "--store", "{store}", "--json"],
    "receipts verify": ["receipts", "verify", "--store", "{store}", "--json"],
    "receipts show": ["receipts", "show", "--store", "{store}", "{request}", "--json"],
    "--help": ["--help"],
    "train --help": ["train", "--help"],
}


@pytest.mark.parametrize("command", QUICK)
def test_commands_that_run_no_model_import_none(command, forgotten):
    """Status, the audit, the receipts and the help import neither torch (its import alone is
    more than a second of every command) nor transformers nor ray."""
    store, request = forgotten
    output, loaded = in_a_fresh_process([a.format(store=store, request=request) for a in QUICK[command]])
    assert loaded == [], f"`sisa {command}` imported {loaded}"
    if command == "receipts show":
        assert json.loads(output)["request_id"] == request
    elif "--help" not in command and command != "status":
        assert json.loads(output)["ok"], output


def test_status_agrees_with_the_library(forgotten):
    """`sisa status` (which reads the store alone, in a process that imports no torch) reports
    what `Sisa.status()` does."""
    from sisa import Sisa

    store, _ = forgotten
    report, loaded = in_a_fresh_process(["status", "--store", str(store), "--json"])
    assert loaded == []
    with Sisa.open(store, recover=False, read_only=True) as sisa:
        assert json.loads(report) == json.loads(json.dumps(sisa.status().to_dict()))


def test_status_reads_the_store_without_sisa_api_and_an_old_store_through_it(forgotten, tmp_path):
    """`sisa status` reads a store that recorded its config digest without importing sisa.api
    (its imports were a third of the command); a store from before the digest was recorded is
    opened through the library, and reported as the library reports it."""
    import shutil
    import sqlite3

    from sisa import Sisa

    store, _ = forgotten
    old = tmp_path / "old"
    shutil.copytree(store, old)
    with sqlite3.connect(old / "store.db") as conn:
        conn.execute("DELETE FROM meta WHERE key = 'config_digest'")
    conn.close()
    for where, api in [(store, False), (old, True)]:
        code = ("import json, sys; from sisa.cli import app\n"
                f"app(['status', '--store', {str(where)!r}, '--json'], standalone_mode=False)\n"
                "print(json.dumps(['sisa.api' in sys.modules, 'torch' in sys.modules]))")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        *report, last = proc.stdout.strip().splitlines()
        assert json.loads(last) == [api, False]
        with Sisa.open(where, recover=False, read_only=True) as sisa:
            assert json.loads("\n".join(report)) == json.loads(json.dumps(sisa.status().to_dict()))


def test_train_from_a_csv_imports_no_pandas(tmp_path):
    """Arrow lays a CSV's feature columns out as one matrix (`RecordBatch.to_tensor`), never
    through `Array.to_numpy`, which imports pandas (a third of a second of every `sisa train`);
    the shards train to the very weights the same rows give read by Python (a JSON array). Nor
    torch._dynamo, which torch.optim imports (a second): sisa's AdamW is its own."""
    rows = make_rows(40)
    data = write_csv(tmp_path / "train.csv", rows)
    code = ("import json, sys; from sisa.cli import app\n"
            f"app(['train', '--store', {str(tmp_path / 'csv')!r}, '--data', {str(data)!r}, "
            f"*{TRAIN!r}], standalone_mode=False)\n"
            "print(json.dumps(['pandas' in sys.modules, 'torch._dynamo' in sys.modules]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [False, False]
    (tmp_path / "train.json").write_text(json.dumps(rows))
    run("train", "--store", str(tmp_path / "json"), "--data", str(tmp_path / "train.json"), *TRAIN)
    weights = [[s["sha256"] for s in as_json(run("status", "--store", str(tmp_path / kind),
                                                 "--json"))["shards"]] for kind in ("csv", "json")]
    assert weights[0] == weights[1] and all(weights[0])


# Where users meet the CLI: its help, its errors, its output ------------------------------------------

def help_of(*command: str) -> str:
    return runner.invoke(app, [*command, "--help"], env={"COLUMNS": "80"}).output


def flat(text: str) -> str:
    """Help text without its boxes and line breaks: a cell wrapped over lines reads as one."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def test_train_help_groups_its_options_as_the_readme_table_does():
    text = help_of("train")
    panels = re.findall(r"╭─ (.+?) ─", text)
    assert panels == ["Options", "Data", "Partition", "Execution", "Serving", "Training",
                      "Training: mlp, head", "Training: head, lora, causal_lm",
                      "Training: lora, causal_lm", "Training: causal_lm", "Key and witness"]
    body = flat(text)
    assert "--id-column <str> Column with the stable record id. [default: (id)]" in body
    assert "--label-column <str> Column with the class label. [default: (label)]" in body
    assert "[default: (mlp 5, head 10, lora 2, causal_lm 2)]" in body  # --epochs, per backend
    assert re.search(r"--lora-r <int> Adapter rank\. \[default: \(8\)\]", body)


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_flags_show_as_flags(command):
    text = help_of(*command.split())
    assert "<bool>" not in text
    assert re.search(r"--help +Show this message", text)


def test_the_command_list_has_one_line_per_command():
    text = help_of()
    rows = text.split("╭─ Commands")[1].split("╰")[0].splitlines()[1:]
    group = typer.main.get_command(app)
    assert len(rows) == len(group.commands)  # type: ignore[attr-defined]
    for row, (name, command) in zip(rows, group.commands.items(), strict=True):  # type: ignore[attr-defined]
        first_line = command.help.split("\n\n")[0]
        assert "\n" not in first_line and flat(row) == f"{name} {first_line}"


def test_a_json_error_is_one_json_object_on_stdout(tmp_path):
    missing = run("status", "--store", str(tmp_path / "nothing"), "--json", ok=False)
    assert missing.exit_code == 1 and missing.stderr == ""
    error = as_json(missing)["error"]
    assert error["code"] == "store_not_found" and "no store at" in error["message"]
    assert error["hint"].startswith("create one with `sisa train")
    usage = run("train", "--store", str(tmp_path / "s"), "--data", "x.csv", "--shards", "many",
                "--json", ok=False)
    assert usage.exit_code == 2 and as_json(usage)["error"]["code"] == "usage"
    unknown = run("status", "--json", "--store", "x", "--no-such-option", ok=False)
    assert unknown.exit_code == 2 and as_json(unknown)["error"]["code"] == "usage"
    plain = run("status", "--store", str(tmp_path / "nothing"), ok=False)
    assert plain.stdout == "" and plain.stderr.startswith("error: no store at")


def test_a_config_error_names_the_options(tmp_path):
    data = write_csv(tmp_path / "train.csv", make_rows(20))
    result = run("train", "--store", str(tmp_path / "s"), "--data", str(data), *TRAIN, "--epochs", "0",
                 ok=False)
    assert result.exit_code == 1 and "--epochs must be" in result.stderr
    assert "epochs_per_slice" not in result.stderr


def test_serve_without_a_token_names_the_flag(trained, monkeypatch):
    monkeypatch.delenv("SISA_SERVE_TOKEN", raising=False)
    result = run("serve", "--store", str(trained[0]), ok=False)
    assert result.exit_code == 1 and "--no-auth" in result.stderr and "no_auth" not in result.stderr


def test_predict_output_prints_a_summary_and_json_streams_plainly(trained):
    store, tmp = trained
    data = write_csv(tmp / "test.csv", make_rows(30, seed=99, prefix="t"))
    out = tmp / "pred.jsonl"
    summary = as_json(run("predict", "--store", str(store), "--data", str(data), "--output", str(out),
                          "--json"))
    status = as_json(run("status", "--store", str(store), "--json"))
    assert summary == {"predictions": 30, "output": str(out), "model_version": status["model_version"],
                       "shards": [0, 1, 2], "config_digest": status["config_digest"]}
    assert len(out.read_text().splitlines()) == 30
    streamed = run("predict", "--store", str(store), "--data", str(data), "--json").stdout
    lines = streamed.splitlines()
    assert lines[0] == "[" and lines[-1] == "]" and len(lines) == 32  # one prediction a line
    assert [json.loads(line.removesuffix(",")) for line in lines[1:-1]] == json.loads(streamed)
    assert json.loads(streamed) == [json.loads(line) for line in out.read_text().splitlines()]
    assert "\x1b" not in streamed
    status_lines = run("status", "--store", str(store), "--json").stdout.splitlines()
    assert len(status_lines) == 1 and json.loads(status_lines[0])["live_records"] == 90  # plain
    table = run("predict", "--store", str(store), "--data", str(data))
    assert "t0000" in table.stdout and "the first" not in table.stderr  # 30 rows: all shown


def test_forget_refuses_ids_and_a_group_together(trained):
    store, tmp = trained
    both = run("forget", "--store", str(store), "r0001", "--group", "u5", "--no-progress", ok=False)
    assert both.exit_code == 1 and "not both" in both.stderr
    assert "--group" in both.stderr and "--ids-file" in both.stderr
    ids_file = tmp / "ids.txt"
    ids_file.write_text("r0002\n")
    as_file = run("forget", "--store", str(store), "--ids-file", str(ids_file), "--group", "u5",
                  "--json", ok=False)
    assert as_file.exit_code == 1 and as_json(as_file)["error"]["code"] == "deletion_target"
    status = as_json(run("status", "--store", str(store), "--json"))
    assert status["deleted_records"] == 0 and status["deletion_requests"] == 0


def test_a_clean_audit_is_one_line_and_violations_show_whole_paths(trained):
    store, _ = trained
    clean = run("audit", "--store", str(store))
    assert clean.stdout == "audit: OK (6 checkpoints checked)\n" and "hint" not in clean.stderr
    stray = store / ("stray-" + "x" * 60 + ".bin")
    stray.write_bytes(b"?")
    result = runner.invoke(app, ["audit", "--store", str(store)], env={"COLUMNS": "80"})
    assert result.exit_code == 1 and result.stdout.startswith("audit: VIOLATIONS")
    paths = "".join(line.split("│")[3].strip() for line in result.stdout.splitlines()
                    if line.startswith("│"))
    assert str(stray) in paths and "…" not in result.stdout  # folded, never cut
    assert f"`sisa repair --store {store}`" in result.stderr
