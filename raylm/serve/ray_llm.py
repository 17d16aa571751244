"""Everything raylm takes from Ray's private LLM code (``ray.llm._internal``), in one place.

ray.serve.llm's public API (``LLMConfig``, ``LLMServer``, ``build_llm_deployment``) deploys
a model; raylm needs four things it does not offer, and takes them from Ray's internals:

- a hook on the vLLM config before the engine starts (``VLLMEngine._start_async_llm_engine``),
  for the one-process CPU engine (``engine.single_process``);
- adapters from a local filesystem (``LoraModelLoader.load_model_from_config`` with
  ``DiskMultiplexConfig``, ``global_id_manager`` and ``get_lora_id``): ray.serve.llm's
  loader accepts only cloud URIs;
- vLLM's built app with a middleware in front (``_add_middleware_to_built_app``) and the
  model's ``/v1/models`` card as ray.serve.llm writes it (``to_model_metadata``);
- loading an adapter on request, once however many requests ask at the same time
  (``LLMServer._load_model``, ``_maybe_resolve_lora_from_multiplex``, the engine's
  ``resolve_lora``);
- vLLM's own engine client behind the replica's engine (``VLLMEngine._engine_client``,
  vLLM's ``AsyncLLM``), for the warm-up generation and the watch on its ``errored`` flag
  (``raylm.serve.engine_health``);
- from Serve's private router (``ray.serve._private``): keeping a handle's router from
  picking this replica for a request it re-sends because its own engine died
  (``RequestRouter.on_replica_actor_died``, reached through the handle's ``_router``
  and its ``AsyncioRouter``), what Serve itself does once a replica actor is gone.

Written for Ray 2.60. ``check()`` (run by tests/unit/test_serve_ray_llm.py) finds every
one of these names and fails naming the missing one and this version, so an upgrade that
moves one breaks a unit test instead of a replica.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
from collections import defaultdict
from collections.abc import Callable
from typing import Any

RAY_VERSION = "2.60"
"""The Ray version whose private LLM code this module was written against."""

PRIVATE = {
    "VLLMEngine": "ray.llm._internal.serve.engines.vllm.vllm_engine",
    "LoraModelLoader": "ray.llm._internal.serve.utils.lora_serve_utils",
    "DiskMultiplexConfig": "ray.llm._internal.serve.core.configs.llm_config",
    "global_id_manager": "ray.llm._internal.common.models",
    "get_lora_id": "ray.llm._internal.common.utils.lora_utils",
    "to_model_metadata": "ray.llm._internal.serve.core.configs.openai_api_models",
    "_add_middleware_to_built_app": "ray.llm._internal.serve.core.server.llm_server",
    "RequestRouter": "ray.serve._private.request_router.request_router",
    "AsyncioRouter": "ray.serve._private.router",
    "SingletonThreadRouter": "ray.serve._private.router",
    "CurrentLoopRouter": "ray.serve._private.router",
}
"""Private name -> the module that defines it."""

PRIVATE_METHODS = {
    "VLLMEngine": ("_start_async_llm_engine", "resolve_lora"),
    "LoraModelLoader": ("load_model_from_config",),
    "RequestRouter": ("on_replica_actor_died",),
    "LLMServer": (
        "__serve_build_asgi_app__",
        "_init_multiplex_loader",
        "_maybe_resolve_lora_from_multiplex",
    ),
}
"""Methods raylm overrides or calls on those classes (``LLMServer`` is public, its
methods here are not)."""


class RayPrivateApiChanged(ImportError):
    """Ray's private LLM code no longer has what raylm.serve.ray_llm was written for."""


def require(name: str) -> Any:
    """One private name, or an error naming it, its module and the Ray version expected."""
    module = PRIVATE[name]
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise _changed(f"{module}.{name}") from err


def _changed(what: str) -> RayPrivateApiChanged:
    import ray

    return RayPrivateApiChanged(
        f"raylm.serve.ray_llm was written for Ray {RAY_VERSION}; Ray {ray.__version__} "
        f"has no {what}. Adapt raylm/serve/ray_llm.py to this Ray, or install ray {RAY_VERSION}."
    )


def check() -> None:
    """Find every private name and method raylm uses; raise on the first one missing."""
    from ray.serve.llm.deployment import LLMServer

    classes = {name: require(name) for name in PRIVATE} | {"LLMServer": LLMServer}
    for cls_name, methods in PRIVATE_METHODS.items():
        for method in methods:
            if not callable(getattr(classes[cls_name], method, None)):
                raise _changed(f"{cls_name}.{method}")
    start = inspect.signature(classes["VLLMEngine"]._start_async_llm_engine)
    if list(start.parameters)[1:] != ["vllm_engine_args", "vllm_engine_config", "placement_group"]:
        raise _changed(f"VLLMEngine._start_async_llm_engine{start} as raylm calls it")
    if not hasattr(classes["LoraModelLoader"](), "disk_cache"):
        raise _changed("LoraModelLoader().disk_cache")
    if "self._engine_client = " not in inspect.getsource(classes["VLLMEngine"]):
        raise _changed("VLLMEngine._engine_client")
    if not isinstance(getattr(classes["AsyncioRouter"], "request_router", None), property):
        raise _changed("AsyncioRouter.request_router (a property)")
    for wrapper in ("SingletonThreadRouter", "CurrentLoopRouter"):
        if "self._asyncio_router = " not in inspect.getsource(classes[wrapper]):
            raise _changed(f"{wrapper}._asyncio_router")
    from ray.serve.handle import DeploymentHandle

    if "self._router: " not in inspect.getsource(DeploymentHandle.__mro__[1]):
        raise _changed("DeploymentHandle._router")


def exclude_replica(handle: Any, replica_id: Any) -> bool:
    """Keep ``handle``'s router from picking ``replica_id`` (this replica, whose engine
    died) until the controller's next replica list; True if its router had one yet."""
    router = getattr(getattr(handle, "_router", None), "_asyncio_router", None)
    request_router = getattr(router, "request_router", None) if router else None
    if request_router is None:
        return False
    request_router.on_replica_actor_died(replica_id)
    return True


def engine_client(server: Any) -> Any:
    """vLLM's ``AsyncLLM`` behind an ``LLMServer``'s engine (set once the engine started)."""
    client = getattr(getattr(server, "engine", None), "_engine_client", None)
    if client is None:
        raise _changed("a started VLLMEngine._engine_client")
    return client


def engine_cls(before_start: Callable[[Any], None]) -> type:
    """Ray's vLLM engine, calling ``before_start(vllm_config)`` before vLLM starts."""

    class RaylmVLLMEngine(require("VLLMEngine")):
        def _start_async_llm_engine(
            self, vllm_engine_args: Any, vllm_engine_config: Any, placement_group: Any
        ) -> Any:
            before_start(vllm_engine_config)
            return super()._start_async_llm_engine(
                vllm_engine_args, vllm_engine_config, placement_group
            )

    return RaylmVLLMEngine


def lora_loader_cls(resolve: Callable[[str], str | None]) -> type:
    """Ray's adapter loader, finding adapter NAME of ``BASE:NAME`` at ``resolve(NAME)``
    (a local directory; None: no such adapter, a 404), called in a thread because it
    may copy the adapter from a bucket first."""
    from fastapi import HTTPException

    disk_config, ids = require("DiskMultiplexConfig"), require("global_id_manager")
    get_lora_id = require("get_lora_id")

    class LocalLoraModelLoader(require("LoraModelLoader")):
        async def load_model_from_config(self, lora_model_id: str, llm_config: Any) -> Any:
            if lora_model_id in self.disk_cache:
                return self.disk_cache[lora_model_id]
            name = get_lora_id(lora_model_id)
            path = await asyncio.to_thread(resolve, name)  # may copy from a bucket
            if path is None:
                raise HTTPException(404, f"LoRA adapter {name!r} not found")
            disk = disk_config.model_validate(
                {
                    "model_id": lora_model_id,
                    "max_total_tokens": None,
                    "local_path": path,
                    "lora_assigned_int_id": ids.next(),
                }
            )
            self.disk_cache[lora_model_id] = disk
            return disk

    return LocalLoraModelLoader


def model_card(llm_config: Any) -> dict[str, Any]:
    """The model's ``/v1/models`` entry, as ray.serve.llm's own ingress writes it."""
    return require("to_model_metadata")(llm_config.model_id, llm_config).model_dump()


def add_middleware(app: Any, middleware: type, **options: Any) -> None:
    """Put ``middleware`` in front of vLLM's app, which has already built its stack."""
    require("_add_middleware_to_built_app")(app, middleware, **options)


def server_base() -> type:
    """ray.serve.llm's LLMServer whose adapters load once, however many requests ask."""
    from ray import serve
    from ray.serve.llm.deployment import LLMServer

    class AdapterLoadingServer(LLMServer):
        def _adapter_lock(self, model_id: str) -> asyncio.Lock:
            locks = self.__dict__.setdefault("_raylm_adapter_locks", defaultdict(asyncio.Lock))
            return locks[model_id]

        async def load_adapter(self, model_id: str) -> None:
            """Load adapter ``BASE:NAME`` into this replica's engine unless it is loaded."""
            async with self._adapter_lock(model_id):
                await self.engine.resolve_lora(await self._load_model(model_id))

        async def _maybe_resolve_lora_from_multiplex(self) -> None:
            # ray.serve.llm checks "loaded?" and then loads without a lock; vLLM fails the
            # second of two concurrent loads with "already been loaded".
            model_id = serve.get_multiplexed_model_id()
            if not model_id:
                return
            async with self._adapter_lock(model_id):
                await super()._maybe_resolve_lora_from_multiplex()

    return AdapterLoadingServer
