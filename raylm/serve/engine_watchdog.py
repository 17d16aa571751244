"""A model replica's engine checks at start and while it runs (``RaylmLLMServer``).

1. **Warm-up** (``warm_up``): the replica's constructor runs one 1-token generation
   before it returns, and fails the replica with a message saying so if that fails, so
   a deployment whose engine cannot serve a first request never reports RUNNING.
2. **Watchdog** (``EngineWatchdog``): a task in the replica polls the engine's
   ``errored`` flag (vLLM's AsyncLLM sets it as soon as its engine-core process is
   gone); once it is set, the replica answers what it holds and then leaves (its actor
   process exits). Serve's controller sees an actor that crashed at its next health
   check and replaces it at once, with no three-failure count
   (``REPLICA_HEALTH_CHECK_UNHEALTHY_THRESHOLD``); the front end stops sending to it (a
   closed port is a connection failure, which HAProxy re-sends to another replica).
   Exiting is chosen over failing the health check because it is the one signal Serve
   acts on at the first observation. It first stays until HAProxy's own health check
   has marked it down (``linger_s``, ``front_end_markdown_s``, counted from Serve's
   health check seeing the engine dead, which turns the replica's ``/-/healthz`` to
   503): HAProxy keeps connections to a replica alive and reuses them, and a request it
   sends on one that the exit closes is cut with no answer (HAProxy then closes the
   client's connection too, so that the client may retry).

What happens to the requests themselves: ``raylm.serve.engine_health``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from raylm.serve.engine_health import EngineState

logger = logging.getLogger("raylm.serve.engine")


class EngineWatchdog:
    """Polls the engine and makes the replica leave once it is dead (module doc, 2)."""

    def __init__(
        self,
        state: EngineState,
        leave: Callable[[], None],
        cleanup: Callable[[], Awaitable[None]] | None = None,
        poll_s: float = 0.5,
        drain_s: float = 30.0,
        settle_s: float = 0.25,
        linger_s: float = 0.0,
    ) -> None:
        self.state, self.leave, self.cleanup = state, leave, cleanup
        self.poll_s, self.drain_s, self.settle_s = poll_s, drain_s, settle_s
        """``settle_s``: how long no request may be in flight before the replica leaves
        (one the HTTP server accepted is in raylm's count within milliseconds)."""
        self.linger_s = linger_s
        """Least time from Serve's health check seeing the death (``reported_since``) to
        leaving: until the front end stops sending here (``front_end_markdown_s``); what
        arrives meanwhile is re-sent unrun. ``drain_s`` still bounds the whole wait."""

    async def run(self) -> None:
        while not self.state.dead():
            await asyncio.sleep(self.poll_s)
        self.state.dead_since = time.monotonic()
        logger.error(
            "raylm: this replica's vLLM engine is dead; answering the %d requests in "
            "flight (at most %.0f s), then leaving so Serve replaces the replica",
            self.state.in_flight, self.drain_s,
        )  # fmt: skip
        if self.cleanup is not None:
            await self.cleanup()
        deadline = self.state.dead_since + self.drain_s
        idle_since = None
        while time.monotonic() < deadline:
            if self.state.in_flight > 0 or not self._marked_down():
                idle_since = None
            elif idle_since is None:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since >= self.settle_s:
                break
            await asyncio.sleep(0.05)
        if self.state.in_flight:
            logger.error("raylm: leaving with %d requests still in flight", self.state.in_flight)
        # No await between the count and leaving: no request starts in between.
        self.leave()

    def _marked_down(self) -> bool:
        """Whether the front end has had time to stop sending here."""
        if not self.linger_s:
            return True
        reported = self.state.reported_since
        return reported is not None and time.monotonic() >= reported + self.linger_s


def front_end_markdown_s(env: Mapping[str, str] = os.environ) -> float:
    """Seconds HAProxy takes at most to mark a replica down whose health check fails:
    one check interval, then ``fall`` checks at ``fastinter``, read from Serve's settings
    (its defaults: 5 s, 2, 250 ms). 0 without HAProxy (Serve's Python proxy)."""
    if env.get("RAY_SERVE_ENABLE_HA_PROXY") != "1":
        return 0.0
    inter = haproxy_seconds(env.get("RAY_SERVE_HAPROXY_HEALTH_CHECK_INTER", "5s"))
    fast = haproxy_seconds(env.get("RAY_SERVE_HAPROXY_HEALTH_CHECK_FASTINTER", "250ms"))
    return inter + int(env.get("RAY_SERVE_HAPROXY_HEALTH_CHECK_FALL", "2")) * fast


def haproxy_seconds(value: str) -> float:
    """An HAProxy time ("5s", "250ms", "1m"; a bare number is milliseconds) in seconds."""
    units = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
    number = value.strip().rstrip("usmhd")
    unit = value.strip()[len(number) :] or "ms"
    try:
        return float(number) * units[unit]
    except (KeyError, ValueError):
        raise ValueError(
            f"{value!r} is not an HAProxy time: a number, then us, ms, s, m, h or d"
        ) from None


def shut_down(shutdown: Callable[[], Any]) -> Callable[[], Awaitable[None]]:
    """The watchdog's ``cleanup``: stop vLLM's engine client (what is left of its
    processes) in a thread, for at most 10 s."""

    async def cleanup() -> None:
        try:
            await asyncio.wait_for(asyncio.to_thread(shutdown), timeout=10)
        except Exception as err:
            logger.warning("engine shutdown before leaving failed: %s", err)

    return cleanup


def exit_replica() -> None:
    """The watchdog's ``leave`` in a replica: end this actor's process; Serve's controller
    sees the actor crashed at its next health check and starts another at once."""
    logger.error("raylm: replica exits (dead engine)")
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(1)


class EngineWarmupError(RuntimeError):
    """The engine could not serve a first request; the replica must not start."""


async def warm_up(generate: Callable[[], AsyncIterator[Any]], model: str, timeout_s: float) -> None:
    """Run one tiny generation (``generate``: 1 token) and fail clearly if it fails."""
    outputs = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for _ in generate():
                outputs += 1
    except Exception as err:
        raise EngineWarmupError(
            f"raylm: the vLLM engine for model {model!r} could not serve a first request "
            f"(a 1-token warm-up generation failed: {type(err).__name__}: {err}). The "
            "replica does not start, so the deployment never reports RUNNING with an "
            "engine that cannot answer. Check the engine's log above; on CPU try "
            "engine.dtype=float32."
        ) from err
    if not outputs:
        raise EngineWarmupError(
            f"raylm: the vLLM engine for model {model!r} returned nothing for a 1-token "
            "warm-up generation; the replica does not start."
        )
