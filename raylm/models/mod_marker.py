"""How a mixture-of-depths model is recognised on disk, and who refuses one.

This sits at the ground floor (not in ``raylm.train.mod``, which builds and trains such
models) because eval, serve, generate and export all check a model directory before they
load it, and none of them should import the train package to do so.
"""

from __future__ import annotations

import json
from typing import Any

from raylm import storage
from raylm.config import ConfigError

MARKER = "mixture_of_depths"
"""config.json key of a MoD model: ``{"routed_layers": [...], "capacity": 0.125}``."""


def is_mod_config(config: dict[str, Any]) -> bool:
    """A config.json of a MoD model: raylm's marker, or the package's renamed architecture."""
    archs = config.get("architectures") or []
    return MARKER in config or any("MoDFor" in str(a) for a in archs)


def refuse_mod_model(model_dir: str, key: str, job: str) -> None:
    """ConfigError when ``model_dir`` (local or a bucket prefix) holds a MoD model: vLLM
    (serve, generate, eval) and the merge/quantize export have no routed layers, and a
    plain transformers load would drop the routers. A missing config.json passes (the
    caller's own check names it)."""
    path = storage.join(model_dir, "config.json")
    try:
        config = json.loads(storage.read_text(path)) if storage.is_file(path) else {}
    except (OSError, ValueError):
        return
    if isinstance(config, dict) and is_mod_config(config):
        raise ConfigError(
            f"{key}={model_dir!r} is a mixture-of-depths model (its config.json records "
            f"{MARKER} / a MoDForCausalLM architecture): {job} cannot run it, since vLLM "
            "and plain transformers loading have no routed layers (its routers would be "
            "dropped). Keep training it with model.mixture_of_depths=load, or train "
            "without mixture_of_depths for a servable model"
        )
