"""From a validated request body to what the engine needs (`Call`): prompt ids, `Options`, and how
to answer. Each problem is one `ApiError` naming its field.

OpenAI fields accepted only at their neutral value (anything else is a 400 saying why):
`n`=1, `top_p`=1, `presence_penalty`=0, `frequency_penalty`=0, `logit_bias`={}; completions also
`best_of`=1, `echo`=false, `logprobs`=null, `suffix`=null; chat also `logprobs`=false,
`top_logprobs`=null, `tools`=[], `tool_choice`="none", `response_format`={"type": "text"}.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..workload import Limits, OptionError, Options, encode_prompt, parse_options
from .chat import ChatPrompt, ChatTemplateError
from .errors import ApiError
from .schemas import ChatCompletionRequest, CompletionRequest, Extras

NEUTRAL = {  # field -> (values accepted, why nothing else is)
    "n": ((1,), "one completion per request; send several requests, they are batched together"),
    "best_of": ((1,), "one completion per request"),
    "echo": ((False,), "the prompt is not echoed"),
    "suffix": ((), "insertion is not supported"),
    "top_p": ((1, 1.0), "nucleus sampling is not supported; use temperature and top_k"),
    "presence_penalty": ((0, 0.0), "penalties are not supported"),
    "frequency_penalty": ((0, 0.0), "penalties are not supported"),
    "logit_bias": (({},), "logit bias is not supported"),
    "top_logprobs": ((), "log-probabilities are not returned"),
    "tools": (([],), "tool calls are not supported"),
    "tool_choice": (("none",), "tool calls are not supported"),
    "response_format": (({"type": "text"},), "only plain text responses are supported"),
}
NEUTRAL_LOGPROBS = {CompletionRequest: (), ChatCompletionRequest: (False,)}


@dataclass(frozen=True)
class CallContext:
    """What turning a body into a call needs from the server."""

    tokenizer: object
    vocab_size: int
    model_name: str
    defaults: Options
    limits: Limits
    chat: ChatPrompt


@dataclass(frozen=True)
class Call:
    """A valid generation request: the prompt ids, options and how to answer."""

    prompt_ids: list[int]
    options: Options
    stream: bool
    include_usage: bool
    stream_steps: bool


def completion_call(req: CompletionRequest, ctx: CallContext) -> Call:
    """POST /v1/completions: a string, a one-string list, or token ids."""
    _check_common(req, ctx)
    options = _options(req, ctx)
    try:
        ids = prompt_ids(req.prompt, ctx.tokenizer, vocab_size=ctx.vocab_size, limits=ctx.limits)
    except OptionError as err:
        raise ApiError(400, str(err), param=err.field) from None
    return _call(req, ids, options)


def chat_call(req: ChatCompletionRequest, ctx: CallContext) -> Call:
    """POST /v1/chat/completions: the messages rendered by the model's chat template (or the
    documented fallback of `chat.py`), then tokenized."""
    _check_common(req, ctx)
    if req.max_completion_tokens is not None:
        if req.max_tokens is not None and req.max_tokens != req.max_completion_tokens:
            raise ApiError(400, "max_tokens and max_completion_tokens differ; give one", param="max_tokens")
        req = req.model_copy(update={"max_tokens": req.max_completion_tokens})
    options = _options(req, ctx)
    try:
        ids = ctx.chat.prompt_ids(req.messages)
    except ChatTemplateError as err:
        raise ApiError(422, f"the chat template refused these messages: {err}", param="messages") from None
    if len(ids) > ctx.limits.max_prompt_tokens:
        raise ApiError(
            400,
            f"the rendered chat has {len(ids)} tokens, more than the limit of {ctx.limits.max_prompt_tokens}",
            param="messages",
        )
    return _call(req, ids, options)


def prompt_ids(prompt, tokenizer, *, vocab_size: int, limits: Limits) -> list[int]:
    """A string, a list of one string, or a list of token ids (taken as they are)."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return encode_prompt(tokenizer, prompt, limits=limits)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
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


def _check_common(req: Extras, ctx: CallContext) -> None:
    if req.model is not None and req.model != ctx.model_name:
        raise ApiError(
            404,
            f"model {req.model!r} does not exist; this server serves {ctx.model_name!r}",
            param="model",
            code="model_not_found",
        )
    given = req.model_dump(exclude_unset=True)
    checks = {**NEUTRAL, "logprobs": (NEUTRAL_LOGPROBS[type(req)], "log-probabilities are not returned")}
    for name, (allowed, why) in checks.items():
        value = given.get(name)
        if value is not None and not any(value == a and type(value) is type(a) for a in allowed):
            raise ApiError(400, f"{name}={json.dumps(value)} is not supported: {why}", param=name)
    if req.stream_options is not None and not req.stream:
        raise ApiError(400, "stream_options is only allowed with stream=true", param="stream_options")
    if req.stream_steps and not req.stream:
        raise ApiError(400, "stream_steps needs stream=true", param="stream_steps")


def _options(req: Extras, ctx: CallContext) -> Options:
    given = req.model_dump(exclude_unset=True, include=set(Options.__dataclass_fields__))
    try:
        return parse_options(given, ctx.defaults, limits=ctx.limits)
    except OptionError as err:
        raise ApiError(400, str(err), param=err.field) from None


def _call(req: Extras, ids: list[int], options: Options) -> Call:
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return Call(ids, options, bool(req.stream), include_usage, bool(req.stream_steps))
