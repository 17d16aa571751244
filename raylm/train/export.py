"""``final/``: what the eval and serve jobs load.

On an object store ``final/`` is written locally first and uploaded; the job's manifest,
written after the upload returned, is what says it is complete.

Full / freeze training writes a Hugging Face directory (safetensors, tokenizer,
generation config); LoRA writes the PEFT adapter (plus the tokenizer, so the
directory is self-describing) and, with ``export.merge_lora``, ``final/merged`` as
a full model. ZeRO-3 weights are gathered from all ranks first (a collective).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from raylm import storage
from raylm.config import resolve_model
from raylm.tokenizer import stop_token_ids

FINAL = "final"


def export_final(loop: Any) -> None:
    import torch.distributed as dist

    state_dict = _gather_state_dict(loop.engine)
    if loop.rank == 0:
        out = storage.join(loop.run_dir, FINAL)
        if storage.is_remote(out):
            with tempfile.TemporaryDirectory(prefix="raylm-final-") as tmp:
                write_final(loop.cfg, loop.engine.module, state_dict, loop.tok, Path(tmp) / FINAL)
                storage.delete_dir(out)
                storage.copy_dir(str(Path(tmp) / FINAL), out)
        else:
            write_final(loop.cfg, loop.engine.module, state_dict, loop.tok, Path(out))
    dist.barrier()


def _gather_state_dict(engine: Any) -> dict[str, Any] | None:
    if engine.zero_optimization_partition_weights():
        return engine._zero3_consolidated_16bit_state_dict()
    return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}


def write_final(cfg: Any, module: Any, state_dict: dict[str, Any], tok: Any, out: Path) -> None:
    """Write into a temp dir and rename, so ``final/`` is never half written."""
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    lora = cfg.finetuning_type in ("lora", "qlora")
    module.save_pretrained(str(tmp), state_dict=state_dict, safe_serialization=True)
    tok.save_pretrained(str(tmp))  # with model.template, its chat_template and EOS
    if not lora and getattr(module, "generation_config", None) is not None:
        stop_at_template(cfg, tok, module.generation_config)
        module.generation_config.save_pretrained(str(tmp))
    if lora and cfg.export.merge_lora:
        merge_lora(cfg, tmp, tmp / "merged", tok)
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


def merge_lora(cfg: Any, adapter_dir: Path, out: Path, tok: Any) -> None:
    """Base + adapter folded into plain weights: servable by engines without LoRA support."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(
        resolve_model(cfg.model.name_or_path), trust_remote_code=cfg.model.trust_remote_code
    )
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    if merged.generation_config is not None:
        stop_at_template(cfg, tok, merged.generation_config)
        merged.generation_config.save_pretrained(str(out))


def stop_at_template(cfg: Any, tok: Any, generation_config: Any) -> None:
    """With a named template, generation must stop at its EOS and stop words (which the
    base model's generation config may not know: qwen's <|im_end|> on a base Qwen), so
    engines reading ``generation_config.json`` (vLLM, transformers) stop where the model
    was trained to; the base's own EOS ids are kept too."""
    template = getattr(cfg.model, "template", None)
    if not template:
        return
    ids = stop_token_ids(tok, template)
    old = generation_config.eos_token_id
    for i in old if isinstance(old, list) else [old]:
        if i is not None and i not in ids:
            ids.append(i)
    generation_config.eos_token_id = ids[0] if len(ids) == 1 else ids
