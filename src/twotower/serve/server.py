"""Running the application under uvicorn on a socket we bind ourselves (so port 0 gives a known free
port before anything starts): in the foreground for `twotower serve`, or on a thread for tests."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from .app import ServerConfig, create_app

BACKLOG = 2048  # pending connections the kernel queues (http.server's default of 5 reset clients)
KEEP_ALIVE_S = 30  # an idle keep-alive connection is closed after this
GRACEFUL_S = 5  # on shutdown, in-flight requests get this long to finish before they are cancelled
START_TIMEOUT_S = 30


class RunningServer:
    """A bound server; `start()` answers on a thread, `serve_forever()` in the caller's thread."""

    def __init__(self, loaded, config: ServerConfig) -> None:
        self.app = create_app(loaded, config)
        self.state = self.app.state.server
        self.sock = _bind(config.host, config.port)
        self.host, self.port = self.sock.getsockname()[:2]
        level = "info" if config.log_requests else "warning"
        self.uvicorn = uvicorn.Server(
            uvicorn.Config(
                self.app,
                log_level=level,
                access_log=config.log_requests,
                timeout_keep_alive=KEEP_ALIVE_S,
                timeout_graceful_shutdown=GRACEFUL_S,
                lifespan="on",
            )
        )
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def serve_forever(self) -> None:
        """Answer until SIGINT/SIGTERM (then KeyboardInterrupt is re-raised by uvicorn for SIGINT)."""
        self.uvicorn.run(sockets=[self.sock])

    def start(self) -> RunningServer:
        self._thread = threading.Thread(
            target=self.uvicorn.run, kwargs={"sockets": [self.sock]}, name="twotower-http", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def close(self) -> None:
        self.uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(GRACEFUL_S + 10)
        self.state.worker.close()
        self.sock.close()

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_server(loaded, config: ServerConfig) -> RunningServer:
    """Bind (OSError if the address is taken or not ours) without answering yet."""
    return RunningServer(loaded, config)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(BACKLOG)
    sock.set_inheritable(True)
    return sock
