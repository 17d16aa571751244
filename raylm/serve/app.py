"""raylm's serve config -> a Ray Serve config that runs ray.serve.llm's deployments.

The result is plain data (the YAML ``serve deploy`` takes): one application whose
import path is raylm's builder (``raylm.serve.builder``: the model replica answers HTTP
itself), whose args are one ray.serve.llm ``LLMConfig`` plus raylm's replica settings, and
whose deployment gets raylm's resource and autoscaling choices. Nothing here imports Ray, so it is unit-tested and
an operator can deploy the written file with ``serve deploy`` unchanged.
"""

from __future__ import annotations

import copy
import os
from dataclasses import replace
from typing import Any

from raylm import storage
from raylm.config import ConfigError, resolve_path
from raylm.engine import LoraSlots, engine_env, engine_kwargs
from raylm.serve import lora, versions
from raylm.serve.config import ServeJobConfig
from raylm.serve.validation import hash_key

BUILDER = "raylm.serve.builder:build_app"


def api_key_hashes(cfg: ServeJobConfig) -> list[str]:
    """Keys from the config and the env var, as digests: the written YAML holds no secret."""
    keys = list(cfg.auth.api_keys)
    env = os.environ.get(cfg.auth.api_key_env, "") if cfg.auth.api_key_env else ""
    keys += [k.strip() for k in env.split(",") if k.strip()]
    if not keys and cfg.auth.required:
        raise ConfigError(
            f"no API key: set {cfg.auth.api_key_env} or auth.api_keys, "
            "or auth.required=false to serve without authentication"
        )
    return sorted({hash_key(k) for k in keys})


def placement(cfg: ServeJobConfig) -> dict[str, Any]:
    r = cfg.resources
    if r.use_gpu:
        bundle = {"GPU": r.gpus_per_replica, "CPU": 1}
        out: dict[str, Any] = {
            "placement_group_config": {
                "bundles": [bundle] * cfg.engine.tensor_parallel_size,
                "strategy": "PACK",
            }
        }
        if r.accelerator_type:
            out["accelerator_type"] = r.accelerator_type
        return out
    return {
        "placement_group_config": {"bundles": [{"CPU": r.cpus_per_replica}], "strategy": "PACK"}
    }


def deployment_config(cfg: ServeJobConfig) -> dict[str, Any]:
    a = cfg.autoscaling
    auto = {
        "min_replicas": a.min_replicas,
        "max_replicas": a.max_replicas,
        "target_ongoing_requests": a.target_ongoing_requests,
        "upscale_delay_s": a.upscale_delay_s,
        "downscale_delay_s": a.downscale_delay_s,
        # Replicas report load every 10 s (Serve's metrics_interval_s); a shorter window
        # can hold no report at all, and Serve warns it will reject one.
        "look_back_period_s": 15.0,
    }
    if a.initial_replicas is not None:
        auto["initial_replicas"] = a.initial_replicas
    return {
        "autoscaling_config": auto,
        "max_ongoing_requests": a.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": cfg.resources.actor_num_cpus},
        "health_check_period_s": 10,
        "health_check_timeout_s": 60,
    }


def check_model_dir(model_dir: str) -> None:
    """A local dir or bucket prefix with ``config.json``, or a ConfigError naming it."""
    try:
        found = storage.is_file(storage.join(model_dir, "config.json"))
    except OSError as err:
        raise ConfigError(f"model.path={model_dir!r}: cannot be read ({err})") from None
    if not found:
        raise ConfigError(
            f"model.path={model_dir!r} is not a Hugging Face model dir (no config.json)"
        )
    from raylm.models.mod_marker import refuse_mod_model

    refuse_mod_model(model_dir, "model.path", "serve")  # vLLM has no MoD routers


def uses_buckets(cfg: ServeJobConfig) -> bool:
    """Whether the model or any adapter location is a bucket URI."""
    paths = [cfg.model.path, cfg.lora.adapters_dir, *cfg.lora.adapters.values()]
    return any(storage.is_remote(p) for p in paths if p)


def llm_config(cfg: ServeJobConfig) -> dict[str, Any]:
    """The ``LLMConfig`` (as a dict) of the served model.

    A model or adapters in a bucket are copied by each replica (``raylm.serve.server``),
    which then needs the storage credentials and endpoint set here
    (``storage.forwarded_env``): replicas get their node's environment, not this one's.
    """
    model_dir = resolve_path(cfg.model.path)
    check_model_dir(model_dir)
    use_gpu = cfg.resources.use_gpu
    env = engine_env(cfg.engine, use_gpu=use_gpu)
    if uses_buckets(cfg):
        env |= storage.forwarded_env()
    out: dict[str, Any] = {
        "model_loading_config": {"model_id": cfg.model.name, "model_source": model_dir},
        "engine_kwargs": engine_kwargs(
            cfg.engine, model_dir, use_gpu=use_gpu, lora=lora_slots(cfg)
        ),
        "deployment_config": deployment_config(cfg),
        "runtime_env": {"env_vars": env},
        "log_engine_metrics": cfg.log_engine_metrics,
        **placement(cfg),
    }
    if cfg.lora.enabled:
        out["lora_config"] = {"max_num_adapters_per_replica": cfg.lora.max_adapters_per_replica}
    return out


def lora_slots(cfg: ServeJobConfig) -> LoraSlots | None:
    lo = cfg.lora
    return LoraSlots(lo.max_lora_rank, lo.max_adapters_per_replica) if lo.enabled else None


def lora_locations(cfg: ServeJobConfig) -> dict[str, Any]:
    """Where the replicas find adapters: ``adapters_dir`` and the named ones, resolved
    (directories or bucket prefixes; ``adapters_dir`` may still be empty)."""
    adapters = {n: resolve_path(p) for n, p in cfg.lora.adapters.items()}
    missing = {n: p for n, p in adapters.items() if not lora.is_adapter(p)}
    if missing:
        raise ConfigError(f"lora.adapters without {lora.ADAPTER_CONFIG}: {missing}")
    adapters_dir = resolve_path(cfg.lora.adapters_dir) if cfg.lora.adapters_dir else None
    return {"adapters_dir": adapters_dir, "adapters": adapters}


def check_settings(
    cfg: ServeJobConfig, model_dir: str, locations: dict[str, Any], key_hashes: list[str]
) -> dict[str, Any]:
    """What raylm's request checks need (``raylm.serve.checks.IngressSettings``)."""
    return {
        "key_hashes": key_hashes,
        "max_request_bytes": cfg.limits.max_request_bytes,
        "max_n": cfg.limits.max_n,
        **guard_settings(cfg),
        "models": {
            cfg.model.name: {
                "max_model_len": cfg.engine.max_model_len,
                "tokenizer_path": None if "://" in model_dir else model_dir,
                "chat_template": cfg.engine.extra.get("chat_template"),
                "adapters_dir": locations.get("adapters_dir"),
                "adapters": dict(locations.get("adapters", {})),
            }
        },
    }


def guard_settings(cfg: ServeJobConfig) -> dict[str, Any]:
    """Budgets, filters and the access log of each replica (``raylm.serve.guards``).

    Each replica keeps its own buckets (no round trip per request), so each gets
    ``1 / autoscaling.max_replicas`` of a budget: the app never exceeds it, and gives a key
    less while fewer replicas run. ``limits.shared`` keeps one budget in the sessions
    store instead, whole.
    """
    lim = cfg.limits
    share = 1.0 if lim.shared else 1.0 / cfg.autoscaling.max_replicas
    f = cfg.filters
    return {
        "max_tokens": lim.max_tokens,
        "requests_per_minute": lim.requests_per_minute and lim.requests_per_minute * share,
        "tokens_per_minute": lim.tokens_per_minute and lim.tokens_per_minute * share,
        "shared_limits": lim.shared,
        "filters": {"blocklist": list(f.blocklist), "pii": f.pii, "output": f.output}
        if f.blocklist or f.pii
        else {},
        "access_log": cfg.logging.access,
        "log_prompts": cfg.logging.prompts,
    }


def serving_args(cfg: ServeJobConfig, key_hashes: list[str]) -> dict[str, Any]:
    """The args of raylm's builder: ray.serve.llm's ``LLMConfig`` and what raylm adds to
    each replica (``raylm.serve.server.ServerSettings``)."""
    llm = llm_config(cfg)
    model_dir = llm["model_loading_config"]["model_source"]
    locations = lora_locations(cfg) if cfg.lora.enabled else {}
    settings = {
        "checks": check_settings(cfg, model_dir, locations, key_hashes),
        "single_process": cfg.engine.single_process,
        "sessions": sessions_settings(cfg),
        **locations,
    }
    return {"llm_config": llm, "raylm": settings}


def sessions_settings(cfg: ServeJobConfig) -> dict[str, Any]:
    """The replicas' store of conversations (``raylm.serve.store.open_store``'s arguments).

    A relative SQLite path is made absolute here, against the deploying workspace: a
    replica's working directory is Ray's, not the user's.
    """
    url = cfg.sessions.store
    if url.startswith("sqlite://"):
        path = url.removeprefix("sqlite://")
        if path and not path.startswith(("/", "~")):
            url = "sqlite://" + resolve_path(path)
    return {"store": url, "retention_s": cfg.sessions.retention_s, "namespace": cfg.app_name}


SECRET_ENV_WORDS = ("KEY", "SECRET", "TOKEN", "PASSWORD", "CONNECTION_STRING")
"""An env var whose name holds one of these is a credential (``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``, ``AZURE_STORAGE_KEY``; ``AWS_ACCESS_KEY_ID`` goes with them)."""


def without_credentials(config: dict[str, Any]) -> dict[str, Any]:
    """The Serve config as written to ``serve_config.yaml``: storage credentials left out.

    The deployed config carries them to the replicas (they must reach a bucket); the file
    is for people and ``serve deploy``, which, like any replica without them, then uses
    the nodes' own credentials (an instance role) or those of the environment it runs in.
    """
    out = copy.deepcopy(config)
    for application in out.get("applications", []):
        args = application["args"]
        for model in args["versions"].values() if "versions" in args else [args]:
            env = model["llm_config"].get("runtime_env", {}).get("env_vars", {})
            for name in [n for n in env if any(w in n.upper() for w in SECRET_ENV_WORDS)]:
                del env[name]
    return out


def app_config(cfg: ServeJobConfig, key_hashes: list[str]) -> dict[str, Any]:
    """One entry of a Serve config's ``applications`` list."""
    out = {
        "name": cfg.app_name,
        "route_prefix": cfg.route_prefix,
        "import_path": BUILDER,
        "args": serving_args(cfg, key_hashes),
    }
    if cfg.versions or (cfg.lora.enabled and cfg.lora.affinity):  # the router in front
        out["args"] = versions_args(cfg, key_hashes)
        weights = {"weights": out["args"]["weights"]}
        out["deployments"] = [{"name": versions.ROUTER, "user_config": weights}]
    return out


def versions_args(cfg: ServeJobConfig, key_hashes: list[str]) -> dict[str, Any]:
    """The builder's args for several versions: each one's model args, and the weights
    (the router's ``user_config`` too: promote and rollback change only that)."""
    paths = {cfg.model.version: cfg.model.path, **cfg.versions}
    each = {
        name: serving_args(replace(cfg, model=replace(cfg.model, path=path)), key_hashes)
        for name, path in paths.items()
    }
    weights = versions.weights_of(cfg.model.version, cfg.versions, cfg.traffic)
    return {"versions": each, "weights": weights, "affinity": cfg.lora.affinity}


def serve_config(cfg: ServeJobConfig, key_hashes: list[str], port: int) -> dict[str, Any]:
    """A complete Serve config file (what ``serve deploy FILE`` takes)."""
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": cfg.http.host, "port": port},
        "applications": [app_config(cfg, key_hashes)],
    }
