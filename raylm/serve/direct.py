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

The guard rails sit here too: per-key request and token budgets (``raylm.serve.guards``,
checked right after the key, before the body is read), the optional blocklist and PII
filters (``raylm.serve.filters``), and one access-log line per request.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from raylm.serve import responses
from raylm.serve.checks import RequestChecks
from raylm.serve.engine_health import RETRY_SCOPE_KEY, EngineGuard, replay
from raylm.serve.filters import ContentFilters
from raylm.serve.guards import AccessRecord, Budgets, Exchange, RateLimiter, access_logger
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
        replica: str = "",
        limiter: Budgets | None = None,
        guard: EngineGuard | None = None,
    ) -> None:
        self.app = app
        self.guard = guard
        """Retries a request the engine died on before its first token, and ends a
        stream it died on mid-way with an error event (``raylm.serve.engine_health``)."""
        self.conversations = conversations
        """The Responses API's store (None: /v1/responses is not served)."""
        self.checks = RequestChecks(settings)
        self.cards = cards
        """Base model id -> its /v1/models entry (a dict)."""
        self.load_adapter = load_adapter
        """Loads ``BASE:NAME`` into the engine (a no-op once it is loaded)."""
        s = self.checks.settings
        self.limiter: Budgets = limiter or RateLimiter(s.requests_per_minute, s.tokens_per_minute)
        """Per-key budgets: this replica's buckets, or the shared store's (``limits.shared``)."""
        self.filters = ContentFilters(**s.filters) if s.filters else None
        self.log = access_logger() if s.access_log else None
        self.replica = replica

    def record(self, scope: Scope, path: str) -> AccessRecord | None:
        if self.log is None:
            return None
        auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        key = responses.owner_of(auth)[:12]
        return AccessRecord(path, scope["method"], key, self.replica, time.time())

    def prepare(
        self, body: dict[str, Any], route: str, key: str, exchange: Exchange
    ) -> bool:  # fmt: skip
        """Apply the filters and set up the answer's watching; True if ``body`` changed."""
        changed = self.checks.settings.max_tokens is not None
        if self.filters is not None:
            changed |= self.filters.check_input(body, route)
            self.filters.refuse_stream(body)
            if self.filters.output:
                out = self.filters.check_output
                exchange.filter = (
                    self.filters.check_response_output if route == "responses" else out
                )
        exchange.stream = bool(body.get("stream"))
        if self.limiter.counts_tokens:
            exchange.watch_usage = True
        if exchange.stream and self.limiter.counts_tokens and route != "responses":
            options = body.get("stream_options")
            options = options if isinstance(options, dict) else {}
            if not options.get("include_usage"):
                body["stream_options"] = {**options, "include_usage": True}
                exchange.strip_usage = changed = True
        if exchange.record is not None:
            exchange.record.model, exchange.record.stream = body.get("model"), exchange.stream
            if self.checks.settings.log_prompts:
                field = {"chat": "messages", "completion": "prompt"}.get(route, "input")
                exchange.record.prompt = body.get(field)
        return changed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = route_path(scope) if scope["type"] == "http" else ""
        if scope["type"] != "http" or path in PROBES or path.startswith("/-/"):
            await self.app(scope, receive, send)
            return
        if self.guard is None:
            await self.serve(scope, receive, send, path)
            return
        with self.guard.state.request():  # a dead engine's replica leaves once none is left
            if scope.get("extensions", {}).get(RETRY_SCOPE_KEY):
                # Re-sent by another replica after its checks: run it as it was sent there.
                await self.guard.call(self.app, scope, b"", receive, send)
            else:
                await self.serve(scope, receive, send, path)

    async def serve(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        record = self.record(scope, path)
        exchange = Exchange(send, record)
        try:
            await self.handle(scope, receive, exchange)
        except ApiError as err:
            await reply(exchange.send, err.status, err.body(), err.headers)
        finally:
            if exchange.tokens and self.limiter.counts_tokens:
                await self.limiter.charge(exchange.key, exchange.tokens)
            if self.log is not None and record is not None:
                record.status = record.status or 500  # the app raised before answering
                self.log.info(record.line())

    async def handle(self, scope: Scope, receive: Receive, exchange: Exchange) -> None:
        path, method, send = route_path(scope), scope["method"], exchange.send
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        self.checks.auth(headers.get("authorization"))
        generates = method == "POST" and (path in GENERATE or path == responses.PATH)
        key = responses.owner_of(headers.get("authorization"))
        exchange.key = key
        exchange.watch_usage &= generates  # a retrieved response's usage costs nothing
        if generates and self.limiter.enabled:
            await self.limiter.admit(key)
        if path in GENERATE and method == "POST":
            raw = await self.checks.read_body(headers.get("content-length"), body_chunks(receive))
            parsed = await self.checks.check_generate(raw, GENERATE[path], list(self.cards))
            route = "chat" if GENERATE[path] else "completion"
            if self.prepare(parsed, route, key, exchange):
                raw = json.dumps(parsed).encode()
            if ":" in parsed["model"]:
                await self.adapter(parsed["model"])
            await self.generate(scope, raw, receive, send)
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
            await self.responses(scope, receive, exchange, headers)
        else:
            raise ApiError(404, "This endpoint is not served by raylm", code="not_found")

    async def responses(
        self, scope: Scope, receive: Receive, exchange: Exchange, headers: dict[str, str]
    ) -> None:
        """``/v1/responses``: a turn goes to vLLM's app with its stored history
        (``raylm.serve.responses``); retrieval and deletion are answered from the store."""
        assert self.conversations is not None
        conv, path, method = self.conversations, route_path(scope), scope["method"]
        send = exchange.send
        owner = responses.owner_of(headers.get("authorization"))
        if path == responses.PATH and method == "POST":
            raw = await self.checks.read_body(headers.get("content-length"), body_chunks(receive))
            body = parse_body(raw, self.checks.settings.max_request_bytes)
            base = await self.checks.resolve_model(body, list(self.cards))
            ms = self.checks.models.get(base)
            responses.check_request(body, ms.max_model_len if ms else 1 << 30)
            self.checks.cap_tokens(body, ("max_output_tokens",), "max_output_tokens")
            self.prepare(body, "responses", owner, exchange)
            if ":" in body["model"]:
                await self.adapter(body["model"])

            async def forward(data: bytes, answer: Send) -> None:
                await self.generate(scope, data, receive, answer)

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

    async def generate(self, scope: Scope, raw: bytes, receive: Receive, send: Send) -> None:
        """vLLM's app on the checked body ``raw``, guarded against a dying engine."""
        if self.guard is None:
            await self.app(scope, replay(raw, receive), send)
        else:
            await self.guard.call(self.app, scope, raw, replay(raw, receive), send)

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


async def reply(
    send: Send, status: int, payload: dict[str, Any], extra: dict[str, str] | None = None
) -> None:
    data = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(data))]
    headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})
