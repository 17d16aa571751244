"""``final/``: what the eval and serve jobs load.

On an object store ``final/`` is written locally first and uploaded; the job's manifest,
written after the upload returned, is what says it is complete.

Full / freeze training writes a Hugging Face directory (safetensors, tokenizer,
generation config); LoRA writes the PEFT adapter (plus the tokenizer, so the
directory is self-describing) and, with ``export.merge_lora``, ``final/merged`` as
a full model. OFT writes the merged full model, its adapter in ``final/oft_adapter``
(no engine serves OFT adapters; ``raylm.train.oft``).

A reward model (stage rm) is an ``AutoModelForSequenceClassification`` (one output):
full / freeze write it as above, its ``score`` head among the shards; LoRA's adapter
holds the trained head too (PEFT's ``modules_to_save``), and ``final/merged`` is always
written, since engines cannot serve a LoRA adapter with a trained head.

ZeRO-3 weights live in pieces on every rank. They are gathered a shard at a time (a
collective per shard) and rank 0 writes each safetensors shard before gathering the
next, so rank 0's host memory peaks at about one shard (``export.shard_mb``), not at
the whole model, which need not fit on one node.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raylm import storage
from raylm.config import local_model
from raylm.tokenizer import stop_at_template

FINAL = "final"


def export_final(loop: Any) -> None:
    """Every rank calls this (the gathers are collectives); rank 0 writes."""
    import torch.distributed as dist

    out = storage.join(loop.run_dir, FINAL)
    with tempfile.TemporaryDirectory(prefix="raylm-final-") as tmp:
        local = Path(tmp) / FINAL if storage.is_remote(out) else Path(out)
        export_to(loop.cfg, loop.engine.module, loop.tok, local, loop.rank)
        if loop.rank == 0 and storage.is_remote(out):
            storage.delete_dir(out)
            storage.copy_dir(str(local), out)
    dist.barrier()


def export_to(cfg: Any, module: Any, tok: Any, out: Path, rank: int) -> None:
    """``final/`` at the local path ``out``: shards first, then the rest around them."""
    weights = out.with_name(f".{out.name}.weights")
    if rank == 0:
        shutil.rmtree(weights, ignore_errors=True)
    files = write_shards(module, _exported(cfg), weights, rank, shard_bytes(cfg))
    if rank == 0:
        write_final(cfg, module, weights, files, tok, out)


def shard_bytes(cfg: Any) -> int:
    return int(cfg.export.shard_mb) * 2**20


def _exported(cfg: Any) -> Callable[[str, Any], bool]:
    """LoRA and OFT export what they trained (the adapter), so only those parameters are
    gathered; full and freeze export every parameter."""
    if cfg.finetuning_type in ("lora", "qlora", "oft"):
        return lambda name, param: param.requires_grad
    return lambda name, param: True


def write_shards(
    module: Any, keep: Callable[[str, Any], bool], out: Path, rank: int, limit: int
) -> list[str]:
    """Gather the parameters ``keep`` selects a shard at a time and write each shard
    from rank 0; every rank must call this (each gather is a collective). Tied weights
    appear once, as transformers saves them. Returns the file names, in order."""
    groups: list[list[tuple[str, Any]]] = [[]]
    size = 0
    for name, param in module.named_parameters():
        if not keep(name, param):
            continue
        nbytes = _full_numel(param) * param.element_size()
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append((name, param))
        size += nbytes
    shards = [g for g in groups if g]
    files = [storage.hf_shard_name(i, len(shards)) for i in range(len(shards))]
    for group, file in zip(shards, files, strict=True):
        tensors = _gather(group, rank)
        if rank == 0:
            from safetensors.torch import save_file

            out.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(out / file), metadata={"format": "pt"})
    return files


def _full_numel(param: Any) -> int:
    return int(getattr(param, "ds_numel", param.numel()))  # ZeRO-3 keeps a 0-size stub


def _gather(group: list[tuple[str, Any]], rank: int) -> dict[str, Any]:
    """CPU copies of one group's full tensors on rank 0 ({} elsewhere); a no-op gather for
    parameters ZeRO does not partition (stages 0-2)."""
    import deepspeed

    params = [p for _, p in group]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        if rank != 0:
            return {}
        return {name: p.detach().to("cpu", copy=True).contiguous() for name, p in group}


def write_final(
    cfg: Any, module: Any, weights: Path, files: list[str], tok: Any, out: Path
) -> None:
    """Assemble ``final/`` beside it and rename, so it is never half written. ``weights``
    holds the shards :func:`write_shards` wrote; a LoRA run's become the adapter, an
    OFT run's the adapter merged into the base (``raylm.train.oft``)."""
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    lora, oft = cfg.finetuning_type in ("lora", "qlora"), cfg.finetuning_type == "oft"
    if lora:
        module.save_pretrained(str(tmp), state_dict=_load_shards(weights, files))
    elif oft:
        from raylm.train.oft import save_oft_adapter

        adapter = save_oft_adapter(module, _load_shards(weights, files), tok, tmp)
        merge_adapter(cfg, adapter, tmp, tok)  # no engine serves OFT adapters
    else:
        weights.rename(tmp)
        _write_index(tmp, files)
        module.config.save_pretrained(str(tmp))
    shutil.rmtree(weights, ignore_errors=True)
    tok.save_pretrained(str(tmp))  # with model.template, its chat_template and EOS
    if not (lora or oft) and getattr(module, "generation_config", None) is not None:
        stop_at_template(cfg.model.template, tok, module.generation_config)
        module.generation_config.save_pretrained(str(tmp))
    if lora and cfg.export.pissa_convert:  # before merging: the merge reads final/
        from raylm.train.pissa import convert_pissa

        convert_pissa(cfg, tmp)
    if lora and cfg.stage == "rm":  # always: no engine serves a LoRA with a trained head
        from raylm.train.reward import merge_reward

        merge_reward(cfg, tmp, tmp / "merged", tok)
    elif lora and cfg.export.merge_lora:
        merge_adapter(cfg, tmp, tmp / "merged", tok)
    (tmp / "raylm_train.json").write_text(
        json.dumps(
            {
                "stage": cfg.stage,
                "finetuning_type": cfg.finetuning_type,
                "base_model": cfg.model.name_or_path,
                "template": getattr(cfg.model, "template", None),
            },
            indent=2,
        )
    )
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def _load_shards(weights: Path, files: list[str]) -> dict[str, Any]:
    from safetensors.torch import load_file

    state: dict[str, Any] = {}
    for file in files:
        state.update(load_file(str(weights / file)))
    return state


def _write_index(out: Path, files: list[str]) -> None:
    """transformers' index for a sharded checkpoint: which file holds each tensor."""
    if len(files) < 2:
        return
    from safetensors import safe_open

    weight_map = {}
    for file in files:
        with safe_open(str(out / file), "pt") as f:
            weight_map.update(dict.fromkeys(f.keys(), file))
    sizes = sum((out / f).stat().st_size for f in files)
    index = {"metadata": {"total_size": sizes}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def merge_adapter(cfg: Any, adapter_dir: Path, out: Path, tok: Any) -> None:
    """Base + PEFT adapter (LoRA, or OFT: each W becomes its rotated W R) folded into plain
    weights at the base's dtype: servable by engines without adapter support."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(
        local_model(cfg.model.name_or_path), trust_remote_code=cfg.model.trust_remote_code
    )
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    if merged.generation_config is not None:
        stop_at_template(cfg.model.template, tok, merged.generation_config)
        merged.generation_config.save_pretrained(str(out))
