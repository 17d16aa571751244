"""No request lost to a dying engine: what a model replica does when its vLLM engine dies.

A vLLM engine core that dies (a crashed kernel, the OOM killer, a kill by hand) never
comes back in that replica: every later request gets vLLM's 500 "EngineCore encountered
an issue". Serve would notice only through its health checks, three failures in a row
``health_check_period_s`` apart (``REPLICA_HEALTH_CHECK_UNHEALTHY_THRESHOLD``), 30 s or
more here. raylm does four things instead:

1. **Warm-up** and 2. **Watchdog**: ``raylm.serve.engine_watchdog`` (a replica whose
   engine cannot serve a first request does not start; one whose engine died answers
   what it holds, then leaves, so Serve replaces it at once).
3. **Retry before the first token** (``EngineGuard``): the answer is held until it
   carries engine output (a token, or a whole JSON body). If the engine turns out dead
   before that, nothing has reached the client, so the request is re-sent once through
   a Serve handle of this deployment (``RaylmLLMServer.raylm_retry``) and another
   replica's answer is streamed back with ``x-raylm-retried: 1``. A replica whose own
   engine is dead never runs a retried request: it bounces it unrun, and the sender
   tries another (``RETRY_ATTEMPTS`` picks in all); if none can, a 503 with
   ``Retry-After``.
4. **An error event after the first token** (``error_event``): a stream whose engine
   dies mid-way ends with an SSE error event and ``data: [DONE]`` (``event: error`` on
   the Responses API), never a cut connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

from raylm.serve.guards import RETRIED

logger = logging.getLogger("raylm.serve.engine")

Message = dict[str, Any]
Send = Callable[[Message], Awaitable[None]]
Receive = Callable[[], Awaitable[Message]]

RETRIED_HEADER = RETRIED
REPLICA_HEADER = b"x-raylm-replica"
RETRY_SCOPE_KEY = "raylm.retry"
"""Key in a scope's ``extensions`` marking a request re-sent by another replica (set by
``raylm_retry``, never from a client's header, so a client cannot skip the checks)."""
BOUNCE = {"type": "raylm.bounce"}
"""What a replica whose engine is dead answers a retried request with: it was not run."""
RETRY_ATTEMPTS = 4
"""Replica picks for one retried request (each but the last bounced unrun)."""
RETRY_AFTER_S = 5
ENGINE_DEAD_MESSAGE = (
    "The model engine serving this request died mid-answer; the replica is being "
    "replaced. Send the request again."
)
PREAMBLE_EVENTS = {"response.created", "response.in_progress"}
"""Responses API events vLLM sends before any engine output."""


class EngineState:
    """What the guard and the watchdog share in one replica."""

    def __init__(self, is_dead: Callable[[], bool]) -> None:
        self._is_dead = is_dead
        self.in_flight = 0
        self.dead_since: float | None = None
        self.reported_since: float | None = None
        """When Serve's health check first saw the engine dead: from then on the replica's
        ``/-/healthz`` answers 503, which is what HAProxy's own check reads."""
        self.counts = {"retried": 0, "retry_failed": 0, "stream_errors": 0, "bounced": 0}
        self._counter: Any = None

    def report_dead(self) -> None:
        """Serve's health check saw the dead engine (the first time counts)."""
        self.reported_since = self.reported_since or time.monotonic()

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        """Count one request in flight in this replica (the watchdog waits for them)."""
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    def dead(self) -> bool:
        try:
            return bool(self._is_dead())
        except Exception:  # the engine client itself is gone
            return True

    def count(self, what: str) -> None:
        """Count ``what`` here and in Ray's metrics (``raylm_engine_death_requests``)."""
        self.counts[what] += 1
        try:
            if self._counter is None:
                from ray.util.metrics import Counter

                self._counter = Counter(
                    "raylm_engine_death_requests",
                    "Requests met by a dead engine, by what happened to them",
                    tag_keys=("outcome",),
                )
            self._counter.inc(1, tags={"outcome": what})
        except Exception:  # not in a Ray worker (unit tests)
            self._counter = False


def sse_events(data: bytes) -> list[tuple[str, Any]]:
    """The complete SSE events in ``data`` as (kind, payload): kind is "done", "error",
    "preamble" or "output"."""
    out: list[tuple[str, Any]] = []
    for event in data.split(b"\n\n"):
        name, payload = "", None
        for line in event.split(b"\n"):
            if line.startswith(b"event: "):
                name = line[7:].decode("latin-1").strip()
            elif line.startswith(b"data: "):
                raw = line[6:].strip()
                if raw == b"[DONE]":
                    payload = "[DONE]"
                else:
                    try:
                        payload = json.loads(raw)
                    except ValueError:
                        payload = raw
        if payload is None:
            continue
        kind = payload.get("type", name) if isinstance(payload, dict) else name
        if payload == "[DONE]":
            out.append(("done", payload))
        elif kind == "error" or (isinstance(payload, dict) and "error" in payload):
            out.append(("error", payload))
        elif kind in PREAMBLE_EVENTS:
            out.append(("preamble", payload))
        else:
            out.append(("output", payload))
    return out


def error_event(responses: bool, message: str = ENGINE_DEAD_MESSAGE) -> bytes:
    """The SSE events that end a stream whose engine died: OpenAI's error chunk and
    ``[DONE]`` (chat and completions), or an ``error`` event (the Responses API)."""
    if responses:
        payload = {"type": "error", "code": "engine_dead", "message": message, "param": None}
        return b"event: error\ndata: " + json.dumps(payload).encode() + b"\n\n"
    err = {"message": message, "type": "server_error", "param": None, "code": "engine_dead"}
    return b"data: " + json.dumps({"error": err}).encode() + b"\n\ndata: [DONE]\n\n"


class FirstTokenGate:
    """A ``send`` that holds the answer until it carries engine output, so that an
    answer the dead engine spoiled before then can be dropped and the request re-sent."""

    def __init__(self, send: Send, state: EngineState, responses: bool) -> None:
        self._send, self.state, self.responses = send, state, responses
        self.held: list[Message] = []
        self.committed = False
        """Something of the answer reached the client: it can no longer be retried."""
        self.spoiled = False
        """The engine died before the first token; nothing was sent."""
        self.finished = False
        self.stream = False
        self._pending = b""

    async def send(self, message: Message) -> None:
        if self.spoiled:
            return
        kind = message["type"]
        if self.committed:
            if kind == "http.response.body":
                message = self._rewrite(message)
                self.finished = not message.get("more_body")
            await self._send(message)
            return
        if kind == "http.response.start":
            headers = dict(message.get("headers", []))
            self.stream = b"event-stream" in headers.get(b"content-type", b"")
            self.held.append(message)
            return
        if kind != "http.response.body":
            await self._send(message)
            return
        self.held.append(message)
        more = bool(message.get("more_body"))
        if not self.stream:
            if more:
                return
            status = self.held[0].get("status", 200) if self.held else 200
            if status >= 500 and self.state.dead():
                self.spoiled = True
                return
            await self._flush(finished=True)
            return
        self._pending += message.get("body", b"")
        complete, _, self._pending = self._pending.rpartition(b"\n\n")
        kinds = [k for k, _ in sse_events(complete)]
        if "error" in kinds and "output" not in kinds and self.state.dead():
            self.spoiled = True
        elif "output" in kinds or "error" in kinds or not more:
            await self._flush(finished=not more)

    def _rewrite(self, message: Message) -> Message:
        """Error events of a stream whose engine died, made to say so (vLLM calls it a
        400 ``BadRequestError``); other events pass unchanged."""
        body = message.get("body", b"")
        if not self.stream or b"error" not in body or not self.state.dead():
            return message
        ours = error_event(self.responses).removesuffix(b"\n\ndata: [DONE]\n\n")
        events = body.split(b"\n\n")
        for i, event in enumerate(events):
            if [k for k, _ in sse_events(event)] == ["error"]:
                events[i] = ours.removesuffix(b"\n\n")
                self.state.count("stream_errors")
        return {**message, "body": b"\n\n".join(events)}

    async def _flush(self, finished: bool) -> None:
        self.committed = True
        for i, message in enumerate(self.held):
            if message["type"] == "http.response.body":
                message = self._rewrite(message)
            if i == len(self.held) - 1 and finished:
                self.finished = True
            await self._send(message)
        self.held = []

    async def end_with_error(self) -> None:
        """Close a committed stream the app left open (it raised) with the error event."""
        if self.finished:
            return
        self.state.count("stream_errors")
        self.finished = True
        body = error_event(self.responses) if self.stream else b""
        await self._send({"type": "http.response.body", "body": body, "more_body": False})


Retry = Callable[[dict[str, Any], bytes], AsyncIterator[Message]]
"""Re-send (scope fields, body) to a replica of this deployment; the answer's messages."""


class EngineGuard:
    """Runs one request against vLLM's app with the engine-death rules (module doc)."""

    def __init__(self, state: EngineState, retry: Retry | None = None, replica: str = "") -> None:
        self.state, self.retry = state, retry
        self.replica = replica.encode("latin-1")
        """Named in ``x-raylm-replica`` on chat and completion answers (the Responses
        API's answers get it from ``raylm.serve.responses``)."""

    async def call(
        self, app: Callable[..., Awaitable[None]], scope: dict[str, Any], raw: bytes,
        receive: Callable[[], Awaitable[Message]], send: Send,
    ) -> None:  # fmt: skip
        """Answer a request whose checked body is ``raw``; ``receive`` yields it first."""
        retried = bool(scope.get("extensions", {}).get(RETRY_SCOPE_KEY))
        responses = scope["path"].rstrip("/").endswith("/v1/responses")
        if self.replica and not responses:
            send = with_header(send, REPLICA_HEADER, self.replica)
        with self.state.request():
            if self.state.dead():
                await self._elsewhere(scope, raw, send, retried)
                return
            gate = FirstTokenGate(send, self.state, responses)
            try:
                await app(scope, receive, gate.send)
            except Exception:
                if gate.committed:
                    await gate.end_with_error()
                    return
                if not self.state.dead():
                    raise
                gate.spoiled = True
            if gate.spoiled:
                await self._elsewhere(scope, raw, send, retried)
            elif gate.committed and not gate.finished and self.state.dead():
                await gate.end_with_error()

    async def _elsewhere(
        self, scope: dict[str, Any], raw: bytes, send: Send, retried: bool
    ) -> None:  # fmt: skip
        """The engine died before the request's first token: bounce it (it is a retry
        already) or re-send it to another replica, once."""
        if retried:
            self.state.count("bounced")
            await send(BOUNCE)
            return
        if self.retry is not None:
            fields = retry_fields(scope)
            for attempt in range(RETRY_ATTEMPTS):
                started = False
                try:
                    async for message in self.retry(fields, raw):
                        if message.get("type") == BOUNCE["type"]:
                            break
                        if message["type"] == "http.response.start":
                            headers = [*message.get("headers", []), (RETRIED_HEADER, b"1")]
                            message = {**message, "headers": headers}
                            if not started:
                                self.state.count("retried")
                                logger.warning(
                                    "engine dead before the first token: %s %s retried on "
                                    "another replica (pick %d)",
                                    scope["method"], scope["path"], attempt + 1,
                                )  # fmt: skip
                            started = True
                        await send(message)
                    else:
                        return
                except Exception as err:
                    if started:  # the other replica's stream broke: end it properly
                        logger.warning("retried request failed mid-answer: %s", err)
                        body = error_event(scope["path"].rstrip("/").endswith("responses"))
                        await send({"type": "http.response.body", "body": body})
                        return
                    logger.warning("retry pick %d failed: %s", attempt + 1, err)
                if started:
                    return
                await asyncio.sleep(0.2 * (attempt + 1))
        self.state.count("retry_failed")
        await unavailable(send)


def with_header(send: Send, name: bytes, value: bytes) -> Send:
    """``send`` adding header ``name`` to the answer unless it has one already (a
    re-sent request's answer names the replica that ran it)."""

    async def wrapped(message: Message) -> None:
        headers = message.get("headers", [])
        if message["type"] == "http.response.start" and all(k != name for k, _ in headers):
            message = {**message, "headers": [*headers, (name, value)]}
        await send(message)

    return wrapped


def scope_fields(scope: dict[str, Any]) -> dict[str, Any]:
    """What of an HTTP scope another replica needs to run the request (picklable): for
    a retry here, and for the version router (``raylm.serve.router``)."""
    keep = ("type", "http_version", "method", "scheme", "path", "raw_path", "root_path")
    fields = {k: scope[k] for k in keep if k in scope}
    fields["query_string"] = scope.get("query_string", b"")
    fields["headers"] = [(k, v) for k, v in scope.get("headers", []) if k != RETRIED_HEADER]
    return fields


def retry_fields(scope: dict[str, Any]) -> dict[str, Any]:
    """``scope_fields`` marked as a re-sent request."""
    fields = scope_fields(scope)
    fields["headers"].append((RETRIED_HEADER, b"1"))
    return fields


def forwarded_scope(fields: dict[str, Any], retried: bool = False) -> dict[str, Any]:
    """The scope a replica runs a request another deployment handed it with: a re-sent
    one (``raylm_retry``, which bounces rather than retries again) or a routed one."""
    scope = {"asgi": {"version": "3.0"}, "client": None, "server": None, **fields}
    scope["extensions"] = {RETRY_SCOPE_KEY: True} if retried else {}
    return scope


def retried_scope(fields: dict[str, Any]) -> dict[str, Any]:
    """The scope a replica runs a re-sent request with (``raylm_retry``)."""
    return forwarded_scope(fields, retried=True)


async def run_collected(
    app: Callable[..., Awaitable[None]], scope: dict[str, Any], raw: bytes
) -> AsyncIterator[Message]:
    """Run an ASGI ``app`` on one request and yield the messages it sends, as they come
    (the body of ``RaylmLLMServer.raylm_retry``)."""
    queue: asyncio.Queue[Message | None] = asyncio.Queue()

    async def never() -> Message:
        await asyncio.Event().wait()  # the caller's client cannot disconnect here
        return {"type": "http.disconnect"}

    receive = replay(raw, never)

    async def run() -> None:
        try:
            await app(scope, receive, queue.put)
        finally:
            await queue.put(None)

    task = asyncio.create_task(run())
    try:
        while (message := await queue.get()) is not None:
            yield message
            if message is BOUNCE or message.get("type") == BOUNCE["type"]:
                break
        await task
    finally:
        task.cancel()


async def unavailable(send: Send) -> None:
    """A 503 with ``Retry-After``: no replica's engine could take the request now."""
    body = json.dumps(
        {
            "error": {
                "message": "No model engine can take this request now (the one it reached "
                "died and no other replica answered); send it again shortly.",
                "type": "server_error",
                "param": None,
                "code": "engine_unavailable",
            }
        }
    ).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(body)),
        (b"retry-after", str(RETRY_AFTER_S).encode()),
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})


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
