"""raylm's HTTP ingress: ray.serve.llm's OpenAiIngress plus auth, checks and local LoRA.

``build_openai_app`` accepts an ingress class (``ingress_cls_config``); this one keeps
OpenAiIngress's routing, streaming and error handling, and takes the raw request on
every route so it can run raylm's request checks (``raylm.serve.checks``: API key, body
size, JSON, model, parameters, prompt length) and only then build the typed request and
hand it to OpenAiIngress. Every rejection is an OpenAI-style error body naming the
field; none reaches an engine, so a bad request cannot disturb others. With direct
streaming (the default) the same checks run in ``raylm.serve.direct`` instead.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from pydantic import ValidationError
from ray.llm._internal.serve.core.configs.openai_api_models import (
    ChatCompletionRequest,
    CompletionRequest,
)
from ray.llm._internal.serve.core.ingress.ingress import OpenAiIngress
from ray.llm._internal.serve.core.ingress.middleware import get_request_id
from ray.llm._internal.serve.utils.server_utils import get_response_for_error
from starlette.responses import JSONResponse, Response

from raylm.serve.checks import RequestChecks
from raylm.serve.validation import ApiError


class RaylmIngress(OpenAiIngress):
    """OpenAiIngress with auth, request checks and filesystem LoRA adapters."""

    def __init__(
        self,
        llm_deployments: dict,
        model_cards: dict,
        *,
        lora_paths: dict | None = None,
        settings: dict | None = None,
    ) -> None:
        super().__init__(llm_deployments, model_cards, lora_paths=lora_paths)
        self._checks = RequestChecks(settings)

    # ---- routes (names match ray.serve.llm's DEFAULT_ENDPOINTS) ----

    async def models(self, request: Request) -> Response:
        return await self._guard(request, self._list_models)

    async def model_data(self, model: str, request: Request) -> Response:
        async def one() -> Response:
            return JSONResponse(self._checks.model_card(model, self._cards()))

        return await self._guard(request, one)

    async def completions(self, request: Request) -> Response:
        return await self._guard(request, lambda: self._generate(request, chat=False))

    async def chat(self, request: Request) -> Response:
        return await self._guard(request, lambda: self._generate(request, chat=True))

    async def embeddings(self, request: Request) -> Response:
        return await self._guard(request, self._unsupported)

    async def transcriptions(self, request: Request) -> Response:
        return await self._guard(request, self._unsupported)

    async def score(self, request: Request) -> Response:
        return await self._guard(request, self._unsupported)

    async def tokenize(self, request: Request) -> Response:
        return await self._guard(request, self._unsupported)

    async def detokenize(self, request: Request) -> Response:
        return await self._guard(request, self._unsupported)

    # ---- implementation ----

    async def _guard(self, request: Request, handler: Any) -> Response:
        """Auth first, then the handler; any error becomes its OpenAI error body.

        Errors are answered here rather than by an exception middleware: such a
        middleware would sit around every streamed chunk too (raylm.serve.builder).
        """
        try:
            self._checks.auth(request.headers.get("authorization"))
            return await handler()
        except ApiError as err:
            return JSONResponse(err.body(), status_code=err.status)
        except Exception as err:  # the engine's and router's errors, as ray.serve.llm maps them
            body = get_response_for_error(err, get_request_id(request))
            return JSONResponse(body.model_dump(), status_code=body.error.code)

    async def _unsupported(self) -> Response:
        raise ApiError(404, "This endpoint is not served by raylm", code="not_found")

    async def _list_models(self) -> Response:
        return JSONResponse({"object": "list", "data": self._checks.model_cards(self._cards())})

    def _cards(self) -> dict[str, dict[str, Any]]:
        return {base: card.model_dump() for base, card in self._model_cards.items()}

    async def _generate(self, request: Request, chat: bool) -> Response:
        raw = await self._checks.read_body(request.headers.get("content-length"), request.stream())
        body = await self._checks.check_generate(raw, chat, list(self._model_cards))
        try:
            typed = (ChatCompletionRequest if chat else CompletionRequest).model_validate(body)
        except ValidationError as err:
            first = err.errors()[0]
            param = ".".join(str(p) for p in first.get("loc", ())) or None
            raise ApiError(
                400, f"Invalid '{param}': {first.get('msg')}", param=param, code="invalid_value"
            ) from None
        method = "chat" if chat else "completions"
        return await self._process_llm_request(typed, call_method=method, raw_request=request)
