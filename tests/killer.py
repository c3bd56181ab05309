"""Run the `sisa` CLI in this process and kill it with SIGKILL at a chosen point (for test_crash.py).

    python tests/killer.py MODULE:ATTRIBUTE:WHEN:N -- sisa arguments...

The process dies (no clean-up, no `finally`) just before or just after the N-th call of the named
function, e.g. `shard_store.store:ShardStore.commit:after:1`: after the first commit transaction,
before the files it unregistered are removed.
"""

from __future__ import annotations

import functools
import importlib
import os
import signal
import sys
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


def main() -> None:
    point, separator, *argv = sys.argv[1:]
    if separator != "--":
        raise SystemExit(__doc__)
    arm(point)
    from sisa.cli import app

    app(argv, prog_name="sisa")


if __name__ == "__main__":
    main()
