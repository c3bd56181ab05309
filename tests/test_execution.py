"""Executors: in-process and Ray give bit-identical weights; Ray errors name the shard."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from sisa import ConfigError, ExecutionConfig, MLPConfig, ShardTrainingError, Sisa

from .conftest import SPEC, live_shas

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_session(tmp_path_factory):
    from sisa.execution import local_ray

    with local_ray(num_cpus=2) as ray:
        yield ray


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


# Run in a fresh process, so that no Ray of this module's fixture is already up: starts sisa's local
# Ray, runs a task (so a worker serves), and reports every TCP socket listened on by a process of
# Ray's (the driver and its descendants: GCS, raylet, agents, workers) and the temp dir's state.
_PROBE = """
import json, os, sys, psutil
from sisa import ExecutionConfig
from sisa.execution import ray_runtime

def sockets(proc):
    connections = getattr(proc, "net_connections", None) or proc.connections
    return [(proc.name(), c.laddr.ip, c.laddr.port) for c in connections(kind="inet")
            if c.status == psutil.CONN_LISTEN]

report = {}
with ray_runtime(ExecutionConfig(executor="ray", progress=False)) as ray:
    ray_temp = ray._private.worker._global_node.get_temp_dir_path()
    root = os.path.dirname(ray_temp)
    info = os.stat(root)
    report.update(ray_temp=ray_temp, root=root, mode=info.st_mode & 0o7777, uid=info.st_uid,
                  env=os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"))
    def pid():
        return os.getpid()

    assert ray.get(ray.remote(pid).remote()) != os.getpid()  # a worker started and ran it
    me = psutil.Process()
    report["sockets"] = [s for p in [me, *me.children(recursive=True)] for s in sockets(p)]
report["root_exists"] = os.path.exists(report["root"])
report["env_after"] = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
print("REPORT " + json.dumps(report))
"""


def test_local_ray_listens_on_loopback_only_in_a_private_temp_dir():
    """Every port of the Ray that sisa starts is bound to loopback (Ray 2.60 turns the node address
    127.0.0.1 into the routable one, and then binds [::]), and its files sit in a fresh directory
    only this user can enter, removed after."""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    done = subprocess.run([sys.executable, "-c", _PROBE], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(lines[-1].removeprefix("REPORT "))
    listening = report["sockets"]
    names = {name for name, _, _ in listening}
    assert "gcs_server" in names and "raylet" in names, listening  # not vacuous
    exposed = [s for s in listening if s[1] not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")]
    assert not exposed, f"Ray listens beyond loopback: {exposed} (all: {listening})"
    assert report["mode"] == 0o700 and report["uid"] == os.getuid(), report
    assert Path(report["ray_temp"]).parent == Path(report["root"])
    assert os.path.basename(report["root"]).startswith("sisa-ray-")
    assert len(report["ray_temp"]) < 60  # Ray's socket paths below it must stay under ~107 bytes
    assert report["env"] == "0" and report["env_after"] is None  # scoped to the runtime
    assert not report["root_exists"], f"{report['root']} was not removed"


def test_ray_temp_dir_must_be_private(tmp_path):
    from sisa.execution import local_ray, private_dir

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with (pytest.raises(ConfigError, match="not private to you: its mode drwxrwxrwx lets others") as info,
          local_ray(str(shared))):
        pass  # never started
    assert str(shared) in str(info.value) and "mkdir -m 700" in str(info.value)
    group = tmp_path / "group"
    group.mkdir(mode=0o770)
    group.chmod(0o770)
    with pytest.raises(ConfigError, match="lets others write"):
        private_dir(str(group))
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(ConfigError, match="cannot be used"):
        private_dir(str(a_file))
    created = tmp_path / "new" / "ray-tmp"
    assert private_dir(str(created)) == str(created.resolve())
    assert stat.S_IMODE(created.stat().st_mode) == 0o700
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    assert private_dir(str(private)) == str(private.resolve())


def test_a_ray_on_a_routable_address_is_refused():
    from sisa.errors import RayExposureError, SisaError
    from sisa.execution import require_loopback

    require_loopback("127.0.0.1")
    require_loopback("::1")
    with pytest.raises(RayExposureError, match=re.escape("'192.0.2.2', not 127.0.0.1")) as info:
        require_loopback("192.0.2.2")
    assert isinstance(info.value, SisaError)
