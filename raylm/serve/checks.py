"""raylm's request checks, run in the model replica in front of vLLM's own app.

A request is checked in this order: the API key (before the body is even read, so an
anonymous client learns nothing), the body size (read at most the limit, never buffered
whole), JSON, the model (a base model or one of its adapters, on disk or in a bucket),
the prompt and sampling parameters, and the prompt length in tokens against
``max_model_len``. Every rejection is an ``ApiError`` naming the field; none reaches an
engine. The ASGI side (reading the request, answering it) is ``raylm.serve.direct``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from raylm import storage
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

ADAPTER_SEEN_S = 30.0
"""How long an adapter found in a bucket counts as present without asking the bucket
again. A deleted adapter may be accepted this long after; a replica that still has it
loaded keeps serving it anyway, as for a local one."""


@dataclass
class ModelSettings:
    """What the checks must know about one served base model."""

    max_model_len: int
    """Prompt + completion token limit of the engine."""

    tokenizer_path: str | None = None
    """Directory to load the tokenizer from for prompt-length checks (None: skip them)."""

    chat_template: str | None = None
    """The template the server renders chats with (``engine.extra.chat_template``, e.g. a
    LLaMA-Factory ``template:``); None: the tokenizer's own."""

    adapters_dir: str | None = None
    """Directory of PEFT adapters, re-listed on each /v1/models call."""

    adapters: dict[str, str] = field(default_factory=dict)
    """Adapters by explicit name -> directory."""

    @property
    def remote(self) -> bool:
        """Whether any adapter location is a bucket (each lookup is then a request)."""
        paths = [self.adapters_dir, *self.adapters.values()]
        return any(storage.is_remote(p) for p in paths if p)


@dataclass
class IngressSettings:
    """Everything the checks need, passed as plain data through the Serve config."""

    key_hashes: list[str] = field(default_factory=list)
    """sha256 of each accepted API key; empty means no auth."""

    max_request_bytes: int = 1_048_576
    """Body size limit."""

    max_n: int = 8
    """Largest ``n``."""

    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Base model id -> ModelSettings fields."""

    max_tokens: int | None = None
    """``limits.max_tokens``: cap and default of a request's completion length."""

    requests_per_minute: float | None = None
    """This replica's share of ``limits.requests_per_minute`` (``raylm.serve.guards``)."""

    tokens_per_minute: float | None = None
    """This replica's share of ``limits.tokens_per_minute``."""

    shared_limits: bool = False
    """``limits.shared``: the budgets are kept in the sessions store (``raylm.serve.budgets``)."""

    filters: dict[str, Any] = field(default_factory=dict)
    """``filters`` (``raylm.serve.filters.ContentFilters`` arguments); empty: none."""

    access_log: bool = True
    """``logging.access``."""

    log_prompts: bool = False
    """``logging.prompts``."""


class RequestChecks:
    """The checks for one app; holds the tokenizers it loaded for length checks."""

    def __init__(self, settings: dict[str, Any] | None) -> None:
        self.settings = IngressSettings(**(settings or {}))
        self.models = {k: ModelSettings(**v) for k, v in self.settings.models.items()}
        self._tokenizers: dict[str, Any] = {}
        self._seen: dict[tuple[str | None, str], float] = {}
        """(adapters_dir, adapter) -> when it was last found in a bucket."""

    def auth(self, header: str | None) -> None:
        check_auth(header, self.settings.key_hashes)

    async def read_body(self, declared: str | None, chunks: AsyncIterator[bytes]) -> bytes:
        """The raw body, refused as soon as it (or its Content-Length) passes the limit."""
        limit = self.settings.max_request_bytes
        if declared and declared.isdigit() and int(declared) > limit:
            raise too_large(int(declared), limit)
        parts, size = [], 0
        async for chunk in chunks:
            size += len(chunk)
            if size > limit:
                raise too_large(size, limit)
            parts.append(chunk)
        return b"".join(parts)

    def adapter_names(self, base: str) -> list[str]:
        """Adapters of ``base`` servable right now (``adapters_dir`` is re-listed)."""
        ms = self.models.get(base)
        return list(lora.list_adapters(ms.adapters_dir, ms.adapters)) if ms else []

    def model_ids(self, bases: list[str]) -> list[str]:
        return [m for b in bases for m in [b, *(f"{b}:{a}" for a in self.adapter_names(b))]]

    def model_cards(self, cards: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        """/v1/models: each base model's entry (``cards``) followed by its adapters."""
        out = []
        for base, card in cards.items():
            meta = {**(card.get("metadata") or {}), "base_model_id": base, "lora": True}
            adapters = [
                {**card, "id": f"{base}:{name}", "permission": [], "metadata": meta}
                for name in self.adapter_names(base)
            ]
            out += [card, *adapters]
        return out

    def model_card(self, model: str, cards: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """/v1/models/MODEL, or a 404 listing what is served."""
        found = {c["id"]: c for c in self.model_cards(cards)}
        if model not in found:
            raise model_not_found(model, sorted(found))
        return found[model]

    async def resolve_model(self, body: dict[str, Any], bases: list[str]) -> str:
        """The base model a request is for; fills in the one model if ``model`` is absent."""
        model = body.get("model")
        if model is None and len(bases) == 1:
            model = body["model"] = bases[0]
        if not isinstance(model, str):
            raise ApiError(
                400,
                "'model' must be a string naming a served model",
                param="model",
                code="invalid_type",
            )
        base, _, adapter = model.partition(":")
        if base in bases and not adapter:
            return base
        ms = self.models.get(base)
        if base in bases and ms and await self._adapter_exists(ms, adapter):
            return base
        known = await asyncio.to_thread(self.model_ids, bases)
        raise model_not_found(model, sorted(known))

    async def _adapter_exists(self, ms: ModelSettings, name: str) -> bool:
        """Whether adapter ``name`` of ``ms`` can be served: a stat on a local disk; in a
        bucket a request, made off the event loop and remembered for ``ADAPTER_SEEN_S``
        once it succeeds (so steady adapter traffic costs no request each). An absent
        adapter is looked up again every time: one copied in later is found."""
        if not ms.remote:
            return lora.resolve_adapter(name, ms.adapters_dir, ms.adapters) is not None
        key = (ms.adapters_dir, name)
        if time.monotonic() - self._seen.get(key, -ADAPTER_SEEN_S) < ADAPTER_SEEN_S:
            return True
        found = await asyncio.to_thread(lora.resolve_adapter, name, ms.adapters_dir, ms.adapters)
        if found:
            self._seen[key] = time.monotonic()
        return found is not None

    async def check_generate(self, raw: bytes, chat: bool, bases: list[str]) -> dict[str, Any]:
        """The parsed body of a completion or chat request that passed every check."""
        body = parse_body(raw, self.settings.max_request_bytes)
        base = await self.resolve_model(body, bases)
        check_prompt(body, chat)
        ms = self.models.get(base)
        max_len = ms.max_model_len if ms else 1 << 30
        check_sampling(body, max_model_len=max_len, max_n=self.settings.max_n)
        keys = ("max_tokens", "max_completion_tokens")
        self.cap_tokens(body, keys, "max_completion_tokens" if chat else "max_tokens")
        if ms is not None and ms.tokenizer_path:
            await self._check_length(body, ms, chat)
        return body

    def cap_tokens(self, body: dict[str, Any], keys: tuple[str, ...], default: str) -> None:
        """``limits.max_tokens``: 400 above it, and filled in (as ``default``) when the
        request sets no length, so every response is bounded by it."""
        cap = self.settings.max_tokens
        if cap is None:
            return
        for key in keys:
            value = body.get(key)
            if isinstance(value, int) and value > cap:
                raise ApiError(
                    400,
                    f"'{key}'={value} is above this server's limit of {cap} tokens "
                    "(limits.max_tokens)",
                    param=key,
                    code="invalid_value",
                )
        if all(body.get(k) is None for k in keys):
            body[default] = cap

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
                if ms.chat_template:  # count what the server renders
                    self._tokenizers[path].chat_template = ms.chat_template
            except Exception as err:  # a remote/unreadable path: the engine still checks
                logger.warning("no tokenizer at %s for length checks: %s", path, err)
                self._tokenizers[path] = None
        return self._tokenizers[path]
