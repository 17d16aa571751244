"""LLaMA Pro (Wu et al. 2024; LLaMA-Factory's ``scripts/llama_pro.py`` and
``use_llama_pro``): grow a model by inserting blocks, then train only those.

``expand`` splits the L decoder layers into ``num_expand`` groups of L / num_expand and
inserts after each group's last layer a copy of it whose ``o_proj`` and ``down_proj``
(the projections that write back into the residual stream) are zero: each new block
adds nothing to the residual, so the expanded model computes exactly what the original
did, and training the new blocks adds capacity without overwriting the old ones
(LLaMA Pro's answer to forgetting). ``raylm llama-pro MODEL OUT --num-expand N`` runs it.

Training then uses finetuning_type freeze with ``freeze.trainable_layers: N`` and
``freeze.llama_pro: true`` (LLaMA-Factory's ``freeze_trainable_layers: N`` with
``use_llama_pro: true``): ``layer_ids`` picks the inserted blocks, the last of each
group of the expanded model's layers.

The expansion streams the safetensors files a tensor at a time, so its host memory is
about one output shard, not the model (LLaMA-Factory's script loads the whole model).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from raylm.config import ConfigError

_LAYER = re.compile(r"^(?P<head>(?:.*\.)?layers\.)(?P<idx>\d+)(?P<tail>\..*)$")
"""A decoder layer's tensor (``model.layers.3.mlp.down_proj.weight``), as in the Llama,
Mistral, Qwen2/3 and Yi checkpoints LLaMA-Factory's script expands."""
ZEROED = ("o_proj", "down_proj")
"""The inserted copy's projections into the residual stream: zero, so it is an identity."""


def layer_ids(num_layers: int, n: int, llama_pro: bool = False) -> list[int]:
    """The decoder layers freeze tuning trains: the last ``n`` (the first ``-n`` when
    negative) or, with ``llama_pro``, LLaMA-Factory's evenly spaced ones: ids stride-1,
    2*stride-1, ... with stride = num_layers / n, the blocks :func:`expand` inserted."""
    if not 0 < abs(n) <= num_layers:
        raise ConfigError(
            f"freeze.trainable_layers={n}: the model has {num_layers} layers (last N > 0, "
            "first -N < 0)"
        )
    if not llama_pro:
        return list(range(num_layers - n, num_layers)) if n > 0 else list(range(-n))
    if n < 0 or num_layers % n:
        raise ConfigError(
            f"freeze.llama_pro with freeze.trainable_layers={n}: the model's {num_layers} "
            "layers must split into that many equal groups (it is the number of blocks "
            "`raylm llama-pro --num-expand` inserted)"
        )
    stride = num_layers // n
    return list(range(stride - 1, num_layers, stride))


def expand(
    model_dir: str | Path, out_dir: str | Path, num_expand: int, shard_mb: int = 2000
) -> Path:
    """Write ``model_dir`` with ``num_expand`` identity blocks inserted to ``out_dir`` (a
    Hugging Face directory: config with the new layer count, weights, tokenizer and the
    other files copied). Returns ``out_dir``."""
    src, out = Path(model_dir), Path(out_dir)
    if not (src / "config.json").is_file():
        raise ConfigError(
            f"llama-pro: {src} is not a local model directory (no config.json); download a "
            "hub model first (huggingface-cli download ORG/NAME --local-dir DIR)"
        )
    config = json.loads((src / "config.json").read_text())
    num_layers = int(config.get("num_hidden_layers") or 0)
    if num_expand <= 0 or not num_layers or num_layers % num_expand:
        raise ConfigError(
            f"llama-pro: num_expand={num_expand} must be positive and divide the model's "
            f"{num_layers} layers (num_hidden_layers in {src / 'config.json'})"
        )
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"llama-pro: {src} holds no *.safetensors weights (resave it so)")
    out.mkdir(parents=True, exist_ok=True)
    split = num_layers // num_expand
    _write_weights(_expanded(files, split), out, shard_mb * 2**20)
    config["num_hidden_layers"] = num_layers + num_expand
    if isinstance(config.get("layer_types"), list):  # per-layer attention kinds (Qwen2/3)
        kinds = config["layer_types"]
        config["layer_types"] = [k for i, t in enumerate(kinds) for k in _copies(i, t, split)]
    skip = {"config.json", "model.safetensors.index.json"}
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in skip:
            shutil.copy(f, out / f.name)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def _copies(i: int, value: Any, split: int) -> list[Any]:
    """Layer ``i``'s entries in the expanded model: itself, and its inserted copy when
    it ends a group."""
    return [value, value] if (i + 1) % split == 0 else [value]


def _new_index(i: int, split: int) -> int:
    """Where original layer ``i`` lands: after the blocks inserted before it."""
    return i + i // split


def _expanded(files: list[Path], split: int) -> Iterator[tuple[str, Any]]:
    """(name, tensor) of the expanded model, read a tensor at a time."""
    import torch
    from safetensors import safe_open

    for file in files:
        with safe_open(str(file), "pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensor = f.get_tensor(name)
                m = _LAYER.match(name)
                if not m:
                    yield name, tensor
                    continue
                i = int(m["idx"])
                yield f"{m['head']}{_new_index(i, split)}{m['tail']}", tensor
                if (i + 1) % split == 0:
                    copy = f"{m['head']}{_new_index(i, split) + 1}{m['tail']}"
                    zero = any(z in m["tail"] for z in ZEROED)
                    yield copy, torch.zeros_like(tensor) if zero else tensor.clone()


def _write_weights(tensors: Iterator[tuple[str, Any]], out: Path, limit: int) -> None:
    """Safetensors shards of at most ``limit`` bytes (and their index when several), in
    transformers' names."""
    from safetensors.torch import save_file

    from raylm.storage import hf_shard_name

    shards: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    size = 0

    def flush() -> None:
        nonlocal current, size
        if current:
            index = len(shards)
            save_file(current, str(out / f".shard-{index}.tmp"), metadata={"format": "pt"})
            shards.append(dict.fromkeys(current))
            current, size = {}, 0

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > limit:
            flush()
        current[name] = tensor.contiguous()
        size += nbytes
    flush()
    total = len(shards)
    weight_map: dict[str, str] = {}
    for index, names in enumerate(shards):
        final = hf_shard_name(index, total)
        (out / f".shard-{index}.tmp").rename(out / final)
        weight_map.update(dict.fromkeys(names, final))
    if total > 1:
        size_all = sum((out / f).stat().st_size for f in set(weight_map.values()))
        index_doc = {"metadata": {"total_size": size_all}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index_doc, indent=2))
