"""Chat messages -> prompt ids: the model's chat template, rendered as Hugging Face renders it, or a
plain documented fallback for a model without one (the bundled model is a base model).

The template is `chat_template.jinja` in the model directory, else `chat_template` in
`tokenizer_config.json` (a string, or a list of named templates: "default" is used). It renders in
a sandboxed Jinja environment with `trim_blocks` and `lstrip_blocks`, the `loopcontrols`
extension, a `tojson` filter, `raise_exception(message)` and `strftime_now(format)`, given
`messages`, `add_generation_prompt=True` and the special tokens (`bos_token`, `eos_token`, ...).
As with `apply_chat_template(tokenize=True)`, the text is tokenized without adding BOS (templates
place it) and special-token strings in it become their ids.

Fallback: each message on its own line as "Role: content" (System, Developer, User, Assistant,
Tool), then "Assistant:"; the prompt starts with BOS, like a completion prompt.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from ..tokenizer import CONFIG_FILE
from .schemas import ChatMessage

TEMPLATE_FILE = "chat_template.jinja"
FALLBACK_ROLES = {
    "system": "System",
    "developer": "Developer",
    "user": "User",
    "assistant": "Assistant",
    "tool": "Tool",
}


class ChatTemplateError(ValueError):
    """The template refused the messages (raise_exception) or failed while rendering them."""


class ChatPrompt:
    """Renders and tokenizes chat messages for one tokenizer; `template` None means the fallback."""

    def __init__(self, tokenizer, template: str | None) -> None:
        self.tokenizer = tokenizer
        self.template_source = template
        self._template = None if template is None else _compile(template)
        specials = {t.content: i for i, t in tokenizer.backend.get_added_tokens_decoder().items() if t.special}
        self._special_ids = specials
        pattern = "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True))
        self._special_re = re.compile(f"({pattern})") if specials else None

    @classmethod
    def from_model_dir(cls, tokenizer, path: str | Path) -> ChatPrompt:
        """The template stored with the model, if any (ValueError if it does not compile)."""
        return cls(tokenizer, read_template(Path(path)))

    @property
    def templated(self) -> bool:
        return self._template is not None

    def render(self, messages: Sequence[ChatMessage]) -> str:
        if self._template is None:
            lines = [f"{FALLBACK_ROLES[m.role]}: {m.text}" for m in messages]
            return "\n".join([*lines, "Assistant:"])
        import jinja2

        tokens = self.tokenizer.special_tokens
        try:
            return self._template.render(
                messages=[_as_dict(m) for m in messages],
                add_generation_prompt=True,
                bos_token=tokens.bos,
                eos_token=tokens.eos,
                pad_token=tokens.pad,
                mask_token=tokens.mask,
            )
        except jinja2.TemplateError as err:
            raise ChatTemplateError(str(err)) from None

    def prompt_ids(self, messages: Sequence[ChatMessage]) -> list[int]:
        text = self.render(messages)
        if self._template is None:
            bos = self.tokenizer.bos_id
            return ([bos] if bos is not None else []) + self.tokenizer.encode(text)
        ids: list[int] = []
        for piece in self._special_re.split(text) if self._special_re else [text]:
            if piece in self._special_ids:
                ids.append(self._special_ids[piece])
            elif piece:
                ids += self.tokenizer.encode(piece)
        if not ids:
            raise ChatTemplateError("the template rendered an empty prompt")
        return ids


def read_template(path: Path) -> str | None:
    """`chat_template.jinja`, else tokenizer_config.json's `chat_template`, else None."""
    if (path / TEMPLATE_FILE).is_file():
        return (path / TEMPLATE_FILE).read_text(encoding="utf-8")
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        return None
    template = json.loads(config_file.read_text(encoding="utf-8")).get("chat_template")
    if isinstance(template, list):  # named templates, as Hugging Face stores several
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{config_file}: chat_template must be a string or a list of named templates")
    return template


def _compile(source: str):
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise jinja2.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as err:
        raise ValueError(f"the chat template does not compile: {err}") from None


def _as_dict(message: ChatMessage) -> dict:
    out = {"role": message.role, "content": message.text}
    if message.name is not None:
        out["name"] = message.name
    return out
