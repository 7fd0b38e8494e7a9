"""Errors a client can cause, as OpenAI's error body: `ApiError`, and a pydantic validation error
turned into one clear message naming the first bad field."""

from __future__ import annotations

import json

from pydantic import ValidationError

CLIENT_CLOSED = 499  # no response was sent: the client left first (the status nginx logs for this)

_EXPECTED = {  # pydantic error type -> what the field must be
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
}


class ApiError(Exception):
    """An error answered with `status` and OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        kind: str = "invalid_request_error",
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def server_error(message: str) -> ApiError:
    return ApiError(500, message, kind="server_error")


def from_validation(err: ValidationError) -> ApiError:
    """A 400 for the first problem pydantic found, worded like the option checks of `workload.py`."""
    first = err.errors()[0]
    loc = [str(part) for part in first["loc"] if not _is_union_tag(part)]
    field = ".".join(loc) or None
    kind = first["type"]
    if kind == "extra_forbidden":
        unknown = sorted(str(e["loc"][-1]) for e in err.errors() if e["type"] == "extra_forbidden")
        return ApiError(400, f"unknown field(s): {', '.join(unknown)}", param=unknown[0])
    if kind == "missing":
        return ApiError(400, f"{field} is required", param=field)
    if kind in _EXPECTED:
        got = json.dumps(first.get("input"), default=str)
        return ApiError(400, f"{field} must be {_EXPECTED[kind]}, got {got}", param=field)
    return ApiError(400, f"{field}: {first['msg']}", param=field)


def _is_union_tag(part) -> bool:
    """pydantic names the union member it tried inside `loc` (e.g. 'list[int]'); that is no field."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "TextPart"))
