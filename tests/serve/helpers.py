"""What the server tests share: clients, the library's reference output, raw HTTP and SSE reading,
and reading /metrics."""

from __future__ import annotations

import http.client
import json
import time

import openai

from twotower.serve.metrics import sample

FAST = {"block_size": 4, "steps_per_block": 4, "confidence_threshold": 0.5}
JSON = {"Content-Type": "application/json"}


def client(server, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


def reference_ids(loaded, ids: list[int], *, max_tokens: int, mode: str = "diffusion", **opts) -> str:
    """What the library produces for these prompt ids alone (greedy), as text."""
    tok, model = loaded.tokenizer, loaded.model
    eos = list(model.config.eos_token_ids)
    if mode in ("ar", "speculative"):  # greedy speculative decoding is the AR model's
        out = model.generate_ar([ids], max_new_tokens=max_tokens, eos_token_id=eos)
    else:
        out = model.generate_mask_diffusion([ids], max_new_tokens=max_tokens, eos_token_id=eos, **opts)
    return tok.decode([t for t in out.new_tokens[0] if t not in eos])


def reference(loaded, prompt: str, *, max_tokens: int, mode: str = "diffusion", **opts) -> str:
    ids = [loaded.tokenizer.bos_id, *loaded.tokenizer.encode(prompt)]
    return reference_ids(loaded, ids, max_tokens=max_tokens, mode=mode, **opts)


def connect(server, timeout: float = 60) -> http.client.HTTPConnection:
    return http.client.HTTPConnection(server.host, server.port, timeout=timeout)


def raw_post(server, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    conn = connect(server)
    conn.request("POST", path, body=body, headers={**JSON, **(headers or {})})
    resp = conn.getresponse()
    status, data = resp.status, json.loads(resp.read())
    conn.close()
    return status, data


def open_stream(server, body: dict) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """A streaming POST /v1/completions whose response is read by the caller."""
    conn = connect(server)
    conn.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}), headers=JSON)
    return conn, conn.getresponse()


def sse_events(raw: str) -> list[tuple[str | None, str]]:
    """(event name, data) per server-sent event."""
    events = []
    for block in raw.split("\n\n"):
        if not block.strip():
            continue
        name, data = None, []
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                data.append(line[len("data: ") :])
        events.append((name, "\n".join(data)))
    return events


def metrics(server) -> str:
    conn = connect(server)
    conn.request("GET", "/metrics")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/plain")
    text = resp.read().decode()
    conn.close()
    return text


def metric(server, name: str, **labels: str) -> float:
    return sample(metrics(server), name, **labels) or 0.0


def wait_for(predicate, *, timeout: float = 30.0, every: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return predicate()
