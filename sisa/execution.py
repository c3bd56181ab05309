"""Stage 4 of the pipeline: runs shard jobs in-process or as one Ray task per shard.

This is the only module that imports `ray`. Jobs and results travel by value (Ray's object store),
so a task never needs the driver's filesystem. A failing shard is retried; the error that finally
surfaces names the shard and carries the original traceback.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from sisa.config import ExecutionConfig
from sisa.errors import ShardTrainingError
from sisa.training.shard_trainer import ShardJob, ShardResult, train_shard

OnDone = Callable[[ShardResult], None]


def run_jobs(
    jobs: Sequence[ShardJob], execution: ExecutionConfig, on_done: OnDone | None = None
) -> list[ShardResult]:
    """Train every job; results come back in job order. `on_done` sees each as it finishes."""
    if not jobs:
        return []
    if execution.executor == "ray":
        return _run_ray(jobs, execution, on_done)
    return _run_local(jobs, execution, on_done)


def _run_local(
    jobs: Sequence[ShardJob], execution: ExecutionConfig, on_done: OnDone | None
) -> list[ShardResult]:
    results = []
    for job in jobs:
        attempts = 0
        while True:
            attempts += 1
            try:
                result = train_shard(job)
                break
            except Exception:  # retried, then surfaced with the shard and the traceback
                if attempts > execution.max_retries:
                    raise ShardTrainingError(job.shard, attempts, traceback.format_exc()) from None
        result = ShardResult(result.shard, result.checkpoints, result.samples, result.seconds,
                             attempts=attempts, node="local")
        if on_done is not None:
            on_done(result)
        results.append(result)
    return results


def default_ray_temp_dir() -> str:
    # Ray's socket paths must stay short (about 100 bytes), so not inside a deep store directory.
    return str(Path(tempfile.gettempdir()) / f"sisa-ray-{os.getuid()}")


@contextlib.contextmanager
def ray_runtime(execution: ExecutionConfig) -> Iterator[Any]:
    """Use the running Ray, or connect to `ray_address`, or start a local one on 127.0.0.1.

    Shuts down only what it started."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    if execution.ray_address:
        ray.init(address=execution.ray_address, log_to_driver=False)
    else:
        ray.init(
            include_dashboard=False,
            _node_ip_address="127.0.0.1",  # loopback only: never expose an unauthenticated Ray
            _temp_dir=execution.ray_temp_dir or default_ray_temp_dir(),
            log_to_driver=False,
            configure_logging=False,
        )
    try:
        yield ray
    finally:
        ray.shutdown()


def _ray_task(job: ShardJob) -> ShardResult:
    import ray

    result = train_shard(job)
    node = ray.get_runtime_context().get_node_id()
    return ShardResult(result.shard, result.checkpoints, result.samples, result.seconds, node=node)


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)  # Ray colours its tracebacks for terminals


def _run_ray(
    jobs: Sequence[ShardJob], execution: ExecutionConfig, on_done: OnDone | None
) -> list[ShardResult]:
    with ray_runtime(execution) as ray:
        remote = ray.remote(_ray_task).options(
            num_cpus=execution.cpus_per_shard,
            num_gpus=execution.gpus_per_shard,
            resources=dict(execution.resources_per_shard) or None,
            max_retries=execution.max_retries,
            retry_exceptions=True,
        )
        pending = {remote.remote(job): job for job in jobs}
        by_shard: dict[int, ShardResult] = {}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            ref = done[0]
            job = pending.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:
                for other in pending:
                    ray.cancel(other)
                text = "Traceback (from the Ray task):\n" + _plain(str(exc))
                raise ShardTrainingError(job.shard, execution.max_retries + 1, text) from None
            by_shard[job.shard] = result
            if on_done is not None:
                on_done(result)
        return [by_shard[job.shard] for job in jobs]
