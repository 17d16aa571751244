"""raylm's ingress app: ray.serve.llm's, minus the per-chunk middleware, same error bodies."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import pytest
from fastapi import Request
from fastapi.testclient import TestClient
from ray.llm._internal.serve.core.configs.openai_api_models import OpenAIHTTPException
from ray.llm._internal.serve.core.ingress.ingress import init as ray_serve_llm_app
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.responses import PlainTextResponse, Response

from raylm.serve.builder import lean_app
from raylm.serve.checks import RequestChecks
from raylm.serve.ingress import RaylmIngress
from raylm.serve.validation import ApiError, hash_key


def test_lean_app_is_ray_serve_llms_without_the_exception_middleware() -> None:
    """If ray.serve.llm adds middleware or handlers, this fails: decide whether raylm needs it."""
    theirs, ours = ray_serve_llm_app(), lean_app()
    assert BaseHTTPMiddleware in [m.cls for m in theirs.user_middleware]
    assert [m.cls for m in ours.user_middleware] == [
        m.cls for m in theirs.user_middleware if m.cls is not BaseHTTPMiddleware
    ]
    assert ours.exception_handlers.keys() == theirs.exception_handlers.keys()


def guarded(raise_: Callable[[], None]) -> TestClient:
    """A lean app whose one route runs ``raise_`` under RaylmIngress's guard (key: sk-t)."""
    app = lean_app()
    ingress = SimpleNamespace(_checks=RequestChecks({"key_hashes": [hash_key("sk-t")]}))

    async def handler() -> Response:
        raise_()
        return PlainTextResponse("ok")

    @app.post("/v1/completions")
    async def route(request: Request) -> Response:
        return await RaylmIngress._guard(ingress, request, handler)

    return TestClient(app)  # an exception escaping the route fails the test


def post(client: TestClient, key: str = "sk-t") -> dict:
    r = client.post(
        "/v1/completions",
        headers={"Authorization": f"Bearer {key}", "X-Request-Id": "req-7"},
    )
    return {"status": r.status_code, **r.json()} if r.status_code != 200 else {"status": 200}


def engine_rejects() -> None:
    raise OpenAIHTTPException(message="logprobs must be <= 20", status_code=400, type="BadRequest")


def bug() -> None:
    raise RuntimeError("secret internal detail")


def test_guard_answers_engine_errors_with_their_status_and_the_request_id() -> None:
    out = post(guarded(engine_rejects))
    assert out["status"] == 400
    assert "logprobs must be <= 20" in out["error"]["message"]
    assert "req-7" in out["error"]["message"]


def test_guard_answers_unexpected_errors_with_a_plain_500() -> None:
    out = post(guarded(bug))
    assert out["status"] == 500 and out["error"]["type"] == "InternalServerError"


@pytest.mark.parametrize("key", ["", "sk-wrong"])
def test_guard_checks_the_key_before_running_the_handler(key: str) -> None:
    ran = []
    out = post(guarded(lambda: ran.append(1)), key=key)
    assert out["status"] == 401 and ran == []


def test_guard_passes_the_handlers_response_through() -> None:
    assert post(guarded(lambda: None)) == {"status": 200}


def test_api_errors_keep_raylms_field_naming_body() -> None:
    def bad_field() -> None:
        raise ApiError(400, "Invalid 'top_p'", param="top_p", code="invalid_value")

    out = post(guarded(bad_field))
    assert out["status"] == 400 and out["error"]["param"] == "top_p"
