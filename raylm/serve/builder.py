"""raylm's Serve application builder: the model replica answers HTTP itself.

The model replica serves vLLM's own OpenAI app behind raylm's request checks, as
ray.serve.llm does under ``RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING=1`` (``build_app`` says
how raylm's differs). Tokens cross no extra process on their way out, which on a 2-core
node is what brings raylm level with vLLM's bare server (docs/benchmarks.md).
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.llm._internal.serve.core.ingress.builder import LLMServingArgs
from ray.llm._internal.serve.core.server.builder import build_llm_deployment
from ray.serve.deployment import Application


def build_app(builder_config: dict[str, Any]) -> Application:
    """The model deployment as the app's ingress: it serves vLLM's HTTP app itself.

    ray.serve.llm's own direct streaming also puts a request-router deployment in front
    (HAProxy asks it, per request, which replica to use, so that LoRA requests go to a
    replica with the adapter loaded). On 2 cores that Python round trip cost about 50 ms
    of time to first token at 32 clients (docs/benchmarks.md), so raylm leaves replica
    choice to the HTTP proxy (HAProxy or Serve's) and each replica loads a requested
    adapter on first use (``RaylmLLMServer.load_adapter``), which also keeps the app
    working behind Serve's Python proxy.
    """
    args = LLMServingArgs.model_validate(builder_config)
    if len(args.llm_configs) != 1:
        raise ValueError(f"a raylm app serves exactly one model, got {len(args.llm_configs)}")
    (config,) = args.llm_configs
    return build_llm_deployment(config, deployment_cls=serve.ingress()(config.server_cls))
