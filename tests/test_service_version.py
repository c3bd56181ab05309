"""The staleness check's change counter: it moves when anyone commits (another process, another
connection, the same object) or the deletion journal changes, and not otherwise; the service reads
the store in full only when it moved, and still never answers from a deleted record's shard."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from shard_store import ShardStore
from sisa import Sisa
from sisa.service import Service, ServiceConfig, create_app
from sisa.service.model import LiveModel

from .conftest import SPEC, make_rows, small_config

TOKEN = "t0ken-for-tests-only-0123456789"
ROW = [0.5, 1.0, -0.5, 0.0]
# Acknowledge a deletion (not applied: its shard stays excluded) from a process of its own.
ACKNOWLEDGE = ("import json, sys\nfrom sisa import Sisa\n"
               "with Sisa.open(sys.argv[1], recover=False) as sisa:\n"
               "    print(json.dumps(sisa.request_deletion([sys.argv[2]]).shards))\n")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("versioned") / "store"
    Sisa.train(root, make_rows(150), small_config(), SPEC).close()
    return root


@pytest.fixture
def store(trained: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "store"
    shutil.copytree(trained, copy)
    return copy


def acknowledge_elsewhere(store: Path, record: str) -> list[int]:
    """A deletion acknowledged by another process; the shards it excludes."""
    out = subprocess.run([sys.executable, "-c", ACKNOWLEDGE, str(store), record], check=True,
                         capture_output=True, text=True, timeout=120)
    return list(json.loads(out.stdout.strip().splitlines()[-1]))


def test_the_counter_moves_for_every_commit_and_only_then(store):
    with Sisa.open(store, recover=False, read_only=True) as reader:
        first = reader.change_counter()
        for _ in range(3):  # reads, however many, change nothing
            reader.servable()
            reader.excluded([0])
            assert reader.change_counter() == first
        with Sisa.open(store, recover=False) as writer:  # another connection: a commit moves it
            mine = writer.change_counter()
            shards = writer.request_deletion(["r0003"]).shards
            assert reader.change_counter() > first
            # The writer's own commit moves its own counter too (it polls a connection that never
            # writes).
            assert writer.change_counter() > mine
        moved = reader.change_counter()
        assert reader.change_counter() == moved
        assert not set(shards) & set(reader.servable())
        acknowledge_elsewhere(store, "r0009")  # another process
        assert reader.change_counter() > moved


def test_the_counter_moves_when_the_journal_changes_without_a_commit(store):
    s = ShardStore.open(store, read_only=True)
    try:
        before = s.change_counter()
        with open(store / "deletions.journal", "ab") as f:  # a line a crash cut short
            f.write(b'{"request_id"')
        after = s.change_counter()
        assert after > before and s.change_counter() == after
    finally:
        s.close()


def serving(store: Path) -> tuple[Service, TestClient]:
    """The service with no deletion worker: a deletion acknowledged stays pending."""
    config = ServiceConfig(token=TOKEN, batch_window=0.0, poll_interval=0.1)
    service = Service(store, config, worker=False).start()
    return service, TestClient(create_app(service))


def predict(client: TestClient) -> dict[str, Any]:
    response = client.post("/v1/predict", json={"inputs": [ROW]})
    assert response.status_code == 200, response.text
    return dict(response.json()["model"])


def test_the_store_is_read_in_full_only_after_a_change(store):
    service, client = serving(store)
    try:
        predict(client)
        reads = service.model.full_reads
        for _ in range(100):
            assert predict(client)["excluded_shards"] == []
        assert service.model.full_reads - reads <= 2
        shards = acknowledge_elsewhere(store, "r0005")
        model = predict(client)
        # Never from the deleted record's shard, though no process told this one.
        assert model["excluded_shards"] == shards and not set(map(str, shards)) & set(model["shards"])
        assert service.model.full_reads > reads
        again = service.model.full_reads
        for _ in range(50):
            assert predict(client)["excluded_shards"] == shards
        assert service.model.full_reads - again <= 2
    finally:
        service.close()


def test_a_deletion_committed_while_an_answer_is_computed_is_not_in_it(store):
    with Sisa.open(store, recover=False, read_only=True) as reader, Sisa.open(store, recover=False) as writer:
        model = LiveModel(reader)
        for _ in range(5):
            _, version = model.run(lambda ensemble: None)
        assert model.full_reads == 1 and version.excluded == []
        deleted: list[int] = []
        calls: list[list[int]] = []

        def answer(ensemble: Any) -> None:
            calls.append(sorted(ensemble.shas))
            if not deleted:  # between the look before and the look after
                deleted.extend(writer.request_deletion(["r0011"]).shards)

        _, version = model.run(answer)
        # Computed again, from the shards still servable; the answer says which sat out.
        assert len(calls) == 2 and not set(deleted) & set(calls[1])
        assert version.excluded == deleted and not set(deleted) & set(version.shards)
        assert model.full_reads == 2  # the look after the deletion; the next attempt's reuse it
