"""`sisa forget` hands its deletion to the running `sisa serve` of the store: the advertisement
(private, alive, this store's only), and the command end to end against a real service."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from sisa import Sisa
from sisa.handoff import RUNTIME_ENV, advert_path, advertise, running_service
from sisa.testing import free_port

from .conftest import SPEC, live_shas, make_rows, small_config
from .test_service_e2e import AUTH, TOKEN, wait_ready


@pytest.fixture
def runtime(tmp_path, monkeypatch) -> Path:
    where = tmp_path / "run"
    where.mkdir(mode=0o700)
    monkeypatch.setenv(RUNTIME_ENV, str(where))
    return where


def test_an_advertisement_is_found_only_while_private_alive_and_for_its_store(tmp_path, runtime):
    store = tmp_path / "store"
    withdraw, secret = advertise(store, "http://127.0.0.1:8123")
    assert running_service(store) == ("http://127.0.0.1:8123", secret) and len(secret) == 64
    assert running_service(tmp_path / "other") is None
    path = advert_path(store)
    assert path.stat().st_mode & 0o777 == 0o600
    text = json.loads(path.read_text())
    path.write_text(json.dumps({**text, "pid": 2 ** 22 + 12345}))  # a process that is gone
    assert running_service(store) is None
    path.write_text(json.dumps(text))
    runtime.chmod(0o777)  # others could have written it: ignored
    assert running_service(store) is None
    runtime.chmod(0o700)
    path.write_text(json.dumps({**text, "url": "http://10.1.2.3:8000"}))  # not loopback: ignored
    assert running_service(store) is None
    path.write_text(json.dumps(text))
    withdraw()
    assert not path.exists() and running_service(store) is None


def forget(store: Path, env: dict[str, str], *ids: str) -> dict:
    """`sisa forget --json` in a fresh interpreter: its receipt, with `imported` (which of torch,
    numpy and transformers it had imported by the end) added."""
    args = ["forget", "--store", str(store), *ids, "--json"]
    code = ("import json, sys; from sisa.cli import app\n"
            f"app({args!r}, standalone_mode=False)\n"
            "print(json.dumps([m for m in ('torch', 'numpy', 'transformers') if m in sys.modules]))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    *receipt, imported = proc.stdout.strip().splitlines()
    return {**json.loads("\n".join(receipt)), "imported": json.loads(imported)}


def test_forget_hands_the_deletion_to_the_running_service(tmp_path, runtime):
    store = tmp_path / "store"
    Sisa.train(store, make_rows(120), small_config(), SPEC).close()
    port, log = free_port(), tmp_path / "serve.log"
    env = {**os.environ, "SISA_SERVE_TOKEN": TOKEN}
    with open(log, "wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "sisa.cli", "serve", "--store", str(store),
                                   "--port", str(port), "--batch-window", "0", "--log-level",
                                   "warning"], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            wait_ready(client, server, log)
            assert running_service(store)[0] == f"http://127.0.0.1:{port}"
            # A server that cannot prove it wrote the advertisement gets neither token nor ids.
            advert = advert_path(store)
            real = json.loads(advert.read_text())
            advert.write_text(json.dumps({**real, "secret": "0" * 64}))
            unproven = forget(store, env, "r0001")
            assert "served_by" not in unproven and unproven["record_ids"] == ["r0001"]
            advert.write_text(json.dumps(real))
            handed = forget(store, env, "r0003")
            assert handed["served_by"] == f"http://127.0.0.1:{port}"
            assert handed["record_ids"] == ["r0003"] and handed["affected_shards"]
            # Handed over, the command runs no model: it imports neither torch nor numpy.
            assert handed["imported"] == [] and "torch" in unproven["imported"]
            state = client.get(f"/v1/deletions/{handed['request_id']}", headers=AUTH).json()
            assert state["status"] == "applied" and state["receipt"]["digest"] == handed["digest"]
            # Without the token the command does the work itself, beside the service.
            direct = forget(store, {k: v for k, v in env.items() if k != "SISA_SERVE_TOKEN"}, "r0005")
            assert "served_by" not in direct and direct["record_ids"] == ["r0005"]
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(60)
    assert server.returncode == 0, log.read_text()[-3000:]
    assert running_service(store) is None  # withdrawn as it stopped
    with Sisa.open(store, recover=False, read_only=True) as sisa:
        assert sisa.audit().ok and sisa.pending() == []
        rows = [r for r in make_rows(120) if r["id"] not in ("r0001", "r0003", "r0005")]
        with Sisa.train(tmp_path / "scratch", rows, small_config(), SPEC) as scratch:
            assert live_shas(sisa) == live_shas(scratch)
