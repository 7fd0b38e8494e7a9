"""The HTTP layer (standard library only): routes, API key, body limits, JSON and server-sent events.

  GET  /health             liveness and load (no key needed)
  GET  /v1/models          the one served model
  GET  /v1/models/{id}
  POST /v1/completions     OpenAI completions, streaming or not (see api.py for the fields)

Each connection gets a handler thread that parses and validates, submits to the engine thread
(`EngineWorker`) and then waits on its ticket, writing text as blocks commit. HTTP/1.1 keep-alive;
streams use chunked transfer encoding with one `data: {...}` event per committed block.
"""

from __future__ import annotations

import hmac
import json
import queue
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ..decode.engine import FINISH_CANCELLED
from ..workload import Limits, Options, TextStream, finish_reason, to_request
from .api import ApiError, completion_body, model_body, models_body, parse_completion, usage, usage_chunk
from .worker import EngineWorker, QueueFull, Ticket

WAIT_POLL_S = 1.0  # a handler waiting for events checks this often that the engine thread is alive


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_batch_size: int = 32
    max_queue: int = 64
    limits: Limits = field(default_factory=Limits)
    defaults: Options = field(default_factory=Options)
    max_body_bytes: int = 1 << 20
    log_requests: bool = False


class App:
    """What every handler shares: the model's name and tokenizer, the engine thread, the config."""

    def __init__(self, loaded, config: ServerConfig) -> None:
        self.model_name = loaded.name
        self.tokenizer = loaded.tokenizer
        self.vocab_size = loaded.model.config.vocab_size
        self.eos_ids = loaded.model.config.eos_token_ids
        self.config = config
        self.created = int(time.time())
        self.worker = EngineWorker(loaded.model, max_batch_size=config.max_batch_size, max_queue=config.max_queue)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "twotower"
    timeout = 60  # seconds an idle keep-alive connection may hold its thread
    app: App  # set on the subclass made by `make_server`

    # ---- routing ------------------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._route({"/health": self._health, "/v1/models": self._models}, prefix_models=True)

    def do_POST(self) -> None:
        self._route({"/v1/completions": self._completions})

    def do_PUT(self) -> None:
        self._route({})

    do_DELETE = do_PATCH = do_PUT

    def _route(self, routes: dict, *, prefix_models: bool = False) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        try:
            if path in routes:
                routes[path]()
            elif prefix_models and path.startswith("/v1/models/"):
                self._model(path.removeprefix("/v1/models/"))
            elif path in ("/health", "/v1/models", "/v1/completions"):
                raise ApiError(405, f"method {self.command} is not allowed on {path}")
            else:
                raise ApiError(404, f"no route {path}; try POST /v1/completions", code="not_found")
        except ApiError as err:
            self._send_json(err.status, err.body(), close=not self._body_read)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            self.close_connection = True
        except Exception as err:  # a bug: answer 500 with one line, keep serving, log the traceback
            traceback.print_exc(file=sys.stderr)
            body = ApiError(500, f"internal error: {type(err).__name__}: {err}", kind="server_error").body()
            try:
                self._send_json(500, body, close=True)
            except OSError:
                self.close_connection = True

    # ---- endpoints ----------------------------------------------------------------------------------
    def _health(self) -> None:
        app = self.app
        body = {"status": "ok" if app.worker.alive else "down", "model": app.model_name}
        body.update(active=app.worker.active, in_flight=app.worker.inflight)
        self._send_json(200 if app.worker.alive else 503, body)

    def _models(self) -> None:
        self._authorize()
        self._send_json(200, models_body(self.app.model_name, self.app.created))

    def _model(self, name: str) -> None:
        self._authorize()
        if name != self.app.model_name:
            raise ApiError(404, f"model {name!r} does not exist", param="model", code="model_not_found")
        self._send_json(200, model_body(name, self.app.created))

    def _completions(self) -> None:
        self._authorize()
        app = self.app
        call = parse_completion(
            self._read_body(),
            tokenizer=app.tokenizer,
            vocab_size=app.vocab_size,
            model_name=app.model_name,
            defaults=app.config.defaults,
            limits=app.config.limits,
        )
        cid, created, eos = f"cmpl-{uuid.uuid4().hex}", int(time.time()), app.eos_ids
        try:
            ticket = app.worker.submit(to_request(cid, call.prompt_ids, call.options, eos_ids=eos))
        except QueueFull as err:
            raise ApiError(429, str(err), kind="rate_limit_error", code="queue_full") from None
        except ValueError as err:
            raise ApiError(400, str(err)) from None
        except RuntimeError as err:
            raise ApiError(503, str(err), kind="server_error") from None
        text = TextStream(app.tokenizer, stop=call.options.stop, eos_ids=eos)
        pieces = self._pieces(ticket, text)
        n_prompt = len(call.prompt_ids)
        if not call.stream:
            try:
                reason = [r for _, r in pieces][-1]
            except RuntimeError as err:
                raise ApiError(500, str(err), kind="server_error") from None
            body = completion_body(
                cid, created, app.model_name, text.text, reason, usage(n_prompt, text.completion_tokens)
            )
            self._send_json(200, body)
            return
        self._start_stream()
        try:
            for delta, reason in pieces:
                self._send_event(completion_body(cid, created, app.model_name, delta, reason, None))
            if call.include_usage:
                self._send_event(usage_chunk(cid, created, app.model_name, usage(n_prompt, text.completion_tokens)))
            self._send_chunk(b"data: [DONE]\n\n")
        except RuntimeError as err:  # decoding failed after the 200 went out: say so in the stream
            self._send_event(ApiError(500, str(err), kind="server_error").body())
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError):
            app.worker.cancel(cid)  # the client left: free its row
            self.close_connection = True
            return
        self._send_chunk(b"")  # end of the chunked body

    def _pieces(self, ticket: Ticket, text: TextStream) -> Iterator[tuple[str, str | None]]:
        """(new text, None) per committed block, then (last text, finish_reason)."""
        worker = self.app.worker
        while True:
            try:
                event = ticket.next(timeout=WAIT_POLL_S)
            except queue.Empty:
                if not worker.alive:
                    raise RuntimeError("the engine thread stopped") from None
                continue
            delta = text.feed(event.tokens)
            reason = event.finish_reason
            if text.stopped and reason is None:
                worker.cancel(ticket.request_id)  # a stop string ended it
                reason = FINISH_CANCELLED
            if reason is not None:
                yield delta + text.finish(), finish_reason(reason, text)
                return
            yield delta, None

    # ---- request plumbing ---------------------------------------------------------------------------
    @property
    def _body_read(self) -> bool:
        return getattr(self, "_consumed", False) or self.headers.get("Content-Length") in (None, "0")

    def _authorize(self) -> None:
        key = self.app.config.api_key
        if key is None:
            return
        given = self.headers.get("Authorization", "")
        if not given.startswith("Bearer "):
            raise ApiError(
                401, "missing API key: send the header 'Authorization: Bearer <key>'", kind="authentication_error"
            )
        if not hmac.compare_digest(given.removeprefix("Bearer ").strip().encode(), key.encode()):
            raise ApiError(401, "invalid API key", kind="authentication_error", code="invalid_api_key")

    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked" or length is None:
            raise ApiError(411, "send the body with a Content-Length header")
        try:
            n = int(length)
        except ValueError:
            raise ApiError(400, f"bad Content-Length {length!r}") from None
        if n > self.app.config.max_body_bytes:
            raise ApiError(413, f"the body is {n} bytes, more than the limit of {self.app.config.max_body_bytes}")
        self._consumed = True
        return self.rfile.read(n)

    # ---- responses ----------------------------------------------------------------------------------
    def _send_json(self, status: int, body: dict, *, close: bool = False) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def _start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _send_event(self, body: dict) -> None:
        self._send_chunk(b"data: " + json.dumps(body).encode() + b"\n\n")

    def _send_chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def log_message(self, format: str, *args) -> None:
        if self.app.config.log_requests:
            sys.stderr.write(f"{self.address_string()} - {format % args}\n")


class RunningServer:
    """A server answering on its own threads; `close()` stops it and the engine thread."""

    def __init__(self, httpd: ThreadingHTTPServer, app: App) -> None:
        self.httpd, self.app = httpd, app
        self.host, self.port = httpd.server_address[:2]
        self._thread = threading.Thread(target=httpd.serve_forever, name="twotower-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> RunningServer:
        self.app.worker.start()
        self._thread.start()
        return self

    def wait(self) -> None:
        """Block until the server stops (Ctrl-C raises KeyboardInterrupt here)."""
        while self._thread.is_alive():
            self._thread.join(0.5)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.app.worker.close()

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_server(loaded, config: ServerConfig) -> RunningServer:
    """Bind (port 0 picks a free port) without starting; `start()` starts answering."""
    app = App(loaded, config)
    handler = type("BoundHandler", (Handler,), {"app": app})
    httpd = ThreadingHTTPServer((config.host, config.port), handler)
    httpd.daemon_threads = True
    return RunningServer(httpd, app)
