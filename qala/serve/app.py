"""The HTTP application: FastAPI routes over a Service and a batcher, the same app in one process
(uvicorn, LocalBatcher) and on Ray Serve (RayBatcher).

Every failure is a JSON object {"error": kind, "field": ..., "message": ...}: a request that cannot be
read or names a bad field gets a 4xx saying which field and why, never a 500; a request the model does
not answer in time gets 504; a full queue (kind "overloaded") or a request predicted to complete past the
shed threshold (kind "shed", refused on arrival) 503 with a Retry-After header.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, Any, Protocol, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from qala.serve.service import Item, Overloaded, ServeConfig, Service

logger = logging.getLogger(__name__)

ROUTES = ("/answer", "/answer/batch", "/healthz", "/metrics")
BodyModel = TypeVar("BodyModel", bound=BaseModel)


class Batcher(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def submit(self, item: Item) -> dict[str, Any]: ...
    def depth(self) -> int: ...


class AnswerRequest(BaseModel):
    """One question about one context; budget_ms (optional) caps the model time, as in QalaModel.answer."""

    model_config = ConfigDict(extra="forbid")

    question: StrictStr
    context: StrictStr
    budget_ms: Annotated[float | None, Field(gt=0, allow_inf_nan=False, strict=True)] = None

    @field_validator("question", "context")
    @classmethod
    def _not_blank(cls, text: str) -> str:
        if not text.strip():
            raise ValueError("empty" if not text else "only whitespace; expected a non-blank string")
        return text


class AnswerBatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    requests: Annotated[list[AnswerRequest], Field(min_length=1)]


class ServeError(Exception):
    """A request the service refuses or cannot answer: HTTP `status`, a `kind` for /metrics, the field."""

    def __init__(
        self, status: int, kind: str, message: str, field: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.kind, self.message, self.field = status, kind, message, field
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(
            {"error": self.kind, "field": self.field, "message": self.message},
            status_code=self.status,
            headers=self.headers,
        )


def field_name(loc: tuple[Any, ...]) -> str:
    """("body", "requests", 1, "question") -> "requests[1].question"; the body itself -> "body"."""
    parts = list(loc[1:] if loc and loc[0] == "body" else loc)
    name = ""
    for part in parts:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or "body"


def validation_error(errors: Sequence[Mapping[str, Any]]) -> ServeError:
    """Pydantic's (or FastAPI's) validation errors as one ServeError naming every bad field."""
    problems = []
    for e in errors:
        name = field_name(tuple(e.get("loc", ())))
        message = e.get("msg", "invalid")
        if e.get("type") == "missing":
            message = "missing; it is required"
        elif e.get("type") == "extra_forbidden":
            message = "unknown field (expected question, context and optionally budget_ms)"
        elif name in ("body", "requests") and message.startswith("Input should be a valid"):
            expected = "a JSON object" if name == "body" else "a list"
            message = f"expected {expected} ({message[0].lower()}{message[1:]})"
        elif message.startswith("Value error, "):
            message = message.removeprefix("Value error, ")
        problems.append((name, message))
    message = "; ".join(f"{name}: {text}" for name, text in problems)
    return ServeError(422, "invalid_field", message, problems[0][0] if problems else "body")


async def read_body(request: Request, model: type[BodyModel]) -> BodyModel:
    """The request's JSON body validated as `model`, whatever its content-type (curl -d sends a form's):
    malformed JSON is a 400, a bad field a 422 naming it."""
    body = await request.body()
    if not body.strip():
        raise ServeError(422, "invalid_field", "body: missing; send a JSON object", "body")
    try:
        data = json.loads(body)
    except UnicodeDecodeError as e:
        raise ServeError(400, "malformed_json", f"body: not UTF-8 ({e.reason} at byte {e.start})", "body") from None
    except json.JSONDecodeError as e:
        raise ServeError(
            400, "malformed_json", f"body: malformed JSON at character {e.pos} ({e.msg})", "body"
        ) from None
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e.errors(include_url=False, include_input=False)) from None


def build_app(service: Service, batcher: Batcher) -> FastAPI:
    """The FastAPI app: POST /answer, POST /answer/batch, GET /healthz, GET /metrics."""
    config, metrics = service.config, service.metrics
    metrics.queue_depth.set_function(batcher.depth)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title="qala", summary="Length-adaptive extractive question answering", lifespan=lifespan)

    def refuse(error: ServeError) -> JSONResponse:
        metrics.errors.labels(kind=error.kind).inc()
        return error.response()

    app.add_middleware(Instrument, config=config, metrics=metrics, refuse=refuse)
    _add_error_handlers(app, refuse)

    # The answer routes return JSONResponse themselves: a returned dict goes through FastAPI's response
    # validation and jsonable_encoder, pure-Python passes over every field. With Instrument below, that took
    # the app's CPU per request (an in-process client included, a stub model) from 0.81 to 0.41 ms on 2 cores
    # of an AMD EPYC Zen 5 (2026-12-05): time the model thread no longer shares.
    @app.post("/answer", openapi_extra=_json_body(AnswerRequest), response_class=JSONResponse)
    async def answer(http: Request) -> JSONResponse:
        """The answer to one question: the QalaModel.answer fields and the configuration chosen."""
        item = _item_of(config, await read_body(http, AnswerRequest))
        return JSONResponse(await _answer_item(batcher, config, item))

    @app.post("/answer/batch", openapi_extra=_json_body(AnswerBatchRequest), response_class=JSONResponse)
    async def answer_batch(http: Request) -> JSONResponse:
        """Answers to several questions; each is batched and adapted like a request of its own."""
        request = await read_body(http, AnswerBatchRequest)
        if len(request.requests) > config.max_batch_items:
            raise ServeError(
                413,
                "too_large",
                f"requests: {len(request.requests)} items, over the limit of {config.max_batch_items} "
                "(--max-batch-items)",
                "requests",
            )
        items = [_item_of(config, r, f"requests[{i}].") for i, r in enumerate(request.requests)]
        tasks = [
            asyncio.ensure_future(_answer_item(batcher, config, item, f"requests[{i}]."))
            for i, item in enumerate(items)
        ]
        try:
            return JSONResponse({"answers": list(await asyncio.gather(*tasks))})
        finally:
            for task in tasks:
                task.cancel()

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "queue_depth": batcher.depth(), **service.describe()}

    @app.get("/metrics")
    async def prometheus() -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    return app


class Instrument:
    """Counts and times every request by route and status, and refuses a body over the size limit (413)
    before it is read. A plain ASGI middleware: Starlette's BaseHTTPMiddleware (@app.middleware) runs each
    request through an extra task and memory streams."""

    def __init__(self, app: Any, config: ServeConfig, metrics: Any, refuse: Callable[[ServeError], JSONResponse]):
        self.app, self.metrics, self.refuse = app, metrics, refuse
        self.limit = config.max_batch_items * (4 * config.max_context_chars + 4096)  # UTF-8 and JSON escapes

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        route = scope["path"] if scope["path"] in ROUTES else "other"
        status = 500  # what the client gets if the app raises before it starts a response

        async def send_and_note(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        size = dict(scope["headers"]).get(b"content-length", b"").decode("latin-1")
        try:
            if size.isdigit() and int(size) > self.limit:
                error = ServeError(413, "too_large", f"body: {size} bytes, over the limit of {self.limit}", "body")
                await self.refuse(error)(scope, receive, send_and_note)
            else:
                await self.app(scope, receive, send_and_note)
        finally:
            self.metrics.requests.labels(route=route, status=str(status)).inc()
            self.metrics.latency.labels(route=route).observe(time.perf_counter() - started)


def _add_error_handlers(app: FastAPI, refuse: Callable[[ServeError], JSONResponse]) -> None:
    """Every error a request can meet becomes a JSON 4xx/5xx through `refuse` (counted by kind)."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return refuse(validation_error(exc.errors()))

    @app.exception_handler(ServeError)
    async def _refused(request: Request, exc: ServeError) -> JSONResponse:
        return refuse(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http")
        return refuse(ServeError(exc.status_code, kind, f"{request.method} {request.url.path}: {exc.detail}"))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal error answering %s", request.url.path)
        return refuse(ServeError(500, "internal", f"internal error ({type(exc).__name__}); see the server log"))


def _item_of(config: ServeConfig, request: AnswerRequest, prefix: str = "") -> Item:
    """A request as a queue item; a context over --max-context-chars is refused (413)."""
    if len(request.context) > config.max_context_chars:
        raise ServeError(
            413,
            "too_large",
            f"{prefix}context: {len(request.context)} characters, over the limit of {config.max_context_chars} "
            "(--max-context-chars)",
            f"{prefix}context",
        )
    return Item(request.question, request.context, request.budget_ms)


async def _answer_item(batcher: Batcher, config: ServeConfig, item: Item, prefix: str = "") -> dict[str, Any]:
    """The item answered through the batcher, or the ServeError that says why not (504, 503, 422)."""
    try:
        result = await asyncio.wait_for(batcher.submit(item), config.timeout_s)
    except asyncio.TimeoutError:
        raise ServeError(
            504,
            "timeout",
            f"{prefix}not answered within {config.timeout_s:g} s (--timeout-s); the service is overloaded",
        ) from None
    except Overloaded as e:  # a full queue, or shed (Shed): refused on arrival, not after a wait
        headers = {"Retry-After": str(e.retry_after_s)} if e.retry_after_s is not None else None
        raise ServeError(503, e.kind, f"{prefix}{e}", headers=headers) from None
    except ValueError as e:  # the model refused the question or context (e.g. a question longer than a window)
        text = str(e)
        name = "question" if "question" in text else ("context" if "context" in text else "body")
        raise ServeError(422, "invalid_input", f"{prefix}{text}", f"{prefix}{name}") from None
    result["server_ms"] = round((time.monotonic() - item.arrival) * 1000, 3)
    return result


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    """The body schema for /docs (the route reads the body itself, see read_body)."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    schema.pop("$defs", None)  # AnswerRequest, nested in the batch: documented by the /answer route
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
