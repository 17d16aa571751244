"""No request lost to a dying engine (raylm.serve.engine_health, engine_watchdog), with
fakes at the seam: a Starlette app stands in for vLLM's (it "kills" its engine by setting
a flag, and answers as vLLM does then), the retry path is a function yielding another
replica's ASGI messages, and the watchdog's ``leave`` records instead of exiting.
The real engine killed under load: tests/e2e/test_serve_responses.py."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from raylm.serve import engine_health as eh
from raylm.serve import engine_watchdog as ew
from raylm.serve.direct import ChecksMiddleware

CARD = {"id": "tiny", "object": "model", "owned_by": "raylm"}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
DEAD_500 = {"error": {"message": "EngineCore encountered an issue.", "code": 500}}
DEAD_CHUNK = 'data: {"error": {"message": "EngineCore encountered an issue.", "code": 400}}\n\n'


class FakeVLLM:
    """vLLM's app as it answers with a live engine, or one that dies at ``die``:
    "before" (vLLM's 500 JSON, or a 200 stream whose first event is the error),
    "mid" (a token, then vLLM's error chunk and [DONE]) or "raise" (a token, then the
    app raises, as vLLM's Responses stream does)."""

    def __init__(self) -> None:
        self.dead = False
        self.die: str | None = None
        self.calls = 0

    async def generate(self, request: Request):
        self.calls += 1
        body = await request.json()
        if self.die == "before" or self.dead:
            self.dead = True
            if not body.get("stream"):
                return JSONResponse(DEAD_500, status_code=500)

        async def chunks():
            if self.dead:
                yield DEAD_CHUNK
                yield "data: [DONE]\n\n"
                return
            yield 'data: {"choices": [{"delta": {"content": "a"}}]}\n\n'
            if self.die == "mid":
                self.dead = True
                yield DEAD_CHUNK
                yield "data: [DONE]\n\n"
                return
            if self.die == "raise":
                self.dead = True
                raise RuntimeError("EngineDeadError")
            yield 'data: {"choices": [{"delta": {"content": "b"}}]}\n\ndata: [DONE]\n\n'

        if body.get("stream"):
            return StreamingResponse(chunks(), media_type="text/event-stream")
        return JSONResponse({"choices": [{"message": {"content": "ab"}}]})

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/v1/chat/completions", self.generate, methods=["POST"])])


class OtherReplica:
    """The retry path: each pick bounces (its engine is dead too) or answers."""

    def __init__(self, answers: list[str]) -> None:
        self.answers = answers
        self.sent: list[tuple[dict, bytes]] = []

    async def __call__(self, fields: dict, raw: bytes):
        self.sent.append((fields, raw))
        if self.answers.pop(0) == "bounce":
            yield eh.BOUNCE
            return
        body = b'{"choices": [{"message": {"content": "from the other replica"}}]}'
        yield {"type": "http.response.start", "status": 200, "headers": []}
        yield {"type": "http.response.body", "body": body}


def served(engine: FakeVLLM, other: OtherReplica | None = None):
    state = eh.EngineState(lambda: engine.dead)
    guard = eh.EngineGuard(state, retry=other)
    app = ChecksMiddleware(
        engine.app(),
        settings={"models": {"tiny": {"max_model_len": 4096}}},
        cards={"tiny": CARD},
        load_adapter=None,  # type: ignore[arg-type]
        guard=guard,
    )
    return TestClient(app), state


def test_a_request_the_engine_died_on_before_its_first_token_is_retried_once_elsewhere() -> None:
    engine, other = FakeVLLM(), OtherReplica(["answer"])
    engine.die = "before"
    client, state = served(engine, other)
    r = client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200 and r.headers["x-raylm-retried"] == "1"
    assert r.json()["choices"][0]["message"]["content"] == "from the other replica"
    fields, raw = other.sent[0]
    assert json.loads(raw)["messages"] == CHAT["messages"] and fields["method"] == "POST"
    assert (b"x-raylm-retried", b"1") in fields["headers"]
    assert state.counts["retried"] == 1 and state.in_flight == 0


def test_a_stream_that_died_before_its_first_token_is_retried_too() -> None:
    engine, other = FakeVLLM(), OtherReplica(["answer"])
    engine.die = "before"
    client, _ = served(engine, other)
    r = client.post("/v1/chat/completions", json=CHAT | {"stream": True})
    assert r.headers["x-raylm-retried"] == "1" and "other replica" in r.text
    assert "EngineCore" not in r.text  # the spoiled answer never reached the client


def test_a_replica_already_dead_sends_new_requests_away_without_running_them() -> None:
    engine, other = FakeVLLM(), OtherReplica(["answer"])
    engine.dead = True
    client, _ = served(engine, other)
    assert client.post("/v1/chat/completions", json=CHAT).headers["x-raylm-retried"] == "1"
    assert engine.calls == 0


def test_a_pick_that_bounces_is_not_a_retry_the_next_pick_answers() -> None:
    engine, other = FakeVLLM(), OtherReplica(["bounce", "answer"])
    engine.die = "before"
    client, _ = served(engine, other)
    r = client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200 and len(other.sent) == 2


def test_no_replica_able_to_answer_is_a_503_with_retry_after() -> None:
    engine, other = FakeVLLM(), OtherReplica(["bounce"] * eh.RETRY_ATTEMPTS)
    engine.die = "before"
    client, state = served(engine, other)
    r = client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 503 and r.headers["retry-after"] == str(eh.RETRY_AFTER_S)
    assert r.json()["error"]["code"] == "engine_unavailable"
    assert state.counts["retry_failed"] == 1


def test_a_retried_request_is_never_retried_again_its_replica_bounces_it() -> None:
    """At most once: the replica a retry reached, dead too, answers with a bounce (the
    request was not run) instead of re-sending it; the sender then picks again."""
    engine, other = FakeVLLM(), OtherReplica(["answer"])
    engine.die = "before"
    state = eh.EngineState(lambda: engine.dead)
    guard = eh.EngineGuard(state, retry=other)
    app = ChecksMiddleware(
        engine.app(), settings={}, cards={"tiny": CARD}, load_adapter=None, guard=guard
    )  # type: ignore[arg-type]
    fields = eh.retry_fields({"type": "http", "method": "POST", "path": "/v1/chat/completions"})

    async def run() -> list[dict]:
        return [m async for m in eh.run_collected(app, eh.retried_scope(fields), b"{}")]

    assert asyncio.run(run()) == [eh.BOUNCE]
    assert other.sent == [] and state.counts["bounced"] == 1


def test_a_live_engines_errors_pass_through_unretried() -> None:
    engine, other = FakeVLLM(), OtherReplica(["answer"])
    client, _ = served(engine, other)
    r = client.post("/v1/chat/completions", json=CHAT | {"stream": True})
    assert r.text.endswith("data: [DONE]\n\n") and '"b"' in r.text
    assert "x-raylm-retried" not in r.headers and other.sent == []


def test_a_stream_the_engine_died_on_mid_way_ends_with_an_error_event_then_done() -> None:
    engine, other = FakeVLLM(), OtherReplica(["answer"])
    engine.die = "mid"
    client, state = served(engine, other)
    r = client.post("/v1/chat/completions", json=CHAT | {"stream": True})
    events = [e for e in r.text.split("\n\n") if e]
    assert events[0].startswith('data: {"choices"')  # the token already sent stays
    assert json.loads(events[1].removeprefix("data: "))["error"]["code"] == "engine_dead"
    assert events[2] == "data: [DONE]" and len(events) == 3
    assert other.sent == [] and state.counts["stream_errors"] == 1


def test_a_stream_cut_by_the_app_raising_still_ends_with_the_error_event() -> None:
    engine = FakeVLLM()
    engine.die = "raise"
    client, _ = served(engine, OtherReplica([]))
    r = client.post("/v1/chat/completions", json=CHAT | {"stream": True})
    events = [e for e in r.text.split("\n\n") if e]
    assert "engine_dead" in events[-2] and events[-1] == "data: [DONE]"


def test_the_responses_api_gets_its_own_error_event() -> None:
    event = eh.error_event(responses=True)
    assert event.startswith(b"event: error\ndata: ")
    payload = json.loads(event.split(b"data: ", 1)[1])
    assert payload["type"] == "error" and payload["code"] == "engine_dead"
    assert eh.sse_events(b'event: response.created\ndata: {"type": "response.created"}')[0][0] == (
        "preamble"
    )


def test_the_watchdog_leaves_once_the_engine_is_dead_and_its_requests_are_answered() -> None:
    dead, left = [False], []
    state = eh.EngineState(lambda: dead[0])
    state.in_flight = 1

    def leave() -> None:
        left.append(state.in_flight)

    async def run() -> None:
        task = asyncio.create_task(ew.EngineWatchdog(state, leave, poll_s=0.01).run())
        await asyncio.sleep(0.05)
        assert not left  # alive: it keeps watching
        dead[0] = True
        await asyncio.sleep(0.05)
        assert not left and state.dead_since is not None  # dead, one request in flight
        state.in_flight = 0
        await asyncio.wait_for(task, 1)

    asyncio.run(run())
    assert left == [0]


def test_the_watchdog_does_not_wait_past_its_drain_bound() -> None:
    state, left = eh.EngineState(lambda: True), []
    state.in_flight = 5

    cleaned: list[bool] = []

    async def cleanup() -> None:
        cleaned.append(not left)  # before leaving

    asyncio.run(
        asyncio.wait_for(
            ew.EngineWatchdog(
                state, lambda: left.append(state.in_flight), cleanup, drain_s=0.1
            ).run(),
            2,
        )
    )
    assert cleaned == [True] and left == [5]


def test_an_engine_client_that_is_gone_counts_as_dead() -> None:
    def gone() -> bool:
        raise AttributeError("engine")

    assert eh.EngineState(gone).dead()


def test_a_failed_warm_up_fails_the_replica_with_a_clear_message() -> None:
    async def dies():
        raise RuntimeError("EngineCore encountered an issue")
        yield  # pragma: no cover

    with pytest.raises(ew.EngineWarmupError) as err:
        asyncio.run(ew.warm_up(dies, "tiny", timeout_s=5))
    message = str(err.value)
    assert "'tiny' could not serve a first request" in message
    assert "never reports RUNNING" in message and "EngineCore encountered" in message


def test_a_warm_up_that_hangs_or_yields_nothing_fails_too() -> None:
    async def hangs():
        await asyncio.sleep(10)
        yield 1

    async def empty():
        return
        yield  # pragma: no cover

    with pytest.raises(ew.EngineWarmupError, match="TimeoutError"):
        asyncio.run(ew.warm_up(hangs, "tiny", timeout_s=0.05))
    with pytest.raises(ew.EngineWarmupError, match="returned nothing"):
        asyncio.run(ew.warm_up(empty, "tiny", timeout_s=1))


def test_a_working_warm_up_returns() -> None:
    async def one_token():
        yield "a"

    asyncio.run(ew.warm_up(one_token, "tiny", timeout_s=1))


def test_a_dead_replica_leaves_itself_out_of_its_handles_next_pick() -> None:
    from types import SimpleNamespace

    from raylm.serve import ray_llm

    died: list[str] = []
    request_router = SimpleNamespace(on_replica_actor_died=died.append)
    handle = SimpleNamespace(_router=SimpleNamespace(_asyncio_router=SimpleNamespace(
        request_router=request_router)))  # fmt: skip
    assert ray_llm.exclude_replica(handle, "me") and died == ["me"]
    assert not ray_llm.exclude_replica(SimpleNamespace(_router=None), "me")  # no router yet


def test_the_watchdog_stays_until_the_front_end_has_marked_it_down() -> None:
    """Idle at once, it still waits for Serve's health check to see the death, then
    ``linger_s``: leaving earlier closes kept-alive connections HAProxy may be sending a
    request on."""
    state, left = eh.EngineState(lambda: True), []
    watchdog = ew.EngineWatchdog(state, lambda: left.append(time.monotonic()), poll_s=0.01,
                                 settle_s=0.01, linger_s=0.3)  # fmt: skip

    async def run() -> float:
        task = asyncio.create_task(watchdog.run())
        await asyncio.sleep(0.3)
        assert not left  # dead and idle, but no health check has reported it yet
        reported = time.monotonic()
        state.report_dead()
        await asyncio.wait_for(task, 2)
        return reported

    reported = asyncio.run(run())
    assert left and left[0] - reported >= 0.3


def test_the_front_end_markdown_time_follows_serves_haproxy_settings() -> None:
    on = {"RAY_SERVE_ENABLE_HA_PROXY": "1"}
    assert ew.front_end_markdown_s(on) == pytest.approx(5.5)  # Serve's defaults: 5 s + 2 x 250 ms
    tuned = on | {"RAY_SERVE_HAPROXY_HEALTH_CHECK_INTER": "2s",
                  "RAY_SERVE_HAPROXY_HEALTH_CHECK_FALL": "3",
                  "RAY_SERVE_HAPROXY_HEALTH_CHECK_FASTINTER": "100"}  # fmt: skip
    assert ew.front_end_markdown_s(tuned) == pytest.approx(2.3)  # a bare number is ms
    assert ew.front_end_markdown_s({}) == 0.0  # Serve's Python proxy: nothing to wait for
    with pytest.raises(ValueError, match=r"'5 sec' is not an HAProxy time"):
        ew.front_end_markdown_s(on | {"RAY_SERVE_HAPROXY_HEALTH_CHECK_INTER": "5 sec"})
