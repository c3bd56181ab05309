"""Executors: in-process and Ray give bit-identical weights; Ray errors name the shard."""

from __future__ import annotations

import pytest

from sisa.api import Sisa
from sisa.config import ExecutionConfig
from sisa.errors import ShardTrainingError

from .conftest import SPEC

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
    local, _ = Sisa.train(tmp_path / "local", rows, config, SPEC)
    ray_config = config.replace(execution=ExecutionConfig(executor="ray", progress=False))
    remote, report = Sisa.train(tmp_path / "ray", rows, ray_config, SPEC)
    assert all(r.node not in ("", "local") for r in report.retrained)  # really ran in Ray tasks
    assert {s: r.sha256 for s, r in local.store.live().items()} == \
        {s: r.sha256 for s, r in remote.store.live().items()}
    victims = [rows[5]["id"], rows[77]["id"]]
    local.forget(victims)
    remote.forget(victims)
    assert {s: r.sha256 for s, r in local.store.live().items()} == \
        {s: r.sha256 for s, r in remote.store.live().items()}


def test_ray_error_names_the_shard_with_the_original_traceback(tmp_path, rows, config, ray_session):
    bad = config.replace(
        training=config.training.__class__(**{**config.training.__dict__, "backend": "no-such"}),
        execution=ExecutionConfig(executor="ray", max_retries=1, progress=False),
    )
    from sisa.execution import run_jobs
    from sisa.schedule import shard_schedule
    from sisa.training.protocol import ModelSpec
    from sisa.training.shard_trainer import ShardJob

    sched = shard_schedule("d", 2, [], 1)
    job = ShardJob(shard=2, config=bad, spec=ModelSpec(num_classes=2, input_dim=4),
                   config_digest="d", inputs=[], labels=[], members=[], sizes=sched.sizes,
                   set_digests=sched.set_digests, keys=sched.keys, start_slice=0)
    with pytest.raises(ShardTrainingError) as info:
        run_jobs([job], bad.execution)
    assert info.value.shard == 2
    assert "unknown backend 'no-such'" in info.value.traceback_text
    assert "Traceback" in info.value.traceback_text
    assert "shard_trainer.py" in info.value.traceback_text  # the frames of the original error
