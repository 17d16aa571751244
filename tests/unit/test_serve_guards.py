"""The guard rails in front of a stand-in for vLLM, called with the real `openai` client:
per-key request and token budgets (429 + Retry-After), the max_tokens cap, content-part
and role validation, the blocklist and PII filters, and the access log."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import openai
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from raylm.serve.direct import ChecksMiddleware
from raylm.serve.guards import ACCESS_LOGGER, RateLimiter
from raylm.serve.validation import ApiError, hash_key

KEYS = ("sk-alice", "sk-bob")
CARD = {"id": "tiny", "object": "model", "owned_by": "raylm"}


class Engine:
    """Stands in for vLLM's chat route: answers with the last message's text (so a test
    sees what reached it, and can make it say a blocked word), 5 prompt + 3 completion
    tokens, streamed with a usage-only chunk when ``stream_options.include_usage``."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []

    async def chat(self, request: Request) -> JSONResponse | StreamingResponse:
        body = json.loads(await request.body())
        self.bodies.append(body)
        content = body["messages"][-1]["content"]
        text = content if isinstance(content, str) else content[0]["text"]
        usage = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
        base = {"id": "c1", "object": "chat.completion", "created": 1, "model": body["model"]}
        if not body.get("stream"):
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "finish_reason": "stop"}  # fmt: skip
            # "retry me": answered as the engine guard answers a re-sent request
            marked = {"x-raylm-retried": "1"} if text == "retry me" else {}
            return JSONResponse({**base, "choices": [choice], "usage": usage}, headers=marked)

        async def events():
            chunk = {**base, "object": "chat.completion.chunk"}
            delta = {"index": 0, "delta": {"content": text}, "finish_reason": "stop"}
            yield f"data: {json.dumps({**chunk, 'choices': [delta]})}\n\n"
            if (body.get("stream_options") or {}).get("include_usage"):
                yield f"data: {json.dumps({**chunk, 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/v1/chat/completions", self.chat, methods=["POST"])])


def served(engine: Engine, **settings: object) -> TestClient:
    checks = {
        "key_hashes": [hash_key(k) for k in KEYS],
        "models": {"tiny": {"max_model_len": 64}},
        **settings,
    }
    app = ChecksMiddleware(
        engine.app(), settings=checks, cards={"tiny": CARD}, load_adapter=None, replica="r1"
    )  # type: ignore[arg-type]
    return TestClient(app)


def client(http: TestClient, key: str = KEYS[0]) -> openai.OpenAI:
    return openai.OpenAI(
        base_url="http://testserver/v1", api_key=key, http_client=http, max_retries=0
    )


def chat(http: TestClient, text: object = "hello", key: str = KEYS[0], **kw: object):
    messages = [{"role": "user", "content": text}]
    return client(http, key).chat.completions.create(model="tiny", messages=messages, **kw)


def test_requests_per_minute_gives_429_with_retry_after_per_key() -> None:
    http = served(Engine(), requests_per_minute=2)
    chat(http), chat(http)
    with pytest.raises(openai.RateLimitError) as err:
        chat(http)
    assert err.value.code == "rate_limit_exceeded"
    assert "requests_per_minute" in err.value.message
    assert int(err.value.response.headers["retry-after"]) == 30  # 1 request at 2/min
    assert chat(http, key=KEYS[1]).choices[0].message.content == "hello"  # bob's own bucket


def test_tokens_per_minute_counts_usage_also_of_streams_the_client_did_not_ask_usage_for() -> None:
    engine = Engine()
    http = served(engine, tokens_per_minute=12)
    chat(http)  # 8 tokens: 4 left
    chunks = list(chat(http, stream=True))  # the checks asked vLLM for usage...
    assert engine.bodies[-1]["stream_options"] == {"include_usage": True}
    assert [c.usage for c in chunks] == [None]  # ...and kept it from the client
    assert chunks[0].choices[0].delta.content == "hello"
    with pytest.raises(openai.RateLimitError) as err:  # 16 > 12: in debt
        chat(http)
    assert "tokens_per_minute" in err.value.message
    assert int(err.value.response.headers["retry-after"]) == 20  # 4 tokens at 12/min
    asked = list(chat(http, key=KEYS[1], stream=True, stream_options={"include_usage": True}))
    assert asked[-1].usage.total_tokens == 8


def test_buckets_refill_continuously_up_to_a_minute() -> None:
    limiter = RateLimiter(requests_per_minute=60, tokens_per_minute=600)
    for _ in range(60):
        limiter.check("k", now=0.0)
    with pytest.raises(ApiError) as err:
        limiter.check("k", now=0.5)
    assert err.value.status == 429 and err.value.headers == {"retry-after": "1"}
    limiter.check("k", now=1.0)  # one refilled
    limiter.spend("k", 700, now=1.0)  # 100 in debt
    with pytest.raises(ApiError) as err:
        limiter.check("k", now=2.0)  # 90 in debt
    assert err.value.headers == {"retry-after": "9"} and "tokens_per_minute" in err.value.message
    limiter.check("k", now=1000.0)  # both full again, never above a minute's worth
    assert limiter._requests["k"].level == 59 and limiter._tokens["k"].level == 600


def test_max_tokens_is_capped_and_filled_in() -> None:
    engine = Engine()
    http = served(engine, max_tokens=16)
    chat(http)
    assert engine.bodies[-1]["max_completion_tokens"] == 16
    chat(http, max_tokens=8)
    assert engine.bodies[-1]["max_tokens"] == 8 and "max_completion_tokens" not in engine.bodies[-1]
    with pytest.raises(openai.BadRequestError) as err:
        chat(http, max_tokens=17)
    assert err.value.param == "max_tokens" and "limits.max_tokens" in err.value.message


def test_request_body_limit_is_413_naming_it() -> None:
    http = served(Engine(), max_request_bytes=200)
    with pytest.raises(openai.APIStatusError) as err:
        chat(http, "x" * 300)
    assert err.value.status_code == 413 and "limits.max_request_bytes" in err.value.message


def test_content_parts_and_roles() -> None:
    engine = Engine()
    http = served(engine)
    parts = [{"type": "text", "text": "hi"}, {"type": "text", "text": "there"}]
    assert chat(http, parts).choices[0].message.content == "hi"
    image = [parts[0], {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]
    with pytest.raises(openai.BadRequestError) as err:
        chat(http, image)
    assert err.value.param == "messages[0].content[1]"
    assert "'image_url'" in err.value.message and "text" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        client(http).chat.completions.create(
            model="tiny", messages=[{"role": "wizard", "content": "hi"}]
        )
    assert err.value.param == "messages[0].role" and "wizard" in err.value.message
    assert len(engine.bodies) == 1


@pytest.fixture
def blocklist(tmp_path: Path) -> str:
    path = tmp_path / "block.txt"
    path.write_text("# blocked\nforbidden word\n禁词\n")
    return str(path)


def test_blocklist_refuses_input_and_withholds_output(blocklist: str) -> None:
    engine = Engine()
    http = served(engine, filters={"blocklist": [blocklist], "output": True})
    with pytest.raises(openai.BadRequestError) as err:
        chat(http, "say the Forbidden Word please")
    assert err.value.code == "content_filter" and err.value.param == "messages[0].content"
    with pytest.raises(openai.BadRequestError):
        chat(http, [{"type": "text", "text": "这是禁词"}])
    assert engine.bodies == []
    assert chat(http, "forbidden words are fine").choices[0].message.content  # whole words
    with pytest.raises(openai.BadRequestError) as err:
        chat(http, stream=True)
    assert err.value.param == "stream"


def test_output_filter_withholds_a_blocked_choice(blocklist: str) -> None:
    """The stand-in echoes its input; with input filtering passed (the phrase arrives in
    an assistant turn the client sent), the output check is what catches it."""
    engine = Engine()
    http = served(engine, filters={"blocklist": [blocklist], "output": True})
    http.app.filters.check_input = lambda body, route: False  # isolate the output side
    out = chat(http, "a forbidden word")
    assert out.choices[0].message.content == "" and out.choices[0].finish_reason == "content_filter"
    assert out.usage.total_tokens == 8


def test_pii_is_scrubbed_before_the_engine_sees_it() -> None:
    engine = Engine()
    http = served(engine, filters={"pii": True})
    out = chat(http, "mail bob@example.com or call +1 415 555 0100")
    assert out.choices[0].message.content == "mail <EMAIL> or call <PHONE>"
    assert "example.com" not in json.dumps(engine.bodies)


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(record.getMessage()))


@pytest.fixture
def access() -> Lines:
    handler = Lines()
    logging.getLogger(ACCESS_LOGGER).addHandler(handler)
    yield handler
    logging.getLogger(ACCESS_LOGGER).removeHandler(handler)


def test_access_log_has_one_json_line_per_request_without_prompts(access: Lines) -> None:
    http = served(Engine(), requests_per_minute=1)
    chat(http, "secret prompt")
    with pytest.raises(openai.RateLimitError):
        chat(http, "secret prompt")
    with pytest.raises(openai.AuthenticationError):
        chat(http, key="sk-nobody")
    ok, limited, denied = access.lines
    assert ok["status"] == 200 and ok["model"] == "tiny" and ok["route"] == "/v1/chat/completions"
    assert (ok["prompt_tokens"], ok["completion_tokens"]) == (5, 3)
    assert ok["key"] == hash_key(KEYS[0])[:12] and ok["replica"] == "r1"
    assert 0 <= ok["latency_ms"] < 10_000 and abs(ok["time"] - time.time()) < 60
    assert limited["status"] == 429 and denied["status"] == 401
    assert not ok["retried"]
    chat(served(Engine()), "retry me")
    assert access.lines[-1]["retried"] is True and access.lines[-1]["status"] == 200
    assert "secret" not in json.dumps(access.lines) and KEYS[0] not in json.dumps(access.lines)


def test_access_log_has_prompts_only_when_asked(access: Lines) -> None:
    http = served(Engine(), log_prompts=True)
    chat(http, "visible prompt")
    assert access.lines[-1]["prompt"] == [{"role": "user", "content": "visible prompt"}]


class ResponsesEngine:
    """Stands in for vLLM's stateless /v1/responses: answers with the last input text,
    4 input + 2 output tokens."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []

    async def create(self, request: Request) -> JSONResponse:
        body = json.loads(await request.body())
        self.bodies.append(body)
        last = body["input"][-1]["content"]
        text = last if isinstance(last, str) else last[0]["text"]
        item = {"id": "m", "type": "message", "role": "assistant", "status": "completed",
                "content": [{"type": "output_text", "text": text, "annotations": []}]}  # fmt: skip
        usage = {"input_tokens": 4, "output_tokens": 2, "total_tokens": 6,
                 "input_tokens_details": {"cached_tokens": 0},
                 "output_tokens_details": {"reasoning_tokens": 0}}  # fmt: skip
        return JSONResponse(
            {
                "id": body["request_id"],
                "object": "response",
                "created_at": 1,
                "status": "completed",
                "model": body["model"],
                "output": [item],
                "parallel_tool_calls": True,
                "tool_choice": "auto",
                "tools": [],
                "usage": usage,
            }
        )

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/v1/responses", self.create, methods=["POST"])])


def responses_app(engine: ResponsesEngine, tmp_path: Path, **settings: object) -> TestClient:
    from raylm.serve.responses import Conversations
    from raylm.serve.store import SqliteStore

    checks = {"key_hashes": [hash_key(k) for k in KEYS],
              "models": {"tiny": {"max_model_len": 64}}, **settings}  # fmt: skip
    conv = Conversations(SqliteStore(str(tmp_path / "s.sqlite"), 60))
    app = ChecksMiddleware(
        engine.app(), settings=checks, cards={"tiny": CARD}, load_adapter=None, conversations=conv
    )  # type: ignore[arg-type]
    return TestClient(app)


def test_responses_are_budgeted_capped_and_validated(tmp_path: Path) -> None:
    engine = ResponsesEngine()
    c = client(responses_app(engine, tmp_path, tokens_per_minute=10, max_tokens=16))
    first = c.responses.create(model="tiny", input="hello")  # 6 tokens
    assert engine.bodies[-1]["max_output_tokens"] == 16
    c.responses.retrieve(first.id), c.responses.retrieve(first.id)  # not charged again
    c.responses.create(model="tiny", input="again", previous_response_id=first.id)  # 12
    with pytest.raises(openai.RateLimitError) as err:
        c.responses.create(model="tiny", input="more")
    assert "tokens_per_minute" in err.value.message and err.value.response.headers["retry-after"]
    other = client(responses_app(ResponsesEngine(), tmp_path), KEYS[1])
    image = {"type": "input_image", "image_url": "http://x/y.png"}
    with pytest.raises(openai.BadRequestError) as err:
        other.responses.create(
            model="tiny",
            input=[{"role": "user", "content": [{"type": "input_text", "text": "a"}, image]}],
        )
    assert err.value.param == "input[0].content[1]" and "input_image" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        other.responses.create(model="tiny", input=[{"role": "wizard", "content": "hi"}])
    assert err.value.param == "input[0].role"


def test_responses_filters(tmp_path: Path, blocklist: str) -> None:
    engine = ResponsesEngine()
    http = responses_app(engine, tmp_path, filters={"blocklist": [blocklist], "pii": True})
    c = client(http)
    with pytest.raises(openai.BadRequestError) as err:
        c.responses.create(model="tiny", input="a forbidden word")
    assert err.value.code == "content_filter" and err.value.param == "input"
    out = c.responses.create(model="tiny", input="write to bob@example.com")
    assert out.output_text == "write to <EMAIL>"
    http.app.filters.check_input = lambda body, route: False  # isolate the output side
    out = c.responses.create(model="tiny", input="a forbidden word")
    assert out.output_text == "" and out.incomplete_details.reason == "content_filter"
