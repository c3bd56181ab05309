"""The README's quick starts run as written, and the main job (`sisa demo`) runs end to end."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sisa.cli import app

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def blocks(language: str, heading: str) -> str:
    section = README.split(heading, 1)[1].split("\n## ", 1)[0]
    found = re.findall(rf"```{language}\n(.*?)```", section, re.S)
    assert found, f"no {language} block under {heading!r}"
    return found[0]


def run_cli_quick_start(folder: Path) -> None:
    lines = [line.split("  #")[0].strip() for line in blocks("bash", "## Quick start: the command line")
             .splitlines() if line.strip()]
    assert shlex.split(lines[0])[:2] == ["sisa", "train"]
    for line in lines:
        result = CliRunner().invoke(app, shlex.split(line)[1:])
        assert result.exit_code == 0, f"{line}\n{result.output}"
    assert (folder / "stores" / "digits" / "store.db").is_file()


def run_library_quick_start(folder: Path) -> None:
    code = blocks("python", "## Quick start: the library")
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})  # our own docs
    assert (folder / "stores" / "library" / "store.db").is_file()


def run_serving_example(folder: Path) -> None:
    """Its `sisa serve` command as a fresh process (on a free port), its client code against it."""
    import time

    import httpx

    from sisa.testing import free_port

    commands = [line.split("  #")[0].strip() for line in blocks("bash", "## Serving over HTTP").splitlines()]
    subprocess.run(commands[0], shell=True, check=True)  # the token file
    port = str(free_port())
    argv = shlex.split(commands[1].replace("8000", port))
    assert argv[:2] == ["sisa", "serve"]
    with open(folder / "serve.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "sisa.cli", *argv[1:]], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, (folder / "serve.log").read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        code = blocks("python", "## Serving over HTTP").replace("8000", port)
        scope: dict = {"__name__": "readme"}
        exec(compile(code, "README.md", "exec"), scope)  # our own docs
        assert scope["ack"].status_code == 202 and scope["state"]["status"] in ("pending", "applied")
        assert len(scope["answer"]["predictions"]) == 3
    finally:
        proc.terminate()
        proc.wait(30)


def run_proving_section(folder: Path) -> None:
    """Its command keeps the key and the witness outside the store (paths under `folder`)."""
    line = blocks("bash", "## Proving a deletion").strip()
    argv = shlex.split(line.replace("~/.sisa", str(folder / "keys")).replace("/backups",
                                                                             str(folder / "backups")))
    (folder / "keys").mkdir()
    (folder / "backups").mkdir()
    assert argv[:2] == ["sisa", "train"]
    result = CliRunner().invoke(app, [*argv[1:], "--shards", "2", "--slices", "2", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert (folder / "keys" / "kept.key").is_file() and (folder / "backups" / "kept.witness").is_file()
    store_db = (folder / "stores" / "kept" / "store.db").read_bytes()
    assert bytes.fromhex((folder / "keys" / "kept.key").read_text().strip()) not in store_db


def test_the_readme_runs_in_order_in_one_folder(tmp_path, monkeypatch):
    """A new user's path: each quick start, then the serving example and the proving section's
    command, one after the other in one folder, as written (no section may trip over another's
    store)."""
    monkeypatch.chdir(tmp_path)
    run_cli_quick_start(tmp_path)
    run_library_quick_start(tmp_path)
    run_serving_example(tmp_path)
    run_proving_section(tmp_path)


@pytest.mark.slow
def test_the_main_job_runs_end_to_end(tmp_path):
    """`make demo`'s command as a fresh process: SISA within 2 points of the monolith, the deletion
    cheaper than retraining, and the audit clean."""
    proc = subprocess.run([sys.executable, "-m", "sisa.cli", "demo", "--json", "--no-progress"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["backend"] == "head" and result["audit_ok"]
    assert result["sisa_accuracy"] >= result["monolith_accuracy"] - 0.02
    assert result["forget_samples"] < result["sisa_train_samples"]


@pytest.mark.slow
def test_the_language_model_demo_runs_end_to_end(tmp_path):
    """`sisa demo --backend causal_lm` as a fresh process (SmolLM2 on chitchat): the canaries were
    memorised before forgetting, the forgotten ones are no longer exposed, and the audit is clean."""
    proc = subprocess.run([sys.executable, "-m", "sisa.cli", "demo", "--backend", "causal_lm",
                           "--json", "--no-progress"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=1200, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    proof = result["proof"]
    assert result["audit_ok"] and proof["memorised"]
    assert proof["forgotten_mean_exposure"] < proof["mean_exposure_before"] - 5
    # Decided by the oracle: the store after the deletion is a scratch store's, byte for byte.
    assert proof["oracle"]["identical"] and proof["verdict"] == "yes", proof["verdict_reason"]
    # The equivalence test's power at the demo's sizes is stated beside it.
    assert 0.0 <= proof["tost"]["power"] <= 1.0 and proof["tost"]["n"] >= 1
