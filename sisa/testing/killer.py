"""Run the `sisa` CLI in this process and kill it with SIGKILL at a chosen point (the crash tests
and the fault harness, `benchmarks/faults.py`).

    python -m sisa.testing.killer MODULE:ATTRIBUTE:WHEN:N -- sisa arguments...
    python -m sisa.testing.killer time:SECONDS -- sisa arguments...

The process dies (no clean-up, no `finally`) just before or just after the N-th call of the named
function, e.g. `shard_store.store:ShardStore.commit:after:1`: after the first commit transaction,
before the files it unregistered are removed. With `time:SECONDS` it dies that many seconds after
the command starts (torch and the library already imported), wherever it is then; a command that
finishes first exits as usual.
"""

from __future__ import annotations

import functools
import importlib
import os
import signal
import subprocess
import sys
import threading
from typing import Any


def arm(point: str) -> None:
    module_name, attribute, when, nth = point.split(":")
    owner: Any = importlib.import_module(module_name)
    *path, name = attribute.split(".")
    for part in path:
        owner = getattr(owner, part)
    original = getattr(owner, name)
    calls = {"n": 0}

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if when == "before" and calls["n"] == int(nth):
            os.kill(os.getpid(), signal.SIGKILL)
        result = original(*args, **kwargs)
        if when == "after" and calls["n"] == int(nth):
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    # On a class, a plain function: called through an instance it binds like the method did, and
    # through the class (a classmethod) the original is already bound.
    setattr(owner, name, wrapper)


def arm_timer(seconds: float) -> None:
    """SIGKILL this process `seconds` from now, once the slow imports are done (so the time is
    spent in the command, not in importing torch)."""
    importlib.import_module("sisa.api")
    timer = threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGKILL))
    timer.daemon = True  # a command that finishes first is not held up by it
    timer.start()


def command(point: str, *argv: str) -> list[str]:
    """The command line of `sisa argv` as a fresh process armed at `point`."""
    return [sys.executable, "-m", "sisa.testing.killer", point, "--", *argv]


def run(point: str, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`sisa argv` as a fresh process, armed at `point` (a named step or `time:SECONDS`); its
    return code is -SIGKILL when it died there."""
    return subprocess.run(command(point, *argv), capture_output=True, text=True, timeout=timeout)


def main() -> None:
    point, separator, *argv = sys.argv[1:]
    if separator != "--":
        raise SystemExit(__doc__)
    if point.startswith("time:"):
        arm_timer(float(point.removeprefix("time:")))
    else:
        arm(point)
    from sisa.cli import app

    app(argv, prog_name="sisa")


if __name__ == "__main__":
    main()
