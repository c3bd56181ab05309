"""Serving from a node that cannot see the store: a replica reads through the store's keeper
(`sisa.service.remote`), gets checkpoints as bytes by digest, verifies them, and never answers
stale. In one process first (fast), then on a two-node Ray cluster whose worker node has the
store's directory hidden by a mount namespace."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sisa import Sisa
from sisa.checkpoint import WEIGHTS
from sisa.config import ServiceConfig
from sisa.errors import CheckpointError, CheckpointMovedError, ConfigError
from sisa.service import Service
from sisa.service.remote import RemoteSisa, StoreKeeper
from sisa.service.staleness import Answer, Deletion, check
from sisa.serving.loader import received
from sisa.testing import free_port
from sisa.testing.serving import delete_while_predicting

from .conftest import SPEC, copy_store, make_rows, small_config

INPUTS = [[0.1, 0.2, 0.3, 0.4], [1.5, 0.0, 0.0, 0.0], [0.0, 0.0, 1.5, 0.2]]


def served(keeper: StoreKeeper, call: Any = None) -> Service:
    """A replica's `Service`, reading and acknowledging through `keeper` only."""
    remote = RemoteSisa(call or keeper.call)
    return Service(keeper.reader.root, ServiceConfig(no_auth=True), worker=False, opened=remote).start()


def test_a_replica_through_the_keeper_answers_as_the_store_and_follows_a_deletion(base, tmp_path):
    store = copy_store(base.root, tmp_path)
    keeper = StoreKeeper(store)
    service = served(keeper)
    try:
        first = service.predict(INPUTS)
        with Sisa.open(store, recover=False, read_only=True) as local:
            np.testing.assert_array_equal(first.probabilities, local.predict_proba(np.asarray(INPUTS)))
            assert first.model.shards == local.servable()
        assert keeper.sent == 3 and service.reader.checkpoints_read == 3

        request = service.acknowledge([base.rows[0]["id"]], None)
        pending = service.predict(INPUTS).model
        assert set(pending.excluded) == set(request.shards)
        assert not set(pending.shards) & set(request.shards)
        assert (service.deletion(request.request_id) or {})["status"] == "pending"

        with Sisa.open(store) as writer:  # opening it applies what is pending, as a worker would
            (receipt,) = [*writer.recovered_, *writer.apply_pending()]
            live = writer.servable()
        after = service.predict(INPUTS)
        assert after.model.shards == live and not after.model.excluded
        assert keeper.sent == 3 + len(request.shards)  # only the retrained shard(s) travelled
        for shard in request.shards:
            assert live[shard] == receipt.checkpoints_changed[str(shard)]["after"]
        assert (service.deletion(request.request_id) or {})["status"] == "applied"
        assert service.status()["store"]["live_records"] == len(base.rows) - 1
        assert service.status()["service"]["store_access"] == "keeper"
        with pytest.raises(ConfigError, match="through its keeper"):
            service.reader.forget([base.rows[1]["id"]])  # the store itself is elsewhere
    finally:
        service.close()
        keeper.close()


def test_checkpoint_bytes_are_verified_where_they_arrive(base, tmp_path):
    keeper = StoreKeeper(copy_store(base.root, tmp_path), deletions=False)
    try:
        shard, sha = sorted(keeper.servable().items())[0]
        files = keeper.checkpoint(shard, sha)
        assert received(files, shard, sha, "here").sha256 == sha
        flipped = bytearray(files.blobs[WEIGHTS])
        flipped[-1] ^= 1
        damaged = dataclasses.replace(files, blobs={**files.blobs, WEIGHTS: bytes(flipped)})
        with pytest.raises(CheckpointError, match="does not match"):
            received(damaged, shard, sha, "here")
        with pytest.raises(CheckpointError, match="received another"):
            received(files, shard + 1, sha, "here")
        ok, error = keeper.call("checkpoint", shard, "0" * 64)
        assert not ok and isinstance(error, CheckpointMovedError)
        ok, error = keeper.call("tidy")
        assert not ok and isinstance(error, ConfigError)

        # A replica that receives damaged bytes for a shard leaves that shard out, saying why.
        def tampering(method: str, *args: Any) -> tuple[bool, Any]:
            ok, value = keeper.call(method, *args)
            if method == "checkpoint" and args[0] == shard:
                value = dataclasses.replace(value, blobs={**value.blobs, WEIGHTS: bytes(flipped)})
            return ok, value

        service = served(keeper, tampering)
        try:
            answer = service.predict(INPUTS).model
            assert shard not in answer.shards and answer.excluded == [shard]
            assert "does not match" in answer.why[shard]
        finally:
            service.close()
    finally:
        keeper.close()


def test_a_causal_lm_generates_and_scores_through_the_keeper(tmp_path, tiny_lm):
    from sisa import CausalLMConfig, PartitionConfig, SisaConfig

    from .conftest import CHAT_SPEC, make_chat_rows

    config = SisaConfig(partition=PartitionConfig(shards=2, slices=2, seed=3),
                        training=CausalLMConfig(model=tiny_lm, epochs_per_slice=1, batch_size=4,
                                                learning_rate=1e-2, max_length=48))
    with Sisa.train(tmp_path / "lm", make_chat_rows(), config, CHAT_SPEC) as sisa:
        expected = sisa.generate(["hi ok"], max_new_tokens=6)[0]
        scored = sisa.score([{"id": "0", "text": "ok sure", "prompt": "hi"}])
    keeper = StoreKeeper(tmp_path / "lm", deletions=False)
    service = served(keeper)
    try:
        (generation,), version = service.generate(["hi ok"], 6, None, 0.0, 0, ())
        assert generation.text == expected.text and version.version == expected.model_version
        report, _ = service.score(["ok sure"], ["hi"], None)
        assert report.records[0].logprob == pytest.approx(scored.records[0].logprob, abs=1e-9)
        assert keeper.sent == 2  # each adapter travelled once
    finally:
        service.close()
        keeper.close()


# -- two Ray nodes, the worker's with the store's directory hidden -------------------------------

HIDDEN = "sisa_hidden_node"  # the custom resource only the worker node has


@contextlib.contextmanager
def hidden_node(head: str, hide: Path, log: Path) -> Iterator[None]:
    """A Ray node joining `head`, started in its own mount namespace where `hide` is an empty
    tmpfs; killed (its whole process group) at the end: `ray stop` outside cannot see it."""
    ray_cli = str(Path(sys.executable).with_name("ray"))
    script = (f"mount -t tmpfs tmpfs {hide} && exec {ray_cli} start --address={head} "
              f"--num-cpus=2 --resources='{{\"{HIDDEN}\": 4}}' --block")
    with open(log, "wb") as out:
        proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                                stdout=out, stderr=out, start_new_session=True)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


@pytest.mark.ray
@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0,
                    reason="needs unshare and root (a mount namespace hides the store)")
def test_replicas_on_a_node_without_the_store_never_answer_stale(tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    from sisa.service.ray_serve import ray_service

    begun = time.monotonic()
    hide = tmp_path / "stores"  # the store's parent: empty on the worker node
    store = hide / "store"
    rows = make_rows(150)
    Sisa.train(store, rows, small_config(), SPEC).close()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    token = "remote-token-0123456789abcdef"
    auth = {"Authorization": "Bearer " + token}
    config = ServiceConfig(token=token, port=free_port(), batch_window=0.05, replicas=2,
                           replica_cpus=0.5, replica_resources={HIDDEN: 1})
    report: dict[str, Any] = {"answers": [], "errors": []}
    try:
        with hidden_node(cluster.address, hide, tmp_path / "node.log"):
            ray.init(address=cluster.address, log_to_driver=False)
            deadline = time.monotonic() + 120
            while not any(n["Alive"] and HIDDEN in n["Resources"] for n in ray.nodes()):
                assert time.monotonic() < deadline, (tmp_path / "node.log").read_text()[-3000:]
                time.sleep(0.2)

            @ray.remote(num_cpus=0, resources={HIDDEN: 0.01})
            def sees(path: str) -> tuple[str, bool, list[str]]:
                return (ray.get_runtime_context().get_node_id(), os.path.exists(path),
                        os.listdir(os.path.dirname(path)))

            hidden_id, store_seen, beside = ray.get(sees.remote(str(store)))
            assert not store_seen and beside == []  # the worker node cannot see the store
            cluster_up = time.monotonic() - begun
            with ray_service(store, config) as url:
                report["deploy_seconds"] = time.monotonic() - begun - cluster_up
                from ray.util.state import list_actors

                replicas = [a for a in list_actors(filters=[("state", "=", "ALIVE")])
                            if "SisaReplica" in a.class_name]
                assert len(replicas) == 2 and {a.node_id for a in replicas} == {hidden_id}
                report.update(run_clients(url, auth, [r["id"] for r in rows[:24:6]]))
    finally:
        ray.shutdown()
        cluster.shutdown()
    report["total_seconds"] = time.monotonic() - begun
    print("REMOTE " + json.dumps({k: v for k, v in report.items()
                                  if k not in ("answers", "deletions", "final", "pids")}))

    assert not report["errors"], report["errors"][:3]
    assert len(report["pids"]) == 2, report["pids"]  # both replicas answered
    assert report["store_access"] == ["keeper"]  # neither could read the directory
    deletions = [Deletion(at, shards, receipt) for at, shards, receipt in report["deletions"]]
    answers = [Answer(sent, shards) for sent, shards in report["answers"]]
    result = check(answers, deletions)
    print(f"REMOTE stale {result.stale} of {len(answers)} answers, {len(deletions)} deletions")
    assert result.unapplied == 0 and len(answers) > 10
    assert result.stale == 0, result.examples
    with Sisa.open(store, recover=False, read_only=True) as local:
        live = {str(s): sha for s, sha in local.servable().items()}
        expected = local.predict_proba(np.asarray(INPUTS))
    retrained: dict[str, str] = {}  # shard -> its checkpoint after the last deletion that retrained it
    for receipt in sorted((d[2] for d in report["deletions"]), key=lambda r: r["sequence"]):
        retrained.update({s: c["after"] for s, c in receipt["checkpoints_changed"].items()})
    assert retrained and all(live[s] == sha for s, sha in retrained.items())
    for shards, probabilities in report["final"]:  # every replica caught up, and answers as here
        assert shards == live
        np.testing.assert_allclose(probabilities, expected, rtol=0, atol=1e-6)


def run_clients(url: str, auth: dict[str, str], victims: list[str]) -> dict[str, Any]:
    """Predict on two threads while deleting `victims` one by one; the answers (when sent, which
    checkpoints served), the deletions (when acknowledged, their shards and receipts), the final
    answers and which replicas answered."""
    import httpx

    out = delete_while_predicting(url, auth, victims, INPUTS[:1])
    client = httpx.Client(base_url=url, timeout=60)
    final = [client.post("/v1/predict", json={"inputs": INPUTS, "probabilities": True}).json()
             for _ in range(6)]
    out["final"] = [[f["model"]["shards"], f["probabilities"]] for f in final]
    statuses = [client.get("/v1/status", headers=auth).json()["service"] for _ in range(12)]
    out["pids"] = sorted({s["pid"] for s in statuses})
    out["store_access"] = sorted({s["store_access"] for s in statuses})
    out["answered"] = len(out["answers"])
    return out
