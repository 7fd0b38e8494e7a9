"""The OpenAI wire format as pydantic models: request bodies (completions, chat) and response and
stream-chunk bodies, plus the diffusion extras. Types only; what a field means to the engine is
decided in `calls.py`.

Requests are strict (no "5" for 5, no 1 for true) and closed (an unknown field is a 400), so a
misspelt option never passes silently. The extras `mode`, `block_size`, `steps_per_block`,
`draft_steps`, `confidence_threshold`, `anchor`, `eos_aware_commit`, `top_k` go in the body next to the OpenAI fields;
`stream_steps` (with `stream`) adds the playground's `event: step` and `event: summary` events.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Request):
    include_usage: bool | None = None


class Extras(_Request):
    """Fields both endpoints share: sampling, the diffusion extras, and OpenAI fields accepted only at
    their neutral value (`calls.NEUTRAL`)."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    # diffusion extras
    mode: str | None = None
    block_size: int | None = None
    steps_per_block: int | None = None
    draft_steps: int | None = None
    confidence_threshold: float | None = None
    anchor: bool | None = None
    eos_aware_commit: bool | None = None
    stream_steps: bool | None = None
    # OpenAI fields this server accepts only at their neutral value
    n: int | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None


class CompletionRequest(Extras):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]]
    best_of: int | None = None
    echo: bool | None = None
    logprobs: int | None = None
    suffix: str | None = None


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    @property
    def text(self) -> str:
        """The content as one string (text parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(Extras):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None


# ---- responses -------------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: None = None


class Completion(BaseModel):
    """A whole completion, or one stream chunk (then usage is absent and finish_reason None until
    the last; the include_usage chunk has no choices)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "twotower"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "down"]
    model: str
    running_rows: int
    queue_depth: int
    in_flight: int


class StepCell(BaseModel):
    """One position of a block in a step event: its token's text, or masked (text empty)."""

    text: str
    masked: bool
    new: bool


class StepEvent(BaseModel):
    """`event: step` (stream_steps): one denoiser step of the request's current block (diffusion),
    or the tokens of one AR step or speculative round, all committed."""

    block: int
    position: int
    step: int
    cells: list[StepCell]


class Summary(BaseModel):
    """`event: summary` (stream_steps), just before [DONE]."""

    mode: str
    completion_tokens: int
    forwards: int  # denoiser forwards (diffusion, speculative drafts) or AR steps this request took
    tokens_per_forward: float | None
    blocks: int
    seconds: float
    finish_reason: str
