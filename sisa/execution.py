"""Stage 4 of the pipeline: runs shard jobs in-process or as one Ray task per shard.

This is the only module that imports `ray`. Jobs and results travel by value (Ray's object store),
so a task never needs the driver's filesystem. Results are yielded as shards finish, so the caller
can store each one at once. A failing shard is retried; the error that finally surfaces names the
shard and carries the original traceback.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import ipaddress
import os
import re
import shutil
import stat
import tempfile
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

from sisa.config import ExecutionConfig
from sisa.errors import ConfigError, RayExposureError, ShardTrainingError
from sisa.training.jobs import ShardJob, ShardResult
from sisa.training.protocol import Backend


def run_jobs(jobs: Sequence[ShardJob], execution: ExecutionConfig, backend: Backend | None = None,
             on_epoch: Callable[[ShardJob, int, int], None] | None = None) -> Iterator[ShardResult]:
    """Train every job, yielding each result as its shard finishes. `backend` (the driver's) serves
    in-process jobs; Ray tasks resolve their own. `on_epoch(job, slice, epoch)`: called as each
    epoch of an in-process job ends (a Ray task's progress is its result)."""
    if not jobs:
        return
    if execution.executor == "ray":
        yield from _run_ray(jobs, execution)
    else:
        yield from _run_local(jobs, execution, backend, on_epoch)


def _run_local(jobs: Sequence[ShardJob], execution: ExecutionConfig, backend: Backend | None,
               on_epoch: Callable[[ShardJob, int, int], None] | None = None) -> Iterator[ShardResult]:
    from sisa.training.shard_trainer import train_shard  # torch: only where shards train

    for job in jobs:
        attempts = 0
        progress = {"on_epoch": functools.partial(on_epoch, job)} if on_epoch is not None else {}
        while True:
            attempts += 1
            try:
                result = train_shard(job, backend, **progress)
                break
            except Exception:  # retried, then surfaced with the shard and the traceback
                if attempts > execution.max_retries:
                    raise ShardTrainingError(job.shard, attempts, traceback.format_exc()) from None
        yield replace(result, attempts=attempts, node="local")


# Ray's `ray.init(_node_ip_address="127.0.0.1")` does not keep 127.0.0.1: it swaps loopback for the
# node's routable address (`services.resolve_ip_for_localhost`) unless Ray "clusters" are disabled,
# as they are by default on macOS and Windows. The GCS, raylet (node and object manager), workers,
# driver, runtime-env agent, dashboard agent and metrics exporter then bind every interface
# (`[::]`) or that address; they bind loopback only when the node address is loopback. So, while a
# local Ray runs, clusters are disabled: by the variable (read when `ray` is imported, also by Ray's
# own processes, which inherit it) and by Ray's constant read from it (`ray` may be imported already).
# Both are restored after `ray.shutdown()`. Should a Ray keep a routable address all the same,
# `require_loopback` shuts it down and raises RayExposureError.
_LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def ray_runtime(execution: ExecutionConfig) -> Iterator[Any]:
    """Use the running Ray, or connect to `ray_address`, or start a local one (see `local_ray`).

    Shuts down only what it started."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    if not execution.ray_address:
        with local_ray(execution.ray_temp_dir) as started:
            yield started
        return
    ray.init(address=execution.ray_address, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@contextlib.contextmanager
def local_ray(temp_dir: str | None = None, **init_options: Any) -> Iterator[Any]:
    """Start a Ray on this machine for this process alone, and shut it down after.

    Every port it listens on is bound to 127.0.0.1 (nothing off this machine needs it), there is
    no dashboard, and its files and sockets sit in a directory only this user can enter:
    `temp_dir` if given (it must be yours and not group- or world-writable), else a fresh one under
    the system temp dir (Ray's socket paths must stay under about 100 bytes), removed after. Ray
    makes its own temp dir world-writable (chmod 0777), so it gets a subdirectory of that one.
    `init_options` go to `ray.init` (e.g. num_cpus)."""
    import ray

    if temp_dir:
        root, fresh = private_dir(temp_dir), None
    else:
        root = fresh = tempfile.mkdtemp(prefix="sisa-ray-")  # mode 0700
    try:
        with _ray_clusters_disabled():
            ray.init(include_dashboard=False, _node_ip_address="127.0.0.1",
                     _temp_dir=os.path.join(root, "ray"), log_to_driver=False,
                     configure_logging=False, **init_options)
            try:
                require_loopback(ray.util.get_node_ip_address())
                yield ray
            finally:
                ray.shutdown()
    finally:
        if fresh:
            shutil.rmtree(fresh, ignore_errors=True)  # best effort


@contextlib.contextmanager
def _ray_clusters_disabled() -> Iterator[None]:
    """Ray resolves the node address 127.0.0.1 to loopback (see _LOCAL_ONLY_ENV), until exit."""
    ray_constants: Any = None
    with contextlib.suppress(ImportError):  # else `require_loopback` still refuses an exposed Ray
        ray_constants = importlib.import_module("ray._private.ray_constants")
    saved_env = os.environ.get(_LOCAL_ONLY_ENV)
    saved_flag = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    os.environ[_LOCAL_ONLY_ENV] = "0"
    if ray_constants is not None:
        ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if saved_env is None:
            os.environ.pop(_LOCAL_ONLY_ENV, None)
        else:
            os.environ[_LOCAL_ONLY_ENV] = saved_env
        if ray_constants is not None:
            ray_constants.ENABLE_RAY_CLUSTER = saved_flag


def require_loopback(node_ip: str) -> None:
    try:
        loopback = ipaddress.ip_address(node_ip).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise RayExposureError(
            f"the local Ray took node address {node_ip!r}, not 127.0.0.1, so its servers would "
            "listen on other interfaces too; sisa does not run it. Start Ray yourself and pass "
            "its address (--ray-address), or use --executor local")


def private_dir(path: str) -> str:
    """`path` (created with mode 0700 if missing), absolute, after checking no one else can write
    in it; a ConfigError names the path and the fix."""
    real = os.path.realpath(path)
    fix = ("use a directory of your own that only you can write to (mkdir -m 700 DIR; chmod 700 "
           "DIR), or leave ray_temp_dir unset for a fresh private one")
    try:
        os.makedirs(real, mode=0o700, exist_ok=True)
        info = os.stat(real)
    except OSError as exc:
        raise ConfigError(f"ray_temp_dir {path!r} cannot be used: {exc.strerror}; {fix}") from None
    problems = []
    if not stat.S_ISDIR(info.st_mode):
        problems.append("it is not a directory")
    if info.st_uid != os.getuid():
        problems.append(f"it is owned by uid {info.st_uid}, not by you (uid {os.getuid()})")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        problems.append(f"its mode {stat.filemode(info.st_mode)} lets others write in it")
    if problems:
        raise ConfigError(f"ray_temp_dir {path!r} is not private to you: {'; '.join(problems)}. "
                          f"Ray keeps its sockets and session files there; {fix}")
    return real


def _ray_task(job: ShardJob) -> ShardResult:
    import ray

    from sisa.training.shard_trainer import train_shard

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
