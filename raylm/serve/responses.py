"""The OpenAI Responses API with conversations kept in a store every replica shares.

vLLM's app already answers ``POST /v1/responses`` (its request and response models, its
conversion of response items to a chat, streaming events): raylm keeps all of that and
only moves the state out of the replica. vLLM's own store is a per-process dict, so a
second replica, a restart or a redeploy would forget every conversation.

So vLLM runs each turn statelessly (``store: false``, no ``previous_response_id``), and
raylm, in front of it (``raylm.serve.direct``):

1. on ``previous_response_id``, reads the stored conversation (one read: each record holds
   every item so far) and prepends its items to the request's ``input``: the same history
   OpenAI's server would use (instructions do not carry over, tool calls do);
2. names the response itself (``request_id``, so no client can choose an id that
   overwrites another's), and answers with vLLM's response, ``store`` and
   ``previous_response_id`` set as the client asked;
3. writes the response and the conversation to the store before the client sees it
   complete (the non-streamed body, or the streamed ``response.completed`` event), so the
   next turn, sent to any replica, finds it;
4. answers ``GET`` and ``DELETE /v1/responses/{id}`` (and ``.../input_items``) from the
   store.

A response belongs to the API key that created it: any other key gets the same 404 as an
absent id. The chat and completion routes never come here.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from raylm.serve.store import SessionStore, StoredResponse, created_from_id, new_response_id
from raylm.serve.validation import ApiError, check_sampling, hash_key

logger = logging.getLogger(__name__)

PATH = "/v1/responses"
REPLICA_HEADER = b"x-raylm-replica"
"""Response header naming the replica that answered (which replica served a turn)."""

WHOLE_RESPONSE_EVENTS = {
    "response.created",
    "response.in_progress",
    "response.completed",
    "response.incomplete",
    "response.failed",
}
"""Streamed events that carry the whole response object."""

STORED_STATUSES = {"completed", "incomplete"}
"""A response is stored once it ended with one of these."""

SendFn = Callable[[dict[str, Any]], Awaitable[None]]
Forward = Callable[[bytes, SendFn], Awaitable[None]]
"""Sends a request body to vLLM's app, its answer going to the given ``send``."""


def owner_of(authorization: str | None) -> str:
    """Whose conversations a request may see: the digest of its bearer key ("" for none)."""
    scheme, _, token = (authorization or "").partition(" ")
    return hash_key(token.strip()) if scheme.lower() == "bearer" and token.strip() else ""


def not_found(
    response_id: str, retention_s: float, now: float, param: str = "response_id"
) -> ApiError:
    """404 for an absent, deleted, expired or another key's response (never 403, which
    would tell a caller that an id it does not own exists)."""
    created = created_from_id(response_id)
    if created is not None and now - created > retention_s:
        message = (
            f"Response with id '{response_id}' not found: it is older than this server's "
            f"retention of stored responses (sessions.retention_s={retention_s:g})."
        )
    else:
        message = (
            f"Response with id '{response_id}' not found (stored responses are kept for "
            f"sessions.retention_s={retention_s:g} and only for the API key that created them)."
        )
    return ApiError(404, message, param=param, code="not_found")


def input_items(value: Any) -> list[dict[str, Any]]:
    """A request's ``input`` as a list of items (a string is one user message)."""
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    if isinstance(value, list) and all(isinstance(i, dict) for i in value):
        return list(value)
    raise ApiError(
        400,
        "'input' must be a string or a list of input items",
        param="input",
        code="invalid_value",
    )


def check_request(body: dict[str, Any], max_model_len: int) -> None:
    """What raylm refuses before vLLM sees a Responses request."""
    if body.get("background"):
        raise ApiError(
            400,
            "'background' responses are not supported by this server; send them in the "
            "foreground (stream=true to see tokens as they come)",
            param="background",
            code="unsupported_parameter",
        )
    for key in ("store", "stream"):
        if key in body and body[key] is not None and not isinstance(body[key], bool):
            raise ApiError(400, f"'{key}' must be true or false", param=key, code="invalid_type")
    prev = body.get("previous_response_id")
    if prev is not None and (not isinstance(prev, str) or not prev):
        raise ApiError(
            400,
            "'previous_response_id' must be a response id string",
            param="previous_response_id",
            code="invalid_type",
        )
    if isinstance(body.get("input"), list):
        for i, item in enumerate(body["input"]):
            check_input_item(i, item)
    check_sampling(
        {k: body.get(k) for k in ("temperature", "top_p", "top_k", "seed")},
        max_model_len=max_model_len,
        max_n=1,
    )
    tokens = body.get("max_output_tokens")
    if tokens is not None and (
        isinstance(tokens, bool) or not isinstance(tokens, int) or not 1 <= tokens <= max_model_len
    ):
        raise ApiError(
            400,
            f"'max_output_tokens'={tokens!r} must be an integer in [1, {max_model_len}]",
            param="max_output_tokens",
            code="invalid_value",
        )


INPUT_ROLES = ("user", "assistant", "system", "developer")
"""Roles of a Responses API message item."""

TEXT_INPUT_PARTS = ("input_text", "output_text", "refusal")
"""Content parts a text model takes in ``input`` (images, files and audio need a
multimodal engine)."""


def check_input_item(i: int, item: Any) -> None:
    """A message item of ``input``: a known role, and text-only content. Other items
    (function calls and their outputs, reasoning) are vLLM's to check."""
    if not isinstance(item, dict) or item.get("type", "message") != "message":
        return
    role = item.get("role")
    if role not in INPUT_ROLES:
        raise ApiError(
            400,
            f"'input[{i}].role'={role!r} is not a message role: expected one of "
            f"{', '.join(INPUT_ROLES)}",
            param=f"input[{i}].role",
            code="invalid_value",
        )
    content = item.get("content")
    for j, part in enumerate(content if isinstance(content, list) else []):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in TEXT_INPUT_PARTS:
            raise ApiError(
                400,
                f"'input[{i}].content[{j}]' has type {kind!r}: this model takes text only, "
                f"parts of type {', '.join(TEXT_INPUT_PARTS)}",
                param=f"input[{i}].content[{j}]",
                code="invalid_value",
            )


def listed(item: dict[str, Any], default_id: str) -> dict[str, Any]:
    """An input item as OpenAI lists it: a message's text as ``input_text`` parts, with an
    id (clients may send ``{"role", "content": "text"}`` shorthand)."""
    if item.get("type", "message") != "message" or "role" not in item:
        return item
    content = item.get("content")
    if isinstance(content, str):
        kind = "output_text" if item["role"] == "assistant" else "input_text"
        content = [{"type": kind, "text": content}]
    return {"type": "message", "id": default_id, "status": "completed", **item, "content": content}


def unavailable(err: Exception) -> ApiError:
    """503 for a store that failed a read or a delete (logged here, not shown in full)."""
    logger.warning("session store failed: %r", err)
    return ApiError(
        503,
        f"The conversation store is unavailable ({type(err).__name__}); retry later.",
        code="store_unavailable",
        type="server_error",
    )


def patched(response: dict[str, Any], *, store: bool, previous: str | None) -> dict[str, Any]:
    """vLLM's response object as the client asked for it (vLLM ran the turn statelessly)."""
    return {**response, "store": store, "previous_response_id": previous}


class Conversations:
    """The ``/v1/responses`` routes of one replica over a shared ``SessionStore``."""

    def __init__(self, store: SessionStore, replica: str = "") -> None:
        self.store = store
        self.replica = replica.encode("latin-1", "replace")

    async def create(
        self, body: dict[str, Any], owner: str, forward: Forward, send: SendFn
    ) -> None:
        """Run one turn through vLLM's app (``forward(body, send)``) with the stored
        history, then store it."""
        previous = body.get("previous_response_id")
        store = body.get("store") is not False
        new_items = input_items(body.get("input"))
        items = []
        if previous is not None:
            record = await self._get(previous, owner)
            if record is None:
                raise not_found(
                    previous, self.store.retention_s, time.time(), "previous_response_id"
                )
            items = list(record.items)
        request_id = new_response_id()
        forwarded = {
            **{k: v for k, v in body.items() if k != "previous_response_id"},
            "input": items + new_items,
            "store": False,
            "request_id": request_id,
        }
        turn = Turn(self, owner, items + new_items, store, previous)
        wrapped = turn.streaming_send(send) if body.get("stream") else turn.buffered_send(send)
        await forward(json.dumps(forwarded).encode(), wrapped)

    async def _get(self, response_id: str, owner: str) -> StoredResponse | None:
        try:
            return await self.store.get(response_id, owner)
        except Exception as err:  # the store is down or unreachable
            raise unavailable(err) from err

    async def save(self, record: StoredResponse) -> bool:
        """Store ``record``; False (and a log line) if the store failed: the client then
        gets the response with ``store: false``, never an id it could not continue from."""
        try:
            await self.store.put(record)
            return True
        except Exception as err:
            logger.warning("session store write failed for %s: %s", record.id, err)
            return False

    async def retrieve(self, response_id: str, owner: str) -> dict[str, Any]:
        record = await self._get(response_id, owner)
        if record is None:
            raise not_found(response_id, self.store.retention_s, time.time())
        return record.response

    async def list_input_items(self, response_id: str, owner: str) -> dict[str, Any]:
        """``GET /v1/responses/{id}/input_items``: the conversation's input items, newest
        first, as OpenAI lists them by default."""
        record = await self._get(response_id, owner)
        if record is None:
            raise not_found(response_id, self.store.retention_s, time.time())
        items = record.items[: record.input_count]
        data = [listed(item, f"{response_id}_{i}") for i, item in enumerate(items)][::-1]
        return {
            "object": "list",
            "data": data,
            "first_id": data[0].get("id") if data else None,
            "last_id": data[-1].get("id") if data else None,
            "has_more": False,
        }

    async def delete(self, response_id: str, owner: str) -> dict[str, Any]:
        try:
            deleted = await self.store.delete(response_id, owner)
        except Exception as err:
            raise unavailable(err) from err
        if not deleted:
            raise not_found(response_id, self.store.retention_s, time.time())
        return {"id": response_id, "object": "response.deleted", "deleted": True}

    def start_headers(self, message: dict[str, Any]) -> dict[str, Any]:
        """``http.response.start`` with the replica header added."""
        headers = [*message.get("headers", []), (REPLICA_HEADER, self.replica)]
        return {**message, "headers": headers}


class Turn:
    """One ``POST /v1/responses`` in flight: rewrites vLLM's answer and stores it."""

    def __init__(
        self, conv: Conversations, owner: str, items: list[dict[str, Any]], store: bool,
        previous: str | None,
    ) -> None:  # fmt: skip
        self.conv, self.owner, self.items = conv, owner, items
        self.store, self.previous = store, previous

    async def finish(self, response: dict[str, Any]) -> dict[str, Any]:
        """The response as the client gets it, stored first if it should be."""
        stored = self.store and response.get("status") in STORED_STATUSES
        if stored:
            output = [o for o in response.get("output") or [] if isinstance(o, dict)]
            record = StoredResponse(
                id=response["id"],
                owner=self.owner,
                response=patched(response, store=True, previous=self.previous),
                items=self.items + output,
                input_count=len(self.items),
            )
            stored = await self.conv.save(record)
        return patched(response, store=stored, previous=self.previous)

    def buffered_send(self, send: SendFn) -> SendFn:
        """A ``send`` for a JSON answer: buffer it, store it, send it rewritten."""
        start: dict[str, Any] = {}
        parts: list[bytes] = []

        async def wrapped(message: dict[str, Any]) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
                return
            if message["type"] != "http.response.body":
                await send(message)
                return
            parts.append(message.get("body", b""))
            if message.get("more_body"):
                return
            data = b"".join(parts)
            if start.get("status") == 200:
                data = json.dumps(await self.finish(json.loads(data))).encode()
            headers = [(k, v) for k, v in start.get("headers", []) if k != b"content-length"]
            headers.append((b"content-length", b"%d" % len(data)))
            await send(self.conv.start_headers({**start, "headers": headers}))
            await send({"type": "http.response.body", "body": data})

        return wrapped

    def streaming_send(self, send: SendFn) -> SendFn:
        """A ``send`` for server-sent events: each passes through as it comes, those that
        carry the whole response rewritten, and the final one only once it is stored."""
        pending = b""

        async def wrapped(message: dict[str, Any]) -> None:
            nonlocal pending
            if message["type"] == "http.response.start":
                await send(self.conv.start_headers(message))
                return
            if message["type"] != "http.response.body":
                await send(message)
                return
            pending += message.get("body", b"")
            out = []
            while b"\n\n" in pending:
                event, pending = pending.split(b"\n\n", 1)
                out.append(await self.event(event) + b"\n\n")
            more = message.get("more_body", False)
            if not more and pending:
                out.append(pending)
                pending = b""
            await send({"type": "http.response.body", "body": b"".join(out), "more_body": more})

        return wrapped

    async def event(self, event: bytes) -> bytes:
        """One SSE event (``event: TYPE\\ndata: JSON``), rewritten if it carries the response."""
        head, _, data = event.partition(b"\n")
        kind = head.removeprefix(b"event: ").decode("latin-1")
        if kind not in WHOLE_RESPONSE_EVENTS or not data.startswith(b"data: "):
            return event
        payload = json.loads(data[len(b"data: ") :])
        response = payload.get("response") or {}
        if kind in ("response.completed", "response.incomplete"):
            payload["response"] = await self.finish(response)
        else:
            payload["response"] = patched(response, store=self.store, previous=self.previous)
        return head + b"\ndata: " + json.dumps(payload).encode()
