"""Per-key rate and token budgets, and the access log, of one model replica.

A key is named by the sha256 digest of its bearer token (``validation.hash_key``, as the
conversation store names owners), so neither the limiter nor the log ever holds a key.

Budgets are token buckets per key: ``requests_per_minute`` (one taken per request) and
``tokens_per_minute`` (prompt + completion tokens from the engine's ``usage``, taken
after the response, so a bucket may go into debt; a key in debt waits until it refills).
Each bucket holds at most one minute's worth, refilled continuously. A refused request
gets 429 with ``Retry-After`` (whole seconds until it would pass) and an OpenAI error
body naming the limit.

By default the buckets live in the replica (``RateLimiter``): no round trip per request,
and the deploy step divides each budget by ``autoscaling.max_replicas``
(``raylm.serve.app``), so the app never exceeds it whatever the proxy's spread, but a key
gets less while fewer replicas run. ``limits.shared: true`` keeps them in the sessions
store instead (``raylm.serve.budgets``): one budget for all replicas, at a store round trip
per request.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from raylm.serve.validation import ApiError

RETRIED = b"x-raylm-retried"
"""The header ``raylm.serve.engine_health`` marks a re-sent request's answer with."""

ACCESS_LOGGER = "raylm.serve.access"
"""Logger of the one-JSON-line-per-request access log (its own stderr handler)."""

MAX_KEYS = 100_000
"""Buckets kept per replica; past this the longest-idle (full again) ones are dropped."""


@dataclass
class Bucket:
    """One token bucket: ``level`` units now, refilled at ``rate`` per second to ``size``."""

    size: float
    rate: float
    level: float
    updated: float

    def refill(self, now: float) -> None:
        self.level = min(self.size, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def wait_for(self, amount: float) -> float:
        """Seconds until ``level`` reaches ``amount`` (0 if it has)."""
        return max(0.0, (amount - self.level) / self.rate)


def rate_limited(limit: str, per_minute: float, wait_s: float, scope: str = "replica") -> ApiError:
    """429 naming the limit, with ``Retry-After`` in whole seconds (at least 1)."""
    retry = max(1, math.ceil(wait_s))
    share = "per replica" if scope == "replica" else "for the app"
    return ApiError(
        429,
        f"Rate limit reached for this API key: {limit}={per_minute:g} {share} "
        f"(limits.{limit}). Retry after {retry} s.",
        code="rate_limit_exceeded",
        type="rate_limit_error",
        headers={"retry-after": str(retry)},
    )


class Budgets(Protocol):
    """Per-key request and token budgets: this replica's (``RateLimiter``) or shared
    (``raylm.serve.budgets``)."""

    @property
    def enabled(self) -> bool:
        """Whether any budget is set."""

    @property
    def counts_tokens(self) -> bool:
        """Whether a token budget is set (answers' ``usage`` must then be read)."""

    async def admit(self, key: str) -> None:
        """Take one request from ``key``'s budget, or raise the 429 of the limit it hit."""

    async def charge(self, key: str, tokens: int) -> None:
        """Take a finished request's tokens from ``key``'s budget."""


class RateLimiter:
    """The request and token buckets of every key seen by this replica."""

    def __init__(self, requests_per_minute: float | None, tokens_per_minute: float | None) -> None:
        self.rpm, self.tpm = requests_per_minute, tokens_per_minute
        self._requests: dict[str, Bucket] = {}
        self._tokens: dict[str, Bucket] = {}

    @property
    def enabled(self) -> bool:
        return bool(self.rpm or self.tpm)

    @property
    def counts_tokens(self) -> bool:
        return bool(self.tpm)

    def _bucket(self, table: dict[str, Bucket], key: str, per_minute: float, now: float) -> Bucket:
        bucket = table.get(key)
        if bucket is None:
            if len(table) >= MAX_KEYS:  # drop the oldest half: idle ones are full anyway
                for old in list(table)[: MAX_KEYS // 2]:
                    del table[old]
            bucket = table[key] = Bucket(per_minute, per_minute / 60.0, per_minute, now)
        bucket.refill(now)
        return bucket

    async def admit(self, key: str) -> None:
        self.check(key)

    async def charge(self, key: str, tokens: int) -> None:
        self.spend(key, tokens)

    def check(self, key: str, now: float | None = None) -> None:
        """Take one request from ``key``'s budget, or raise the 429 of the limit it hit.
        The token budget is checked first and not taken from (the cost is not known yet)."""
        now = time.monotonic() if now is None else now
        if self.tpm:
            tokens = self._bucket(self._tokens, key, self.tpm, now)
            if tokens.level < 0:  # in debt from earlier answers
                raise rate_limited("tokens_per_minute", self.tpm, tokens.wait_for(0))
        if self.rpm:
            requests = self._bucket(self._requests, key, self.rpm, now)
            if requests.level < 1:
                raise rate_limited("requests_per_minute", self.rpm, requests.wait_for(1))
            requests.level -= 1

    def spend(self, key: str, tokens: int, now: float | None = None) -> None:
        """Take a finished request's tokens (prompt + completion) from ``key``'s budget."""
        if self.tpm and tokens > 0:
            now = time.monotonic() if now is None else now
            self._bucket(self._tokens, key, self.tpm, now).level -= tokens


def usage_tokens(usage: Any) -> tuple[int, int]:
    """(prompt, completion) tokens of an OpenAI ``usage`` object (chat, completions or
    responses naming), (0, 0) if there is none."""
    if not isinstance(usage, dict):
        return 0, 0
    prompt = usage.get("prompt_tokens", usage.get("input_tokens")) or 0
    completion = usage.get("completion_tokens", usage.get("output_tokens")) or 0
    return int(prompt), int(completion)


def access_logger() -> logging.Logger:
    """The access log: bare JSON lines on stderr. In a Serve replica Ray writes them to
    ``logs/worker-<worker>-<job>-<pid>.err`` of the node's session, not Serve's replica
    log (Ray 2.60, ``RAY_SERVE_LOG_TO_STDERR=1``); docs/operations.md says how to find them."""
    log = logging.getLogger(ACCESS_LOGGER)
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False  # not Serve's formatter: one parseable JSON object a line
    return log


@dataclass
class AccessRecord:
    """What one access-log line says. No prompt or completion text unless ``prompt`` is set
    (``logging.prompts: true``)."""

    route: str
    method: str
    key: str
    """First 12 hex digits of the key's sha256 ("" without a key): enough to tell keys
    apart in a log, useless for recovering one."""
    replica: str
    start: float
    model: str | None = None
    status: int = 0
    prompt_tokens: int | None = None
    """From the answer's ``usage`` (None: it had none, e.g. a stream without
    ``stream_options.include_usage`` while no token budget is set)."""
    completion_tokens: int | None = None
    stream: bool = False
    retried: bool = False
    """The engine this replica sent it to died before its first token and another replica
    answered it (``raylm.serve.engine_health``; the answer's ``x-raylm-retried``)."""
    prompt: Any = None

    def line(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        out: dict[str, Any] = {
            "event": "raylm_access",
            "time": round(now, 3),
            "key": self.key,
            "method": self.method,
            "route": self.route,
            "model": self.model,
            "status": self.status,
            "stream": self.stream,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "latency_ms": round((now - self.start) * 1000, 1),
            "replica": self.replica,
            "retried": self.retried,
        }
        if self.prompt is not None:
            out["prompt"] = self.prompt
        return json.dumps(out, ensure_ascii=False)


SendFn = Callable[[dict[str, Any]], Awaitable[None]]


class Exchange:
    """One request's answer on its way to the client: records its status and the tokens
    its ``usage`` reports (for the key's token budget), applies the output filter to a
    whole JSON answer, and drops the usage-only stream chunk the checks asked vLLM for
    when the client did not (``stream_options.include_usage``).

    A JSON answer is held until complete (vLLM sends it in one message anyway); a stream
    passes through chunk by chunk, and only a chunk that mentions ``"usage"`` is parsed.
    """

    def __init__(self, send: SendFn, record: AccessRecord | None) -> None:
        self._send, self.record = send, record
        self.status = 0
        self.stream = False
        self.watch_usage = record is not None
        self.strip_usage = False
        self.key = ""
        """The sha256 of the request's key ("" without one)."""
        self.tokens = 0
        """Prompt + completion tokens its ``usage`` reported (charged once it is sent)."""
        self.filter: Callable[[dict[str, Any]], bool] | None = None
        self._start: dict[str, Any] | None = None
        self._parts: list[bytes] = []
        self._counted = False

    @property
    def _buffer(self) -> bool:
        return not self.stream and (self.watch_usage or self.filter is not None)

    async def send(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.status = message["status"]
            if self.record is not None:
                self.record.status = self.status
                self.record.retried = (RETRIED, b"1") in message.get("headers", [])
            if self._buffer:
                self._start = message
                return
        elif kind == "http.response.body" and self._start is not None:
            self._parts.append(message.get("body", b""))
            if not message.get("more_body"):
                await self._flush()
            return
        elif kind == "http.response.body" and self.stream and self.watch_usage:
            body = message.get("body", b"")
            if b'"usage"' in body:
                message = {**message, "body": self._stream_usage(body)}
        await self._send(message)

    def _usage(self, usage: Any) -> None:
        prompt, completion = usage_tokens(usage)
        if self._counted or not prompt + completion:
            return
        self._counted = True
        self.tokens = prompt + completion
        if self.record is not None:
            self.record.prompt_tokens, self.record.completion_tokens = prompt, completion

    async def _flush(self) -> None:
        assert self._start is not None
        start, data = self._start, b"".join(self._parts)
        if self.status == 200:
            try:
                payload = json.loads(data)
            except ValueError:
                payload = None
            if isinstance(payload, dict):
                self._usage(payload.get("usage"))
                if self.filter is not None and self.filter(payload):
                    data = json.dumps(payload).encode()
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", b"%d" % len(data)))
        await self._send({**start, "headers": headers})
        await self._send({"type": "http.response.body", "body": data})

    def _stream_usage(self, body: bytes) -> bytes:
        """``body`` (whole SSE events) with the usage read, and the usage-only chunk
        dropped if the client did not ask for it."""
        events = body.split(b"\n\n")
        kept = []
        for event in events:
            if b'"usage"' in event:
                data = event[event.find(b"data: ") + 6 :] if b"data: " in event else b""
                try:
                    payload = json.loads(data)
                except ValueError:
                    payload = None
                if isinstance(payload, dict):
                    inner = payload.get("response")
                    usage = payload.get("usage") or (inner or {}).get("usage")
                    self._usage(usage)
                    if self.strip_usage and payload.get("choices") == []:
                        continue
            kept.append(event)
        return b"\n\n".join(kept)
