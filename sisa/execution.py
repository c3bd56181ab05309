"""Stage 4 of the pipeline: runs shard jobs in-process or as one Ray task per shard.

This is the only module that imports `ray`. Jobs and results travel by value (Ray's object store),
so a task never needs the driver's filesystem. Results are yielded as shards finish, so the caller
can store each one at once. A failing shard is retried; the error that finally surfaces names the
shard and carries the original traceback.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from sisa.config import ExecutionConfig
from sisa.errors import ShardTrainingError
from sisa.training.protocol import Backend
from sisa.training.shard_trainer import ShardJob, ShardResult, train_shard


def run_jobs(jobs: Sequence[ShardJob], execution: ExecutionConfig,
             backend: Backend | None = None) -> Iterator[ShardResult]:
    """Train every job, yielding each result as its shard finishes. `backend` (the driver's) serves
    in-process jobs; Ray tasks resolve their own."""
    if not jobs:
        return
    if execution.executor == "ray":
        yield from _run_ray(jobs, execution)
    else:
        yield from _run_local(jobs, execution, backend)


def _run_local(jobs: Sequence[ShardJob], execution: ExecutionConfig,
               backend: Backend | None) -> Iterator[ShardResult]:
    for job in jobs:
        attempts = 0
        while True:
            attempts += 1
            try:
                result = train_shard(job, backend)
                break
            except Exception:  # retried, then surfaced with the shard and the traceback
                if attempts > execution.max_retries:
                    raise ShardTrainingError(job.shard, attempts, traceback.format_exc()) from None
        yield replace(result, attempts=attempts, node="local")


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
    return replace(result, node=ray.get_runtime_context().get_node_id())


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)  # Ray colours its tracebacks for terminals


def _run_ray(jobs: Sequence[ShardJob], execution: ExecutionConfig) -> Iterator[ShardResult]:
    with ray_runtime(execution) as ray:
        remote = ray.remote(_ray_task).options(
            num_cpus=execution.cpus_per_shard,
            num_gpus=execution.gpus_per_shard,
            resources=dict(execution.resources_per_shard) or None,
            max_retries=execution.max_retries,
            retry_exceptions=True,
        )
        pending = {remote.remote(job): job for job in jobs}
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                job = pending.pop(done[0])
                try:
                    result = ray.get(done[0])
                except ray.exceptions.RayTaskError as exc:
                    text = "Traceback (from the Ray task):\n" + _plain(str(exc))
                    raise ShardTrainingError(job.shard, execution.max_retries + 1, text) from None
                yield result
        finally:
            for ref in pending:  # an error, or the caller stopped early
                ray.cancel(ref)
