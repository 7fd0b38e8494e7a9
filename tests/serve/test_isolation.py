"""One request's failure is its own: a request whose decoding raises gets a 500 (or an error event
in its stream) while the requests decoded beside it finish with exactly their lone output, and the
engine keeps serving. A step that fails once (a transient fault) costs nobody their request."""

from __future__ import annotations

import threading
import time

import openai
import pytest

from twotower.serve.app import ServerConfig
from twotower.serve.server import make_server
from twotower.workload import Options

from .helpers import FAST, client, metric, reference

PROMPTS = ["the quick brown", "over the lazy", "Line 7: the"]
MAX_TOKENS = 48
FAULT_AT = 6  # the denoiser forward that raises, counted from when the fault is armed
SLOW_S = 0.004  # per denoiser forward, so the batch is still running when the fault comes


@pytest.fixture
def server(loaded, monkeypatch):
    model = loaded.model
    forward = model.denoise

    def slow(*args, **kwargs):
        time.sleep(SLOW_S)
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "denoise", slow)
    with make_server(loaded, ServerConfig(port=0, defaults=Options(**FAST))).start() as running:
        yield running


def start_streams(server, loaded) -> tuple[list[threading.Thread], list, list[threading.Event]]:
    """Three streaming clients; returns when each has its first block."""
    texts: list = [None] * len(PROMPTS)
    first = [threading.Event() for _ in PROMPTS]

    def read(i: int) -> None:
        parts = []
        stream = client(server).completions.create(
            model=loaded.name, prompt=PROMPTS[i], max_tokens=MAX_TOKENS, stream=True, extra_body=FAST
        )
        for chunk in stream:
            parts.append(chunk.choices[0].text)
            first[i].set()
        texts[i] = "".join(parts)

    threads = [threading.Thread(target=read, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for e in first:
        assert e.wait(60)
    return threads, texts, first


def finish(threads, texts, loaded) -> None:
    for t in threads:
        t.join(120)
    for prompt, text in zip(PROMPTS, texts):
        assert text == reference(loaded, prompt, max_tokens=MAX_TOKENS, **FAST), prompt


def test_a_request_that_breaks_the_model_fails_alone(server, loaded, monkeypatch):
    poison = loaded.model.mask_token_id  # a prompt holding it makes the context tower raise
    tower = loaded.model.context_tower
    forward = tower.forward

    def poisoned(input_ids, *args, **kwargs):
        if bool((input_ids == poison).any()):
            raise RuntimeError("poisoned input")
        return forward(input_ids, *args, **kwargs)

    monkeypatch.setattr(tower, "forward", poisoned)
    threads, texts, _ = start_streams(server, loaded)
    bad = [loaded.tokenizer.bos_id, poison, *loaded.tokenizer.encode("the")]
    with pytest.raises(openai.InternalServerError, match="decoding failed: RuntimeError: poisoned input"):
        client(server).completions.create(model=loaded.name, prompt=bad, max_tokens=8, extra_body=FAST)
    with pytest.raises(openai.APIError, match="poisoned input"):
        for _ in client(server).completions.create(
            model=loaded.name, prompt=bad, max_tokens=8, stream=True, extra_body=FAST
        ):
            pass
    finish(threads, texts, loaded)
    assert metric(server, "twotower_engine_failures_total") >= 2
    assert metric(server, "twotower_requests_total", status="500") == 2
    assert metric(server, "twotower_requests_total", status="200") == len(PROMPTS)
    out = client(server).completions.create(model=loaded.name, prompt="still serving", max_tokens=4)
    assert out.usage.completion_tokens >= 1


def test_a_step_that_fails_once_costs_nobody_their_request(server, loaded, monkeypatch):
    denoise = loaded.model.denoise  # the slowed one
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == FAULT_AT:
            raise RuntimeError("transient fault")
        return denoise(*args, **kwargs)

    threads, texts, _ = start_streams(server, loaded)
    monkeypatch.setattr(loaded.model, "denoise", flaky)
    for t in threads:
        t.join(120)
    monkeypatch.setattr(loaded.model, "denoise", denoise)  # the references below run unfaulted
    finish(threads, texts, loaded)
    assert calls["n"] > FAULT_AT
    assert metric(server, "twotower_engine_failures_total") == 1
    assert metric(server, "twotower_requests_total", status="200") == len(PROMPTS)
    assert metric(server, "twotower_requests_total", status="500") == 0


def test_the_engine_thread_survives_a_failing_recovery(server, loaded, monkeypatch):
    """Last resort: when isolating a fault fails too, the requests in flight fail and the engine
    thread lives on to serve the next ones."""
    worker = server.state.worker

    def broken(error):
        raise RuntimeError("recovery failed")

    monkeypatch.setattr(worker, "_recover", broken)
    real = loaded.model.denoise
    monkeypatch.setattr(loaded.model, "denoise", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("fault")))
    with pytest.raises(openai.InternalServerError, match="recovery failed"):
        client(server).completions.create(model=loaded.name, prompt="the", max_tokens=8, extra_body=FAST)
    monkeypatch.setattr(loaded.model, "denoise", real)
    assert worker.alive
    out = client(server).completions.create(model=loaded.name, prompt="the", max_tokens=8, extra_body=FAST)
    assert out.choices[0].text == reference(loaded, "the", max_tokens=8, **FAST)
