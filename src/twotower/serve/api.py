"""The OpenAI completions schema: reading a request body (one clear 4xx per problem) and building
response and stream-chunk bodies. No sockets here.

Accepted: `model`, `prompt` (a string, a one-string list, or token ids), `max_tokens`, `temperature`,
`seed`, `stop`, `stream`, `stream_options.include_usage`, and the extras `mode` ("diffusion", "ar" or
"speculative"), `block_size`, `steps_per_block`, `draft_steps` (speculative: denoiser steps per
drafted block, default 4), `confidence_threshold`, `top_k`. Accepted only at their neutral value (anything
else is a 400 naming the field): `n`=1, `best_of`=1, `echo`=false, `logprobs`=null, `suffix`=null,
`top_p`=1, `presence_penalty`=0, `frequency_penalty`=0, `logit_bias`={}. `user` is ignored. Any
other field is a 400, so a misspelt option never passes silently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..workload import OPTION_NAMES, Limits, OptionError, Options, encode_prompt, parse_options

# field -> the only values this server accepts (None = the field may be null/absent)
NEUTRAL = {
    "n": (1,),
    "best_of": (1,),
    "echo": (False,),
    "logprobs": (),
    "suffix": (),
    "top_p": (1, 1.0),
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
    "logit_bias": ({},),
}
WHY_NOT = {
    "n": "one completion per request; send several requests, they are batched together",
    "best_of": "one completion per request",
    "echo": "the prompt is not echoed",
    "logprobs": "log-probabilities are not returned",
    "suffix": "insertion is not supported",
    "top_p": "nucleus sampling is not supported; use temperature and top_k",
    "presence_penalty": "penalties are not supported",
    "frequency_penalty": "penalties are not supported",
    "logit_bias": "logit bias is not supported",
}
ALLOWED = {"model", "prompt", "stream", "stream_options", "user", *NEUTRAL, *OPTION_NAMES}


class ApiError(Exception):
    """An error answered with `status` and OpenAI's error body."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, kind: str = "invalid_request_error", code=None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class CompletionCall:
    """A valid completion request."""

    prompt_ids: list[int]
    options: Options
    stream: bool
    include_usage: bool


def parse_completion(
    raw: bytes, *, tokenizer, vocab_size: int, model_name: str, defaults: Options, limits: Limits
) -> CompletionCall:
    body = parse_json_object(raw)
    unknown = sorted(set(body) - ALLOWED)
    if unknown:
        raise ApiError(400, f"unknown field(s): {', '.join(unknown)}", param=unknown[0])
    model = body.get("model")
    if model is not None and model != model_name:
        raise ApiError(
            404,
            f"model {model!r} does not exist; this server serves {model_name!r}",
            param="model",
            code="model_not_found",
        )
    for name, allowed in NEUTRAL.items():
        value = body.get(name)
        if value is not None and not any(value == a and type(value) is type(a) for a in allowed):
            raise ApiError(400, f"{name}={json.dumps(value)} is not supported: {WHY_NOT[name]}", param=name)
    stream = _flag(body, "stream")
    stream_options = body.get("stream_options")
    if stream_options is not None and (not isinstance(stream_options, dict) or set(stream_options) - {"include_usage"}):
        raise ApiError(400, 'stream_options must be an object with only "include_usage"', param="stream_options")
    include_usage = _flag(stream_options or {}, "include_usage", where="stream_options.include_usage")
    try:
        options = parse_options(body, defaults, limits=limits)
        ids = prompt_ids(body.get("prompt"), tokenizer, vocab_size=vocab_size, limits=limits)
    except OptionError as err:
        raise ApiError(400, str(err), param=err.field) from None
    return CompletionCall(ids, options, stream, include_usage)


def parse_json_object(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ApiError(400, f"the request body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def prompt_ids(prompt, tokenizer, *, vocab_size: int, limits: Limits) -> list[int]:
    """A string, a list of one string, or a list of token ids (taken as they are)."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return encode_prompt(tokenizer, prompt, limits=limits)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if not all(0 <= t < vocab_size for t in prompt):
            raise OptionError(f"prompt token ids must be in [0, {vocab_size})", "prompt")
        if len(prompt) > limits.max_prompt_tokens:
            raise OptionError(
                f"the prompt has {len(prompt)} tokens, more than the limit of {limits.max_prompt_tokens}", "prompt"
            )
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) > 1:
        raise OptionError("one prompt per request; send several requests, they are batched together", "prompt")
    raise OptionError(f"prompt must be a string or a list of token ids, got {json.dumps(prompt)}", "prompt")


def _flag(body: dict, name: str, *, where: str | None = None) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, f"{where or name} must be true or false, got {json.dumps(value)}", param=where or name)
    return value


# ---- responses -------------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(
    cid: str, created: int, model: str, text: str, finish_reason: str | None, usage_: dict | None
) -> dict:
    """A whole completion, or (usage None, finish_reason None until the last) one stream chunk."""
    body = {
        "id": cid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"text": text, "index": 0, "finish_reason": finish_reason, "logprobs": None}],
    }
    if usage_ is not None:
        body["usage"] = usage_
    return body


def usage_chunk(cid: str, created: int, model: str, usage_: dict) -> dict:
    """The last stream chunk when `stream_options.include_usage` is set: usage, no choices."""
    return {"id": cid, "object": "text_completion", "created": created, "model": model, "choices": [], "usage": usage_}


def models_body(model: str, created: int) -> dict:
    return {"object": "list", "data": [model_body(model, created)]}


def model_body(model: str, created: int) -> dict:
    return {"id": model, "object": "model", "created": created, "owned_by": "twotower"}
