"""Crashes at every commit step: the CLI, as a fresh process, killed with SIGKILL (sisa.testing.killer)
just before or after each step of `forget`, `add` and `train`. Then the next command (`status`, a
reader) leaves no file on disk that derives from a deleted record, `recover` finishes the work, the
audit passes, and every live shard is bit-identical to training from scratch on what remains."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sisa import Sisa
from sisa.testing import TRAIN_FLAGS, killer

from .conftest import SPEC, assert_exact, derived_from, make_rows, small_config, write_csv

STORE = "shard_store.store:ShardStore"


def killed(point: str, *argv: str) -> None:
    """Run `sisa argv` as a fresh process and check it died of SIGKILL at `point`."""
    proc = killer.run(point, *argv)
    assert proc.returncode == -signal.SIGKILL, \
        f"the process was not killed at {point} (exit {proc.returncode}): {proc.stderr[-2000:]}"


def cli(*argv: str, ok: bool = True) -> dict | list:
    result = CliRunner().invoke(__import__("sisa.cli", fromlist=["app"]).app, list(argv))
    if ok:
        assert result.exit_code == 0, result.output
    return json.loads(result.stdout) if "--json" in argv and result.exit_code == 0 else {}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, list[dict], list[str]]:
    """A trained store, and two victims: one from shard 1 (not in its first slice) and one
    from shard 2."""
    root = tmp_path_factory.mktemp("crash")
    rows = make_rows(90)
    sisa = Sisa.train(root / "store", rows, small_config(), SPEC)
    victims = [next(r.id for r in sisa.live_records(1) if r.slice == 1),
               next(r.id for r in sisa.live_records(2))]
    sisa.close()
    return root / "store", rows, victims


FORGET_POINTS = [
    f"{STORE}.acknowledge:after:1",  # acknowledged; files of the dropped checkpoints still on disk
    "shard_store.files:remove:after:1",  # halfway through removing them
    "shard_store.files:_fsync_file:after:1",  # a retrained checkpoint half written (a temporary)
    "shard_store.files:write_dir:after:1",  # a retrained checkpoint's files, not registered
    f"{STORE}.register_checkpoint:after:1",  # one registered, not live
    f"{STORE}.commit:before:1",  # every shard retrained, nothing swapped
    f"{STORE}.commit:after:1",  # swapped and applied, files of unregistered ones not removed
]


@pytest.mark.parametrize("point", FORGET_POINTS, ids=lambda p: p.split(":", 1)[1])
def test_forget_killed_at_each_step(tmp_path, base, point):
    source, rows, victims = base
    store = tmp_path / "store"
    shutil.copytree(source, store)
    killed(point, "forget", "--store", str(store), *victims, "--no-progress")
    status = cli("status", "--store", str(store), "--json")  # a reader, not a writer
    assert status["deleted_records"] == 2  # the acknowledgement was durable
    assert derived_from(store, set(victims)) == []
    cli("recover", "--store", str(store), "--no-progress")
    audit = cli("audit", "--store", str(store), "--json")
    assert audit["ok"], audit
    with Sisa.open(store, recover=False) as sisa:
        assert sisa.pending() == []
        assert_exact(sisa, [r for r in rows if r["id"] not in victims], small_config(), SPEC,
                     tmp_path / "scratch")


@pytest.mark.parametrize("point", [f"{STORE}.insert_records:after:1", f"{STORE}.commit:after:1",
                                   "shard_store.files:remove:after:1"],
                         ids=lambda p: p.split(":", 1)[1])
def test_add_killed_at_each_step(tmp_path, base, point):
    source, rows, _ = base
    store = tmp_path / "store"
    shutil.copytree(source, store)
    new = make_rows(20, seed=5, prefix="n")
    killed(point, "add", "--store", str(store), "--data", str(write_csv(tmp_path / "new.csv", new)),
           "--no-progress")
    cli("recover", "--store", str(store), "--no-progress")
    assert cli("audit", "--store", str(store), "--json")["ok"]
    with Sisa.open(store, recover=False) as sisa:
        assert_exact(sisa, rows + new, small_config(), SPEC, tmp_path / "scratch")


def test_train_killed_before_its_records_are_written(tmp_path):
    data = write_csv(tmp_path / "train.csv", make_rows(90))
    store = tmp_path / "store"
    killed("shard_store.store:migrate:after:1", "train", "--store", str(store), "--data", str(data),
           *TRAIN_FLAGS)
    result = CliRunner().invoke(__import__("sisa.cli", fromlist=["app"]).app,
                                ["status", "--store", str(store)])
    assert result.exit_code == 1 and "incomplete" in result.stderr and "Traceback" not in result.output
    cli("train", "--store", str(store), "--data", str(data), *TRAIN_FLAGS)  # replaces it
    assert cli("audit", "--store", str(store), "--json")["ok"]


@pytest.mark.parametrize("point", [f"{STORE}.create:after:1", f"{STORE}.register_checkpoint:after:4"],
                         ids=["records written, nothing trained", "halfway through training"])
def test_train_killed_after_its_records_are_written(tmp_path, point):
    rows = make_rows(90)
    data = write_csv(tmp_path / "train.csv", rows)
    store = tmp_path / "store"
    killed(point, "train", "--store", str(store), "--data", str(data), *TRAIN_FLAGS)
    cli("recover", "--store", str(store), "--no-progress")
    assert cli("audit", "--store", str(store), "--json")["ok"]
    with Sisa.open(store, recover=False) as sisa:
        assert_exact(sisa, rows, small_config(), SPEC, tmp_path / "scratch")
