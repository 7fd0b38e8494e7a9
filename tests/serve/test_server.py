"""The OpenAI-compatible server on loopback, driven by the real `openai` client: completions and
streams equal the library's decoding of the prompt alone, concurrent clients are decoded together
and each still gets exactly its lone result, and every bad request gets the right 4xx and message
while the server keeps serving."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading

import openai
import pytest

from twotower.cli import serve as serve_cli
from twotower.serve.app import ServerConfig
from twotower.serve.server import make_server
from twotower.workload import Limits, OptionError, Options, parse_options

from .helpers import FAST, client, connect, metric, open_stream, raw_post, reference, sse_events

KEY = "test-key"


@pytest.fixture(scope="module")
def server(loaded):
    config = ServerConfig(port=0, limits=Limits(max_prompt_tokens=64, max_tokens=256), defaults=Options(**FAST))
    with make_server(loaded, config).start() as running:
        yield running


def test_binds_loopback_by_default():
    parser = argparse.ArgumentParser()
    serve_cli.register(parser.add_subparsers())
    args = parser.parse_args(["serve"])
    assert ServerConfig().host == "127.0.0.1" and serve_cli.server_config(args).host == "127.0.0.1"
    args = parser.parse_args(["serve", "--mode", "speculative", "--draft-steps", "2", "--block-size", "4"])
    defaults = serve_cli.server_config(args).defaults
    assert (defaults.mode, defaults.draft_steps, defaults.block_size) == ("speculative", 2, 4)
    defaults = serve_cli.server_config(parser.parse_args(["serve", "--anchor"])).defaults
    assert defaults.anchor and defaults.mode == "diffusion"
    assert parse_options({"mode": "ar"}, defaults).anchor is False  # a default anchor yields to an ar request
    with pytest.raises(OptionError, match="anchor applies to mode diffusion only"):
        parse_options({"mode": "ar", "anchor": True}, defaults)


def test_a_warning_when_reachable_from_elsewhere_without_a_key():
    assert serve_cli.exposure_warning("127.0.0.1", None) is None
    assert serve_cli.exposure_warning("localhost", None) is None
    assert serve_cli.exposure_warning("::1", None) is None
    assert "without an API key" in serve_cli.exposure_warning("0.0.0.0", None)
    assert serve_cli.exposure_warning("0.0.0.0", "k") is None


def test_the_command_serves_with_the_key_from_the_environment_and_stops_on_ctrl_c(model_dir):
    env = {**os.environ, serve_cli.API_KEY_ENV: KEY}
    cmd = [sys.executable, "-m", "twotower.cli", "serve", "--model", str(model_dir), "--port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith(f"serving {model_dir.name} on http://127.0.0.1:"), line
        url = line.rsplit(" on ", 1)[1].strip()
        c = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        assert c.completions.create(model=model_dir.name, prompt="the", max_tokens=2).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Traceback" not in proc.stderr.read()


def test_completion_equals_the_library_alone(server, loaded):
    c = client(server)
    out = c.completions.create(model=loaded.name, prompt="the quick brown", max_tokens=10, extra_body=FAST)
    assert out.object == "text_completion" and out.model == loaded.name
    choice = out.choices[0]
    assert choice.text == reference(loaded, "the quick brown", max_tokens=10, **FAST)
    assert choice.finish_reason in ("stop", "length") and choice.index == 0
    assert out.usage.prompt_tokens == 1 + len(loaded.tokenizer.encode("the quick brown"))
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    ar = c.completions.create(model=loaded.name, prompt="over the", max_tokens=7, extra_body={"mode": "ar"})
    assert ar.choices[0].text == reference(loaded, "over the", max_tokens=7, mode="ar")
    assert [m.id for m in c.models.list().data] == [loaded.name]


def test_anchored_completion_equals_the_library_alone(server, loaded):
    out = client(server).completions.create(
        model=loaded.name, prompt="the lazy", max_tokens=12, extra_body={**FAST, "anchor": True}
    )
    assert out.choices[0].text == reference(loaded, "the lazy", max_tokens=12, anchor=True, **FAST)


def test_eos_aware_completion_equals_the_library_alone(server, loaded):
    out = client(server).completions.create(
        model=loaded.name, prompt="the lazy", max_tokens=12, extra_body={**FAST, "eos_aware_commit": True}
    )
    assert out.choices[0].text == reference(loaded, "the lazy", max_tokens=12, eos_aware_commit=True, **FAST)


def test_speculative_completion_equals_the_ar_completion(server, loaded):
    c = client(server)
    opts = dict(model=loaded.name, prompt="over the lazy", max_tokens=11)
    spec = c.completions.create(**opts, extra_body={**FAST, "mode": "speculative", "draft_steps": 2})
    ar = c.completions.create(**opts, extra_body={"mode": "ar"})
    assert spec.choices[0].text == ar.choices[0].text == reference(loaded, "over the lazy", max_tokens=11, mode="ar")
    assert (spec.choices[0].finish_reason, spec.usage) == (ar.choices[0].finish_reason, ar.usage)


def test_stream_sends_one_event_per_block_and_the_same_text(server, loaded):
    c = client(server)
    opts = dict(model=loaded.name, prompt="Line 3: the lazy", max_tokens=16, extra_body=FAST)
    whole = c.completions.create(**opts)
    chunks = list(c.completions.create(stream=True, stream_options={"include_usage": True}, **opts))
    texts = [ch.choices[0].text for ch in chunks if ch.choices]
    assert "".join(texts) == whole.choices[0].text
    blocks = -(-whole.usage.completion_tokens // FAST["block_size"])
    assert len(texts) >= blocks if whole.choices[0].finish_reason == "length" else len(texts) >= 1
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_concurrent_clients_are_batched_and_each_gets_its_lone_result(server, loaded):
    c = client(server)
    jobs = [
        dict(prompt=f"Line {i}: the quick", max_tokens=24 + 4 * (i % 3), extra_body={**FAST, "mode": mode})
        for i, mode in enumerate(["diffusion", "ar", "diffusion", "speculative", "ar", "diffusion"])
    ]
    alone = [c.completions.create(model=loaded.name, **j).choices[0].text for j in jobs]  # one at a time
    server.state.worker.peak_rows = 0
    results: list[str | None] = [None] * len(jobs)
    start = threading.Barrier(len(jobs))

    def call(i: int) -> None:
        start.wait()
        results[i] = client(server).completions.create(model=loaded.name, **jobs[i]).choices[0].text

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == alone
    assert server.state.worker.peak_rows >= 3  # decoded together, not one after another
    assert alone[0] == reference(loaded, "Line 0: the quick", max_tokens=24, **FAST)


def test_stop_string_and_seeded_sampling(server, loaded):
    c = client(server)
    free = c.completions.create(model=loaded.name, prompt="the quick", max_tokens=24, extra_body=FAST).choices[0].text
    # a two-character stop string (no replacement characters) first seen in the middle of the text
    at = next(i for i in range(3, len(free) - 2) if "\ufffd" not in free[i : i + 2] and free.find(free[i : i + 2]) == i)
    stop, cut = free[at : at + 2], free[:at]
    out = c.completions.create(model=loaded.name, prompt="the quick", max_tokens=24, stop=[stop], extra_body=FAST)
    assert (out.choices[0].text, out.choices[0].finish_reason) == (cut, "stop")
    streamed = c.completions.create(
        model=loaded.name, prompt="the quick", max_tokens=24, stop=stop, stream=True, extra_body=FAST
    )
    assert "".join(ch.choices[0].text for ch in streamed) == cut
    sampled = dict(model=loaded.name, prompt="the quick", max_tokens=16, temperature=1.0, extra_body=FAST)
    a, b = (c.completions.create(seed=11, **sampled).choices[0].text for _ in range(2))
    assert a == b
    assert c.completions.create(seed=12, **sampled).choices[0].text != a


@pytest.mark.parametrize(
    "body, status, message",
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "must be a JSON object"),
        (b'{"prompt": "a", "max_tokens": "ten"}', 400, "max_tokens must be an integer"),
        (b'{"prompt": "a", "temperature": "hot"}', 400, "temperature must be a number"),
        (b'{"prompt": 5}', 400, "prompt must be a string"),
        (b'{"prompt": "a", "mode": "mock-ar"}', 400, "mode must be one of diffusion, ar"),
        (b'{"prompt": "a", "block_size": 0}', 400, "block_size must be a positive integer"),
        (b'{"prompt": "a", "draft_steps": 0}', 400, "draft_steps must be a positive integer"),
        (b'{"prompt": "a", "mode": "speculative", "block_size": 1}', 400, "block_size must be at least 2"),
        (b'{"prompt": "a", "max_tokens": 100000}', 400, "max_tokens must be between 1 and 256"),
        (b'{"prompt": "a", "n": 2}', 400, "n=2 is not supported"),
        (b'{"prompt": "a", "top_p": 0.5}', 400, "top_p=0.5 is not supported"),
        (b'{"prompt": "a", "steps_per_blok": 2}', 400, "unknown field(s): steps_per_blok"),
        (b'{"prompt": ["a", "b"]}', 400, "one prompt per request"),
        (b'{"prompt": "a", "stream": "yes"}', 400, "stream must be true or false"),
        (b'{"prompt": "a", "anchor": "yes"}', 400, "anchor must be true or false"),
        (b'{"prompt": "a", "mode": "ar", "anchor": true}', 400, "anchor applies to mode diffusion only"),
        (b'{"prompt": "a", "seed": -1}', 400, "seed must be an integer in [0, 2**64)"),
        (b'{"prompt": [1, 99999]}', 400, "prompt token ids must be in [0, "),
        (b'{"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}', 400, "stop takes at most 4 strings"),
        (b'{"prompt": "a", "model": "gpt-4"}', 404, "model 'gpt-4' does not exist"),
        (b"[" * 5000 + b"]" * 5000, 400, "nested too deeply"),
        (b'{"prompt": "a", "max_tokens": ' + b"1" * 5000 + b"}", 400, "not valid JSON"),
        (b'{"prompt": "a\\ud800"}', 400, "lone UTF-16 surrogate"),
        (b'{"prompt": "a", "stop": ["\\udc00"]}', 400, "lone UTF-16 surrogate"),
        (b'{"prompt": "a", "block_size": 2000000}', 400, "block_size must be between 1 and 1024"),
        (b'{"prompt": "a", "temperature": NaN}', 400, "temperature must be a number, got nan"),
        (b'{"prompt": "a", "temperature": 1e-39}', 400, "temperature must be 0 (greedy) or a finite number"),
    ],
)
def test_bad_requests_get_a_clear_4xx(server, body, status, message):
    got_status, got = raw_post(server, "/v1/completions", body)
    assert got_status == status
    assert message in got["error"]["message"]


def test_chat_messages_that_are_not_text_get_a_400(server, loaded):
    body = b'{"model": "%s", "messages": [{"role": "user", "content": "hi \\ud83d"}]}' % loaded.name.encode()
    status, got = raw_post(server, "/v1/chat/completions", body)
    assert status == 400 and "lone UTF-16 surrogate" in got["error"]["message"]


def test_an_internal_error_is_a_json_500_and_the_server_keeps_serving(server, loaded, monkeypatch):
    from twotower.serve import app as app_module

    def broken(*args, **kwargs):
        raise TypeError("a bug")

    before = metric(server, "twotower_requests_total", endpoint="completions", mode="none", status="500")
    monkeypatch.setattr(app_module, "completion_call", broken)
    status, got = raw_post(server, "/v1/completions", b'{"prompt": "a"}')
    assert status == 500 and got["error"]["type"] == "server_error" and "TypeError" in got["error"]["message"]
    assert metric(server, "twotower_requests_total", endpoint="completions", mode="none", status="500") == before + 1
    monkeypatch.undo()
    out = client(server).completions.create(model=loaded.name, prompt="still there", max_tokens=4)
    assert out.usage.completion_tokens >= 1


def test_errors_through_the_client_and_the_server_keeps_serving(server, loaded):
    c = client(server)
    with pytest.raises(openai.BadRequestError, match="more than the limit of 64"):
        c.completions.create(model=loaded.name, prompt="word " * 100, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="confidence_threshold must be a number"):
        c.completions.create(model=loaded.name, prompt="a", extra_body={"confidence_threshold": "high"})
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="nope", prompt="a")
    conn = connect(server)
    conn.request("GET", "/v1/nowhere")
    resp = conn.getresponse()
    assert resp.status == 404 and "no route /v1/nowhere" in json.loads(resp.read())["error"]["message"]
    conn.request("DELETE", "/v1/completions")
    resp = conn.getresponse()
    assert resp.status == 405 and json.loads(resp.read())["error"]["type"] == "invalid_request_error"
    conn.close()
    out = c.completions.create(model=loaded.name, prompt="still there", max_tokens=4)
    assert out.usage.completion_tokens >= 1


def test_api_key_guards_the_api_and_metrics_but_not_health(loaded):
    config = ServerConfig(port=0, api_key=KEY, defaults=Options(**FAST))
    with make_server(loaded, config).start() as server:
        with pytest.raises(openai.AuthenticationError, match="invalid API key"):
            client(server, "wrong").completions.create(model=loaded.name, prompt="a", max_tokens=2)
        status, body = raw_post(server, "/v1/completions", b"{not even json")  # the key is checked first
        assert status == 401 and "missing API key" in body["error"]["message"]
        with pytest.raises(openai.AuthenticationError):
            client(server, "wrong").models.list()
        with pytest.raises(openai.AuthenticationError):
            client(server, "wrong").chat.completions.create(
                model=loaded.name, messages=[{"role": "user", "content": "a"}]
            )
        out = client(server, KEY).completions.create(model=loaded.name, prompt="a", max_tokens=2)
        assert out.choices[0].finish_reason in ("stop", "length")
        conn = connect(server)
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        assert resp.status == 401 and resp.read()
        conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {KEY}"})
        resp = conn.getresponse()
        assert resp.status == 200 and b"twotower_requests_total" in resp.read()
        conn.request("GET", "/health")  # no key needed
        resp = conn.getresponse()
        health = json.loads(resp.read())
        assert resp.status == 200 and health["status"] == "ok" and health["model"] == loaded.name
        conn.close()


def test_queue_full_gets_429_then_serves_again(loaded):
    config = ServerConfig(port=0, max_batch_size=1, max_queue=0, defaults=Options(**FAST))
    with make_server(loaded, config).start() as server:
        conn, resp = open_stream(server, {"prompt": "the quick", "max_tokens": 64, **FAST})
        assert resp.readline().startswith(b"data: ")  # the one slot is taken
        with pytest.raises(openai.RateLimitError, match="at capacity"):
            client(server).completions.create(model=loaded.name, prompt="a", max_tokens=2)
        rest = resp.read().decode()
        assert rest.rstrip().endswith("data: [DONE]")
        conn.close()
        assert client(server).completions.create(model=loaded.name, prompt="a", max_tokens=2).choices
        assert metric(server, "twotower_requests_total", status="429", mode="diffusion") == 1


def test_body_limit_413_and_chunked_bodies_are_read(loaded):
    config = ServerConfig(port=0, max_body_bytes=256, defaults=Options(**FAST))
    with make_server(loaded, config).start() as server:
        status, body = raw_post(server, "/v1/completions", json.dumps({"prompt": "x" * 400}).encode())
        assert status == 413 and "more than the limit of 256" in body["error"]["message"]
        payload = json.dumps({"prompt": "the quick", "max_tokens": 4, **FAST}).encode()
        for chunks in ([payload], [payload[:10], payload[10:]], [b"{" + b" " * 300 + b"}"]):
            with socket.create_connection((server.host, server.port), timeout=30) as sock:
                head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                sock.sendall(head.encode() + b"Content-Type: application/json\r\nConnection: close\r\n\r\n")
                for c in chunks:
                    sock.sendall(f"{len(c):X}\r\n".encode() + c + b"\r\n")
                sock.sendall(b"0\r\n\r\n")
                reply = b"".join(iter(lambda: sock.recv(65536), b""))
            status_line, _, rest = reply.partition(b"\r\n")
            if len(chunks) == 1 and len(chunks[0]) > 256:  # a chunked body past the limit: 413 too
                assert b" 413 " in status_line
            else:
                assert b" 200 " in status_line and b'"text_completion"' in rest


def test_models_and_health(server, loaded):
    c = client(server)
    assert [m.id for m in c.models.list().data] == [loaded.name]
    assert c.models.retrieve(loaded.name).id == loaded.name
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        c.models.retrieve("gpt-4")
    conn = connect(server)
    conn.request("GET", "/health")
    health = json.loads(conn.getresponse().read())
    assert health["status"] == "ok" and set(health) >= {"running_rows", "queue_depth", "in_flight"}
    conn.close()


def test_step_events_show_the_blocks_filling_and_end_as_the_text(server, loaded):
    """stream_steps: per denoiser step, the block's cells (masked ones empty); blocks fill step by
    step, never un-commit, and the data events still carry exactly the library's text."""
    _, resp = open_stream(server, {"prompt": "the quick", "max_tokens": 12, "stream_steps": True, **FAST})
    events = sse_events(resp.read().decode())
    steps = [json.loads(d) for name, d in events if name == "step"]
    summary = next(json.loads(d) for name, d in events if name == "summary")
    text = "".join(json.loads(d)["choices"][0]["text"] for name, d in events if name is None and d != "[DONE]")
    assert text == reference(loaded, "the quick", max_tokens=12, **FAST)
    assert events[-1] == (None, "[DONE]")
    by_block: dict[int, list[dict]] = {}
    for s in steps:
        by_block.setdefault(s["block"], []).append(s)
    assert sorted(by_block) == [0, 1, 2]
    for block, seq in by_block.items():
        masked = [sum(c["masked"] for c in s["cells"]) for s in seq]
        assert masked == sorted(masked, reverse=True) and masked[-1] == 0, (block, masked)
        assert masked[0] < FAST["block_size"]  # the first step committed something
        for before, after in zip(seq, seq[1:]):
            for a, b in zip(before["cells"], after["cells"]):
                assert a["masked"] or (b["text"] == a["text"] and not b["new"])  # committed tokens stay
    assert summary["forwards"] == len(steps) and summary["completion_tokens"] == 12
    assert summary["tokens_per_forward"] == pytest.approx(12 / len(steps), abs=1e-3)
    _, resp = open_stream(server, {"prompt": "the quick", "max_tokens": 5, "stream_steps": True, "mode": "ar"})
    events = sse_events(resp.read().decode())
    ar_steps = [json.loads(d) for name, d in events if name == "step"]
    assert [len(s["cells"]) for s in ar_steps] == [1] * 5 and [s["position"] for s in ar_steps] == list(range(5))
    status, body = raw_post(server, "/v1/completions", b'{"prompt": "a", "stream_steps": true}')
    assert status == 400 and "stream_steps needs stream=true" in body["error"]["message"]
