"""Smoke test of the benchmark suite: `--tiny` end to end, checking the result schema and that every
plot is written (never the numbers: timings on shared machines are noise)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_run_writes_results_plots_and_summary(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "run", "--tiny", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "MPLBACKEND": "Agg"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"retrain_cost", "streams", "accuracy", "placement", "overhead", "meta"}
    for name in ("retrain_cost", "streams", "accuracy", "placement", "overhead"):
        png = out / results[name]["plot"]
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    cell = results["retrain_cost"]["cells"][0]
    assert {"shards", "slices", "scratch_seconds", "scratch_load_seconds", "deletion_seconds",
            "deletion_seconds_cold", "deletion_samples", "speedup_time", "speedup_time_cold",
            "speedup_samples", "theory", "ratio_time_to_theory", "ratio_time_to_theory_cold",
            "speedup_vs_monolith"} <= set(cell)
    assert len(results["retrain_cost"]["cells"]) == 4  # the tiny grid: S in {1,2}, R in {1,2}
    batch = results["streams"]["batches"][0]
    assert {"k", "batched_samples", "one_at_a_time_samples", "shards_hit",
            "expected_shards_hit"} <= set(batch)
    names = [s["name"] for s in results["streams"]["streams"]]
    assert names == ["uniform", "pareto", "user, group placement on", "user, group placement off"]
    for stream in results["streams"]["streams"]:
        assert [p["deletions"] for p in stream["points"]] == list(range(5))
        assert all(0.0 <= p["accuracy"] <= 1.0 for p in stream["points"])
    assert [c["data"] for c in results["accuracy"]["curves"]] == ["synthetic (mlp)", "digits (mlp)"]
    assert [r["placement"] for r in results["placement"]["results"]] == \
        ["uniform", "late_slices", "dedicated_shards"]
    for model in results["overhead"]["models"]:
        assert {"plain_torch_seconds", "sisa_training_seconds", "ratio_training", "repeats",
                "runs"} <= set(model)
        assert len(model["runs"]) == model["repeats"]
    summary = (out / "summary.md").read_text()
    assert "| benchmark | figure | value |" in summary and "| overhead |" in summary
    assert "| streams |" in summary and "python -m benchmarks run --tiny" in summary


def test_lm_memorisation_tiny_run_writes_its_figure(tmp_path, tiny_lm):
    result = run_tiny("benchmarks.lm_memorisation", tmp_path / "mem", "--model", tiny_lm)
    assert result["setting"]["per_user"] == 2 and result["train_seconds"] > 0
    # A random tiny model memorises nothing: the figure says so against the bar.
    assert result["memorised"] is (result["mean_exposure"] >= result["bar"])
    assert 0 < result["bar"] <= 10


def test_llm_unlearning_tiny_run_writes_its_figures(tmp_path, tiny_lm):
    out = tmp_path / "llm"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.llm_unlearning", "--tiny", "--model",
                           tiny_lm, "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "MPLBACKEND": "Agg"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert {"sisa", "monolith", "models", "sweeps", "utility_gate", "power", "decoding", "export",
            "retrain_cost"} <= set(results)
    assert set(results["sweeps"]) == {"gradient_ascent", "gradient_difference", "npo", "simnpo", "rmu"}
    assert all(len(points) == len(results["setting"]["grid"]) for points in results["sweeps"].values())
    names = [m["model"] for m in results["models"]]
    assert names[:4] == ["SISA before", "SISA after (exact)", "monolith before",
                         "oracle (monolith retrained without them)"]
    # SISA after the deletion is its own oracle (checked by sha256): its differences are zero.
    assert results["sisa"]["oracle"]["identical"] is True
    after = results["models"][1]
    assert after["canaries"]["minus_oracle"]["mean"] == 0.0
    for kind in after["mia"].values():
        assert all(row["privleak"] == 0.0 for row in kind.values())
    # Every model is measured with intervals; single models with the gradient-norm attack too.
    oracle = results["models"][3]
    assert any("gradient_norm" in kind for kind in oracle["mia"].values())
    for m in results["models"]:
        lo, hi = m["canaries"]["forgotten"]["ci"]
        assert lo <= m["canaries"]["forgotten"]["mean"] <= hi
    assert results["export"]["loaded"], results["export"]["error"]
    assert results["decoding"]["merged"] > 0 and results["retrain_cost"]["deletion_samples"] > 0
    assert (out / "exposure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| SISA after (exact) |" in (out / "summary.md").read_text()


def test_llm_unlearning_sisa_part_alone_and_a_misspelt_method(tmp_path, tiny_lm):
    def bench(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "benchmarks.llm_unlearning", "--tiny", "--model",
                               tiny_lm, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "MPLBACKEND": "Agg"})

    # A misspelt method fails before any training, naming it and the choices.
    proc = bench("--out", str(tmp_path / "bad"), "--methods", "npo,gradient-ascent")
    assert proc.returncode != 0 and "gradient-ascent" in proc.stderr and "simnpo" in proc.stderr
    assert not (tmp_path / "bad" / "results.json").exists()
    # --methods none: SISA's part only (its verdict, oracle check, decoding, export).
    out = tmp_path / "sisa"
    proc = bench("--out", str(out), "--methods", "none", "--per-user", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["setting"]["methods"] == "none" and results["setting"]["per_user"] == 1
    assert "monolith" not in results and "sweeps" not in results
    assert [m["model"] for m in results["models"]] == ["SISA before", "SISA after (exact)"]
    assert results["sisa"]["oracle"]["identical"] is True and results["export"]["loaded"]
    assert "no monolith or baselines (--methods none)" in (out / "summary.md").read_text()
    # --sisa-part no: the baselines alone, their monolith's adapter of rank --mono-rank.
    out = tmp_path / "baselines"
    proc = bench("--out", str(out), "--sisa-part", "no", "--methods", "rmu", "--mono-rank", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert "sisa" not in results and results["monolith"]["rank"] == 4
    assert [m["model"] for m in results["models"]][:2] == ["monolith before",
                                                         "oracle (monolith retrained without them)"]
    assert list(results["sweeps"]) == ["rmu"] and "monolith before" in proc.stdout
    assert "shards not measured in this run (--sisa-part no)" in (out / "summary.md").read_text()
    # Nothing left to run, and a bad yes/no, fail at once.
    assert bench("--out", str(tmp_path / "x"), "--sisa-part", "no", "--methods", "none").returncode != 0
    proc = bench("--out", str(tmp_path / "y"), "--sisa-part", "maybe")
    assert proc.returncode == 2 and "--sisa-part" in proc.stderr


def test_lm_scaling_tiny_run_writes_its_figures(tmp_path, tiny_lm):
    out = tmp_path / "scaling"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.lm_scaling", "--tiny", "--model",
                           tiny_lm, "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "MPLBACKEND": "Agg"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert [p["shards"] for p in results["points"]] == [1, 2, 4]
    for point in results["points"]:
        assert set(point["combine"]) == {"mean", "product", "merged"}
        assert all(c["seconds_per_token"] > 0 for c in point["combine"].values())
        assert point["deletion"]["samples"] > 0
    # One shard: every combination is that shard's own model (the merge of one adapter is it).
    one = results["points"][0]["combine"]
    assert one["mean"]["share_of_monolith_gain"] == 1.0
    assert abs(one["merged"]["gain_nats"] - one["mean"]["gain_nats"]) < 1e-4
    assert (out / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| S | combine |" in (out / "summary.md").read_text()


def run_tiny(module: str, out: Path, *extra: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", module, "--tiny", "--out", str(out), *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "MPLBACKEND": "Agg"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(next(out.glob("*.json")).read_text())


def test_end_to_end_tiny_run_measures_every_goal(tmp_path):
    result = run_tiny("benchmarks.end_to_end", tmp_path / "e2e")
    assert [g["goal"].split(" ")[0] for g in result["goals"]] == ["ingest", "train", "train", "one",
                                                                  "forget", "sisa"]
    assert all(isinstance(g["met"], bool) and g["measured"] for g in result["goals"])
    assert len(result["forget"]["runs"]) == 4 and result["train"]["peak_mb"] > 0
    assert {r["start_slice"] for r in result["forget"]["runs"]} == {0, 1, 2, 3}  # one per slice index
    assert "| goal | target | measured | met |" in (tmp_path / "e2e" / "summary.md").read_text()


def test_scaling_tiny_run_writes_its_series_and_plot(tmp_path):
    result = run_tiny("benchmarks.scaling", tmp_path / "scaling")
    assert [x["rows"] for x in result["series"]] == [800] and len(result["fixed"]) == 1
    assert {"ingest_seconds", "train_peak_mb", "one_deletion_seconds", "hundred_deletions_seconds",
            "predict_rows_per_second"} <= set(result["series"][0])
    png = tmp_path / "scaling" / "scaling.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gpu_script_runs_its_steps_within_its_budget(tmp_path):
    """On a machine without a GPU: the device step fails or is missing, the gpu tests are all
    deselected or skipped, and the budget stops the long steps; gpu.json says so."""
    out = tmp_path / "gpu"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--tiny", "--budget", "45",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "gpu.json").read_text())
    steps = {s["step"]: s for s in result["steps"]}
    assert list(steps) == ["device", "torch", "gpu_tests", "text_accuracy", "llm_unlearning"]
    assert steps["torch"]["outcome"] == "ok" and '"cuda"' in steps["torch"]["tail"]
    assert (out / "logs" / "gpu_tests.log").is_file()


def test_serve_load_tiny_run_checks_every_answer(tmp_path, tiny_lm):
    result = run_tiny("benchmarks.serve_load", tmp_path / "serve", "--stores", "mlp",
                      "--generation", "--generation-model", tiny_lm)
    run = result["runs"][0]
    steady, deleting = run["steady"], run["deleting"]
    assert steady["requests"] > 0 and deleting["deletions"] > 0
    assert steady["answers_checked"] == steady["requests"]
    assert deleting["answers_checked"] == deleting["requests"]
    assert steady["stale_answers"] == deleting["stale_answers"] == 0
    assert deleting["ack_p50_ms"] > 0 and deleting["ack_to_applied_p50_s"] is not None
    assert deleting["receipt_seconds_p50"] > 0 and deleting["ack_to_live_over_receipt_p50"] > 0
    assert run["deleting_over_steady"] > 0
    # Side by side with the bare app, at batch 1 and 32: both answered, the ratios computed.
    versus = run["versus_bare"]
    assert [v["batch"] for v in versus] == [1, 32]
    for v in versus:
        assert v["sisa"]["requests"] > 0 and v["bare"]["requests"] > 0
        assert v["sisa"]["errors"] == v["bare"]["errors"] == 0
        assert v["ratio_predictions_per_s"] > 0 and v["ratio_p99"] > 0 and isinstance(v["goal_met"], bool)
    text = (tmp_path / "serve" / "serve_load.md").read_text()
    assert "| store | serving | phase |" in text and "| bare predictions/s |" in text
    # The generation load beside it: tokens/s of 1 and 4 clients, every answer as decoded alone.
    generation = result["generation"]
    assert set(generation["speedup"]) == {"mean", "merged"}
    assert all(p["mismatches"] == 0 and p["tokens_per_second"] > 0 for p in generation["phases"])
    assert "| generation (combine) |" in text


def test_service_faults_tiny_run_counts_every_goal(tmp_path):
    result = run_tiny("benchmarks.service_faults", tmp_path / "faults")
    totals = result["totals"]
    assert totals["answers_after_substitution"] > 0 and totals["kill_trials"] == 1
    assert totals["answers_from_an_unverified_checkpoint"] == 0
    assert totals["acknowledged_deletions_lost"] == 0 and totals["audits_failed"] == 0
    assert totals["bad_inputs_tried"] == len(result["bad_inputs"]["statuses"])
    assert totals["bad_inputs_answered_200"] == totals["error_bodies_quoting_the_request"] == 0


def test_verify_cost_tiny_run_states_its_share(tmp_path):
    result = run_tiny("benchmarks.verify_cost", tmp_path / "verify")
    assert result["read_and_hash_seconds_per_gb"] > 0 and result["live_checkpoints_bytes"] > 0
    assert 0 < result["predict_verify_share"] < 1 and 0 < result["forget_verify_share"] < 1


def test_quick_commands_tiny_run_times_every_command(tmp_path):
    result = run_tiny("benchmarks.quick_commands", tmp_path / "quick")
    commands = {c["command"]: c for c in result["commands"]}
    assert list(commands) == ["python -c pass", "sisa --help", "sisa status", "sisa audit",
                              "sisa receipts verify", "sisa receipts show ID", "sisa predict (4 rows)"]
    for c in commands.values():
        assert len(c["runs"]) == result["repeats"] == 1 and c["median_seconds"] > 0
        assert isinstance(c["heavy_imports"], list)
    assert "torch" in commands["sisa predict (4 rows)"]["heavy_imports"]  # the imports are read
    assert "| command | median s |" in (tmp_path / "quick" / "quick_commands.md").read_text()


def test_predict_scale_tiny_run_predicts_every_row_of_new_data(tmp_path):
    result = run_tiny("benchmarks.predict_scale", tmp_path / "predict")
    assert result["rows"] == result["output_file"]["lines_written"] == 10_000
    assert result["output_file"]["stdout"]["predictions"] == 10_000  # a summary, not the rows
    assert result["json_stdout"]["rows_parsed"] == 10_000


def test_generation_load_tiny_run_checks_every_answer(tmp_path, tiny_lm):
    out = tmp_path / "generation"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.generation_load", "--tiny", "--model",
                           tiny_lm, "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "generation_load.json").read_text())
    assert [(p["combine"], p["clients"]) for p in result["phases"]] == \
        [("mean", 1), ("mean", 4), ("merged", 1), ("merged", 4)]
    assert result["mismatches"] == 0 and result["errors"] == 0
    assert all(p["tokens"] > 0 and p["tokens_per_second"] > 0 for p in result["phases"])
    assert set(result["speedup"]) == set(result["lone"]) == {"mean", "merged"}
    assert all(lone["batched_p50"] > 0 for lone in result["lone"].values())


def test_cli_overhead_tiny_run_states_every_goal(tmp_path):
    out = tmp_path / "overhead"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.cli_overhead", "--tiny", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "cli_overhead.json").read_text())
    train, forget = result["train"], result["forget"]
    assert train["seconds"] > 0 and train["wall"] > train["seconds"]
    assert abs(train["wall_over_seconds"] - train["wall"] / train["seconds"]) < 0.01
    assert len(forget["runs"]) == 3 and len({r["id"] for r in forget["runs"]}) == 3
    for r in forget["runs"]:
        assert abs(r["wall_minus_receipt"] - (r["wall"] - r["receipt_seconds"])) < 0.01 and r["cpu"] > 0
    assert len(result["status"]["walls"]) == 2 and result["status"]["median"] > 0
    handed = result["forget_handed_off"]["runs"]
    assert len(handed) == 3 and not {r["id"] for r in handed} & {r["id"] for r in forget["runs"]}
    assert [g["target"] for g in result["goals"]] == ["<= 1.5 s", "<= 1.5 s", "<= 1.3x", "<= 0.8 s"]
    assert all(isinstance(g["met"], bool) for g in result["goals"])
    assert "torch" in result["imports"]["sisa forget"]  # it trains
    assert not {"torch", "pandas"} & set(result["imports"]["sisa status"])
    assert "| goal | target | measured | met |" in (out / "cli_overhead.md").read_text()
