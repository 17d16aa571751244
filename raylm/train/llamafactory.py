"""Read a flat LLaMA-Factory training YAML as a raylm train config.

Users arrive with files like LLaMA-Factory's ``examples/train_lora/*.yaml``. Each key
either maps onto a raylm key, is accepted with no effect (raylm already does that
thing, or it only matters to LLaMA-Factory's own launcher), or is rejected by name.
Nothing is dropped silently: ignored keys are logged with the reason.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable
from typing import Any

from raylm.config import ConfigError

log = logging.getLogger(__name__)

# LLaMA-Factory key -> raylm dotted key.
MAPPED: dict[str, str] = {
    "model_name_or_path": "model.name_or_path",
    "trust_remote_code": "model.trust_remote_code",
    "stage": "stage",
    "finetuning_type": "finetuning_type",
    "lora_rank": "lora.rank",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "lora_target": "lora.target",
    "freeze_trainable_layers": "freeze.trainable_layers",
    "pref_beta": "dpo.beta",
    "pref_loss": "dpo.loss_type",
    "pref_ftx": "dpo.sft_weight",
    "simpo_gamma": "dpo.simpo_gamma",
    "dpo_label_smoothing": "dpo.label_smoothing",
    "cutoff_len": "data.cutoff_len",
    "max_samples": "data.max_samples",
    "val_size": "data.val_size",
    "per_device_train_batch_size": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "learning_rate": "train.lr",
    "num_train_epochs": "train.epochs",
    "max_steps": "train.max_steps",
    "lr_scheduler_type": "train.lr_scheduler",
    "warmup_ratio": "train.warmup_ratio",
    "weight_decay": "train.weight_decay",
    "max_grad_norm": "train.max_grad_norm",
    "seed": "train.seed",
    "logging_steps": "train.logging_steps",
    "save_steps": "checkpoint.save_steps",
    "save_total_limit": "checkpoint.keep",
    "deepspeed": "deepspeed.config_file",
    "report_to": "report_to",
}

# Keys accepted with no effect, and why (logged so the user knows).
IGNORED: dict[str, str] = {
    "do_train": "a train job always trains",
    "template": "the chat template comes from the model's tokenizer",
    "overwrite_cache": "raylm's data job writes fresh shards per run",
    "preprocessing_num_workers": "Ray Data sizes its own parallelism",
    "dataloader_num_workers": "Ray Data feeds the workers",
    "plot_loss": "raylm always writes loss.png",
    "overwrite_output_dir": "runs are keyed by run_name; re-running resumes",
    "save_only_model": "raylm checkpoints always hold what exact resume needs",
    "ddp_timeout": "Ray Train sets the collective timeout",
    "resume_from_checkpoint": "raylm resumes from the newest complete checkpoint by itself",
    "flash_attn": "the attention kernel is chosen by transformers for the device",
    "eval_strategy": "use the eval job",
    "eval_steps": "use the eval job",
    "per_device_eval_batch_size": "use the eval job",
    "do_eval": "use the eval job",
    "dataset_dir": "folded into data.path",
    "bf16": "folded into train.precision",
    "fp16": "folded into train.precision",
}

SPECIAL = ("dataset", "output_dir", "quantization_bit", "bf16", "fp16")

# LLaMA-Factory pref_loss values raylm has no loss for, and what to use instead.
UNSUPPORTED_PREF_LOSS: dict[str, str] = {
    "kto_pair": "use sigmoid, hinge or ipo (or simpo/orpo without a reference model)",
}


def is_llamafactory(data: dict[str, Any]) -> bool:
    """LLaMA-Factory YAMLs are flat and always name the model this way."""
    return "model_name_or_path" in data and not any(isinstance(v, dict) for v in data.values())


def translate(data: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """Nested raylm keys for a flat LLaMA-Factory mapping; raises on unknown keys."""
    unknown = sorted(k for k in data if k not in MAPPED and k not in IGNORED and k not in SPECIAL)
    if unknown:
        known = [*MAPPED, *IGNORED, *SPECIAL]
        hints = [_hint(k, known) for k in unknown]
        raise ConfigError(
            f"{source}: LLaMA-Factory keys raylm does not support: {', '.join(hints)}. "
            f"Supported: {', '.join(sorted(MAPPED))}"
        )
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key in MAPPED:
            _set(out, MAPPED[key], CONVERT.get(key, _same)(value))
        elif key in IGNORED:
            log.warning("%s: ignoring LLaMA-Factory key %r: %s", source, key, IGNORED[key])
    _special(data, out, source)
    return out


def _special(data: dict[str, Any], out: dict[str, Any], source: str) -> None:
    """Keys that map onto more than one raylm key, or need a decision."""
    pref_loss = str(data.get("pref_loss", ""))
    if pref_loss in UNSUPPORTED_PREF_LOSS:
        raise ConfigError(
            f"{source}: pref_loss={pref_loss!r} is not supported by raylm: "
            f"{UNSUPPORTED_PREF_LOSS[pref_loss]}"
        )
    if data.get("bf16"):
        _set(out, "train.precision", "bf16")
    elif data.get("fp16"):
        _set(out, "train.precision", "fp16")
    if "output_dir" in data:
        run_dir = str(data["output_dir"]).rstrip("/")
        parent, _, name = run_dir.rpartition("/")
        _set(out, "storage_path", parent or ".")
        _set(out, "run_name", name)
    if "dataset" in data:
        names = [d.strip() for d in str(data["dataset"]).split(",") if d.strip()]
        if len(names) != 1:
            raise ConfigError(
                f"{source}: dataset={data['dataset']!r}: raylm trains on one dataset; "
                "merge them with the data job first"
            )
        root = str(data.get("dataset_dir", "")).rstrip("/")
        _set(out, "data.path", f"{root}/{names[0]}" if root else names[0])
    bits = data.get("quantization_bit")
    if bits is not None:
        if int(bits) != 4:
            raise ConfigError(f"{source}: quantization_bit={bits}: raylm's QLoRA supports 4 only")
        if data.get("finetuning_type", "lora") != "lora":
            raise ConfigError(f"{source}: quantization_bit needs finetuning_type: lora")
        _set(out, "finetuning_type", "qlora")


def _hint(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.7)
    return f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key)


def _set(out: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = out
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def _same(value: Any) -> Any:
    return value


def _csv(value: Any) -> list[str]:
    """LLaMA-Factory writes lists as comma-separated strings (``q_proj,v_proj``)."""
    if isinstance(value, list):
        return [str(v) for v in value]
    return [v.strip() for v in str(value).split(",") if v.strip()]


def _report_to(value: Any) -> list[str]:
    return [v for v in _csv(value) if v != "none"]


CONVERT: dict[str, Callable[[Any], Any]] = {
    "lora_target": _csv,
    "report_to": _report_to,
    "learning_rate": float,
    "num_train_epochs": float,
    # YAML reads ``1e-3`` (no dot) as a string; LLaMA-Factory's parser coerces it.
    "pref_beta": float,
    "pref_ftx": float,
    "simpo_gamma": float,
    "dpo_label_smoothing": float,
}
