"""/v1/chat/completions: messages rendered by the model's chat template exactly as Hugging Face
renders and tokenizes them, or by the documented fallback for a model without one; the completion
equals the library's decoding of those prompt ids; refusals and unsupported fields get clear 4xx."""

from __future__ import annotations

import json
import shutil

import openai
import pytest

from twotower.loading import load_for_inference
from twotower.serve.app import ServerConfig
from twotower.serve.chat import ChatPrompt
from twotower.serve.schemas import ChatMessage
from twotower.serve.server import make_server
from twotower.workload import Options

from .helpers import FAST, client, raw_post, reference_ids

# A ChatML-like template that places BOS and EOS itself and refuses turns that do not alternate.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}[SYS] {{ m['content'] | trim }}\n"
    "{% else %}{% if (m['role'] == 'user') != (loop.index0 % 2 == (1 if messages[0]['role'] == 'system' else 0)) %}"
    "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}<{{ m['role'] }}> {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
MESSAGES = [
    {"role": "system", "content": "Be brief. "},
    {"role": "user", "content": "the quick </s> brown"},  # a special token's text in content: its id, as in HF
    {"role": "assistant", "content": [{"type": "text", "text": "over the"}, {"type": "text", "text": " lazy"}]},
    {"role": "user", "content": "dog"},
]


@pytest.fixture(scope="module")
def templated_dir(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("templated")
    for f in model_dir.iterdir():
        shutil.copy(f, out / f.name)
    config = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    return out


@pytest.fixture(scope="module")
def templated(templated_dir):
    return load_for_inference(str(templated_dir))


@pytest.fixture(scope="module")
def server(templated):
    with make_server(templated, ServerConfig(port=0, defaults=Options(**FAST))).start() as running:
        yield running


def messages(raw=MESSAGES) -> list[ChatMessage]:
    return [ChatMessage.model_validate(m) for m in raw]


def test_the_template_renders_and_tokenizes_as_hugging_face_does(templated, templated_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(templated_dir))
    flat = [
        {**m, "content": "".join(p["text"] for p in m["content"])} if isinstance(m["content"], list) else m
        for m in MESSAGES
    ]
    chat = ChatPrompt.from_model_dir(templated.tokenizer, templated_dir)
    assert chat.templated
    assert chat.render(messages()) == hf.apply_chat_template(flat, tokenize=False, add_generation_prompt=True)
    expected = hf.apply_chat_template(flat, tokenize=True, add_generation_prompt=True)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    ids = chat.prompt_ids(messages())
    assert ids == list(expected)
    assert ids[0] == templated.tokenizer.bos_id and templated.tokenizer.eos_id in ids


def test_a_model_without_a_template_gets_the_plain_fallback(loaded):
    chat = ChatPrompt.from_model_dir(loaded.tokenizer, loaded.path)
    assert not chat.templated
    text = chat.render(messages([{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]))
    assert text == "System: S\nUser: hi\nAssistant:"
    assert chat.prompt_ids(messages([{"role": "user", "content": "hi"}])) == [
        loaded.tokenizer.bos_id,
        *loaded.tokenizer.encode("User: hi\nAssistant:"),
    ]


def test_chat_completion_equals_the_library_on_the_rendered_prompt(server, templated):
    ids = ChatPrompt(templated.tokenizer, TEMPLATE).prompt_ids(messages())
    c = client(server)
    out = c.chat.completions.create(model=templated.name, messages=MESSAGES, max_tokens=10, extra_body=FAST)
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == reference_ids(templated, ids, max_tokens=10, **FAST)
    assert out.usage.prompt_tokens == len(ids)
    chunks = list(
        c.chat.completions.create(
            model=templated.name,
            messages=MESSAGES,
            max_completion_tokens=10,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=FAST,
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert content == out.choices[0].message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == out.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens
    ar = c.chat.completions.create(model=templated.name, messages=MESSAGES, max_tokens=6, extra_body={"mode": "ar"})
    assert ar.choices[0].message.content == reference_ids(templated, ids, max_tokens=6, mode="ar")


def test_chat_refusals_and_unsupported_fields(server, templated):
    c = client(server)
    twice = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(openai.UnprocessableEntityError, match="roles must alternate"):
        c.chat.completions.create(model=templated.name, messages=twice)
    cases = [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "a"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content must be a string"),
        ({"messages": MESSAGES, "tools": [{"type": "function"}]}, "tool calls are not supported"),
        ({"messages": MESSAGES, "logprobs": True}, "log-probabilities are not returned"),
        ({"messages": MESSAGES, "max_tokens": 3, "max_completion_tokens": 4}, "differ"),
        ({"messages": MESSAGES, "prompt": "a"}, "unknown field(s): prompt"),
        ({"prompt": "a"}, "messages is required"),
    ]
    for body, message in cases:
        status, got = raw_post(server, "/v1/chat/completions", json.dumps(body).encode())
        assert status == 400 and message in got["error"]["message"], (body, got)
    ok = c.chat.completions.create(model=templated.name, messages=MESSAGES, max_tokens=2, tools=[], logprobs=False)
    assert ok.choices[0].message.content is not None


def test_where_the_template_is_read_from(tmp_path, loaded):
    from twotower.serve.chat import read_template

    assert read_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": [{"name": "default", "template": "A"}]})
    )
    assert read_template(tmp_path) == "A"  # Hugging Face's list of named templates
    (tmp_path / "chat_template.jinja").write_text("B")
    assert read_template(tmp_path) == "B"  # the separate file wins, as in transformers
    (tmp_path / "chat_template.jinja").write_text("{% for %}")
    with pytest.raises(ValueError, match="does not compile"):
        ChatPrompt.from_model_dir(loaded.tokenizer, tmp_path)
