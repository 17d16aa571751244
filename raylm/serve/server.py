"""raylm's model server: ray.serve.llm's LLMServer with these changes, used for every model.

What touches Ray's private LLM code lives in ``raylm.serve.ray_llm``; this module says what
raylm wants of it. raylm's settings reach each replica as arguments of the deployment
(``ServerSettings``), not through Ray's ``experimental_configs``.

1. **vLLM's own HTTP app answers in this replica** behind raylm's request checks
   (``raylm.serve.direct``), so every streamed chunk goes out as vLLM writes it.
2. **Each LoRA adapter is loaded once** however many first requests arrive together
   (ray.serve.llm checks "loaded?" and then awaits the load without a lock, and vLLM
   fails the second load with "already been loaded": a 500 for a valid request).
3. **Adapters come from a local or shared filesystem, or a bucket** (``raylm.serve.lora``).
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
5. **A model in a bucket is served from this node's copy** (``storage.local_dir``), made
   before the engine starts; vLLM loads local directories only, and ray.serve.llm's own
   downloader would keep a second cache with its own rules. The replica's request
   checks count prompt tokens with that copy's tokenizer.
6. **Conversations of the Responses API live in a store all replicas share**
   (``sessions``: SQLite on the node or Redis; ``raylm.serve.responses``), not in vLLM's
   per-process dict, so any replica continues them, across restarts and redeploys.
7. **A dying engine loses no request** (``raylm.serve.engine_health``,
   ``raylm.serve.engine_watchdog``): the constructor runs a 1-token warm-up generation
   and fails the replica if it fails; a watchdog makes a replica whose engine died leave
   once its requests are answered, so Serve replaces it at once; a request the engine
   died on before its first token is re-sent once to another replica (``raylm_retry``,
   through a Serve handle of this deployment); a stream it died on mid-way ends with an
   error event.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from raylm import storage
from raylm.serve import lora


@dataclass
class ServerSettings:
    """What raylm adds to ray.serve.llm's LLMConfig, bound to each replica by the builder."""

    checks: dict[str, Any] = field(default_factory=dict)
    """raylm's request-check settings (``raylm.serve.checks.IngressSettings`` fields)."""

    single_process: bool = True
    """``engine.single_process``."""

    adapters_dir: str | None = None
    """Directory (or bucket prefix) of PEFT adapters, one per sub-directory."""

    adapters: dict[str, str] = field(default_factory=dict)
    """Adapters by explicit name -> directory."""

    routed: bool = False
    """One of several versions (``versions``): the version router is the app's HTTP
    ingress (Serve allows one), so this replica builds its own app to run what the router
    forwards (``raylm_forward``)."""

    sessions: dict[str, Any] = field(default_factory=dict)
    """The Responses API's store: ``store`` (URL), ``retention_s`` and ``namespace``, as
    ``raylm.serve.app.sessions_settings`` writes them; empty: SQLite on the node."""


def single_process_executor(parallel_config: Any, enabled: bool = True) -> bool:
    """Switch a one-worker multiprocess executor to vLLM's in-process one; True if switched."""
    if not enabled:
        return False
    if parallel_config.world_size == 1 and parallel_config.distributed_executor_backend == "mp":
        parallel_config.distributed_executor_backend = "uni"
        return True
    return False


def on_local_model(llm_config: Any, settings: ServerSettings) -> Any:
    """``llm_config`` with a bucket model replaced by this node's copy (a no-op for a
    local model); the checks' tokenizer is that copy's too. Runs in the replica."""
    from raylm.engine import on_local_copy

    source = llm_config.model_loading_config.model_source
    if not isinstance(source, str) or not storage.is_remote(source):
        return llm_config
    local = storage.local_dir(source, key="model.path")
    data = llm_config.model_dump()
    data["model_loading_config"]["model_source"] = local
    data["engine_kwargs"] = on_local_copy(data["engine_kwargs"], source, local)
    model = settings.checks.get("models", {}).get(llm_config.model_id)
    if model is not None:
        model["tokenizer_path"] = local
    # A new config, not an edited one: LLMConfig caches what it derived from the source.
    return type(llm_config).model_validate(data)


def conversations(settings: ServerSettings) -> Any:
    """The replica's ``/v1/responses`` over the shared store that ``settings.sessions``
    names (SQLite on the node, 7 days, when a config written before sessions has none)."""
    from raylm.serve.responses import Conversations
    from raylm.serve.store import open_store

    s = {"store": "sqlite://", "retention_s": 7 * 24 * 3600.0, "namespace": "raylm"}
    s |= settings.sessions
    store = open_store(s["store"], s["retention_s"], s["namespace"])
    return Conversations(store, replica=replica_id())


def budgets(settings: ServerSettings) -> Any:
    """The per-key budgets in the sessions store (``limits.shared``), or None: the
    middleware then keeps this replica's own."""
    checks = settings.checks
    if not checks.get("shared_limits"):
        return None
    from raylm.serve.budgets import SharedBudgets

    s = {"store": "sqlite://", "namespace": "raylm"} | settings.sessions
    rpm, tpm = checks.get("requests_per_minute"), checks.get("tokens_per_minute")
    return SharedBudgets(s["store"], s["namespace"], rpm, tpm)


WARM_UP_TIMEOUT_S = 600.0
"""How long the replica's 1-token warm-up generation may take (a cold CPU engine's first
step can be slow) before the replica fails."""


def warm_up_generation(client: Any) -> Any:
    """One greedy 1-token generation on vLLM's ``AsyncLLM`` (the replica's warm-up)."""
    from uuid import uuid4

    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0)
    return client.generate("Hello", params, request_id=f"raylm-warmup-{uuid4().hex}")


async def start_app(app: Any) -> Any:
    """Run an ASGI app's lifespan start-up as Serve does for an ingress's app (uvicorn's
    handler); the handler, whose ``shutdown`` ends it."""
    from uvicorn.config import Config
    from uvicorn.lifespan.on import LifespanOn

    lifespan = LifespanOn(Config(app, lifespan="on", log_level=None, log_config=None))
    await lifespan.startup()
    if lifespan.should_exit:
        raise RuntimeError("raylm: the version's app failed its start-up (see the log)")
    return lifespan


def replica_id() -> str:
    """This Serve replica's id (the ``x-raylm-replica`` header), "" outside Serve."""
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # not in a replica (unit tests)
        return ""


def _server_cls() -> type:
    """Built lazily: importing ray.serve.llm pulls in vLLM-facing modules."""
    from raylm.serve import ray_llm
    from raylm.serve.direct import ChecksMiddleware

    class RaylmLLMServer(ray_llm.server_base()):
        async def __init__(self, llm_config: Any, *, raylm: dict[str, Any], **kwargs: Any) -> None:
            self.settings = ServerSettings(**raylm)
            llm_config = await asyncio.to_thread(on_local_model, llm_config, self.settings)
            self.cards = {llm_config.model_id: ray_llm.model_card(llm_config)}
            one = partial(single_process_executor, enabled=self.settings.single_process)
            kwargs.setdefault("engine_cls", ray_llm.engine_cls(lambda c: one(c.parallel_config)))
            find = partial(
                lora.local_adapter,
                adapters_dir=self.settings.adapters_dir,
                adapters=self.settings.adapters,
            )
            kwargs.setdefault("model_downloader", ray_llm.lora_loader_cls(find))
            await super().__init__(llm_config, **kwargs)
            await self._raylm_engine_checks(llm_config.model_id)
            if self.settings.routed:  # Serve builds the ingress's app only
                self._raylm_lifespan = await start_app(await self.__serve_build_asgi_app__())

        async def _raylm_engine_checks(self, model: str) -> None:
            """Warm the engine up (or fail), then watch it (``raylm.serve.engine_health``)."""
            from raylm.serve import engine_health as eh
            from raylm.serve import engine_watchdog as ew

            client = ray_llm.engine_client(self)
            await ew.warm_up(partial(warm_up_generation, client), model, WARM_UP_TIMEOUT_S)
            self.raylm_engine = eh.EngineState(lambda: ray_llm.engine_client(self).errored)
            self.raylm_guard = eh.EngineGuard(
                self.raylm_engine, retry=self._raylm_elsewhere, replica=replica_id()
            )
            watchdog = ew.EngineWatchdog(
                self.raylm_engine,
                ew.exit_replica,
                cleanup=ew.shut_down(client.shutdown),
                linger_s=ew.front_end_markdown_s(),
            )
            self._raylm_watchdog = asyncio.get_running_loop().create_task(watchdog.run())

        async def check_health(self) -> None:
            if self.raylm_engine.dead():
                self.raylm_engine.report_dead()
                raise RuntimeError("raylm: this replica's vLLM engine is dead")
            await super().check_health()

        async def raylm_retry(self, fields: dict[str, Any], raw: bytes) -> Any:
            """Run a request another replica's dead engine could not start (called through
            a Serve handle by ``_raylm_elsewhere``); yields its ASGI messages."""
            from raylm.serve import engine_health as eh

            async for message in eh.run_collected(self._raylm_app, eh.retried_scope(fields), raw):
                yield message

        async def raylm_forward(self, fields: dict[str, Any], raw: bytes) -> Any:
            """Run a request the version router (``raylm.serve.router``) picked this
            version for; yields its ASGI messages, and may still retry it elsewhere."""
            from raylm.serve import engine_health as eh

            scope = eh.forwarded_scope(fields)
            async for message in eh.run_collected(self._raylm_app, scope, raw):
                yield message

        async def _raylm_elsewhere(self, fields: dict[str, Any], raw: bytes) -> Any:
            """Re-send a request to a replica Serve's router picks (this one bounces it)."""
            from ray import serve

            ctx = serve.get_replica_context()
            if getattr(self, "_raylm_handle", None) is None:
                handle = serve.get_deployment_handle(ctx.deployment, ctx.app_name)
                self._raylm_handle = handle.options(stream=True, method_name="raylm_retry")
            # Not this replica again (once the handle's router knows the replicas).
            ray_llm.exclude_replica(self._raylm_handle, ctx.replica_id)
            async for message in self._raylm_handle.remote(fields, raw):
                yield message

        async def __serve_build_asgi_app__(self) -> Any:
            """vLLM's app, as ray.serve.llm builds it, behind raylm's request checks."""
            app = await super().__serve_build_asgi_app__()
            ray_llm.add_middleware(
                app,
                ChecksMiddleware,
                settings=self.settings.checks,
                cards=self.cards,
                load_adapter=self.load_adapter,
                conversations=conversations(self.settings),
                replica=replica_id(),
                limiter=budgets(self.settings),
                guard=self.raylm_guard,
            )
            self._raylm_app = app
            return app

    RaylmLLMServer.__module__ = __name__
    RaylmLLMServer.__qualname__ = "RaylmLLMServer"
    return RaylmLLMServer


def __getattr__(name: str) -> Any:
    """``raylm.serve.server.RaylmLLMServer`` without importing ray.serve.llm eagerly."""
    if name == "RaylmLLMServer":
        cls = _server_cls()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
