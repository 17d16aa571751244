"""raylm's Serve application builder: ray.serve.llm's ``build_openai_app``, leaner HTTP app.

ray.serve.llm's FastAPI app puts a ``BaseHTTPMiddleware`` around every route to turn an
exception into an OpenAI error body. For a streamed response that middleware moves every
chunk through an extra task and an in-memory stream, in the ingress replica, which on a
CPU node shares its cores with the engine. RaylmIngress already turns every exception
its routes raise into the same error body (``RaylmIngress._guard``), so the middleware has
nothing left to catch; this builder wires the same deployments as ray.serve.llm's, with
an app that keeps everything else of ray.serve.llm's (request ids, CORS, HTTP metrics,
the validation and last-resort error handlers). See docs/benchmarks.md for the effect.

With direct streaming (``direct_streaming: true``, raylm's default) there is no ingress
replica at all: the model replica serves vLLM's HTTP app itself, as ray.serve.llm does
under ``RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING=1`` (``build_direct_app`` says how raylm's
differs). raylm selects it per app (the model's ``experimental_configs`` carry raylm's
checks, ``raylm.serve.server.DIRECT_KEY``) rather than per process environment, so one
cluster can run both kinds of app.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from ray import serve
from ray.llm._internal.common.dict_utils import maybe_apply_llm_deployment_config_defaults
from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata
from ray.llm._internal.serve.core.ingress.builder import LLMServingArgs
from ray.llm._internal.serve.core.ingress.ingress import make_fastapi_ingress
from ray.llm._internal.serve.core.ingress.middleware import (
    SetRequestIdMiddleware,
    _handle_validation_error,
    _uncaught_exception_handler,
)
from ray.llm._internal.serve.core.server.builder import build_llm_deployment
from ray.llm._internal.serve.observability.metrics.fast_api_metrics import (
    add_http_metrics_middleware,
    metrics_lifespan,
)
from ray.serve.deployment import Application

from raylm.serve.server import DIRECT_KEY


def lean_app() -> FastAPI:
    """ray.serve.llm's ingress app without the per-chunk exception middleware.

    Middleware runs last-added first, as in ray.serve.llm: request id, metrics, CORS.
    """
    app = FastAPI(lifespan=metrics_lifespan)
    app.add_exception_handler(Exception, _uncaught_exception_handler)
    app.add_exception_handler(RequestValidationError, _handle_validation_error)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=["*"],
        allow_credentials=True,
        allow_methods=["*"],
        allow_headers=["*"],
    )
    add_http_metrics_middleware(app)
    app.add_middleware(SetRequestIdMiddleware)
    return app


def build_app(builder_config: dict[str, Any]) -> Application:
    """The Serve application for ``LLMServingArgs``: what ray.serve.llm builds, lean app."""
    args = LLMServingArgs.model_validate(builder_config)
    configs = args.llm_configs
    if any(DIRECT_KEY in c.experimental_configs for c in configs):
        return build_direct_app(args)
    ingress = args.ingress_cls_config
    options = maybe_apply_llm_deployment_config_defaults(
        ingress.ingress_cls.get_deployment_options(configs), args.ingress_deployment_config
    )
    cls = make_fastapi_ingress(ingress.ingress_cls, app=lean_app())
    return serve.deployment(cls, **options).bind(
        llm_deployments={c.model_id: build_llm_deployment(c) for c in configs},
        model_cards={c.model_id: to_model_metadata(c.model_id, c) for c in configs},
        lora_paths={
            c.model_id: c.lora_config.dynamic_lora_loading_path
            for c in configs
            if c.lora_config is not None
        },
        **ingress.ingress_extra_kwargs,
    )


def build_direct_app(args: LLMServingArgs) -> Application:
    """The model deployment as the app's ingress: it serves vLLM's HTTP app itself.

    ray.serve.llm's own direct streaming also puts a request-router deployment in front
    (HAProxy asks it, per request, which replica to use, so that LoRA requests go to a
    replica with the adapter loaded). On 2 cores that Python round trip cost about 50 ms
    of time to first token at 32 clients (docs/benchmarks.md), so raylm leaves replica
    choice to the HTTP proxy (HAProxy or Serve's) and each replica loads a requested
    adapter on first use (``RaylmLLMServer.load_adapter``), which also keeps the app
    working behind Serve's Python proxy.
    """
    if len(args.llm_configs) != 1:
        raise ValueError(
            f"direct streaming serves exactly one model per app, got {len(args.llm_configs)}"
        )
    (config,) = args.llm_configs
    return build_llm_deployment(config, deployment_cls=serve.ingress()(config.server_cls))
