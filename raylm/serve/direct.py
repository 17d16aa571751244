"""raylm's checks in front of vLLM's own app, in the model replica.

There is no ingress replica: the HTTP proxy (HAProxy on raylm's clusters) sends the
request straight to a model replica's own HTTP port, where vLLM's
own OpenAI app answers it (ray.serve.llm's ``LLMServer.__serve_build_asgi_app__``).
Tokens then cross one process boundary fewer, which is what closes the gap to vLLM's
bare server (docs/benchmarks.md). This ASGI middleware wraps that app so a request
still meets every raylm rule before vLLM sees it: API key, body size, JSON, model (base
or an adapter, on disk or in a bucket), parameters and prompt length
(``raylm.serve.checks``), with the OpenAI-style error bodies naming the field. It then
loads a requested adapter into this replica's engine if it is not loaded yet. Only the
OpenAI routes raylm serves are let through; Serve's own probes (``/-/...``) and vLLM's
liveness probe pass untouched.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from raylm.serve import responses
from raylm.serve.checks import RequestChecks
from raylm.serve.validation import ApiError, parse_body

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

GENERATE = {"/v1/completions": False, "/v1/chat/completions": True}
"""Routes that generate, and whether each is chat. ``/v1/responses`` goes through
``raylm.serve.responses`` (conversations kept in the shared store) instead."""

PROBES = {"/health", "/ping"}
"""vLLM's liveness routes, answered without a key (as are Serve's own, under ``/-/``)."""


class ChecksMiddleware:
    """Run raylm's request checks, answer /v1/models, and refuse every other route."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        settings: dict[str, Any] | None,
        cards: dict[str, Any],
        load_adapter: Callable[[str], Awaitable[None]],
        conversations: responses.Conversations | None = None,
    ) -> None:
        self.app = app
        self.conversations = conversations
        """The Responses API's store (None: /v1/responses is not served)."""
        self.checks = RequestChecks(settings)
        self.cards = cards
        """Base model id -> its /v1/models entry (a dict)."""
        self.load_adapter = load_adapter
        """Loads ``BASE:NAME`` into the engine (a no-op once it is loaded)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = route_path(scope) if scope["type"] == "http" else ""
        if scope["type"] != "http" or path in PROBES or path.startswith("/-/"):
            await self.app(scope, receive, send)
            return
        try:
            await self.handle(scope, receive, send)
        except ApiError as err:
            await reply(send, err.status, err.body())

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        path, method = route_path(scope), scope["method"]
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        self.checks.auth(headers.get("authorization"))
        if path in GENERATE and method == "POST":
            raw = await self.checks.read_body(headers.get("content-length"), body_chunks(receive))
            parsed = await self.checks.check_generate(raw, GENERATE[path], list(self.cards))
            if ":" in parsed["model"]:
                await self.adapter(parsed["model"])
            await self.app(scope, replay(raw, receive), send)
        elif method == "GET" and path == "/v1/models":
            # Listing adapters may be a request to a bucket: off the event loop.
            cards = await asyncio.to_thread(self.checks.model_cards, self.cards)
            await reply(send, 200, {"object": "list", "data": cards})
        elif method == "GET" and path.startswith("/v1/models/"):
            model = path.removeprefix("/v1/models/")
            await reply(
                send, 200, await asyncio.to_thread(self.checks.model_card, model, self.cards)
            )
        elif self.conversations is not None and path.split("/")[:3] == ["", "v1", "responses"]:
            await self.responses(scope, receive, send, headers)
        else:
            raise ApiError(404, "This endpoint is not served by raylm", code="not_found")

    async def responses(
        self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str]
    ) -> None:
        """``/v1/responses``: a turn goes to vLLM's app with its stored history
        (``raylm.serve.responses``); retrieval and deletion are answered from the store."""
        assert self.conversations is not None
        conv, path, method = self.conversations, route_path(scope), scope["method"]
        owner = responses.owner_of(headers.get("authorization"))
        if path == responses.PATH and method == "POST":
            raw = await self.checks.read_body(headers.get("content-length"), body_chunks(receive))
            body = parse_body(raw, self.checks.settings.max_request_bytes)
            base = await self.checks.resolve_model(body, list(self.cards))
            ms = self.checks.models.get(base)
            responses.check_request(body, ms.max_model_len if ms else 1 << 30)
            if ":" in body["model"]:
                await self.adapter(body["model"])

            async def forward(data: bytes, answer: Send) -> None:
                await self.app(scope, replay(data, receive), answer)

            await conv.create(body, owner, forward, send)
            return
        response_id, _, sub = path.removeprefix(responses.PATH + "/").partition("/")
        if method == "GET" and response_id and not sub:
            await reply(send, 200, await conv.retrieve(response_id, owner))
        elif method == "GET" and response_id and sub == "input_items":
            await reply(send, 200, await conv.list_input_items(response_id, owner))
        elif method == "DELETE" and response_id and not sub:
            await reply(send, 200, await conv.delete(response_id, owner))
        else:
            raise ApiError(404, "This endpoint is not served by raylm", code="not_found")

    async def adapter(self, model: str) -> None:
        try:
            await self.load_adapter(model)
        except Exception as err:  # the checks found it on disk: a broken adapter
            raise ApiError(
                500,
                f"Could not load LoRA adapter {model!r}: {err}",
                code="adapter_load_failed",
                type="server_error",
            ) from err


def route_path(scope: Scope) -> str:
    """The path below the app's route prefix (Serve passes the prefix as root_path)."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root) :] or "/"
    return path


async def body_chunks(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ApiError(400, "Client disconnected before the request body ended")
        yield message.get("body", b"")
        if not message.get("more_body"):
            return


def replay(raw: bytes, receive: Receive) -> Receive:
    """A ``receive`` that yields the already-read body once, then the client's messages
    (so the app still learns of a disconnect while it streams)."""
    sent = False

    async def again() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        return await receive()

    return again


async def reply(send: Send, status: int, payload: dict[str, Any]) -> None:
    data = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(data))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})
