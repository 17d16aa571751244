"""``llamafactory-cli export X.yaml`` as ``raylm export X.yaml``: LLaMA-Factory's merge
YAMLs (examples/merge_lora) read as the export job's config, every key with a fate.

LLaMA-Factory merges in memory and saves with ``export_size`` GB shards; raylm merges
the base's own shards one at a time (``raylm.export.merge``), so the shard layout is the
base's and ``export_size`` / ``export_device`` change nothing (said in a warning).
``export_quantization_bit`` (with its dataset / nsamples / maxlen) asks for a GPTQ copy:
LLaMA-Factory runs optimum's GPTQ (auto-gptq), raylm llmcompressor's ``GPTQModifier``
(``quantize.method=gptq``, written to ``export_dir/quantized``; ``raylm.export.llmc``).
"""

from __future__ import annotations

import logging
from typing import Any

from raylm.config import ConfigError
from raylm.train import llamafactory_keys as train_keys
from raylm.train.llamafactory_values import csv_list, hint

log = logging.getLogger(__name__)

MAPPED = {
    "model_name_or_path": "model",
    "adapter_name_or_path": "adapters",
    "template": "template",
    "trust_remote_code": "trust_remote_code",
    "export_dir": "output_dir",
    # LLaMA-Factory quantizes with GPTQ through optimum / auto-gptq; raylm runs
    # llmcompressor's GPTQModifier (W{bit}A16, group 128) in its own venv (raylm.export.llmc)
    "export_quantization_bit": "quantize.bits",
    "export_quantization_dataset": "quantize.dataset",
    "export_quantization_nsamples": "quantize.nsamples",
    "export_quantization_maxlen": "quantize.max_length",
}
NOOP = {
    "export_size": "raylm keeps the base's shard layout: each shard is merged in place",
    "export_device": "raylm merges on the CPU, one shard at a time",
    "stage": "an export merges what any stage trained",
    "finetuning_type": "the adapters' own adapter_config.json says what they are",
    "infer_dtype": "the merged model keeps the base's dtype, as LLaMA-Factory's auto does",
}
REFUSED = {
    "export_legacy_format": "raylm writes safetensors only (set it to false)",
    "export_hub_model_id": "raylm does not push to the hub: upload the export dir yourself",
    "quantization_bit": "an adapter trained with QLoRA merges into the unquantized base: "
    "drop quantization_bit (LLaMA-Factory refuses merging into a quantized model too)",
}
DEFAULTS = {"export_legacy_format": False}


def is_llamafactory(data: dict[str, Any]) -> bool:
    """LLaMA-Factory export YAMLs are flat and name ``export_dir``."""
    return "model_name_or_path" in data and "export_dir" in data


def translate(data: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """The export job's keys; unknown and refused keys are named together."""
    every = [*MAPPED, *NOOP, *REFUSED, *train_keys.known()]
    unknown = [hint(k, every) for k in sorted(data) if k not in set(every)]
    foreign = sorted(k for k in data if k not in set(MAPPED) | set(NOOP) | set(REFUSED))
    problems = [f"{k}={v!r}: {REFUSED[k]}" for k, v in data.items()
                if k in REFUSED and DEFAULTS.get(k) != v and v is not None]  # fmt: skip
    problems += [f"{k}: a training argument; an export YAML takes model, adapter and export "
                 "keys" for k in foreign if k not in unknown and k in train_keys.known()]  # fmt: skip
    if unknown or problems:
        lines = [f"{source}: LLaMA-Factory export keys raylm cannot take:"]
        lines += [f"  - unknown key {u}" for u in unknown] + [f"  - {p}" for p in problems]
        raise ConfigError("\n".join(lines))
    out: dict[str, Any] = {}
    for key, target in MAPPED.items():
        if data.get(key) is not None:
            value = data[key]
            value = csv_list(value) if key == "adapter_name_or_path" else value
            if target.startswith("quantize."):
                out.setdefault("quantize", {})[target.split(".", 1)[1]] = value
            else:
                out[target] = value
    if data.get("export_quantization_bit") is not None:
        out["quantize"]["method"] = "gptq"
    for key in sorted(data.keys() & NOOP.keys()):
        log.warning("%s: ignoring LLaMA-Factory key %r: %s", source, key, NOOP[key])
    return out
