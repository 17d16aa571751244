"""Request checks done before a request reaches an engine, with OpenAI-style errors.

vLLM rejects many bad requests itself, but some only after queueing, some with a 500,
and its messages rarely name the parameter. Checking the common fields here costs
microseconds and gives every client the same answer: a 4xx whose ``param`` names the
field and whose message says what was expected. Pure functions, so they are unit-tested
without a server.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ApiError(Exception):
    """An HTTP error with the OpenAI error body (``{"error": {...}}``)."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None
    type: str = "invalid_request_error"
    headers: dict[str, str] = field(default_factory=dict)
    """Extra response headers (``Retry-After`` of a 429)."""

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def hash_key(key: str) -> str:
    """Keys are stored and compared as sha256 digests, so no config or log holds one."""
    return hashlib.sha256(key.encode()).hexdigest()


def check_auth(header: str | None, key_hashes: list[str]) -> None:
    """401 unless ``Authorization: Bearer KEY`` carries an accepted key (none: open)."""
    if not key_hashes:
        return
    scheme, _, token = (header or "").partition(" ")
    if not header or scheme.lower() != "bearer" or not token.strip():
        raise ApiError(
            401,
            "Missing API key: send the header 'Authorization: Bearer YOUR_KEY'.",
            code="invalid_api_key",
        )
    digest = hash_key(token.strip())
    # Compare against every key so timing does not reveal which prefix matched.
    matched = False
    for known in key_hashes:
        matched |= hmac.compare_digest(digest, known)
    if not matched:
        raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")


def parse_body(raw: bytes, max_bytes: int) -> dict[str, Any]:
    if len(raw) > max_bytes:
        raise too_large(len(raw), max_bytes)
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, f"Request body is not valid JSON: {err}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(
            400,
            f"Request body must be a JSON object, got {type(body).__name__}",
            code="invalid_json",
        )
    return body


def too_large(size: int, max_bytes: int) -> ApiError:
    return ApiError(
        413,
        f"Request body is {size} bytes; the limit is {max_bytes} bytes (limits.max_request_bytes).",
        code="request_too_large",
    )


def _number(
    body: dict[str, Any],
    key: str,
    lo: float,
    hi: float,
    *,
    integer: bool = False,
    lo_open: bool = False,
) -> None:
    if key not in body or body[key] is None:
        return
    value = body[key]
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok_type:
        raise ApiError(
            400, f"'{key}' must be {kind}, got {value!r}", param=key, code="invalid_type"
        )
    below = value <= lo if lo_open else value < lo
    if below or value > hi:
        left = "(" if lo_open else "["
        raise ApiError(
            400,
            f"'{key}'={value!r} is out of range: expected {left}{lo}, {hi}]",
            param=key,
            code="invalid_value",
        )


def check_sampling(body: dict[str, Any], *, max_model_len: int, max_n: int) -> None:
    """Reject sampling parameters vLLM would refuse (or accept and misbehave on)."""
    _number(body, "temperature", 0.0, 2.0)
    _number(body, "top_p", 0.0, 1.0, lo_open=True)
    _number(body, "top_k", -1, 1_000_000, integer=True)
    _number(body, "min_p", 0.0, 1.0)
    _number(body, "presence_penalty", -2.0, 2.0)
    _number(body, "frequency_penalty", -2.0, 2.0)
    _number(body, "repetition_penalty", 0.0, 2.0, lo_open=True)
    _number(body, "n", 1, max_n, integer=True)
    _number(body, "max_tokens", 1, max_model_len, integer=True)
    _number(body, "max_completion_tokens", 1, max_model_len, integer=True)
    _number(body, "seed", -(2**63), 2**63 - 1, integer=True)
    if "stream" in body and not isinstance(body["stream"], bool):
        raise ApiError(
            400,
            f"'stream' must be true or false, got {body['stream']!r}",
            param="stream",
            code="invalid_type",
        )
    stop = body.get("stop")
    if stop is not None and not (
        isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))
    ):
        raise ApiError(
            400, "'stop' must be a string or a list of strings", param="stop", code="invalid_type"
        )


def check_prompt(body: dict[str, Any], chat: bool) -> None:
    """The one required input field is present and has a shape the engine accepts."""
    if chat:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise ApiError(
                400,
                "'messages' must be a non-empty list of {role, content} objects",
                param="messages",
                code="invalid_value",
            )
        for i, m in enumerate(msgs):
            check_message(i, m)
        return
    prompt = body.get("prompt")
    if isinstance(prompt, str) and prompt:
        return
    if isinstance(prompt, list) and prompt and all(isinstance(p, str | int) for p in prompt):
        return
    raise ApiError(
        400,
        "'prompt' must be a non-empty string or list of strings",
        param="prompt",
        code="invalid_value",
    )


ROLES = ("system", "developer", "user", "assistant", "tool", "function")
"""OpenAI's chat roles (``function`` is its deprecated ``tool``). An unknown one would
render as nothing or fail inside the chat template, so it is refused here."""

TEXT_PARTS = ("text",)
"""Content part types a text model accepts; images and audio need a multimodal engine."""


def check_message(i: int, m: Any) -> None:
    """``messages[i]``: a known role, and content that is a string, a list of text parts,
    or absent/null (an assistant turn of tool calls)."""
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise ApiError(
            400,
            f"'messages[{i}]' must be an object with a string 'role'",
            param=f"messages[{i}]",
            code="invalid_value",
        )
    if m["role"] not in ROLES:
        raise ApiError(
            400,
            f"'messages[{i}].role'={m['role']!r} is not a chat role: expected one of "
            f"{', '.join(ROLES)}",
            param=f"messages[{i}].role",
            code="invalid_value",
        )
    content = m.get("content")
    if content is None or isinstance(content, str):
        return
    if not isinstance(content, list):
        raise ApiError(
            400,
            f"'messages[{i}].content' must be a string or a list of content parts",
            param=f"messages[{i}].content",
            code="invalid_type",
        )
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in TEXT_PARTS or not isinstance(part.get("text"), str):
            raise ApiError(
                400,
                f"'messages[{i}].content[{j}]' has type {kind!r}: this model takes text "
                f"only, parts of type {', '.join(TEXT_PARTS)} with a string 'text'",
                param=f"messages[{i}].content[{j}]",
                code="invalid_value",
            )


def prompt_too_long(n_tokens: int, max_tokens: int, max_model_len: int, field: str) -> ApiError:
    return ApiError(
        400,
        f"'{field}' is {n_tokens} tokens; with max_tokens={max_tokens} that exceeds the model's "
        f"max_model_len of {max_model_len} tokens. Shorten the prompt or lower max_tokens.",
        param=field,
        code="context_length_exceeded",
    )


def chat_token_ids(tok: Any, messages: list[dict[str, Any]]) -> list[int]:
    """Prompt ids after the chat template (transformers 5 returns an encoding, 4 a list)."""
    out = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def model_not_found(model: str, available: list[str]) -> ApiError:
    return ApiError(
        404,
        f"The model '{model}' does not exist. Available models: {available}",
        param="model",
        code="model_not_found",
    )
