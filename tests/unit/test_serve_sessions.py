"""/v1/responses in front of a stand-in for vLLM's app, called with the real `openai` client:
the stored history reaches the engine, another key sees nothing, retention is named, and
two middlewares (two replicas) on one store continue each other's conversations."""

from __future__ import annotations

import json
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
from raylm.serve.responses import Conversations
from raylm.serve.store import SqliteStore, new_response_id, open_store
from raylm.serve.validation import hash_key

KEYS = ("sk-alice", "sk-bob")
CARD = {"id": "tiny", "object": "model", "owned_by": "raylm"}


class Engine:
    """Stands in for vLLM's stateless Responses route: answers with how many input items
    it saw, so a test can tell whether the history reached it."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []

    def response(self, body: dict, status: str = "completed") -> dict:
        n = len(body["input"])
        text = f"saw {n} items"
        return {
            "id": body["request_id"],
            "object": "response",
            "created_at": int(time.time()),
            "model": body["model"],
            "status": status,
            "output": [
                {
                    "id": f"msg_{n}",
                    "type": "message",
                    "role": "assistant",
                    "status": "completed",
                    "content": [{"type": "output_text", "text": text, "annotations": []}],
                }
            ],
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "store": body["store"],
            "previous_response_id": body.get("previous_response_id"),
            "usage": {
                "input_tokens": n,
                "output_tokens": 3,
                "total_tokens": n + 3,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens_details": {"reasoning_tokens": 0},
            },
        }

    async def create(self, request: Request) -> JSONResponse | StreamingResponse:
        body = json.loads(await request.body())
        self.bodies.append(body)
        done = self.response(body)
        if not body.get("stream"):
            return JSONResponse(done)

        async def events():
            start = {**done, "status": "in_progress", "output": []}
            yield sse("response.created", {"type": "response.created", "response": start})
            delta = {"type": "response.output_text.delta", "delta": "saw", "item_id": "m",
                     "output_index": 0, "content_index": 0, "logprobs": []}  # fmt: skip
            yield sse("response.output_text.delta", delta)
            yield sse("response.completed", {"type": "response.completed", "response": done})

        return StreamingResponse(events(), media_type="text/event-stream")

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/v1/responses", self.create, methods=["POST"])])


def sse(kind: str, payload: dict) -> str:
    return f"event: {kind}\ndata: {json.dumps(payload)}\n\n"


def replica(engine: Engine, store: object, name: str) -> TestClient:
    settings = {
        "key_hashes": [hash_key(k) for k in KEYS],
        "models": {"tiny": {"max_model_len": 64}},
    }
    app = ChecksMiddleware(
        engine.app(),
        settings=settings,
        cards={"tiny": CARD},
        load_adapter=None,  # type: ignore[arg-type]
        conversations=Conversations(store, replica=name),  # type: ignore[arg-type]
    )
    return TestClient(app)


@pytest.fixture
def replicas(tmp_path: Path) -> tuple[Engine, TestClient, TestClient]:
    """Two replicas (each its own store object) on one SQLite file."""
    engine = Engine()
    path = str(tmp_path / "s.sqlite")
    one = replica(engine, SqliteStore(path, 60), "r1")
    two = replica(engine, SqliteStore(path, 60), "r2")
    return engine, one, two


def client(http: TestClient, key: str = KEYS[0]) -> openai.OpenAI:
    return openai.OpenAI(
        base_url="http://testserver/v1", api_key=key, http_client=http, max_retries=0
    )


def test_a_conversation_continues_on_the_other_replica(replicas) -> None:
    engine, one, two = replicas
    first = client(one).responses.create(model="tiny", input="hello", instructions="be brief")
    assert first.output_text == "saw 1 items" and first.store is True
    assert first.previous_response_id is None
    second = client(two).responses.create(model="tiny", input="more", previous_response_id=first.id)
    # the engine got: turn 1's input, its output, the new input (instructions do not carry)
    assert second.output_text == "saw 3 items"
    assert second.previous_response_id == first.id and second.id != first.id
    sent = engine.bodies[-1]
    assert "previous_response_id" not in sent and sent["store"] is False
    assert [i.get("role") for i in sent["input"]] == ["user", "assistant", "user"]
    assert "instructions" not in sent
    third = client(one).responses.create(
        model="tiny", input=[{"role": "user", "content": "again"}], previous_response_id=second.id
    )
    assert third.output_text == "saw 5 items"
    # retrieval from either replica, deletion from the other
    assert client(two).responses.retrieve(first.id).output_text == "saw 1 items"
    items = client(one).responses.input_items.list(third.id)
    assert [i.role for i in items.data] == ["user", "assistant", "user", "assistant", "user"]
    assert (
        items.data[0].content[0].type == "input_text" and items.data[0].content[0].text == "again"
    )
    assert items.data[-1].content[0].text == "hello" and items.data[-1].id
    client(two).responses.delete(second.id)
    with pytest.raises(openai.NotFoundError):
        client(one).responses.retrieve(second.id)
    # a later turn holds its whole history: deleting an earlier one does not break it
    assert client(two).responses.retrieve(third.id).id == third.id


def test_replica_header_names_who_answered(replicas) -> None:
    _, _, two = replicas
    raw = client(two).responses.with_raw_response.create(model="tiny", input="x")
    assert raw.headers["x-raylm-replica"] == "r2"


def test_another_key_gets_404_never_403(replicas) -> None:
    _, one, two = replicas
    first = client(one).responses.create(model="tiny", input="secret")
    bob = client(two, KEYS[1])
    for call in (
        lambda: bob.responses.retrieve(first.id),
        lambda: bob.responses.delete(first.id),
        lambda: bob.responses.create(model="tiny", input="x", previous_response_id=first.id),
    ):
        with pytest.raises(openai.NotFoundError) as err:
            call()
        assert first.id in str(err.value)
    assert client(one).responses.retrieve(first.id).id == first.id
    with pytest.raises(openai.AuthenticationError):
        client(one, "sk-nobody").responses.retrieve(first.id)


def test_expired_response_names_the_retention(tmp_path: Path) -> None:
    http = replica(Engine(), open_store(f"sqlite://{tmp_path}/s.sqlite", 3600), "r")
    old = new_response_id(time.time() - 7200)
    with pytest.raises(openai.NotFoundError, match=r"older than .*sessions.retention_s=3600"):
        client(http).responses.create(model="tiny", input="x", previous_response_id=old)
    with pytest.raises(openai.NotFoundError, match=r"sessions\.retention_s"):
        client(http).responses.retrieve(new_response_id())


def test_store_false_is_not_kept_and_streaming_is_stored(replicas) -> None:
    _, one, two = replicas
    unstored = client(one).responses.create(model="tiny", input="x", store=False)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        client(two).responses.retrieve(unstored.id)
    events = list(client(one).responses.create(model="tiny", input="hi", stream=True))
    kinds = [e.type for e in events]
    assert kinds == ["response.created", "response.output_text.delta", "response.completed"]
    done = events[-1].response
    assert done.store is True
    later = client(two).responses.create(model="tiny", input="on", previous_response_id=done.id)
    assert later.output_text == "saw 3 items"


def test_requests_are_checked_before_the_engine(replicas) -> None:
    engine, one, _ = replicas
    bad = [
        ({"model": "tiny", "input": "x", "background": True}, "background"),
        ({"model": "tiny", "input": "x", "temperature": 9}, "temperature"),
        ({"model": "tiny", "input": "x", "max_output_tokens": 65}, "max_output_tokens"),
        ({"model": "nope", "input": "x"}, "model"),
        ({"model": "tiny", "input": 3}, "input"),
        ({"model": "tiny", "input": "x", "previous_response_id": 5}, "previous_response_id"),
    ]
    for body, param in bad:
        r = one.post("/v1/responses", json=body, headers={"Authorization": f"Bearer {KEYS[0]}"})
        assert r.status_code in (400, 404), (body, r.text)
        assert r.json()["error"]["param"] == param
    assert engine.bodies == []
    assert one.post("/v1/responses", json={"model": "tiny", "input": "x"}).status_code == 401


def test_a_client_cannot_choose_the_stored_id(replicas) -> None:
    engine, one, _ = replicas
    r = client(one).responses.create(
        model="tiny", input="x", extra_body={"request_id": "resp_chosen"}
    )
    assert r.id != "resp_chosen" and engine.bodies[-1]["request_id"] == r.id


def test_a_store_that_is_down_gives_503_and_store_false(replicas) -> None:
    class Down:
        retention_s = 60.0

        async def get(self, *a: object) -> None:
            raise ConnectionError("refused")

        async def put(self, *a: object) -> None:
            raise ConnectionError("refused")

        async def delete(self, *a: object) -> None:
            raise ConnectionError("refused")

    http = replica(Engine(), Down(), "r")
    r = client(http).responses.create(model="tiny", input="x")
    assert r.store is False  # answered, but never an id that cannot be continued
    with pytest.raises(openai.InternalServerError, match="store is unavailable"):
        client(http).responses.create(model="tiny", input="x", previous_response_id=r.id)
    with pytest.raises(openai.InternalServerError, match="store is unavailable"):
        client(http).responses.delete(r.id)
