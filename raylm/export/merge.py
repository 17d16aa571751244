"""LoRA adapters folded into the base model's weights, one safetensors shard at a time.

The base is never loaded as a model: each of its shards is read, every adapter's
``scaling * B @ A`` is added to the weights it targets (in float32, then cast back to
the shard's dtype), and the shard is written before the next is read. Memory peaks at
about one shard plus the adapters, so a model larger than this machine's RAM merges.

What goes wrong silently elsewhere fails here by name: an adapter module that matches
no base weight (the "merged model is identical to the base" of LLaMA-Factory's
tracker), a DoRA adapter (its magnitude vector needs the whole merged column norm:
merged with PEFT in memory instead, ``merge_in_memory``), and an adapter trained on a
different shape.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raylm.config import ConfigError

PEFT_PREFIX = "base_model.model."
PAIRS = (
    (".lora_A.weight", ".lora_B.weight", False),
    (".lora_embedding_A", ".lora_embedding_B", True),
)
"""A and B keys of PEFT's LoRA weights, and whether the stored weight is B @ A's transpose."""
INDEX = "model.safetensors.index.json"


@dataclass
class Delta:
    """One adapted base weight: ``weight += scale * (B @ A)`` (transposed for fan-in-fan-out
    and embedding layers, whose stored weight is the transpose of ``B @ A``)."""

    a: Any
    b: Any
    scale: float
    transpose: bool

    def tensor(self) -> Any:
        delta = (self.b.float() @ self.a.float()) * self.scale
        return delta.T if self.transpose else delta


def adapter_config(adapter: Path) -> dict[str, Any]:
    path = adapter / "adapter_config.json"
    if not path.is_file():
        raise ConfigError(f"{adapter} is not a PEFT adapter: no adapter_config.json")
    config = json.loads(path.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"{adapter}: a {config['peft_type']} adapter; only LoRA merges")
    return config


def is_dora(adapter: Path) -> bool:
    return bool(adapter_config(adapter).get("use_dora"))


def adapter_deltas(adapter: Path) -> tuple[dict[str, Delta], dict[str, Any]]:
    """Base weight name -> its ``Delta``, and the ``modules_to_save`` weights that replace
    base weights whole (a reward model's score head, a trained embedding)."""
    from safetensors.torch import load_file

    config = adapter_config(adapter)
    files = sorted(adapter.glob("adapter_model*.safetensors"))
    if not files:
        raise ConfigError(f"{adapter}: no adapter_model.safetensors (a .bin adapter: resave it)")
    tensors: dict[str, Any] = {}
    for f in files:
        tensors |= load_file(str(f))
    deltas, replaced = {}, {}
    for key, tensor in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        if ".lora_" not in name:
            replaced[name] = tensor
            continue
        for a_key, b_key, embedding in PAIRS:
            if name.endswith(a_key):
                module = name[: -len(a_key)]
                b = tensors[key[: -len(a_key)] + b_key]
                scale = _scale(config, module, tensor.shape[0])
                transpose = embedding or bool(config.get("fan_in_fan_out"))
                deltas[f"{module}.weight"] = Delta(tensor, b, scale, transpose)
        if not name.endswith(tuple(k for pair in PAIRS for k in pair[:2])):
            raise ConfigError(
                f"{adapter}: {key} is not a LoRA A/B weight (a LoRA bias or magnitude?); "
                "the shard merge folds plain LoRA only"
            )
    if not deltas and not replaced:
        raise ConfigError(f"{adapter}: the adapter holds no LoRA weights")
    return deltas, replaced


def _scale(config: dict[str, Any], module: str, rank: int) -> float:
    """``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA), per-module patterns first."""
    alpha = config.get("lora_alpha", 8)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if module.endswith(pattern):
            alpha = value
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def base_shards(base: Path) -> list[str]:
    """The base's safetensors files, in the index's order when it has one."""
    index = base / INDEX
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    if (base / "model.safetensors").is_file():
        return ["model.safetensors"]
    raise ConfigError(
        f"{base}: no model.safetensors or {INDEX}; export merges safetensors checkpoints "
        "(resave a .bin model with save_pretrained(safe_serialization=True))"
    )


def merge_shards(base: Path, adapters: list[Path], out: Path) -> dict[str, Any]:
    """Write ``out`` = base + every adapter, shard by shard; returns what was merged."""
    from raylm.models.mod_marker import refuse_mod_model

    refuse_mod_model(str(base), "model", "export")  # routers no engine or quantizer knows
    plans = [(a, *adapter_deltas(a)) for a in adapters]
    out.mkdir(parents=True, exist_ok=True)
    merged, replaced, seen = 0, 0, set()
    shards = base_shards(base)
    for name in shards:
        tensors = dict(_read_shard(base / name))
        for adapter, deltas, whole in plans:
            for key in tensors.keys() & deltas.keys():
                tensors[key] = _apply(tensors[key], deltas[key], adapter, key)
                merged += 1
            for key in tensors.keys() & whole.keys():
                tensors[key] = whole[key].to(tensors[key].dtype)
                replaced += 1
        seen |= tensors.keys()
        _write_shard(tensors, out / name)
    for adapter, deltas, whole in plans:
        _check_all_matched(adapter, deltas.keys() | whole.keys(), seen)
    if (base / INDEX).is_file():
        shutil.copy(base / INDEX, out / INDEX)
    return {"merged_weights": merged, "replaced_weights": replaced, "shards": len(shards)}


def _read_shard(path: Path) -> Iterator[tuple[str, Any]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            yield key, f.get_tensor(key)


def _write_shard(tensors: dict[str, Any], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def _apply(weight: Any, delta: Delta, adapter: Path, key: str) -> Any:
    update = delta.tensor()
    if tuple(update.shape) != tuple(weight.shape):
        raise ConfigError(
            f"{adapter}: the update for {key} is {tuple(update.shape)} but the base weight is "
            f"{tuple(weight.shape)}: the adapter was trained on another model"
        )
    return (weight.float() + update).to(weight.dtype)


def _check_all_matched(adapter: Path, wanted: set[str], seen: set[str]) -> None:
    missing = sorted(wanted - seen)
    if missing:
        raise ConfigError(
            f"{adapter}: {len(missing)} adapted weights match no weight of the base model "
            f"(e.g. {missing[:3]}): the adapter was trained on another model, or the base's "
            "weights are tied or renamed; a merge without them would equal the base"
        )


def merge_in_memory(base: str, adapters: list[Path], out: Path, trust_remote_code: bool) -> None:
    """PEFT's own merge, the whole model in memory: for DoRA, whose magnitude vector
    rescales each merged column by its norm."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, trust_remote_code=trust_remote_code)
    for adapter in adapters:
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    model.save_pretrained(str(out), safe_serialization=True)
