"""The deletion worker in a process of its own (`sisa serve`'s default under uvicorn): deletions
acknowledged by the service are applied by the child, exactly, the service loads the retrained
shards from its reports, and a child that dies is started again and finishes what is pending."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from fastapi.testclient import TestClient

from sisa import Sisa
from sisa.service import Service, ServiceConfig, create_app

from .conftest import SPEC, live_shas, make_rows, small_config

TOKEN = "t0ken-for-tests-only-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ROW = [0.5, 1.0, -0.5, 0.0]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Service, TestClient, Path]]:
    store = tmp_path / "store"
    Sisa.train(store, make_rows(150), small_config(), SPEC).close()
    config = ServiceConfig(token=TOKEN, batch_window=0.0, poll_interval=0.1, worker="process")
    service = Service(store, config).start()
    try:
        yield service, TestClient(create_app(service)), store
    finally:
        service.close()


def applied(client: TestClient, request_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while (state := client.get(f"/v1/deletions/{request_id}", headers=AUTH).json())["status"] != "applied":
        assert time.monotonic() < deadline, state
        time.sleep(0.05)
    return state


def test_deletions_are_applied_by_a_process_of_their_own_exactly(served):
    service, client, store = served
    assert service.worker.wait_idle(60)
    worker = client.get("/v1/status", headers=AUTH).json()["service"]["worker"]
    assert worker["alive"] and worker["ready"] and worker["process"] not in (None, os.getpid())
    child = psutil.Process(worker["process"])
    assert child.ppid() == os.getpid()
    assert child.nice() == os.nice(0) + 10  # requests first (ServiceConfig.worker_nice)
    before = client.post("/v1/predict", json={"inputs": [ROW]}).json()["model"]

    ack = client.post("/v1/deletions", json={"ids": ["r0004", "r0007"]}, headers=AUTH).json()
    state = applied(client, ack["request_id"])
    assert service.worker.wait_idle(30)  # its report was handled: counted, and the shards loaded
    changed = state["receipt"]["checkpoints_changed"]
    assert sorted(map(int, changed)) == ack["shards"]
    assert service.reader.loaded == {int(s): sha for s, sha in client.post(
        "/v1/predict", json={"inputs": [ROW]}).json()["model"]["shards"].items()}
    after = client.post("/v1/predict", json={"inputs": [ROW]}).json()["model"]
    for shard, change in changed.items():
        assert after["shards"][shard] == change["after"] != before["shards"][shard]
    rows = [r for r in make_rows(150) if r["id"] not in ("r0004", "r0007")]
    with Sisa.train(store.parent / "scratch", rows, small_config(), SPEC) as scratch:
        assert {str(s): sha for s, sha in live_shas(scratch).items()} == after["shards"]
    metrics = client.get("/metrics").text
    assert "sisa_deletions_applied_total 1.0" in metrics
    assert "sisa_deletion_ack_to_applied_seconds_count 1.0" in metrics
    assert service.worker.failures == {}


def test_a_killed_worker_process_is_started_again_and_applies_what_is_pending(served):
    service, client, _store = served
    assert service.worker.wait_idle(60)
    first = service.worker.pid
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while psutil.pid_exists(first) and psutil.Process(first).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # Acknowledged while no worker runs: durable, and its shards excluded until applied.
    ack = client.post("/v1/deletions", json={"ids": ["r0010"]}, headers=AUTH)
    assert ack.status_code == 202, ack.text
    body = ack.json()
    assert client.post("/v1/predict", json={"inputs": [ROW]}).json()["model"][
        "excluded_shards"] == body["shards"]
    state = applied(client, body["request_id"])
    assert state["receipt"]["affected_shards"]
    assert service.worker.pid != first and service.worker.starts == 2 and service.worker.alive
    assert "sisa_deletion_worker_failures_total 1.0" in client.get("/metrics").text
    assert service.worker.wait_idle(30)
    assert client.post("/v1/predict", json={"inputs": [ROW]}).json()["model"]["excluded_shards"] == []


def test_close_stops_the_worker_process(tmp_path):
    store = tmp_path / "store"
    Sisa.train(store, make_rows(60), small_config(), SPEC).close()
    service = Service(store, ServiceConfig(token=TOKEN, worker="process")).start()
    child = psutil.Process(service.worker.pid)
    service.close()
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    assert not service.worker.alive


def test_the_worker_process_ends_when_the_service_is_killed(tmp_path):
    """A service killed outright (SIGKILL) leaves no worker behind: its input closes, and it
    stops (a run it had begun is finished by the next writer, as after any crash)."""
    import httpx

    from sisa.testing import free_port

    from .test_service_e2e import AUTH as SERVE_AUTH
    from .test_service_e2e import start, wait_ready

    store = tmp_path / "store"
    Sisa.train(store, make_rows(60), small_config(), SPEC).close()
    port, log = free_port(), tmp_path / "serve.log"
    proc = start(store, port, log)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            wait_ready(client, proc, log)
            child = psutil.Process(client.get("/v1/status", headers=SERVE_AUTH).json()[
                "service"]["worker"]["process"])
        proc.kill()
        proc.wait(30)
        child.wait(60)  # raises TimeoutExpired if it outlives the service
    finally:
        if proc.poll() is None:
            proc.kill()
