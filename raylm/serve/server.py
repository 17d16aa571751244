"""raylm's model server: ray.serve.llm's LLMServer with these changes, used for every model.

1. **vLLM's own HTTP app answers in this replica** behind raylm's request checks
   (``raylm.serve.direct``), so every streamed chunk goes out as vLLM writes it.
2. **Each LoRA adapter is loaded once** however many first requests arrive together
   (ray.serve.llm checks "loaded?" and then awaits the load without a lock, and vLLM
   fails the second load with "already been loaded": a 500 for a valid request).
3. **Adapters come from a local or shared filesystem** (``raylm.serve.lora``).
4. **A one-device CPU engine runs in one process** (``engine.single_process``, default
   on). vLLM's CPU platform always picks its multiprocess executor, even for a single
   worker (vLLM's own server does too), which puts the model in a second process that
   exchanges every step with the engine core through shared memory and busy polling:
   on a 2-core node that alone takes a large share of a core. raylm switches it to the
   in-process ("uni") executor. vLLM's reason for the second process is that OpenMP
   thread settings only take effect in a fresh process; on a large CPU node where
   thread binding matters, set ``engine.single_process: false``. Multi-device engines
   (tensor/pipeline parallel, and every GPU engine, which uses Ray's executor) are left
   exactly as ray.serve.llm configures them.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

from raylm.serve import lora

SINGLE_PROCESS_KEY = "raylm_single_process"
"""Key in ``LLMConfig.experimental_configs`` carrying ``engine.single_process``."""

DIRECT_KEY = "raylm_direct"
"""Key in ``LLMConfig.experimental_configs``: raylm's request-check settings."""


def single_process_executor(parallel_config: Any, enabled: bool = True) -> bool:
    """Switch a one-worker multiprocess executor to vLLM's in-process one; True if switched."""
    if not enabled:
        return False
    if parallel_config.world_size == 1 and parallel_config.distributed_executor_backend == "mp":
        parallel_config.distributed_executor_backend = "uni"
        return True
    return False


def _engine_cls() -> type:
    from ray.llm._internal.serve.engines.vllm.vllm_engine import VLLMEngine

    class RaylmVLLMEngine(VLLMEngine):
        def _start_async_llm_engine(
            self, vllm_engine_args: Any, vllm_engine_config: Any, placement_group: Any
        ) -> Any:
            enabled = self.llm_config.experimental_configs.get(SINGLE_PROCESS_KEY, True)
            single_process_executor(vllm_engine_config.parallel_config, enabled)
            return super()._start_async_llm_engine(
                vllm_engine_args, vllm_engine_config, placement_group
            )

    return RaylmVLLMEngine


def _server_cls() -> type:
    """Built lazily: importing ray.serve.llm pulls in vLLM-facing modules."""
    from ray import serve
    from ray.serve.llm.deployment import LLMServer

    class RaylmLLMServer(LLMServer):
        _default_engine_cls = _engine_cls()

        async def __init__(self, llm_config: Any, **kwargs: Any) -> None:
            self._lora_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
            kwargs.setdefault("model_downloader", lora.loader_cls())
            await super().__init__(llm_config, **kwargs)

        async def __serve_build_asgi_app__(self) -> Any:
            """vLLM's app, as ray.serve.llm builds it, behind raylm's request checks."""
            from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata
            from ray.llm._internal.serve.core.server.llm_server import (
                _add_middleware_to_built_app,
            )

            from raylm.serve.direct import ChecksMiddleware

            app = await super().__serve_build_asgi_app__()
            cfg = self._llm_config
            card = to_model_metadata(cfg.model_id, cfg).model_dump()
            _add_middleware_to_built_app(
                app,
                ChecksMiddleware,
                settings=cfg.experimental_configs.get(DIRECT_KEY),
                cards={cfg.model_id: card},
                load_adapter=self.load_adapter,
            )
            return app

        async def load_adapter(self, model_id: str) -> None:
            """Load adapter ``BASE:NAME`` into this replica's engine, once (there is no
            multiplexed routing, so any replica may get any adapter)."""
            async with self._lora_locks[model_id]:
                await self.engine.resolve_lora(await self._load_model(model_id))

        async def _maybe_resolve_lora_from_multiplex(self) -> None:
            model_id = serve.get_multiplexed_model_id()
            if not model_id:
                return
            async with self._lora_locks[model_id]:
                await super()._maybe_resolve_lora_from_multiplex()

    RaylmLLMServer.__module__ = __name__
    RaylmLLMServer.__qualname__ = "RaylmLLMServer"
    return RaylmLLMServer


def __getattr__(name: str) -> Any:
    """``raylm.serve.server:RaylmLLMServer`` as an import string, without eager ray.llm."""
    if name == "RaylmLLMServer":
        cls = _server_cls()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
