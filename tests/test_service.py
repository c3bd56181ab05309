"""The HTTP service through FastAPI's test client: every endpoint, its auth, limits and errors, the
deletion lifecycle (excluded before the 202, applied by the worker, exact), and other writers."""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from sisa import Sisa
from sisa.errors import ConfigError
from sisa.service import Service, ServiceConfig, create_app, read_token
from sisa.service.staleness import Answer, Deletion, check

from .conftest import SPEC, live_shas, make_rows, small_config, store_snapshot

TOKEN = "t0ken-for-tests-only-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ROW = [0.5, 1.0, -0.5, 0.0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A trained MLP store (3 shards, 3 slices), copied for each test that changes it."""
    root = tmp_path_factory.mktemp("served") / "store"
    Sisa.train(root, make_rows(150), small_config(), SPEC).close()
    return root


@pytest.fixture
def store(trained: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "store"
    shutil.copytree(trained, copy)
    return copy


def serving(store: Path, worker: bool = True, **settings: Any) -> tuple[Service, TestClient]:
    # The worker as a thread: these tests hold and replace it (tests/test_worker_process.py runs
    # it as the process `sisa serve` starts).
    config = ServiceConfig(**{"token": TOKEN, "batch_window": 0.0, "poll_interval": 0.1,
                              "worker": "thread", **settings})
    service = Service(store, config, worker=worker).start()
    return service, TestClient(create_app(service))


@pytest.fixture
def served(store: Path):
    service, client = serving(store)
    yield service, client
    service.close()


def predict(client: TestClient, rows: list[list[float]] | None = None, **kw: Any) -> Any:
    return client.post("/v1/predict", json={"inputs": rows or [ROW]}, **kw)


def wait_applied(client: TestClient, request_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/v1/deletions/{request_id}", headers=AUTH).json()
        if body["status"] == "applied":
            return body
        time.sleep(0.05)
    raise AssertionError(f"deletion {request_id} not applied within {timeout} s")


# -- answers -------------------------------------------------------------------------------------


def test_predict_matches_the_library_and_names_its_checkpoints(served, store):
    _service, client = served
    rows = [r for r in make_rows(6, seed=3)]
    inputs = [[r[f] for f in SPEC.feature_columns] for r in rows]
    body = client.post("/v1/predict", json={"inputs": inputs, "probabilities": True}).json()
    with Sisa.open(store, recover=False, read_only=True) as sisa:
        assert body["predictions"] == sisa.predict(inputs)
        shas = live_shas(sisa)
        version = sisa.status().model_version
    assert body["classes"] == ["0", "1", "2"]
    assert len(body["probabilities"]) == 6 and all(abs(sum(p) - 1) < 1e-4 for p in body["probabilities"])
    model = body["model"]
    assert model["shards"] == {str(s): sha for s, sha in shas.items()}
    assert model["adapters"] == [f"shard-{s}@{sha[:16]}" for s, sha in sorted(shas.items())]
    assert model["excluded_shards"] == [] and model["version"] == version


def test_openapi_lists_every_endpoint_and_the_bearer_scheme(served):
    _service, client = served
    schema = client.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/generate", "/v1/score", "/v1/deletions", "/v1/deletions/{request_id}",
            "/v1/status", "/healthz", "/readyz", "/metrics"} <= set(schema["paths"])
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert "security" in schema["paths"]["/v1/deletions"]["post"]
    assert "security" not in schema["paths"]["/v1/predict"]["post"]


def test_health_ready_and_metrics(served):
    _service, client = served
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    predict(client)
    text = client.get("/metrics").text
    assert 'sisa_requests_total{endpoint="/v1/predict",method="POST",status="200"} 1.0' in text
    assert "sisa_request_seconds_bucket" in text and "sisa_deletions_pending 0.0" in text


# -- auth ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, path", [("post", "/v1/deletions"), ("get", "/v1/deletions"),
                                          ("get", "/v1/deletions/abc"), ("get", "/v1/status")])
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-token-wrong-token"},
                                     {"Authorization": f"Basic {TOKEN}"}])
def test_admin_endpoints_refuse_a_missing_or_wrong_token(served, store, method, path, headers):
    _service, client = served
    before = store_snapshot(store)
    kw: dict[str, Any] = {"json": {"ids": ["r0001"]}} if method == "post" else {}
    response = getattr(client, method)(path, headers=headers, **kw)
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"]["code"] == "unauthorized"
    assert store_snapshot(store) == before


def test_protected_predictions_need_the_token(store):
    service, client = serving(store, protect_predict=True)
    try:
        assert predict(client).status_code == 401
        assert predict(client, headers=AUTH).status_code == 200
    finally:
        service.close()


def test_settings_refuse_deletions_without_a_token_and_read_token_files(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="need a bearer token"):
        ServiceConfig()
    with pytest.raises(ConfigError, match="shorter than 16"):
        ServiceConfig(token="short")
    with pytest.raises(ConfigError, match="on_pending"):
        ServiceConfig(token=TOKEN, on_pending="never")  # type: ignore[arg-type]
    assert ServiceConfig(deletions=False).token is None  # predictions only: no token needed
    assert ServiceConfig(no_auth=True).no_auth
    assert TOKEN not in repr(ServiceConfig(token=TOKEN))
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        read_token(path)
    path.chmod(0o600)
    assert read_token(path) == TOKEN
    monkeypatch.setenv("SISA_SERVE_TOKEN", "from-the-environment-0123")
    assert read_token() == "from-the-environment-0123"
    monkeypatch.delenv("SISA_SERVE_TOKEN")
    assert read_token() is None


def test_deletion_endpoints_are_off_in_a_prediction_only_service(store):
    service, client = serving(store, deletions=False)
    try:
        assert service.worker is None
        response = client.post("/v1/deletions", json={"ids": ["r0001"]}, headers=AUTH)
        assert response.status_code == 403 and response.json()["error"]["code"] == "deletions_disabled"
        assert predict(client).status_code == 200
    finally:
        service.close()


# -- limits and errors ---------------------------------------------------------------------------


def test_limits_refuse_large_bodies_and_batches(store):
    service, client = serving(store, max_body_bytes=2000, max_batch=4, max_deletion_ids=2)
    try:
        big = predict(client, [ROW] * 200)
        assert big.status_code == 413 and big.json()["error"]["code"] == "body_too_large"
        chunks = (b'{"inputs": [' + b"[0,0,0,0]," * 100 + b"[0,0,0,0]]}" for _ in range(1))
        streamed = client.post("/v1/predict", content=chunks, headers={"Content-Type": "application/json"})
        assert streamed.status_code == 413  # no Content-Length: counted as it arrives
        batch = predict(client, [ROW] * 5)
        assert batch.status_code == 413 and batch.json()["error"]["code"] == "batch_too_large"
        many = client.post("/v1/deletions", json={"ids": ["r0001", "r0002", "r0003"]}, headers=AUTH)
        assert many.status_code == 422 and "at most 2" in many.json()["error"]["message"]
        # Refused before routing, a body too large is still counted (as no route).
        metrics = client.get("/metrics").text
        assert 'sisa_requests_total{endpoint="unmatched",method="POST",status="413"} 1.0' in metrics
        assert 'sisa_requests_total{endpoint="/v1/predict",method="POST",status="413"} 2.0' in metrics
    finally:
        service.close()


@pytest.mark.parametrize("body, status, code", [
    (b"{not json", 400, "malformed_json"),
    (b'{"inputs": [[1, 2, 3, 4]], "extra": 1}', 422, "invalid_request"),
    (b'{"inputs": []}', 422, "invalid_request"),
    (b'{"inputs": [[1, 2]]}', 422, "invalid_request"),
    (b'{"inputs": [[NaN, 1, 2, 3]]}', 422, "invalid_request"),
    (b'{"inputs": [["SECRET-CONTENT", 1, 2, 3]]}', 422, "invalid_request"),
    (b'{"inputs": ["a text"]}', 422, "invalid_request"),
])
def test_bad_predictions_get_a_json_error_that_quotes_no_input(served, body, status, code):
    _service, client = served
    response = client.post("/v1/predict", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert "SECRET" not in response.text


def test_unknown_ids_change_nothing(served, store):
    service, client = served
    before = store_snapshot(store)
    response = client.post("/v1/deletions", json={"ids": ["r0001", "no-such-id"]}, headers=AUTH)
    assert response.status_code == 404, response.text
    assert response.json()["error"] == {  # the field and a count, never the ids
        "code": "unknown_record", "message": "ids: 1 of the 2 ids are not in the store; nothing was deleted"}
    for body in ({}, {"ids": ["r0001"], "group": "u1"}, {"ids": []}, {"ids": "r0001"}):
        assert client.post("/v1/deletions", json=body, headers=AUTH).status_code == 422, body
    assert client.get("/v1/deletions/nope", headers=AUTH).status_code == 404
    assert store_snapshot(store) == before
    assert service.reader.pending() == []


@pytest.mark.parametrize("row", [[1e39, 0, 0, 0], [-1e39, 0, 0, 0], [3.5e38, 0, 0, 0], [0, 0, 0, -3.5e38]])
def test_inputs_beyond_float32_are_refused_as_the_cli_refuses_them(served, row):
    _service, client = served
    response = predict(client, [ROW, row])
    assert response.status_code == 422, response.text
    assert "input 1" in response.json()["error"]["message"]


def test_a_chunked_body_over_the_limit_is_413(served):
    _service, client = served
    big = b'{"inputs": [["' + b"x" * (2 << 20) + b'"]]}'  # 2 MB, sent in chunks with no length
    streamed = client.post("/v1/predict", content=(big[i:i + 65536] for i in range(0, len(big), 65536)),
                           headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413 and streamed.json()["error"]["code"] == "body_too_large"


@pytest.mark.parametrize("method, path, body", [
    ("get", "/v1/deletions/' OR 1=1--", None),
    ("get", "/v1/deletions/SECRET-REQUEST-ID", None),
    ("post", "/v1/deletions", {"group": "SECRET-GROUP"}),
    ("post", "/v1/deletions", {"ids": ["r0001", "SECRET-ID-0042"]}),
    ("post", "/v1/predict", {"inputs": [[1, 2, 3, 4]], "SECRET-FIELD": 1}),
    ("post", "/v1/predict", {"inputs": ["SECRET-TEXT"]}),
    ("post", "/v1/generate", {"prompts": ["SECRET-PROMPT"]}),
    ("post", "/v1/score", {"texts": ["SECRET-TEXT"], "prompts": ["SECRET-PROMPT"]}),
])
def test_no_error_body_quotes_the_request(served, method, path, body):
    _service, client = served
    response = getattr(client, method)(path, headers=AUTH, **({"json": body} if body is not None else {}))
    assert 400 <= response.status_code < 500, response.text
    assert "SECRET" not in response.text and "OR 1=1" not in response.text
    assert response.json()["error"]["code"]


def test_the_access_log_names_routes_never_values_or_query_strings(served, caplog):
    _service, client = served
    with caplog.at_level(logging.INFO, logger="sisa.access"):
        client.get("/v1/deletions/secret-request-id?token=SECRET-TOKEN", headers=AUTH)
        predict(client, params={"token": "SECRET-TOKEN"})
    lines = [r.getMessage() for r in caplog.records if r.name == "sisa.access"]
    assert lines and any("/v1/deletions/{request_id}" in line for line in lines)
    assert not any("SECRET" in line or "secret-request-id" in line for line in lines)


def test_a_tampered_shard_sits_out_and_every_answer_says_why(served, store):
    from sisa.testing.tamper import checkpoint, substitute_weights

    _service, client = served
    assert predict(client).json()["model"]["excluded_shards"] == []
    other = (store / checkpoint(store, 1).path / "weights.safetensors").read_bytes()
    substitute_weights(store, 0, other)  # another shard's weights, registered without the key
    model = predict(client).json()["model"]
    assert "0" not in model["shards"] and model["excluded_shards"] == [0]
    assert "seal" in model["excluded_why"]["0"]
    ready = client.get("/readyz").json()
    assert ready["ready"] and "shard 0" in ready["reason"] and "seal" in ready["reason"]


def test_unknown_routes_and_methods_answer_json(served):
    _service, client = served
    assert client.get("/v1/nothing").json()["error"]["code"] == "not_found"
    wrong = client.get("/v1/predict")
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"


def test_a_causal_lm_store_refuses_predict_and_a_classifier_refuses_generate(served):
    _service, client = served
    for path, body in (("/v1/generate", {"prompts": ["hi"]}), ("/v1/score", {"texts": ["hi"]})):
        response = client.post(path, json=body)
        assert response.status_code == 422 and "causal_lm" in response.json()["error"]["message"]


# -- the deletion lifecycle ----------------------------------------------------------------------


def test_a_deletion_is_excluded_before_its_202_and_applied_exactly(served, store, caplog):
    service, client = served
    before = predict(client).json()["model"]
    caplog.set_level(logging.DEBUG)
    service.worker.stop()  # hold the worker, to see the pending state
    ack = client.post("/v1/deletions", json={"ids": ["r0004", "r0007"]}, headers=AUTH)
    assert ack.status_code == 202, ack.text
    body = ack.json()
    assert ack.headers["location"] == f"/v1/deletions/{body['request_id']}"
    assert body["status"] == "pending" and body["records"] == 2 and body["shards"]
    during = predict(client).json()["model"]
    assert during["excluded_shards"] == body["shards"]
    assert set(during["shards"]) == set(before["shards"]) - {str(s) for s in body["shards"]}
    listed = client.get("/v1/deletions?status=pending", headers=AUTH).json()["deletions"]
    assert [d["request_id"] for d in listed] == [body["request_id"]]

    # A long poll (?wait=) answers pending at its deadline while the worker is held...
    where = f"/v1/deletions/{body['request_id']}"
    assert client.get(where, params={"wait": 0.05}, headers=AUTH).json()["status"] == "pending"
    assert client.get(where, params={"wait": 61}, headers=AUTH).status_code == 422  # at most 60 s
    assert client.get("/v1/deletions/nope", params={"wait": 30}, headers=AUTH).status_code == 404
    service.worker = service.worker.__class__(service.writer, 0.0, 0.1, service._after_run).start()
    # ... and, once the worker runs, with the applied deletion as soon as it is applied.
    done = client.get(where, params={"wait": 60}, headers=AUTH).json()
    assert done["status"] == "applied"
    changed = done["receipt"]["checkpoints_changed"]
    assert sorted(map(int, changed)) == body["shards"]
    after = predict(client).json()["model"]
    assert after["excluded_shards"] == []
    for shard, change in changed.items():
        assert after["shards"][shard] == change["after"] != change["before"] == before["shards"][shard]
    # Exact: the live shards are those of a store trained without the deleted records.
    rows = [r for r in make_rows(150) if r["id"] not in ("r0004", "r0007")]
    with Sisa.train(store.parent / "scratch", rows, small_config(), SPEC) as scratch:
        assert {str(s): sha for s, sha in live_shas(scratch).items()} == after["shards"]
    assert client.get("/v1/deletions?status=pending", headers=AUTH).json()["deletions"] == []
    assert "r0004" not in caplog.text and "r0007" not in caplog.text  # ids stay out of the log
    assert service.worker.wait_idle(30)  # its hook has run: counts and reloads
    metrics = client.get("/metrics").text
    assert "sisa_deletions_applied_total 1.0" in metrics
    assert "sisa_deletion_ack_to_applied_seconds_count 1.0" in metrics


def test_a_burst_of_deletions_is_applied_in_one_run(store):
    service, client = serving(store, batch_window=1.0)
    try:
        ids = [client.post("/v1/deletions", json={"ids": [f"r{i:04d}"]}, headers=AUTH).json()["request_id"]
               for i in range(10, 15)]
        receipts = [wait_applied(client, rid)["receipt"] for rid in ids]
        assert service.worker.runs == 1
        assert len({r["applied_at"] for r in receipts}) == 1  # one commit
        assert {s for r in receipts for s in r["checkpoints_changed"]} <= {"0", "1", "2"}
    finally:
        service.close()


def test_group_deletion(served):
    _service, client = served
    ack = client.post("/v1/deletions", json={"group": "u3"}, headers=AUTH)
    assert ack.status_code == 202 and ack.json()["records"] == 10
    wait_applied(client, ack.json()["request_id"])
    again = client.post("/v1/deletions", json={"group": "u3"}, headers=AUTH)
    assert again.status_code == 200 and again.json()["status"] == "nothing_to_delete"


def test_wait_mode_holds_requests_until_the_shard_is_live(store):
    service, client = serving(store, worker=False, on_pending="wait", wait_timeout=0.3)
    try:
        ack = client.post("/v1/deletions", json={"ids": ["r0020"]}, headers=AUTH).json()
        held = predict(client)
        assert held.status_code == 503 and held.headers["retry-after"] == "1"
        assert held.json()["error"]["excluded_shards"] == ack["shards"]
        assert not client.get("/readyz").json()["ready"] or len(ack["shards"]) < 3

        def apply_later() -> None:
            time.sleep(0.2)
            with Sisa.open(store) as writer:  # another writer, as a CLI `sisa recover` would be
                writer.apply_pending()

        service.model.wait_timeout = 60
        thread = threading.Thread(target=apply_later)
        thread.start()
        answer = predict(client)
        thread.join()
        assert answer.status_code == 200 and answer.json()["model"]["excluded_shards"] == []
        assert client.get(f"/v1/deletions/{ack['request_id']}", headers=AUTH).json()["status"] == "applied"
    finally:
        service.close()


def test_another_process_forget_reloads_only_the_changed_shard(served, store):
    service, client = served
    before = predict(client).json()["model"]["shards"]
    read = service.reader.checkpoints_read
    with Sisa.open(store) as other:  # a CLI `sisa forget` while the service runs
        receipt = other.forget(["r0031"])
    after = predict(client).json()["model"]
    changed = {s for s in after["shards"] if after["shards"][s] != before[s]}
    assert changed == set(receipt.checkpoints_changed) and len(changed) == 1
    assert service.reader.checkpoints_read == read + 1
    assert after["excluded_shards"] == []


def test_nothing_servable_answers_503(store):
    service, client = serving(store, worker=False)
    try:
        ids = [f"r{i:04d}" for i in range(150)]
        client.post("/v1/deletions", json={"ids": ids[:100]}, headers=AUTH)
        response = predict(client)
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "no_servable_shard"
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "no shard can serve" in ready.json()["reason"]
    finally:
        service.close()


def test_status_reports_the_store_and_the_service(served):
    _service, client = served
    body = client.get("/v1/status", headers=AUTH).json()
    assert body["store"]["live_records"] == 150
    assert body["service"]["worker"]["alive"] is True
    assert set(body["service"]["loaded"]) == {"0", "1", "2"}
    assert body["service"]["store_access"] == "directory"


# -- the staleness check -------------------------------------------------------------------------


def test_the_staleness_check_finds_an_answer_from_a_deleted_records_checkpoint():
    receipt = {"sequence": 1, "checkpoints_changed": {"2": {"before": "old", "after": "new"}}}
    deletion = Deletion(acknowledged=10.0, shards=[2], receipt=receipt)
    fine = [Answer(9.0, {"2": "old"}), Answer(11.0, {"2": "new"}), Answer(11.0, {"0": "x"})]
    assert check(fine, [deletion]).stale == 0
    result = check([*fine, Answer(10.5, {"2": "old", "0": "x"})], [deletion])
    assert result.stale == 1 and result.examples[0]["shards"] == ["2"]
    assert check(fine, [Deletion(1.0, [2], None)]).unapplied == 1


@pytest.mark.skipif(os.cpu_count() == 1, reason="needs a second core for the concurrent clients")
def test_concurrent_predictions_during_deletions_are_never_stale(served):
    """In-process: clients predict on threads while deletions are acknowledged and applied."""
    _service, client = served
    answers: list[Answer] = []
    stop = threading.Event()

    def clientloop() -> None:
        while not stop.is_set():
            sent = time.monotonic()
            response = predict(client)
            assert response.status_code == 200, response.text
            answers.append(Answer(sent, response.json()["model"]["shards"]))

    threads = [threading.Thread(target=clientloop) for _ in range(3)]
    for t in threads:
        t.start()
    deletions = []
    for i in range(40, 46):
        ack = client.post("/v1/deletions", json={"ids": [f"r{i:04d}"]}, headers=AUTH)
        deletions.append((time.monotonic(), ack.json()))
        time.sleep(0.15)
    for _, body in deletions:
        wait_applied(client, body["request_id"])
    stop.set()
    for t in threads:
        t.join()
    log = [Deletion(at, body["shards"], wait_applied(client, body["request_id"])["receipt"])
           for at, body in deletions]
    result = check(answers, log)
    assert len(answers) > 20 and result.unapplied == 0
    assert result.stale == 0, result.examples


def test_generate_and_score_on_a_causal_lm_store(tmp_path, tiny_lm):
    from sisa import CausalLMConfig, PartitionConfig, SisaConfig

    from .conftest import CHAT_SPEC, make_chat_rows

    config = SisaConfig(partition=PartitionConfig(shards=2, slices=2, seed=3),
                        training=CausalLMConfig(model=tiny_lm, epochs_per_slice=1, batch_size=4,
                                                learning_rate=1e-2, max_length=48))
    rows = make_chat_rows()
    with Sisa.train(tmp_path / "lm", rows, config, CHAT_SPEC) as sisa:
        expected = sisa.generate(["hi ok"], max_new_tokens=6)[0]
        scored = sisa.score([{"id": "0", "text": "ok sure", "prompt": "hi"}])
    service, client = serving(tmp_path / "lm", max_new_tokens=8)
    try:
        body = client.post("/v1/generate", json={"prompts": ["hi ok"], "max_new_tokens": 6}).json()
        assert body["generations"][0]["text"] == expected.text
        assert body["model"]["version"] == expected.model_version
        assert client.post("/v1/generate", json={"prompts": ["hi"], "max_new_tokens": 9}).status_code == 422
        score = client.post("/v1/score", json={"texts": ["ok sure"], "prompts": ["hi"]}).json()
        assert score["records"][0]["logprob"] == pytest.approx(scored.records[0].logprob, abs=1e-9)
        assert predict(client).status_code == 422  # a causal LM has no classes
        service.worker.stop()  # hold it: generation while the deletion is pending
        read = service.reader.checkpoints_read
        ack = client.post("/v1/deletions", json={"group": "u3"}, headers=AUTH).json()
        during = client.post("/v1/generate", json={"prompts": ["hi ok"], "max_new_tokens": 6}).json()
        assert during["model"]["excluded_shards"] == ack["shards"]
        assert service.reader.checkpoints_read == read  # the other shards' adapters, as loaded: a view
        with Sisa.open(tmp_path / "lm", recover=False, read_only=True) as fresh:  # loads the rest anew
            alone = fresh.generate(["hi ok"], max_new_tokens=6)[0]
        assert during["generations"][0]["text"] == alone.text
        assert during["model"]["version"] == alone.model_version
        service.worker = service.worker.__class__(service.writer, 0.0, 0.1, service._after_run).start()
        service.worker.wait_idle(120)
        after = client.post("/v1/generate", json={"prompts": ["hi ok"], "max_new_tokens": 6}).json()
        receipt = wait_applied(client, ack["request_id"])["receipt"]
        for shard, change in receipt["checkpoints_changed"].items():
            assert after["model"]["shards"][shard] == change["after"]
    finally:
        service.close()


def test_a_failing_retrain_is_reported_and_retried_with_the_shard_still_excluded(served, monkeypatch):
    from sisa.errors import ShardTrainingError

    service, client = served
    real = service.writer.apply_pending

    def failing(receipts: Any = None) -> Any:
        raise ShardTrainingError(1, 3, "Traceback: out of memory")

    monkeypatch.setattr(service.writer, "apply_pending", failing)
    ack = client.post("/v1/deletions", json={"ids": ["r0050"]}, headers=AUTH).json()
    deadline = time.monotonic() + 30
    where = f"/v1/deletions/{ack['request_id']}"
    while (state := client.get(where, headers=AUTH).json())["status"] != "failed":
        assert time.monotonic() < deadline, state
        time.sleep(0.05)
    assert state["error"].startswith("ShardTrainingError") and state["receipt"] is None
    assert [d["request_id"] for d in client.get("/v1/deletions?status=failed", headers=AUTH).json()[
        "deletions"]] == [ack["request_id"]]
    assert predict(client).json()["model"]["excluded_shards"] == ack["shards"]
    assert "sisa_deletion_worker_failures_total 1.0" in client.get("/metrics").text
    monkeypatch.setattr(service.writer, "apply_pending", real)  # the next attempt succeeds
    assert wait_applied(client, ack["request_id"])["error"] is None


def test_sisa_serve_refuses_to_start_without_a_token(store, monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from sisa.cli import app

    monkeypatch.delenv("SISA_SERVE_TOKEN", raising=False)
    result = CliRunner().invoke(app, ["serve", "--store", str(store)])
    assert result.exit_code == 1 and "SISA_SERVE_TOKEN" in result.output
    loose = tmp_path / "token"
    loose.write_text(TOKEN)
    loose.chmod(0o644)
    result = CliRunner().invoke(app, ["serve", "--store", str(store), "--token-file", str(loose)])
    assert result.exit_code == 1 and "chmod 600" in result.output
    result = CliRunner().invoke(app, ["serve", "--store", str(store), "--on-pending", "later",
                                      "--no-auth"])
    assert result.exit_code == 1 and "--on-pending" in result.output
