"""Named versions of one served model and the traffic split between them (canary).

A serve config with ``versions`` deploys one model deployment per version and a small
router in front (``raylm.serve.router``) that picks each request's version by weight.
The weights are the router's ``user_config``, so ``raylm serve promote`` and ``raylm
serve rollback`` change them with a lightweight Serve update (the router reconfigures
in place; no replica restarts and no in-flight request is dropped), keeping the split
they replaced for the next rollback. Nothing here imports Ray.
"""

from __future__ import annotations

import copy
from typing import Any

from raylm.config import ConfigError, choice, resolve_path

ROUTER = "VersionRouter"
"""The router deployment's name in the app (its ``user_config`` holds the weights)."""

VERSION_HEADER = b"x-raylm-version"
"""The answer header naming the version that produced it."""


def check_name(key: str, name: str) -> None:
    """A version name goes into deployment names and headers: keep it plain."""
    if not name or any(c in name for c in ":/ @") or not name.isprintable():
        raise ConfigError(f"{key}={name!r}: a version name is non-empty, without ':/@ '")


def check_versions(base: str, versions: dict[str, str], traffic: dict[str, float]) -> None:
    """Refuse a split that names an unknown version, a negative weight or no traffic."""
    check_name("model.version", base)
    for name in versions:
        check_name(f"versions.{name}", name)
        if name == base:
            raise ConfigError(
                f"versions.{name}: {name!r} is model.version already (model.path holds it); "
                "name the other versions differently"
            )
    if traffic and not versions:
        raise ConfigError("traffic splits requests between versions: set versions too")
    check_weights(dict(traffic), [base, *versions], "traffic")


def check_weights(weights: dict[str, float], known: list[str], key: str) -> None:
    for name, weight in weights.items():
        choice(f"{key}: version", name, known)
        if not isinstance(weight, (int, float)) or weight < 0:
            raise ConfigError(f"{key}.{name}={weight!r}: a weight is a number >= 0")
    if weights and sum(weights.values()) <= 0:
        raise ConfigError(f"{key}: every weight is 0; at least one version must get traffic")


def weights_of(base: str, versions: dict[str, str], traffic: dict[str, float]) -> dict[str, float]:
    """Every version's weight (0 where ``traffic`` leaves it out; all to ``base`` if empty)."""
    names = [base, *versions]
    given = dict(traffic) or {base: 100.0}
    return {n: float(given.get(n, 0.0)) for n in names}


def version_model(name: str, source: str) -> str:
    """The model directory ``versions.NAME`` names: a model dir, or a run dir whose
    manifest records a model (LoRA: its merged copy), so a version keeps its lineage."""
    from raylm import storage
    from raylm.manifest import Manifest
    from raylm.outputs import ModelOutput

    where = resolve_path(source)
    manifest = Manifest.read(where) if storage.is_dir(where) else None
    if manifest is None:
        return where
    key = f"versions.{name}={source}"
    if manifest.status != "succeeded":
        raise ConfigError(f"{key}: that run's manifest says {manifest.status}")
    out = ModelOutput.from_record(manifest.output, key)
    if out.adapter and not out.merged:
        raise ConfigError(f"{key}: a LoRA run is served from its merged model (final/merged)")
    return out.merged if out.adapter else out.path


def promoted(weights: dict[str, float], version: str, percent: float) -> dict[str, float]:
    """``version`` gets ``percent`` of the traffic; the others share the rest as before
    (equally if none had any)."""
    check_weights({version: 1.0}, list(weights), "promote")
    if not 0 < percent <= 100:
        raise ConfigError(f"promote: percent={percent} must be in (0, 100]")
    others = {n: w for n, w in weights.items() if n != version}
    total = sum(others.values())
    rest = 100.0 - percent
    share = {n: (rest * w / total if total else rest / len(others)) for n, w in others.items()}
    return {n: (percent if n == version else round(share[n], 6)) for n in weights}


def router_config(app: dict[str, Any]) -> dict[str, Any]:
    """The router's ``user_config`` in a declared Serve app config."""
    for deployment in app.get("deployments") or []:
        if deployment.get("name") == ROUTER:
            return dict(deployment.get("user_config") or {})
    raise ConfigError(
        f"serve app {app.get('name')!r} serves one version (no {ROUTER}); deploy it with "
        "`versions` and `traffic` to split traffic"
    )


def with_router_config(app: dict[str, Any], user_config: dict[str, Any]) -> dict[str, Any]:
    """``app`` with the router's ``user_config`` replaced (nothing else changes, so Serve
    reconfigures the router in place)."""
    out = copy.deepcopy(app)
    for deployment in out.get("deployments") or []:
        if deployment.get("name") == ROUTER:
            deployment["user_config"] = user_config
    return out


def promote(current: dict[str, Any], version: str, percent: float) -> dict[str, Any]:
    """The router config after ``raylm serve promote APP VERSION [PERCENT]``."""
    weights = current["weights"]
    return {"weights": promoted(weights, version, percent), "previous": weights}


def rollback(current: dict[str, Any]) -> dict[str, Any]:
    """The router config after ``raylm serve rollback APP``: the split before the last
    change (a second rollback undoes the first)."""
    if not current.get("previous"):
        raise ConfigError("rollback: this app's split has not changed since it was deployed")
    return {"weights": current["previous"], "previous": current["weights"]}


class WeightedPicker:
    """Smooth weighted round robin (nginx's): over any window of ``sum(weights)`` picks
    each version gets exactly its share, spread out rather than in runs, and with no
    random draw a small canary's share is exact from the first hundred requests."""

    def __init__(self, weights: dict[str, float]) -> None:
        check_weights(weights, list(weights), "weights")
        self.weights = {n: w for n, w in sorted(weights.items()) if w > 0}
        self.total = sum(self.weights.values())
        self.current = dict.fromkeys(self.weights, 0.0)

    def pick(self) -> str:
        for name, weight in self.weights.items():
            self.current[name] += weight
        best = max(self.current, key=lambda n: self.current[n])
        self.current[best] -= self.total
        return best
