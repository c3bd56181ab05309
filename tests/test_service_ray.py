"""`sisa serve --ray`: the service on Ray Serve with two replicas, on a local Ray bound to
loopback; deleting while clients predict never gives a stale answer, and every replica catches up."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sisa import Sisa
from sisa.service.staleness import Answer, Deletion, check
from sisa.testing import free_port

from .conftest import SPEC, make_rows, small_config

pytestmark = pytest.mark.ray

# In a fresh process (no Ray of another test is up): serve, predict on threads while deleting,
# and report the answers, the deletions with their receipts, which replicas answered, and every
# TCP socket a process of the run listens on.
_PROBE = """
import json, sys, httpx, psutil
from sisa.service import ServiceConfig
from sisa.service.ray_serve import ray_service
from sisa.testing.serving import delete_while_predicting

store, port = sys.argv[1], int(sys.argv[2])
token = "ray-token-0123456789abcdef"
auth = {"Authorization": "Bearer " + token}
config = ServiceConfig(token=token, port=port, batch_window=0.05, replicas=2, replica_cpus=0.5)
report = {"answers": [], "deletions": [], "errors": [], "pids": []}
with ray_service(store, config) as url:
    client = httpx.Client(base_url=url, timeout=60)
    report.update(delete_while_predicting(url, auth, ["r%04d" % i for i in range(0, 24, 6)],
                                          [[0.1, 0.2, 0.3, 0.4]], settle=1.0))
    # The last answers: every replica must have caught up with the retrained shards.
    report["final"] = [client.post("/v1/predict", json={"inputs": [[0.0] * 4]}).json()["model"]["shards"]
                       for _ in range(8)]
    report["pids"] = sorted({client.get("/v1/status", headers=auth).json()["service"]["pid"]
                             for _ in range(12)})
    me = psutil.Process()
    report["sockets"] = [(p.name(), c.laddr.ip, c.laddr.port) for p in [me, *me.children(recursive=True)]
                         for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
print("REPORT " + json.dumps(report))
"""


def test_ray_serve_two_replicas_never_answer_stale_and_catch_up(tmp_path: Path) -> None:
    store = tmp_path / "store"
    Sisa.train(store, make_rows(150), small_config(), SPEC).close()
    port = free_port()
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", _PROBE, str(store), str(port)], cwd=root,
                          capture_output=True, text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(lines[-1].removeprefix("REPORT "))
    assert not report["errors"], report["errors"][:3]
    assert len(report["pids"]) == 2, report["pids"]  # both replicas answered
    deletions = [Deletion(at, shards, receipt) for at, shards, receipt in report["deletions"]]
    answers = [Answer(sent, shards) for sent, shards in report["answers"]]
    result = check(answers, deletions)
    assert result.unapplied == 0 and len(answers) > 10
    assert result.stale == 0, result.examples
    with Sisa.open(store, recover=False, read_only=True) as sisa:
        live = {str(s): sha for s, sha in sisa.servable().items()}
    assert all(final == live for final in report["final"]), (report["final"], live)
    listening = report["sockets"]
    assert any(port == p for _, _, p in listening), listening  # the proxy, found: not vacuous
    exposed = [s for s in listening if s[1] not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")]
    assert not exposed, f"the service listens beyond loopback: {exposed}"
