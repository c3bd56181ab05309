"""Multi-node, simulated on one machine: shard tasks run on a second Ray node and never touch the
store's filesystem; checkpoints travel back through the object store."""

from __future__ import annotations

import pytest

from sisa import ExecutionConfig, Sisa

from .conftest import SPEC, live_shas

pytestmark = pytest.mark.ray


def test_train_and_forget_on_a_second_node(tmp_path, rows, config, monkeypatch):
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    worker = cluster.add_node(num_cpus=2, resources={"sisa_worker": 4})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        # The driver runs from a directory unrelated to the store; tasks get no paths at all.
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        monkeypatch.chdir(elsewhere)
        store_dir = tmp_path / "store"
        remote = config.replace(execution=ExecutionConfig(
            executor="ray", resources_per_shard={"sisa_worker": 1}, progress=False))
        sisa = Sisa.train(store_dir, rows, remote, SPEC)
        assert {r.node for r in sisa.training_report_.retrained} == {worker.node_id}
        assert len(sisa.live_checkpoints()) == config.partition.shards
        victim = rows[42]["id"]
        receipt = sisa.forget([victim])
        assert receipt.affected_shards and receipt.checkpoints_changed
        assert sisa.audit().ok
        for c in sisa.checkpoints():
            assert (store_dir / c.path / "weights.safetensors").is_file()
        assert not any(elsewhere.iterdir())  # nothing was written relative to the cwd
    finally:
        ray.shutdown()
        cluster.shutdown()

    # The checkpoints that came back equal an in-process scratch training without the record.
    local = Sisa.train(tmp_path / "local", [r for r in rows if r["id"] != victim], config, SPEC)
    assert live_shas(sisa) == live_shas(local)
