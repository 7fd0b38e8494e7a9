"""The ASGI application (FastAPI): routes, API key, body limit, OpenAI error bodies.

  GET  /                      the playground (static page; see static/)
  GET  /health                liveness and load (no key needed)
  GET  /metrics               Prometheus text format (needs the key when one is set)
  GET  /v1/models             the one served model
  GET  /v1/models/{id}
  POST /v1/completions        OpenAI completions, streaming or not
  POST /v1/chat/completions   OpenAI chat completions, streaming or not

Every generation request is parsed (`schemas`, `calls`), submitted to the engine thread
(`generation.Generation`) and answered whole or as a stream (`responses`). A client that leaves
is noticed whether it streams or not, and its request is cancelled in the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import sys
import time
import traceback
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..decode.static import resolve_engine_step
from ..workload import Limits, Options, lone_surrogate, to_request
from .calls import CallContext, chat_call, completion_call
from .chat import ChatPrompt
from .errors import CLIENT_CLOSED, ApiError, from_validation, server_error
from .generation import Generation
from .metrics import CONTENT_TYPE, ServerMetrics
from .responses import ChatFormat, CompletionFormat, Format, stream
from .schemas import ChatCompletionRequest, CompletionRequest, Health, ModelCard, ModelList
from .worker import EngineWorker

STATIC = Path(__file__).with_name("static")
PAGES = {"": "playground.html", "playground.js": "playground.js", "playground.css": "playground.css"}


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_batch_size: int = 32
    max_queue: int = 64
    engine_step: str = "auto"  # the engine's steps: auto, eager, static or compiled (decode.static.resolve_engine_step)
    warmup: bool = False  # compiled steps: decode the default options at every batch width before serving
    limits: Limits = field(default_factory=Limits)
    defaults: Options = field(default_factory=Options)
    max_body_bytes: int = 1 << 20
    log_requests: bool = False


def warmup_request(defaults: Options, tokenizer, *, eos_count: int, mask_id: int):
    """The warm-up request (`Scheduler.warm_up`): the server's default options with a one-token
    prompt and two blocks to fill (a full block, its commit and the next block; AR: 2 tokens). Its
    EOS set has the size of the real one (the compiled steps see an EOS table of the real shape) but
    holds only the mask id, which the denoiser never predicts, so every row runs its whole budget."""
    blocks = 2 * defaults.block_size if defaults.mode != "ar" else 2
    prompt = [tokenizer.bos_id if tokenizer.bos_id is not None else 0]
    options = replace(defaults, max_tokens=blocks, stop=())
    return to_request(("warm-up",), prompt, options, eos_ids=(mask_id,) * eos_count)


class ServerState:
    """What every route shares: the model's name, tokenizer and chat template, the engine thread,
    the metrics, the config."""

    def __init__(self, loaded, config: ServerConfig) -> None:
        self.config = config
        self.model_name = loaded.name
        self.tokenizer = loaded.tokenizer
        self.eos_ids = tuple(loaded.model.config.eos_token_ids)
        self.created = int(time.time())
        self.metrics = ServerMetrics()
        self.engine_step = resolve_engine_step(config.engine_step, loaded.model.context_device)  # "auto" resolved
        warmup = None
        if config.warmup and self.engine_step == "compiled":
            mask_id = loaded.model.mask_token_id
            warmup = warmup_request(config.defaults, self.tokenizer, eos_count=len(self.eos_ids), mask_id=mask_id)
        self.worker = EngineWorker(
            loaded.model,
            max_batch_size=config.max_batch_size,
            max_queue=config.max_queue,
            metrics=self.metrics,
            decode_step=self.engine_step,
            warmup=warmup,
        )
        w = self.worker
        self.metrics.watch(
            queue_depth=lambda: w.queue_depth, running_rows=lambda: w.running_rows, in_flight=lambda: w.in_flight
        )
        self.calls = CallContext(
            tokenizer=loaded.tokenizer,
            vocab_size=loaded.model.config.vocab_size,
            model_name=loaded.name,
            defaults=config.defaults,
            limits=config.limits,
            chat=ChatPrompt.from_model_dir(loaded.tokenizer, loaded.path),
        )

    def authorize(self, request: Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        if not given.startswith("Bearer "):
            raise ApiError(
                401, "missing API key: send the header 'Authorization: Bearer <key>'", kind="authentication_error"
            )
        if not hmac.compare_digest(given.removeprefix("Bearer ").strip().encode(), key.encode()):
            raise ApiError(401, "invalid API key", kind="authentication_error", code="invalid_api_key")


def create_app(loaded, config: ServerConfig) -> FastAPI:
    """The application; the engine thread starts and stops with it (lifespan)."""
    state = ServerState(loaded, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.worker.start()
        try:
            yield
        finally:
            state.worker.close()

    # no /docs or /redoc: their pages load scripts from a CDN; the schema stays at /openapi.json
    app = FastAPI(
        title="twotower", summary="OpenAI-compatible TwoTower server", lifespan=lifespan, docs_url=None, redoc_url=None
    )
    app.state.server = state
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)

    @app.get("/health", response_model=Health)
    async def health() -> JSONResponse:
        w = state.worker
        body = Health(
            status="ok" if w.alive else "down",
            model=state.model_name,
            running_rows=w.running_rows,
            queue_depth=w.queue_depth,
            in_flight=w.in_flight,
        )
        return JSONResponse(body.model_dump(), status_code=200 if w.alive else 503)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        state.authorize(request)
        return Response(state.metrics.exposition(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", response_model=ModelList)
    async def models(request: Request) -> ModelList:
        state.authorize(request)
        return ModelList(data=[ModelCard(id=state.model_name, created=state.created)])

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard)
    async def model(model_id: str, request: Request) -> ModelCard:
        state.authorize(request)
        if model_id != state.model_name:
            raise ApiError(404, f"model {model_id!r} does not exist", param="model", code="model_not_found")
        return ModelCard(id=model_id, created=state.created)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _generate(state, request, CompletionRequest, completion_call, CompletionFormat())

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _generate(state, request, ChatCompletionRequest, chat_call, ChatFormat())

    @app.get("/", include_in_schema=False)
    @app.get("/static/{name}", include_in_schema=False)
    async def page(name: str = "") -> FileResponse:
        if name not in PAGES:
            raise ApiError(404, f"no page {name!r}", code="not_found")
        return FileResponse(STATIC / PAGES[name], headers={"Cache-Control": "no-cache"})

    return app


async def _generate(state: ServerState, request: Request, schema, to_call, fmt: Format) -> Response:
    """Parse, submit, answer; every outcome is counted once in the metrics."""
    started, mode = time.monotonic(), "none"

    def finish(status: int, gen: Generation | None = None) -> None:
        first = None if gen is None or gen.first_tokens_at is None else gen.first_tokens_at - gen.started
        state.metrics.observe_request(
            endpoint=fmt.endpoint,
            mode=mode,
            status=status,
            seconds=time.monotonic() - started,
            first_tokens_s=first,
            tokens_per_forward=None if gen is None else gen.tokens_per_forward,
        )

    try:
        state.authorize(request)
        body = await _read_json(request, limit=state.config.max_body_bytes)
        try:
            call = to_call(schema.model_validate(body), state.calls)
        except ValidationError as err:
            raise from_validation(err) from None
        mode = call.options.mode
        gen = Generation(
            state.worker,
            call,
            model=state.model_name,
            tokenizer=state.tokenizer,
            eos_ids=state.eos_ids,
            prefix=fmt.prefix,
        )
    except ApiError as err:
        finish(err.status)
        raise
    except Exception as err:  # a bug: answered as a server error, still counted
        finish(500)
        traceback.print_exc(file=sys.stderr)
        raise server_error(f"the request could not be handled ({type(err).__name__})") from None
    if call.stream:
        body = stream(
            gen,
            fmt,
            tokenizer=state.tokenizer,
            on_finish=lambda status: finish(status, gen),
            disconnected=lambda: _disconnected(request),
        )
        return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    return await _whole(gen, fmt, request, finish)


async def _whole(gen: Generation, fmt: Format, request: Request, finish) -> Response:
    """Decode to the end while watching the connection: a client that leaves cancels the request."""
    decoding = asyncio.ensure_future(gen.collect())
    gone = asyncio.ensure_future(_disconnected(request))
    await asyncio.wait({decoding, gone}, return_when=asyncio.FIRST_COMPLETED)
    if not decoding.done():
        decoding.cancel()  # pieces() cancels the request in the engine
        with contextlib.suppress(asyncio.CancelledError, ApiError):
            await decoding
        finish(CLIENT_CLOSED, gen)
        return Response(status_code=CLIENT_CLOSED)
    gone.cancel()
    try:
        reason = decoding.result()
    except ApiError as err:
        finish(err.status, gen)
        raise
    finish(200, gen)
    return JSONResponse(fmt.whole(gen, reason).model_dump())


async def _disconnected(request: Request) -> None:
    """Returns when the client has closed the connection (the body is already read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _read_json(request: Request, *, limit: int) -> dict:
    """The body as a JSON object: 413 past `limit` bytes (chunked bodies included), 400 if not JSON."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"the body is {length} bytes, more than the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the body is more than the limit of {limit} bytes")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ApiError(400, f"the request body is not valid JSON: {err}") from None
    except RecursionError:
        raise ApiError(400, "the request body is not valid JSON: nested too deeply") from None
    except ValueError as err:  # e.g. an integer of more digits than Python converts
        raise ApiError(400, f"the request body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    if lone_surrogate(body) is not None:
        raise ApiError(400, "the request body holds a lone UTF-16 surrogate escape (\\udXXX), which is not text")
    return body


async def _internal_error(request: Request, err: Exception) -> JSONResponse:
    """Anything else that escaped a handler: OpenAI's error shape, not a plain-text page."""
    return JSONResponse(server_error(f"internal error ({type(err).__name__})").body(), status_code=500)


async def _api_error(request: Request, err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    """Starlette's own 404 / 405 in OpenAI's error shape."""
    if err.status_code == 404:
        api = ApiError(404, f"no route {request.url.path}; try POST /v1/completions", code="not_found")
    else:
        api = ApiError(err.status_code, f"{request.method} {request.url.path}: {err.detail}")
    return JSONResponse(api.body(), status_code=api.status, headers=getattr(err, "headers", None))
