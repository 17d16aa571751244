"""raylm's Serve application builder: the model replica answers HTTP itself.

The model replica serves vLLM's own OpenAI app behind raylm's request checks, as
ray.serve.llm does under ``RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING=1`` (``build_app`` says
how raylm's differs). Tokens cross no extra process on their way out, which on a 2-core
node is what brings raylm level with vLLM's bare server (docs/benchmarks.md). Only
ray.serve.llm's public API is used here.
"""

from __future__ import annotations

from typing import Any


def build_app(args: dict[str, Any]) -> Any:
    """The Serve application for ``args`` as ``raylm.serve.app`` writes them: one model
    (``llm_config`` and ``raylm``), or ``versions`` of one (each such a pair), their
    ``weights`` and ``affinity``, behind the version router (``raylm.serve.router``)."""
    if "versions" not in args:
        return model_app(args)
    from raylm.serve.router import build_router

    models = {name: model_app(a, name) for name, a in args["versions"].items()}
    return build_router(models, args["weights"], args.get("affinity", False))


def model_app(args: dict[str, Any], version: str | None = None) -> Any:
    """One model's deployment; the app's ingress unless it is one of several versions.

    ray.serve.llm's own direct streaming also puts a request-router deployment in front
    (HAProxy asks it, per request, which replica to use, so that LoRA requests go to a
    replica with the adapter loaded). On 2 cores that Python round trip cost about 50 ms
    of time to first token at 32 clients (docs/benchmarks.md), so raylm leaves replica
    choice to the HTTP proxy (HAProxy or Serve's) and each replica loads a requested
    adapter on first use (``load_adapter``), which also keeps the app working behind
    Serve's Python proxy.
    """
    from ray import serve
    from ray.serve.llm import LLMConfig, build_llm_deployment

    from raylm.serve.server import RaylmLLMServer

    if version is None:
        return build_llm_deployment(
            LLMConfig.model_validate(args["llm_config"]),
            bind_kwargs={"raylm": args.get("raylm", {})},
            deployment_cls=serve.ingress()(RaylmLLMServer),
        )
    return build_llm_deployment(  # the router is the ingress; Serve allows one
        LLMConfig.model_validate(args["llm_config"]),
        name_prefix=f"RaylmLLMServer@{version}:",
        bind_kwargs={"raylm": {**args.get("raylm", {}), "routed": True}},
        deployment_cls=RaylmLLMServer,
    )
