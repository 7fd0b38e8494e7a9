"""A client that leaves is cancelled in the engine, streaming or not: its row leaves the batch, the
request is counted with status 499, and it stops generating long before its token budget (seen
through /metrics, as an operator would see it)."""

from __future__ import annotations

import json
import socket

import pytest

from twotower.serve.app import ServerConfig
from twotower.serve.server import make_server
from twotower.workload import Limits, Options

from .helpers import FAST, metric, open_stream, wait_for

BUDGET = 1024  # far more than a cancelled request may generate


@pytest.fixture(scope="module")
def server(loaded):
    config = ServerConfig(port=0, limits=Limits(max_tokens=BUDGET), defaults=Options(**FAST))
    with make_server(loaded, config).start() as running:
        yield running


def idle(server) -> bool:
    return metric(server, "twotower_in_flight") == 0 and metric(server, "twotower_running_rows") == 0


def test_a_client_that_leaves_mid_stream_is_cancelled(server):
    tokens_before = metric(server, "twotower_generated_tokens_total")
    conn, resp = open_stream(server, {"prompt": "the quick", "max_tokens": BUDGET, **FAST})
    try:
        assert resp.status == 200 and resp.readline().startswith(b"data: ")
        assert metric(server, "twotower_running_rows") == 1
    finally:
        conn.close()  # gone after the first block
    assert wait_for(lambda: idle(server)), "the abandoned stream is still decoding"
    assert metric(server, "twotower_requests_total", status="499", endpoint="completions") == 1
    assert metric(server, "twotower_generated_tokens_total") - tokens_before < BUDGET // 4


def test_clients_that_leave_a_non_streaming_request_are_cancelled(server):
    """The old server decoded these to their limit: seconds later /health still counted them."""
    before = metric(server, "twotower_requests_total", status="499")
    tokens_before = metric(server, "twotower_generated_tokens_total")
    body = json.dumps({"prompt": "over the lazy", "max_tokens": BUDGET, **FAST}).encode()
    socks = []
    for _ in range(4):
        sock = socket.create_connection((server.host, server.port), timeout=30)
        head = (
            f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
        )
        sock.sendall(head.encode() + b"\r\n\r\n" + body)
        socks.append(sock)
    assert wait_for(lambda: metric(server, "twotower_running_rows") == 4)
    for sock in socks:
        sock.close()
    assert wait_for(lambda: idle(server), timeout=10), "abandoned requests are still decoding"
    assert metric(server, "twotower_requests_total", status="499") - before == 4
    assert metric(server, "twotower_generated_tokens_total") - tokens_before < BUDGET


def test_the_server_serves_normally_after_clients_left(server):
    conn, resp = open_stream(server, {"prompt": "the quick", "max_tokens": 8, **FAST})
    raw = resp.read().decode()
    assert raw.rstrip().endswith("data: [DONE]")
    conn.close()
    assert metric(server, "twotower_requests_total", status="200") >= 1
    assert wait_for(lambda: idle(server))
