"""The OpenAI-compatible server on loopback, driven by the real `openai` client: completions and
streams equal the library's decoding of the prompt alone, concurrent clients are decoded together
and each still gets exactly its lone result, and every bad request gets the right 4xx and message
while the server keeps serving."""

from __future__ import annotations

import argparse
import http.client
import json
import threading
import time

import openai
import pytest

from twotower.loading import load_for_inference
from twotower.serve import cli as serve_cli
from twotower.serve.http import ServerConfig, make_server
from twotower.workload import Limits, OptionError, Options, parse_options

KEY = "test-key"
FAST = {"block_size": 4, "steps_per_block": 4, "confidence_threshold": 0.5}


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_for_inference(str(model_dir))


@pytest.fixture(scope="module")
def server(loaded):
    config = ServerConfig(port=0, limits=Limits(max_prompt_tokens=64, max_tokens=256), defaults=Options(**FAST))
    with make_server(loaded, config).start() as running:
        yield running


def client(server, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


def reference(loaded, prompt: str, *, max_tokens: int, mode: str = "diffusion", **opts) -> str:
    """What the library produces for this prompt alone (greedy), as text."""
    tok, model = loaded.tokenizer, loaded.model
    ids = [tok.bos_id, *tok.encode(prompt)]
    if mode in ("ar", "speculative"):  # greedy speculative decoding is the AR model's
        out = model.generate_ar([ids], max_new_tokens=max_tokens, eos_token_id=tok.eos_id)
    else:
        out = model.generate_mask_diffusion([ids], max_new_tokens=max_tokens, eos_token_id=tok.eos_id, **opts)
    return tok.decode([t for t in out.new_tokens[0] if t != tok.eos_id])


def raw_post(server, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    status, data = resp.status, json.loads(resp.read())
    conn.close()
    return status, data


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
    server.app.worker.peak_active = 0
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
    assert server.app.worker.peak_active >= 3  # decoded together, not one after another
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
    ],
)
def test_bad_requests_get_a_clear_4xx(server, body, status, message):
    got_status, got = raw_post(server, "/v1/completions", body)
    assert got_status == status
    assert message in got["error"]["message"]


def test_errors_through_the_client_and_the_server_keeps_serving(server, loaded):
    c = client(server)
    with pytest.raises(openai.BadRequestError, match="more than the limit of 64"):
        c.completions.create(model=loaded.name, prompt="word " * 100, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="confidence_threshold must be a number"):
        c.completions.create(model=loaded.name, prompt="a", extra_body={"confidence_threshold": "high"})
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="nope", prompt="a")
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    conn.request("GET", "/v1/nowhere")
    assert conn.getresponse().status == 404
    conn.close()
    out = c.completions.create(model=loaded.name, prompt="still there", max_tokens=4)
    assert out.usage.completion_tokens >= 1


def test_a_client_that_leaves_mid_stream_frees_its_row(server, loaded):
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    body = json.dumps({"prompt": "the quick", "max_tokens": 256, "stream": True, **FAST})
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data: ")
    conn.close()  # gone after the first block
    deadline = time.monotonic() + 30
    while server.app.worker.inflight and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.app.worker.inflight == 0


def test_api_key_and_health(loaded):
    config = ServerConfig(port=0, api_key=KEY, defaults=Options(**FAST))
    with make_server(loaded, config).start() as server:
        with pytest.raises(openai.AuthenticationError, match="invalid API key"):
            client(server, "wrong").completions.create(model=loaded.name, prompt="a", max_tokens=2)
        status, body = raw_post(server, "/v1/completions", b'{"prompt": "a"}')
        assert status == 401 and "missing API key" in body["error"]["message"]
        with pytest.raises(openai.AuthenticationError):
            client(server, "wrong").models.list()
        out = client(server, KEY).completions.create(model=loaded.name, prompt="a", max_tokens=2)
        assert out.choices[0].finish_reason in ("stop", "length")
        conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
        conn.request("GET", "/health")  # no key needed
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["status"] == "ok"
        conn.close()


def test_queue_full_gets_429_then_serves_again(loaded):
    config = ServerConfig(port=0, max_batch_size=1, max_queue=0, defaults=Options(**FAST))
    with make_server(loaded, config).start() as server:
        conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
        body = json.dumps({"prompt": "the quick", "max_tokens": 64, "stream": True, **FAST})
        conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.readline().startswith(b"data: ")  # the one slot is taken
        with pytest.raises(openai.RateLimitError, match="at capacity"):
            client(server).completions.create(model=loaded.name, prompt="a", max_tokens=2)
        rest = resp.read().decode()
        assert rest.rstrip().endswith("data: [DONE]")
        conn.close()
        assert client(server).completions.create(model=loaded.name, prompt="a", max_tokens=2).choices
