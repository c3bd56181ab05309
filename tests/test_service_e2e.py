"""`sisa serve` as users run it: a fresh process on a loopback port, clients predicting on threads
while deletions arrive, and every answer checked against the deletion log (no stale answer)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil

from sisa import Sisa
from sisa.service.staleness import Answer, Deletion, check
from sisa.testing import free_port

from .conftest import SPEC, make_rows, small_config

TOKEN = "e2e-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def start(store: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    """The service, its output to `log` (a pipe nobody reads would fill and stall it)."""
    env = {**os.environ, "SISA_SERVE_TOKEN": TOKEN}
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "sisa.cli", "serve", "--store", str(store),
                                 "--port", str(port), "--batch-window", "0.3", "--log-level", "warning"],
                                env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_ready(client: httpx.Client, proc: subprocess.Popen[bytes], log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            if client.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("the service did not become ready")


def test_a_real_server_deletes_while_clients_predict_and_never_answers_stale(tmp_path):
    store = tmp_path / "store"
    rows = make_rows(240)
    Sisa.train(store, rows, small_config(shards=4), SPEC).close()
    port = free_port()
    log = tmp_path / "serve.log"
    proc = start(store, port, log)
    try:
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
        wait_ready(client, proc, log)
        # Loopback only: every socket the server listens on.
        listening = [c.laddr for c in psutil.Process(proc.pid).net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN]
        assert listening and all(a.ip == "127.0.0.1" for a in listening), listening
        # Deletions retrain in a child process, not among the request threads.
        child = client.get("/v1/status", headers=AUTH).json()["service"]["worker"]["process"]
        assert psutil.Process(child).ppid() == proc.pid

        answers: list[Answer] = []
        errors: list[str] = []
        stop = threading.Event()

        def predicting() -> None:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as own:
                while not stop.is_set():
                    sent = time.monotonic()
                    response = own.post("/v1/predict", json={"inputs": [[0.1, 0.2, 0.3, 0.4]] * 8})
                    if response.status_code != 200:
                        errors.append(response.text)
                        continue
                    answers.append(Answer(sent, response.json()["model"]["shards"]))

        threads = [threading.Thread(target=predicting) for _ in range(3)]
        for t in threads:
            t.start()
        acks = []
        for i in range(0, 60, 6):  # ten deletions, 0.2 s apart
            response = client.post("/v1/deletions", json={"ids": [f"r{i:04d}", f"r{i + 1:04d}"]},
                                   headers=AUTH)
            assert response.status_code == 202, response.text
            acks.append((time.monotonic(), response.json()))
            time.sleep(0.2)
        ledger = []
        for at, body in acks:
            deadline = time.monotonic() + 120
            while (state := client.get(f"/v1/deletions/{body['request_id']}", headers=AUTH).json())[
                    "status"] != "applied":
                assert time.monotonic() < deadline, state
                time.sleep(0.1)
            ledger.append(Deletion(at, body["shards"], state["receipt"]))
        time.sleep(0.5)  # answers after the last swap too
        stop.set()
        for t in threads:
            t.join()
        assert not errors, (errors[:3], log.read_text()[-3000:])
        result = check(answers, ledger)
        assert len(answers) > 30 and result.unapplied == 0
        assert result.stale == 0, result.examples
        # Some answers came while a shard was excluded (each for at least the 0.3 s batching
        # window), and the last ones from every shard.
        assert any(len(a.shards) < 4 for a in answers) and len(answers[-1].shards) == 4
        # The worker counts a run's receipts once the run has committed them.
        deadline = time.monotonic() + 30
        while "sisa_deletions_applied_total 10.0" not in client.get("/metrics").text:
            assert time.monotonic() < deadline, log.read_text()[-5000:]
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert proc.returncode == 0, log.read_text()
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE
    with Sisa.open(store, recover=False, read_only=True) as sisa:
        report = sisa.audit()
        assert sisa.pending() == [] and report.ok, report.violations
