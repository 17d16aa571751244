"""Read a flat LLaMA-Factory training YAML as a raylm train config.

Users arrive with files like LLaMA-Factory's ``examples/train_lora/*.yaml``. Every key
LLaMA-Factory knows has a fate in ``raylm.train.llamafactory_keys``: mapped onto a raylm
key, accepted with no effect (the reason is logged), or refused with the reason and what
would make it work; a key LLaMA-Factory does not know is refused with a did-you-mean.
Nothing is dropped silently. All refusals of one file are reported together.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from raylm.config import ConfigError, resolve_path
from raylm.data.hub import hub_path
from raylm.train import llamafactory_keys as keys
from raylm.train import llamafactory_optim as optim_keys
from raylm.train.config_methods import SCHEDULERS
from raylm.train.llamafactory_values import CONVERT, as_bool, csv_list, hint, same, set_key

log = logging.getLogger(__name__)

UNSUPPORTED_PREF_LOSS: dict[str, str] = {
    "kto_pair": "use sigmoid, hinge or ipo (or simpo/orpo without a reference model)",
}
"""LLaMA-Factory pref_loss values raylm has no loss for, and what to use instead."""

STAGES: dict[str, str | None] = {
    "pt": None,
    "sft": None,
    "dpo": None,
    "kto": None,
    "rm": None,
    "ppo": (
        "stage ppo: LLaMA-Factory's ppo YAML is not translated (its reward_model is a "
        "value-head model, an adapter or an API raylm's rm stage does not write); write "
        "raylm's stage ppo with a ppo group, reward_model an rm run (docs/rl.md)"
    ),
}

PREQUANTIZED = ("gptq", "awq", "aqlm", "hqq", "eetq", "fp8", "compressed-tensors", "bitnet")
"""quant_method values of checkpoints (and quantization_method values) raylm cannot train:
its only quantized path is QLoRA on bitsandbytes 4-bit (CUDA)."""

OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_hf")
"""``optim`` values that are what raylm builds anyway: torch AdamW."""

ATTENTION = {"auto": "auto", "sdpa": "sdpa", "disabled": "eager", "eager": "eager",
             "off": "eager", "false": "eager", "fa2": "flash_attention_2"}  # fmt: skip
"""``flash_attn`` -> ``model.attn_implementation`` (YAML reads the older ``off`` as false)."""


def is_llamafactory(data: dict[str, Any]) -> bool:
    """LLaMA-Factory YAMLs are flat and always name the model this way."""
    return "model_name_or_path" in data and not isinstance(data.get("model"), dict)


def translate(data: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """Nested raylm keys for a flat LLaMA-Factory mapping; raises on unknown keys and on
    anything raylm cannot honour, naming every such key with its reason."""
    unknown = [hint(k, keys.known()) for k in sorted(data) if k not in set(keys.known())]
    refusals = [
        f"{k}={data[k]!r}: {keys.REFUSED[k]}"
        for k in data
        if k in keys.REFUSED and not keys.at_default(k, data[k])
    ]
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key in keys.MAPPED and value is not None:
            convert = CONVERT.get(key, optim_keys.CONVERT.get(key, same))
            set_key(out, keys.MAPPED[key], convert(value))
    _defaults(data, out)
    refusals += _special(data, out, source, bool(refusals or unknown))  # may override
    if unknown or refusals:
        raise ConfigError(_problems(source, unknown, refusals))
    for key in data:
        if key in keys.NOOP:
            log.warning("%s: ignoring LLaMA-Factory key %r: %s", source, key, keys.NOOP[key])
    _notes(data, source)
    return out


def _notes(data: dict[str, Any], source: str) -> None:
    """What a file gets that LLaMA-Factory does a little differently."""
    if as_bool(data.get("pissa_init")) and "pissa_iter" not in data:  # else its no-op is logged
        log.warning(
            "%s: pissa_init: raylm's PiSSA is the exact SVD (LLaMA-Factory's pissa_iter: -1), "
            "not 16 fast-SVD iterations: their residual cannot be redone when final/ loads",
            source,
        )
    strategy = data.get("eval_strategy", data.get("evaluation_strategy"))
    if strategy is None and (data.get("val_size") or data.get("eval_dataset")):
        log.warning(
            "%s: val_size / eval_dataset without eval_strategy: the examples are held out "
            "and counted but not scored (transformers' default is no); set eval_strategy: "
            "steps (with eval_steps) or epoch",
            source,
        )
    hf = data.get("gradient_checkpointing")
    hf_off = hf is not None and not as_bool(hf)
    if hf_off and _checkpoints(data):
        log.warning(
            "%s: gradient_checkpointing=false: LLaMA-Factory checkpoints activations anyway, "
            "and so does raylm (disable_gradient_checkpointing: true turns it off)",
            source,
        )


def _problems(source: str, unknown: list[str], refusals: list[str]) -> str:
    """One message for every key of the file raylm cannot take."""
    parts = [f"{source}:"]
    if unknown:
        parts.append(
            f"keys LLaMA-Factory and raylm do not know: {', '.join(unknown)} (mapped keys: "
            f"{', '.join(sorted(keys.MAPPED))}; docs/llamafactory.md lists them all)."
        )
    if refusals:
        parts.append("LLaMA-Factory settings raylm cannot honour:")
        parts += [f"\n  - {r}" for r in refusals]
    return " ".join(parts).replace(" \n", "\n")


def _special(data: dict[str, Any], out: dict[str, Any], source: str, refused: bool) -> list[str]:
    """Keys whose fate depends on their value; returns the refusals (``refused``: some
    key was refused already, so a missing dataset needs no mention)."""
    refusals: list[str] = []
    checks = (_stage, _values, _precision, _quantization, _attention, _knobs, _ray, _resume, _loss,
              _oft, _llama_pro, optim_keys.optimizer_extras)  # fmt: skip
    for check in checks:
        refusals += check(data, out)
    _data(data, out, refusals, refused)
    _output(data, out)
    if data.get("packing") is None and data.get("stage") == "pt":
        log.warning(
            "%s: stage pt: LLaMA-Factory packs documents into cutoff_len blocks; raylm's "
            "train job truncates each document at cutoff_len (the data job's tokenize.pack "
            "packs)",
            source,
        )
    elif data.get("packing"):
        refusals.append(
            "packing=True: pack with the data job (tokenize.pack=true) and train on its shards"
        )
    return refusals


def _stage(data: dict[str, Any], out: dict[str, Any]) -> list[str]:
    stage = str(data.get("stage", "sft"))
    if stage not in STAGES:
        return [f"stage={stage!r}: expected one of {list(STAGES)}"]
    reason = STAGES[stage]
    refusals = [reason] if reason else []
    if stage == "kto":  # pref_beta and pref_ftx are KTO's beta and SFT weight there
        dpo = out.get("dpo", {})
        for key in ("beta", "sft_weight"):
            if key in dpo:
                set_key(out, f"kto.{key}", dpo.pop(key))
    pref_loss = str(data.get("pref_loss", ""))
    if pref_loss in UNSUPPORTED_PREF_LOSS:
        refusals.append(
            f"pref_loss={pref_loss!r} is not supported by raylm: {UNSUPPORTED_PREF_LOSS[pref_loss]}"
        )
    return refusals


def _values(data: dict[str, Any], out: dict[str, Any]) -> list[str]:
    """Mapped keys whose LLaMA-Factory values raylm has no counterpart for."""
    refusals = []
    sched = data.get("lr_scheduler_type")
    if sched is not None and sched not in SCHEDULERS:
        refusals.append(f"lr_scheduler_type={sched!r}: raylm has {', '.join(SCHEDULERS)}")
    sinks = [s for s in csv_list(data.get("report_to", [])) if s != "none"]
    odd = [s for s in sinks if s not in ("tensorboard", "mlflow", "wandb")]
    if odd:
        refusals.append(f"report_to={odd}: raylm reports to tensorboard, mlflow or wandb")
    optim = data.get("optim")
    if optim is not None and optim not in OPTIMIZERS and optim not in optim_keys.BNB_OPTIM:
        refusals.append(
            f"optim={optim!r}: raylm builds {', '.join(OPTIMIZERS)} (torch AdamW, or Muon "
            f"with use_muon) and bitsandbytes' {', '.join(optim_keys.BNB_OPTIM)}"
        )
    return refusals + _warmup(data, out)


def _warmup(data: dict[str, Any], out: dict[str, Any]) -> list[str]:
    """Whole steps, or (transformers 5) a float in [0, 1): a share of the total steps."""
    value = data.get("warmup_steps")
    if value is None:
        return []
    try:
        steps = float(value)
    except (TypeError, ValueError):
        steps = -1.0
    if 0 < steps < 1:
        set_key(out, "train.warmup_ratio", steps)
    elif steps >= 0 and steps == int(steps):
        set_key(out, "train.warmup_steps", int(steps))
    else:
        return [f"warmup_steps={value!r}: a whole number of steps, or a share in [0, 1)"]
    return []


def _precision(data: dict[str, Any], out: dict[str, Any]) -> list[str]:
    if data.get("bf16") or data.get("pure_bf16"):
        set_key(out, "train.precision", "bf16")
    elif data.get("fp16"):
        set_key(out, "train.precision", "fp16")
    return []


def _quantization(data: dict[str, Any], out: dict[str, Any]) -> list[str]:
    """bitsandbytes 4-bit is raylm's QLoRA; other methods, and checkpoints already
    quantized by them (their config.json says so), are refused."""
    method = str(data.get("quantization_method", "bnb")).lower()
    bits = data.get("quantization_bit")
    if method != "bnb":
        return [
            f"quantization_method={method!r}: raylm's only quantized path is QLoRA on "
            "bitsandbytes 4-bit (quantization_method: bnb, quantization_bit: 4, a CUDA GPU)"
        ]
    found = _checkpoint_quantization(str(data.get("model_name_or_path", "")))
    if found in PREQUANTIZED:
        return [
            f"model_name_or_path: a {found}-quantized checkpoint; raylm cannot train on it "
            f"(its matmuls need {found}'s CUDA kernel packages, which raylm does not load: "
            "start from the unquantized model, with quantization_bit: 4 for QLoRA)"
        ]
    if bits is None:
        return []
    if int(bits) != 4:
        return [f"quantization_bit={bits}: raylm's QLoRA (bitsandbytes) supports 4 only"]
    if data.get("finetuning_type") == "oft":
        return [
            f"quantization_bit={bits} with finetuning_type oft (QOFT): a 4-bit bitsandbytes "
            "base needs bitsandbytes' CUDA kernels (LLaMA-Factory's bnb_npu example runs "
            "them on Ascend NPUs, which raylm does not target), and raylm quantizes the "
            "base for LoRA only (QLoRA, on CUDA GPUs): train OFT on the unquantized model"
        ]
    if data.get("finetuning_type", "lora") != "lora":
        return ["quantization_bit needs finetuning_type: lora (QLoRA)"]
    set_key(out, "finetuning_type", "qlora")
    return []


def _checkpoint_quantization(model: str) -> str | None:
    """The ``quant_method`` a local checkpoint declares (hub ids are not looked up)."""
    path = os.path.join(resolve_path(model), "config.json") if model else ""
    if not path or not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            quant = json.load(f).get("quantization_config") or {}
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return str(quant.get("quant_method", "")).lower() or None


def _attention(data: dict[str, Any], out: dict[str, Any]) -> list[str]:
    """``flash_attn`` names the kernel (LLaMA-Factory's disabled is eager). fa2 maps: that
    it needs CUDA, flash-attn and bf16/fp16 is checked when the run starts
    (``raylm.train.model.check_knobs``), as for a raylm YAML."""
    value = data.get("flash_attn")
    if value is None:
        return []
    value = str(value).lower()
    if value in ATTENTION:
        set_key(out, "model.attn_implementation", ATTENTION[value])
        return []
    if value == "fa3":
        return [
            "flash_attn='fa3': raylm supports flash_attention_2 only (flash_attn: fa2, "
            "model.attn_implementation=flash_attention_2)"
        ]
    return [f"flash_attn={value!r}: expected auto, sdpa, disabled or fa2"]


def _checkpoints(data: dict[str, Any]) -> bool:
    """LLaMA-Factory checkpoints activations unless ``disable_gradient_checkpointing``;
    transformers' ``gradient_checkpointing: true`` turns it on regardless (its Trainer
    enables it), and false does not turn LLaMA-Factory's off."""
    return as_bool(data.get("gradient_checkpointing")) or not as_bool(
        data.get("disable_gradient_checkpointing")
    )


def _knobs(data: dict[str, Any], out: dict[str, Any]) -> list[str]:
    """Gradient checkpointing, the adapter to continue and PiSSA's initialisation."""
    set_key(out, "model.gradient_checkpointing", _checkpoints(data))
    if as_bool(data.get("pissa_init")):
        set_key(out, "lora.init", "pissa")
    elif as_bool(data.get("pissa_convert")):
        return ["pissa_convert=True converts a PiSSA adapter: it needs pissa_init: true"]
    adapters = csv_list(data.get("adapter_name_or_path") or [])
    if len(adapters) > 1:
        return [
            f"adapter_name_or_path={data['adapter_name_or_path']!r}: raylm continues one "
            "adapter; merge the adapters into the base first (export.merge_lora), then "
            "train from the merged model"
        ]
    if adapters:
        set_key(out, "lora.adapter_name_or_path", adapters[0])
    return []


def _loss(data: dict[str, Any], out: dict[str, Any]) -> list[str]:
    """``use_{dft,eaft,asft}_loss``: ``loss.type`` (LLaMA-Factory's SFT trainer reads them)."""
    on = [k for k in ("dft", "eaft", "asft") if as_bool(data.get(f"use_{k}_loss"))]
    if len(on) > 1 or (on and str(data.get("stage", "sft")) != "sft"):
        return [f"use_{'_loss, use_'.join(on)}_loss: one SFT loss variant, with stage sft"]
    if on:
        set_key(out, "loss.type", on[0])
    return []


LORA_ONLY = ("use_dora", "use_rslora", "pissa_init", "loraplus_lr_ratio")
"""LoRA variants LLaMA-Factory refuses with any other finetuning_type."""


def _oft(data: dict[str, Any], out: dict[str, Any]) -> list[str]:
    """finetuning_type oft: LLaMA-Factory builds PEFT's OFTConfig on ``lora_target`` (its
    ``oft_target`` is parsed, then unused) with ``additional_target``; raylm's oft.target
    takes oft_target, else lora_target. ``oft_rank`` alone sizes the blocks by count."""
    if str(data.get("finetuning_type")) != "oft":
        return []
    refusals = [f"{k}={data[k]!r}: a LoRA variant; LLaMA-Factory refuses it with "
                "finetuning_type oft too" for k in LORA_ONLY if as_bool(data.get(k))]  # fmt: skip
    oft_t, lora_t = data.get("oft_target"), data.get("lora_target")
    if oft_t is not None and lora_t is not None and csv_list(oft_t) != csv_list(lora_t):
        refusals.append(
            f"oft_target={oft_t!r} with lora_target={lora_t!r}: LLaMA-Factory builds OFT on "
            "lora_target (oft_target is read, unused), raylm on oft_target: set one"
        )
    if oft_t is not None or lora_t is not None:
        set_key(out, "oft.target", csv_list(oft_t if oft_t is not None else lora_t))
    if "additional_target" in out.get("lora", {}):
        set_key(out, "oft.additional_target", out["lora"].pop("additional_target"))
    if data.get("oft_rank") and data.get("oft_block_size") is None:
        set_key(out, "oft.block_size", 0)  # PEFT takes one of the two
    if data.get("adapter_name_or_path"):
        refusals.append(
            "adapter_name_or_path with finetuning_type oft: raylm continues LoRA adapters "
            "only; merge the OFT adapter into its base (a raylm OFT run's final/ is that "
            "merge) and train a new one from it"
        )
    return refusals


def _llama_pro(data: dict[str, Any], out: dict[str, Any]) -> list[str]:
    """``use_llama_pro``: train the blocks LLaMA Pro inserted (``raylm.train.llama_pro``)."""
    if not as_bool(data.get("use_llama_pro")):
        return []
    ftype = str(data.get("finetuning_type", "lora"))
    if ftype == "freeze":
        set_key(out, "freeze.llama_pro", True)
        return []
    return [
        f"use_llama_pro with finetuning_type {ftype}: raylm trains LLaMA Pro's inserted "
        "blocks with finetuning_type freeze (freeze_trainable_layers: the number inserted); "
        "adapters on those blocks only (LLaMA-Factory's lora/oft variant) are not built"
    ]


def _ray(data: dict[str, Any], out: dict[str, Any]) -> list[str]:
    """``resources_per_worker`` (earlier LLaMA-Factory releases): CPUs per worker, and one
    GPU per worker at most."""
    res = data.get("resources_per_worker")
    if res is None:
        return []
    if not isinstance(res, dict):
        return [f"resources_per_worker={res!r}: expected a mapping like {{GPU: 1}}"]
    res = {str(k).upper(): v for k, v in res.items()}
    refusals = [f"resources_per_worker.{k}: raylm reserves CPU and GPU only" for k in res
                if k not in ("CPU", "GPU")]  # fmt: skip
    if "CPU" in res:
        set_key(out, "scaling.cpus_per_worker", float(res["CPU"]))
    gpus = float(res.get("GPU", 0))
    if gpus > 1:
        refusals.append(f"resources_per_worker.GPU={res['GPU']}: raylm runs one GPU per worker")
    elif gpus:
        set_key(out, "scaling.use_gpu", True)
    return refusals


def _resume(data: dict[str, Any], out: dict[str, Any]) -> list[str]:
    value = data.get("resume_from_checkpoint")
    if value in (None, True, False):
        return []
    return [
        f"resume_from_checkpoint={value!r}: raylm resumes its own run (output_dir) from the "
        "newest complete checkpoint; a checkpoint of another run cannot be named"
    ]


def _data(data: dict[str, Any], out: dict[str, Any], refusals: list[str], refused: bool) -> None:
    """``dataset`` names registered in ``dataset_dir``'s dataset_info.json; a ``REMOTE:``
    dir is a Hub dataset repo (``raylm.data.hub``). ``tokenized_path`` without a dataset
    is a saved set to train on (``raylm.train.tokenized``: it is a data job output)."""
    root = str(data.get("dataset_dir", "data")).rstrip("/")
    if root.upper().startswith("REMOTE:"):
        root = hub_path(root)
    saved = data.get("tokenized_path")
    if "dataset" not in data:
        if saved:
            set_key(out, "data.path", str(saved))
        elif not (refusals or refused):
            refusals.append("no 'dataset': a training YAML names the datasets to train on")
        return
    set_key(out, "data.path", root)
    set_key(out, "data.datasets", csv_list(data["dataset"]))
    if saved:
        set_key(out, "data.tokenized_path", str(saved))


def _output(data: dict[str, Any], out: dict[str, Any]) -> None:
    """The run dir is ``output_dir``: its parent is storage_path and its name run_name,
    unless a run name is given too (run_name, ray_run_name), which then lives inside it."""
    if "output_dir" not in data:
        return
    run_dir = str(data["output_dir"]).rstrip("/")
    if data.get("run_name") or data.get("ray_run_name"):
        set_key(out, "storage_path", run_dir)
        return
    parent, _, name = run_dir.rpartition("/")
    set_key(out, "storage_path", parent or ".")
    set_key(out, "run_name", name)


def _defaults(data: dict[str, Any], out: dict[str, Any]) -> None:
    """LLaMA-Factory defaults that differ from raylm's: lora_alpha is twice the rank."""
    if data.get("lora_alpha") is None:
        set_key(out, "lora.alpha", 2 * int(data.get("lora_rank") or 8))
    if data.get("eval_strategy", data.get("evaluation_strategy")) is None:
        set_key(out, "eval.strategy", "no")  # transformers' default
