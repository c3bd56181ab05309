"""Executors: in-process and Ray give bit-identical weights; Ray errors name the shard."""

from __future__ import annotations

import pytest

from sisa import ExecutionConfig, MLPConfig, ShardTrainingError, Sisa

from .conftest import SPEC, live_shas

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_session(tmp_path_factory):
    import ray

    from sisa.execution import default_ray_temp_dir

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             _temp_dir=default_ray_temp_dir(), log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def test_local_and_ray_executors_are_bit_identical(tmp_path, rows, config, ray_session):
    local = Sisa.train(tmp_path / "local", rows, config, SPEC)
    ray_config = config.replace(execution=ExecutionConfig(executor="ray", progress=False))
    remote = Sisa.train(tmp_path / "ray", rows, ray_config, SPEC)
    report = remote.training_report_
    assert all(r.node not in ("", "local") for r in report.retrained)  # really ran in Ray tasks
    assert live_shas(local) == live_shas(remote)
    victims = [rows[5]["id"], rows[77]["id"]]
    local.forget(victims)
    remote.forget(victims)
    assert live_shas(local) == live_shas(remote)


def test_ray_error_names_the_shard_with_the_original_traceback(tmp_path, rows, config, ray_session):
    import numpy as np

    from sisa.execution import run_jobs
    from sisa.schedule import shard_schedule
    from sisa.tasks import ModelSpec
    from sisa.training.shard_trainer import ShardJob

    class Unknown(MLPConfig):
        backend = "no-such"  # type: ignore[misc]

    execution = ExecutionConfig(executor="ray", max_retries=1, progress=False)
    job = ShardJob(schedule=shard_schedule("d", 2, [], 1), training=Unknown(),
                   spec=ModelSpec(num_classes=2, input_dim=4), seed=0, device="cpu",
                   config_digest="d", inputs=[], targets=np.zeros(0, dtype=np.int64), start_slice=0)
    with pytest.raises(ShardTrainingError) as info:
        list(run_jobs([job], execution))
    assert info.value.shard == 2
    assert "unknown backend 'no-such'" in info.value.traceback_text
    assert "Traceback" in info.value.traceback_text
    assert "shard_trainer.py" in info.value.traceback_text  # the frames of the original error


def test_causal_lm_on_ray_equals_in_process(tmp_path, tiny_lm, ray_session):
    """The causal-LM backend's jobs (tokens and cached lower-layer activations) travel to Ray
    tasks and come back with the same bits as in-process training, before and after a deletion."""
    from sisa import PartitionConfig, SisaConfig
    from sisa.config import CausalLMConfig

    from .conftest import CHAT_SPEC, make_chat_rows

    chat = make_chat_rows()
    config = SisaConfig(partition=PartitionConfig(shards=2, slices=2, seed=1),
                        training=CausalLMConfig(model=tiny_lm, epochs_per_slice=1, batch_size=4,
                                                top_k_layers=1, max_length=32))
    local = Sisa.train(tmp_path / "local", chat, config, CHAT_SPEC)
    remote = Sisa.train(tmp_path / "ray", chat, config.replace(
        execution=ExecutionConfig(executor="ray", progress=False)), CHAT_SPEC)
    assert all(r.node not in ("", "local") for r in remote.training_report_.retrained)
    assert live_shas(local) == live_shas(remote)
    local.forget_group("u2")
    remote.forget_group("u2")
    assert live_shas(local) == live_shas(remote)
