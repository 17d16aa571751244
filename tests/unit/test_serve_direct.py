"""raylm's checks in front of vLLM's app (direct streaming), against a recording ASGI app."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from raylm.serve.direct import ChecksMiddleware
from raylm.serve.validation import hash_key

KEY = {"Authorization": "Bearer sk-t"}
CARD = {"id": "tiny", "object": "model", "owned_by": "raylm", "metadata": {"x": 1}}


class Engine:
    """Stands in for vLLM's app: records what reached it, streams three chunks back."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.loaded: list[str] = []

    async def load_adapter(self, model: str) -> None:
        if model.endswith(":broken"):
            raise RuntimeError("bad safetensors header")
        self.loaded.append(model)

    async def generate(self, request: Request) -> StreamingResponse:
        self.bodies.append(await request.body())

        async def chunks():
            for i in range(3):
                yield f"data: {i}\n\n"

        return StreamingResponse(chunks(), media_type="text/event-stream")

    async def anything(self, request: Request) -> JSONResponse:
        return JSONResponse({"reached": request.url.path})

    def app(self) -> Starlette:
        routes = [Route(p, self.generate, methods=["POST"]) for p in ("/v1/completions",)]
        routes += [Route(p, self.generate, methods=["POST"]) for p in ("/v1/chat/completions",)]
        routes += [Route("/{path:path}", self.anything, methods=["GET", "POST"])]
        return Starlette(routes=routes)


def make_adapter(root: Path, name: str) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "adapter_config.json").write_text("{}")


@pytest.fixture
def served(tmp_path: Path) -> tuple[TestClient, Engine, Path]:
    adapters = tmp_path / "adapters"
    make_adapter(adapters, "a1")
    settings = {
        "key_hashes": [hash_key("sk-t")],
        "max_request_bytes": 4096,
        "max_n": 4,
        "models": {"tiny": {"max_model_len": 64, "adapters_dir": str(adapters)}},
    }
    engine = Engine()
    app = ChecksMiddleware(
        engine.app(), settings=settings, cards={"tiny": CARD}, load_adapter=engine.load_adapter
    )
    return TestClient(app), engine, adapters


def test_a_valid_request_reaches_the_engine_byte_for_byte_and_streams_back(served) -> None:
    client, engine, _ = served
    raw = b'{"model": "tiny:a1",  "prompt": "hi", "stream": true}'
    r = client.post("/v1/completions", content=raw, headers=KEY)
    assert r.status_code == 200 and r.text == "data: 0\n\ndata: 1\n\ndata: 2\n\n"
    assert engine.bodies == [raw]
    assert engine.loaded == ["tiny:a1"]  # the adapter was loaded before the engine ran


def test_base_model_requests_load_no_adapter(served) -> None:
    client, engine, _ = served
    r = client.post("/v1/completions", json={"prompt": "hi"}, headers=KEY)  # model defaults
    assert r.status_code == 200 and engine.loaded == [] and len(engine.bodies) == 1


def test_an_adapter_that_fails_to_load_is_a_500_naming_it(served) -> None:
    client, engine, adapters = served
    make_adapter(adapters, "broken")
    r = client.post("/v1/completions", json={"model": "tiny:broken", "prompt": "x"}, headers=KEY)
    assert r.status_code == 500 and "tiny:broken" in r.json()["error"]["message"]
    assert "bad safetensors header" in r.json()["error"]["message"]
    assert engine.bodies == []


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}])
def test_key_is_checked_before_the_body_is_parsed(served, headers) -> None:
    client, engine, _ = served
    r = client.post("/v1/chat/completions", content=b"{not json", headers=headers)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert engine.bodies == []


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "tiny", "prompt": "x", "temperature": 7}, 400, "temperature"),
        ({"model": "tiny", "prompt": "x", "n": 5}, 400, "n"),
        ({"model": "tiny", "prompt": "x", "max_tokens": 65}, 400, "max_tokens"),
        ({"model": "gpt-4", "prompt": "x"}, 404, "model"),
        ({"model": "tiny:nope", "prompt": "x"}, 404, "model"),
        ({"model": "tiny", "prompt": ""}, 400, "prompt"),
    ],
)
def test_bad_fields_are_refused_by_name_and_never_reach_the_engine(
    served, body, status, param
) -> None:
    client, engine, _ = served
    r = client.post("/v1/completions", json=body, headers=KEY)
    assert r.status_code == status and r.json()["error"]["param"] == param
    assert param in r.json()["error"]["message"]
    assert engine.bodies == []


def test_chat_messages_are_checked(served) -> None:
    client, engine, _ = served
    r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": []}, headers=KEY)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    ok = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    assert client.post("/v1/chat/completions", json=ok, headers=KEY).status_code == 200
    assert len(engine.bodies) == 1


def test_oversized_and_malformed_bodies(served) -> None:
    client, engine, _ = served
    big = json.dumps({"model": "tiny", "prompt": "x" * 5000}).encode()
    assert client.post("/v1/completions", content=big, headers=KEY).status_code == 413

    def chunked():  # no Content-Length: the limit holds while reading
        yield big[:3000]
        yield big[3000:]

    assert client.post("/v1/completions", content=chunked(), headers=KEY).status_code == 413
    r = client.post("/v1/completions", content=b"[1, 2]", headers=KEY)
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]
    assert engine.bodies == []


def test_models_lists_adapters_on_disk_now(served) -> None:
    client, _, adapters = served
    ids = [m["id"] for m in client.get("/v1/models", headers=KEY).json()["data"]]
    assert ids == ["tiny", "tiny:a1"]
    make_adapter(adapters, "a2")
    shutil.rmtree(adapters / "a1")
    ids = [m["id"] for m in client.get("/v1/models", headers=KEY).json()["data"]]
    assert ids == ["tiny", "tiny:a2"]
    card = client.get("/v1/models/tiny:a2", headers=KEY).json()
    assert card["metadata"] == {"x": 1, "base_model_id": "tiny", "lora": True}
    assert client.get("/v1/models/tiny:a1", headers=KEY).status_code == 404
    assert client.get("/v1/models", headers={}).status_code == 401


def test_probes_pass_and_every_other_route_is_refused(served) -> None:
    client, _, _ = served
    assert client.get("/-/healthz").json() == {"reached": "/-/healthz"}
    assert client.get("/health").json() == {"reached": "/health"}
    for path in ("/tokenize", "/v1/embeddings", "/v1/load_lora_adapter", "/metrics", "/healthz"):
        assert client.post(path, headers={}).status_code == 401
        r = client.post(path, headers=KEY)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_routes_are_matched_below_the_apps_route_prefix(served) -> None:
    client, engine, _ = served
    prefixed = TestClient(client.app, root_path="/lm")
    raw = b'{"model": "tiny", "prompt": "hi"}'
    r = prefixed.post("/lm/v1/completions", content=raw, headers=KEY)
    assert r.status_code == 200 and engine.bodies == [raw]
    assert prefixed.post("/lm/v1/completions", json={"prompt": 1}, headers=KEY).status_code == 400


def test_adapters_in_a_bucket_are_listed_and_looked_up_off_the_event_loop(
    s3_bucket: str,
) -> None:
    """A found adapter is remembered (no request per call); an absent one is asked for
    each time, so one uploaded later is served."""
    from raylm import storage
    from raylm.serve import checks

    root = storage.join(s3_bucket, "direct-adapters")
    storage.write_text(storage.join(root, "a1", "adapter_config.json"), "{}")
    settings = {"models": {"tiny": {"max_model_len": 64, "adapters_dir": root}}}
    engine = Engine()
    app = ChecksMiddleware(
        engine.app(), settings=settings, cards={"tiny": CARD}, load_adapter=engine.load_adapter
    )
    client = TestClient(app)
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["tiny", "tiny:a1"]
    assert (
        client.post("/v1/completions", json={"model": "tiny:a1", "prompt": "x"}).status_code == 200
    )
    storage.delete_dir(storage.join(root, "a1"))
    # Still counted as present for ADAPTER_SEEN_S: no bucket request on the hot path.
    assert (
        client.post("/v1/completions", json={"model": "tiny:a1", "prompt": "x"}).status_code == 200
    )
    assert checks.ADAPTER_SEEN_S >= 10
    assert (
        client.post("/v1/completions", json={"model": "tiny:a2", "prompt": "x"}).status_code == 404
    )
    storage.write_text(storage.join(root, "a2", "adapter_config.json"), "{}")
    assert (
        client.post("/v1/completions", json={"model": "tiny:a2", "prompt": "x"}).status_code == 200
    )
    assert engine.loaded == ["tiny:a1", "tiny:a1", "tiny:a2"]
