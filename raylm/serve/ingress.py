"""raylm's HTTP ingress: ray.serve.llm's OpenAiIngress plus auth, checks and local LoRA.

``build_openai_app`` accepts an ingress class (``ingress_cls_config``); this one keeps
OpenAiIngress's routing, streaming and error handling, and takes the raw request on
every route so it can, in order: check the API key (before the body is even parsed, so
an anonymous client learns nothing), enforce the body size, parse JSON, check the model
and parameters, count prompt tokens against ``max_model_len``, and only then build the
typed request and hand it to OpenAiIngress. Every rejection is an OpenAI-style error
body naming the field; none reaches an engine, so a bad request cannot disturb others.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from pydantic import ValidationError
from ray.llm._internal.serve.core.configs.openai_api_models import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
)
from ray.llm._internal.serve.core.ingress.ingress import OpenAiIngress
from ray.llm._internal.serve.core.ingress.middleware import get_request_id
from ray.llm._internal.serve.utils.server_utils import get_response_for_error
from starlette.responses import JSONResponse, Response

from raylm.serve import lora
from raylm.serve.validation import (
    ApiError,
    chat_token_ids,
    check_auth,
    check_prompt,
    check_sampling,
    model_not_found,
    parse_body,
    prompt_too_long,
    too_large,
)

logger = logging.getLogger(__name__)


@dataclass
class ModelSettings:
    """What the ingress must know about one served base model."""

    max_model_len: int
    """Prompt + completion token limit of the engine."""

    tokenizer_path: str | None = None
    """Directory to load the tokenizer from for prompt-length checks (None: skip them)."""

    adapters_dir: str | None = None
    """Directory of PEFT adapters, re-listed on each /v1/models call."""

    adapters: dict[str, str] = field(default_factory=dict)
    """Adapters by explicit name -> directory."""


@dataclass
class IngressSettings:
    """Everything the ingress needs, passed as plain data through the Serve config."""

    key_hashes: list[str] = field(default_factory=list)
    """sha256 of each accepted API key; empty means no auth."""

    max_request_bytes: int = 1_048_576
    """Body size limit."""

    max_n: int = 8
    """Largest ``n``."""

    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Base model id -> ModelSettings fields."""


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
        self._settings = IngressSettings(**(settings or {}))
        self._models = {k: ModelSettings(**v) for k, v in self._settings.models.items()}
        self._tokenizers: dict[str, Any] = {}

    # ---- routes (names match ray.serve.llm's DEFAULT_ENDPOINTS) ----

    async def models(self, request: Request) -> Response:
        return await self._guard(request, self._list_models)

    async def model_data(self, model: str, request: Request) -> Response:
        async def one() -> Response:
            cards = {c.id: c for c in self._all_cards()}
            if model not in cards:
                raise model_not_found(model, sorted(cards))
            return JSONResponse(cards[model].model_dump())

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
            check_auth(request.headers.get("authorization"), self._settings.key_hashes)
            return await handler()
        except ApiError as err:
            return JSONResponse(err.body(), status_code=err.status)
        except Exception as err:  # the engine's and router's errors, as ray.serve.llm maps them
            body = get_response_for_error(err, get_request_id(request))
            return JSONResponse(body.model_dump(), status_code=body.error.code)

    async def _unsupported(self) -> Response:
        raise ApiError(404, "This endpoint is not served by raylm", code="not_found")

    async def _list_models(self) -> Response:
        return JSONResponse(ModelList(data=self._all_cards()).model_dump())

    def _all_cards(self) -> list[ModelCard]:
        cards = []
        for base, card in self._model_cards.items():
            cards.append(card)
            ms = self._models.get(base)
            if ms is None:
                continue
            for name in lora.list_adapters(ms.adapters_dir, ms.adapters):
                meta = {**card.metadata, "base_model_id": base, "lora": True}
                cards.append(
                    ModelCard(
                        id=f"{base}:{name}",
                        object="model",
                        owned_by=card.owned_by,
                        permission=[],
                        metadata=meta,
                    )
                )
        return cards

    async def _read_body(self, request: Request) -> dict[str, Any]:
        """Read at most max_request_bytes, so an oversized body is not buffered whole."""
        limit = self._settings.max_request_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise too_large(int(declared), limit)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large(size, limit)
            chunks.append(chunk)
        return parse_body(b"".join(chunks), limit)

    def _resolve_model(self, body: dict[str, Any]) -> str:
        model = body.get("model")
        if model is None and len(self._model_cards) == 1:
            model = next(iter(self._model_cards))
            body["model"] = model
        if not isinstance(model, str):
            raise ApiError(
                400,
                "'model' must be a string naming a served model",
                param="model",
                code="invalid_type",
            )
        base, _, adapter = model.partition(":")
        if base in self._model_cards and not adapter:
            return base
        ms = self._models.get(base)
        if (
            base in self._model_cards
            and ms
            and lora.resolve_adapter(adapter, ms.adapters_dir, ms.adapters)
        ):
            return base
        raise model_not_found(model, sorted(c.id for c in self._all_cards()))

    async def _generate(self, request: Request, chat: bool) -> Response:
        body = await self._read_body(request)
        base = self._resolve_model(body)
        check_prompt(body, chat)
        ms = self._models.get(base)
        max_len = ms.max_model_len if ms else 1 << 30
        check_sampling(body, max_model_len=max_len, max_n=self._settings.max_n)
        if ms is not None and ms.tokenizer_path:
            await self._check_length(body, ms, chat)
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

    async def _check_length(self, body: dict[str, Any], ms: ModelSettings, chat: bool) -> None:
        tok = await self._tokenizer(ms)
        if tok is None:
            return
        # OpenAI's defaults: completions generate 16 tokens, chat up to the context limit.
        max_tokens = (
            body.get("max_completion_tokens") or body.get("max_tokens") or (1 if chat else 16)
        )
        if chat:
            n = len(await asyncio.to_thread(chat_token_ids, tok, body["messages"]))
            if n + max_tokens > ms.max_model_len:
                raise prompt_too_long(n, max_tokens, ms.max_model_len, "messages")
            return
        prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        if all(isinstance(p, int) for p in prompts):
            prompts = [prompts]
        for p in prompts:
            n = len(p) if isinstance(p, list) else len(tok(p)["input_ids"])
            if n + max_tokens > ms.max_model_len:
                raise prompt_too_long(n, max_tokens, ms.max_model_len, "prompt")

    async def _tokenizer(self, ms: ModelSettings) -> Any:
        path = ms.tokenizer_path
        if path not in self._tokenizers:
            try:
                from transformers import AutoTokenizer

                self._tokenizers[path] = await asyncio.to_thread(
                    AutoTokenizer.from_pretrained, path
                )
            except Exception as err:  # a remote/unreadable path: the engine still checks
                logger.warning("no tokenizer at %s for length checks: %s", path, err)
                self._tokenizers[path] = None
        return self._tokenizers[path]
