"""The HTTP face of a `Service`: FastAPI routes that parse, call one service method and answer JSON.

Every error is a JSON body `{"error": {"code", "message"}}` with a 4xx or 5xx status; nothing is
changed by a refused request. Request bodies are never logged, and no message quotes a record's
content. Deletion and admin routes need the bearer token; prediction routes too if configured.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations, which name
# dependencies local to `create_app`.
import asyncio
import hmac
import json
import logging
import time
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sisa import __version__
from sisa.errors import (
    ConfigError,
    NoServableShardError,
    RecordError,
    SisaError,
    StoreCorruptError,
    UnknownRecordError,
)
from sisa.handoff import CHALLENGE, MAX_WAIT, PROOF, proof
from sisa.service.metrics import Metrics
from sisa.service.model import Unavailable
from sisa.service.service import Service

log = logging.getLogger("sisa.service")
access = logging.getLogger("sisa.access")

Finite = Annotated[float, Field(allow_inf_nan=False)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PredictIn(_Body):
    inputs: list[str] | list[list[Finite]] | list[dict[str, Finite | str]] = Field(
        min_length=1, description="Texts (text stores) or rows of numbers (feature stores), or "
        "objects of column -> value, matched by name to the columns the model reads (the data "
        "spec's id, label, group and prior may be there and are ignored)")
    probabilities: bool = Field(False, description="Also return each class's probability")


class GenerateIn(_Body):
    prompts: list[str] = Field(min_length=1)
    max_new_tokens: int = Field(48, ge=1)
    combine: Literal["mean", "product", "merged"] | None = Field(
        None, description="mean, product or merged (default: the store's)")
    temperature: Finite = Field(0.0, ge=0)
    seed: int = 0
    stop: list[str] = Field(default_factory=list)


class ScoreIn(_Body):
    texts: list[str] = Field(min_length=1)
    prompts: list[str] | None = None
    combine: Literal["mean", "product", "merged"] | None = Field(
        None, description="mean, product or merged (default: the store's)")


class DeletionIn(_Body):
    ids: list[str] | None = Field(None, min_length=1, description="Record ids to delete")
    group: str | None = Field(None, min_length=1, description="A group id: delete all its records")


# The API's own words (its fields, routes and choices): an error names them, and a request that
# holds one is not quoted by that.
_OWN_WORDS = frozenset({*PredictIn.model_fields, *GenerateIn.model_fields, *ScoreIn.model_fields,
                        *DeletionIn.model_fields, "v1", "deletions", "predict", "generate", "score",
                        "status", "healthz", "readyz", "metrics", "mean", "product", "pending",
                        "applied", "failed", "limit", "body"})


class HTTPError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status, headers=headers)


_STATUS: list[tuple[type[SisaError], int, str]] = [
    (NoServableShardError, 503, "no_servable_shard"),
    (UnknownRecordError, 404, "unknown_record"),
    (StoreCorruptError, 500, "store_corrupt"),
    (RecordError, 422, "invalid_request"),
    (ConfigError, 422, "invalid_request"),
]


_WAIT_LOOK = 0.01  # seconds between looks at a deletion a client waits on (a long poll)
_COUNTERS_KEPT = 512  # (route, method, status) label children kept at hand


class RequestGuard:
    """The one middleware, pure ASGI (each layer costs as much as the rest of a small prediction).

    It reads every request body whole before the app sees it, so one over `limit` bytes is `413`
    however it is sent (a declared length or chunks); keeps error answers from quoting the
    request (an error body holding any string of the request, a value, an unknown key, a path
    segment, is replaced by one that names the problem's code only); and counts and times every
    request by route and status, and writes the access log: the route, never the path's values or
    the query string (a token sent as ?token=... would land in the log)."""

    def __init__(self, app: ASGIApp, limit: int, metrics: Metrics) -> None:
        self.app, self.limit, self.metrics = app, limit, metrics
        self._counters: dict[tuple[str, str, int], tuple[Any, Any]] = {}  # prometheus children

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        begun = time.perf_counter()
        start: dict[str, Any] = {"status": 500}
        try:
            await self._guarded(scope, receive, send, start)
        finally:
            self._count(scope, start["status"], time.perf_counter() - begun)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send, start: dict[str, Any]) -> None:
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            start["status"] = 413
            await _error(413, "body_too_large", self._text())(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                start["status"] = 499  # the client left before sending its body (nginx's code)
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                start["status"] = 413
                await _error(413, "body_too_large", self._text())(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        given = False

        async def replay() -> Message:
            nonlocal given
            if not given:
                given = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        held: list[bytes] = []

        async def guarded(message: Message) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
                if message["status"] < 400:
                    await send(message)
                return
            if message["type"] != "http.response.body" or start["status"] < 400:
                await send(message)
                return
            held.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            content = _unquoted(b"".join(held), body, scope)
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            await send({"type": "http.response.start", "status": start["status"],
                        "headers": [*headers, (b"content-length", str(len(content)).encode())]})
            await send({"type": "http.response.body", "body": content})

        await self.app(scope, replay, guarded)

    def _count(self, scope: Scope, status: int, seconds: float) -> None:
        endpoint = getattr(scope.get("route"), "path", "unmatched")  # set by the router
        method = scope["method"]
        key = (endpoint, method, status)
        children = self._counters.get(key)
        if children is None:
            children = (self.metrics.requests.labels(endpoint, method, str(status)),
                        self.metrics.latency.labels(endpoint))
            if len(self._counters) < _COUNTERS_KEPT:  # a client's made-up methods: not kept
                self._counters[key] = children
        children[0].inc()
        children[1].observe(seconds)
        access.info("%s %s %d %.1f ms", method, endpoint, status, seconds * 1000)

    def _text(self) -> str:
        return f"the request body is larger than {self.limit} bytes (the service's max_body_bytes)"


def _strings(value: Any) -> Iterator[str]:
    """Every string in a JSON value: its values, and its objects' keys."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _unquoted(content: bytes, request_body: bytes, scope: Scope) -> bytes:
    """An error body, or one naming no content of the request if it quoted any."""
    try:
        parsed = json.loads(request_body) if request_body else None
    except ValueError:
        parsed = request_body.decode("utf-8", "replace")
    found = [*_strings(parsed), *str(scope.get("path", "")).split("/"),
             *str(scope.get("query_string", b""), "utf-8", "replace").replace("&", "=").split("=")]
    found = [f for f in found if len(f) >= 3 and f not in _OWN_WORDS]
    text = content.decode("utf-8", "replace")
    for value in found:
        needles = {value[:24], json.dumps(value[:24])[1:-1], repr(value[:24])[1:-1]}
        if any(n and n in text for n in needles):
            try:
                code = json.loads(content)["error"]["code"]
            except (ValueError, KeyError, TypeError):
                code = "invalid_request"
            return json.dumps({"error": {"code": code, "message": (
                f"the request was refused ({code}); the service never quotes a request's content, "
                "so check each field against the API")}}).encode()
    return content


def create_app(service: Service) -> FastAPI:
    """The app serving `service` (started and closed by whoever runs the app)."""
    config = service.config
    metrics = service.metrics
    app = FastAPI(title="sisa", version=__version__,
                  description="Predictions from a SISA ensemble that forgets records exactly, and the "
                              "deletions that make it forget.")
    bearer = HTTPBearer(auto_error=False, description="The service's token (SISA_SERVE_TOKEN)")

    def require_token(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        if config.no_auth:
            return
        given = credentials.credentials if credentials is not None else ""
        if not given or not hmac.compare_digest(given.encode(), (config.token or "").encode()):
            raise HTTPError(401, "unauthorized",
                            "a valid bearer token is required (Authorization: Bearer <token>)"
                            if given else "this endpoint needs the bearer token "
                            "(Authorization: Bearer <token>)", {"WWW-Authenticate": "Bearer"})

    admin = [Depends(require_token)]
    predicting = admin if config.protect_predict else []

    def check_batch(n: int, what: str) -> None:
        if n > config.max_batch:
            raise HTTPError(413, "batch_too_large", f"{n} {what} in one request; at most "
                                                    f"{config.max_batch} (the service's max_batch)")

    # -- errors ----------------------------------------------------------------------------------

    @app.exception_handler(HTTPError)
    async def http_error(_request: Request, exc: HTTPError) -> JSONResponse:
        return _error(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(SisaError)
    async def sisa_error(_request: Request, exc: SisaError) -> JSONResponse:
        status, code = next(((s, c) for cls, s, c in _STATUS if isinstance(exc, cls)), (500, "store_error"))
        error: dict[str, Any] = {"code": code, "message": str(exc)}
        if isinstance(exc, Unavailable):
            error["excluded_shards"] = exc.excluded
        if status >= 500:
            log.error("%s: %s", type(exc).__name__, exc)
        return JSONResponse({"error": error}, status,
                            headers={"Retry-After": "1"} if status == 503 else None)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = exc.errors()
        if any(p.get("type") == "json_invalid" for p in problems):
            return _error(400, "malformed_json", "the request body is not valid JSON")
        # Where and what, never the input itself (it may be a record's content).
        text = "; ".join(f"{'.'.join(str(x) for x in p.get('loc', ()) if x != 'body') or 'body'}: "
                         f"{p.get('msg', 'invalid')}" for p in problems[:10])
        return _error(422, "invalid_request", text)

    @app.exception_handler(HTTPException)
    async def http_exception(_request: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal(_request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error: %s", type(exc).__name__)  # no message: it may quote an input
        return _error(500, "internal", "internal error; the service log names its type")

    app.add_middleware(RequestGuard, limit=config.max_body_bytes, metrics=metrics)

    # -- answers ---------------------------------------------------------------------------------

    # The answering routes return their JSONResponse themselves: a route returning a dict has
    # FastAPI validate it against `dict[str, Any]` (it checks nothing) on a second trip to the
    # thread pool, a fifth of a small prediction's time.
    @app.post("/v1/predict", dependencies=predicting, summary="Classify inputs with the ensemble")
    def predict(body: PredictIn) -> JSONResponse:
        check_batch(len(body.inputs), "inputs")
        result = service.predict(body.inputs)
        out: dict[str, Any] = {"predictions": result.labels, "classes": result.classes,
                               "model": result.model.to_dict()}
        if body.probabilities:
            out["probabilities"] = [[round(float(p), 6) for p in row] for row in result.probabilities]
        return JSONResponse(out)

    @app.post("/v1/generate", dependencies=predicting, summary="Continue prompts (causal-LM stores)")
    def generate(body: GenerateIn) -> JSONResponse:
        check_batch(len(body.prompts), "prompts")
        if body.max_new_tokens > config.max_new_tokens:
            raise HTTPError(422, "invalid_request", f"max_new_tokens {body.max_new_tokens} is above "
                                                    f"the service's cap of {config.max_new_tokens}")
        out, version = service.generate(body.prompts, body.max_new_tokens, body.combine,
                                        body.temperature, body.seed, body.stop)
        return JSONResponse({"generations": [{"prompt": g.prompt, "text": g.text, "tokens": g.tokens}
                                             for g in out], "model": version.to_dict()})

    @app.post("/v1/score", dependencies=predicting, summary="Log-likelihood of texts (causal-LM stores)")
    def score(body: ScoreIn) -> JSONResponse:
        check_batch(len(body.texts), "texts")
        report, version = service.score(body.texts, body.prompts, body.combine)
        return JSONResponse({"records": [{"index": int(r.id), "tokens": r.tokens, "logprob": r.logprob,
                                          "perplexity": r.perplexity} for r in report.records],
                             "tokens": report.tokens, "perplexity": report.perplexity,
                             "combine": report.combine, "model": version.to_dict()})

    # -- deletions -------------------------------------------------------------------------------

    def deletions_on() -> None:
        if service.writer is None:
            raise HTTPError(403, "deletions_disabled", "this service was started without deletion "
                                                       "endpoints (serve predictions only)")

    deleting = [*admin, Depends(deletions_on)]

    @app.post("/v1/deletions", dependencies=deleting, status_code=202,
              summary="Acknowledge a deletion: durable and excluded from answers before the 202")
    def delete(body: DeletionIn, response: Response) -> dict[str, Any]:
        if (body.ids is None) == (body.group is None):
            raise HTTPError(422, "invalid_request", "give either ids (a list of record ids) or group")
        request = service.acknowledge(body.ids, body.group)
        if not request.request_id:
            response.status_code = 200
            return {"request_id": None, "status": "nothing_to_delete",
                    "already_deleted": len(request.already_deleted)}
        response.headers["Location"] = f"/v1/deletions/{request.request_id}"
        return {"request_id": request.request_id, "status": "pending", "shards": request.shards,
                "records": len(request.record_ids), "already_deleted": len(request.already_deleted),
                "requested_at": request.requested_at}

    @app.get("/v1/deletions/{request_id}", dependencies=deleting, summary="A deletion's state and receipt")
    async def deletion(request_id: str, wait: Annotated[float, Query(
            ge=0, le=MAX_WAIT, description="Seconds to wait while it is pending (a long poll): the "
                                           "answer comes as soon as it is applied or has failed")] = 0.0,
                       ) -> dict[str, Any]:
        # Each look is a read of the store in a worker thread; between looks the request holds
        # no thread (`sisa forget`, handing a deletion over, learns at once that it was applied).
        deadline = time.monotonic() + wait
        while True:
            found = await run_in_threadpool(service.deletion, request_id)
            if found is None:
                raise HTTPError(404, "unknown_deletion", "no deletion request has that id")
            if found["status"] != "pending" or time.monotonic() >= deadline:
                return found
            await asyncio.sleep(_WAIT_LOOK)

    @app.get("/v1/deletions", dependencies=deleting, summary="Deletions, newest last")
    def deletions(status: Literal["pending", "applied", "failed"] | None = None,
                  limit: Annotated[int, Query(ge=1, le=10_000)] = 100) -> dict[str, Any]:
        return {"deletions": service.deletions(status, limit)}

    # -- operations ------------------------------------------------------------------------------

    @app.get("/v1/status", dependencies=admin, summary="The store and the service")
    def status() -> dict[str, Any]:
        return service.status()

    @app.get("/healthz", summary="The process answers")
    def healthz(request: Request) -> JSONResponse:
        headers = None
        challenge = request.headers.get(CHALLENGE)
        if challenge and service.handoff_secret:  # `sisa forget` checks who it hands ids to
            headers = {PROOF: proof(service.handoff_secret, challenge[:128])}
        return JSONResponse({"status": "ok"}, headers=headers)

    @app.get("/readyz", summary="Whether answers can be given now")
    def readyz() -> JSONResponse:
        ok, reason = service.ready()
        return JSONResponse({"ready": ok, "reason": reason}, 200 if ok else 503)

    @app.get("/metrics", summary="Prometheus metrics")
    def prometheus() -> Response:
        metrics.pending.set(len(service.reader.pending()))
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
