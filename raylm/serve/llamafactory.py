"""Read LLaMA-Factory's inference YAMLs as the serve job, its do_predict YAMLs as generate.

``llamafactory-cli api|chat X.yaml`` becomes ``raylm serve X.yaml`` (an OpenAI app on
vLLM, the adapter served as a LoRA, the named template rendered by the server, the
generating arguments as the server's default sampling parameters); ``llamafactory-cli
train X.yaml`` with ``do_predict: true`` becomes ``raylm generate X.yaml`` (the
eval_dataset's prompts completed, ``generated_predictions.jsonl`` and
``predict_results.json`` written as LLaMA-Factory writes them). Each key's fate is in
``raylm.serve.llamafactory_keys``; all problems of a file are reported together.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from raylm.config import ConfigError
from raylm.serve import llamafactory_keys as keys
from raylm.train import llamafactory_keys as train_keys
from raylm.train.llamafactory_values import hint

log = logging.getLogger(__name__)

LF_MAXLEN = 4096
"""LLaMA-Factory's ``vllm_maxlen`` default."""

LF_LORA_RANK = 32
"""LLaMA-Factory's ``vllm_max_lora_rank`` default."""

LF_MAX_NEW_TOKENS = 1024
"""LLaMA-Factory's ``max_new_tokens`` default (what its do_predict generates)."""


def is_llamafactory(data: dict[str, Any]) -> bool:
    """LLaMA-Factory YAMLs are flat and name the model with model_name_or_path."""
    return "model_name_or_path" in data and not isinstance(data.get("model"), dict)


def serve_translate(data: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """Nested serve-job keys for a flat LLaMA-Factory inference YAML."""
    return _translate(data, source, "serve")


def generate_translate(data: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """Nested generate-job keys for a flat LLaMA-Factory do_predict YAML."""
    return _translate(data, source, "generate")


def _translate(data: dict[str, Any], source: str, job: str) -> dict[str, Any]:
    every = [*keys.known(), *train_keys.known()]
    unknown = [hint(k, every) for k in sorted(data) if k not in set(every)]
    refusals = [
        f"{k}={v!r}: {keys.REFUSED[k]}"
        for k, v in data.items()
        if k in keys.REFUSED and not keys.at_default(k, v)
    ]
    out: dict[str, Any] = {}
    refusals += _model(data, out, job) + _engine(data, out) + _sampling(data, out, job)
    refusals += _predict(data, out) if job == "generate" else _not_predict(data, job)
    if unknown or refusals:
        raise ConfigError(_problems(source, job, unknown, refusals))
    _log_unused(data, source, job)
    return out


def _model(data: dict[str, Any], out: dict[str, Any], job: str) -> list[str]:
    serve = job == "serve"
    _set(out, "model.path" if serve else "model", str(data["model_name_or_path"]))
    refusals: list[str] = []
    backend = str(data.get("infer_backend", "vllm")).lower()  # absent: no note
    note = keys.BACKENDS.get(backend, f"infer_backend={backend!r}: expected vllm or huggingface")
    if backend == "huggingface":
        log.info("%s", note)
    elif note:
        refusals.append(note)
    if data.get("template") is not None:
        from raylm import templates

        name = str(data["template"])
        try:
            jinja = templates.get(name).jinja()
        except ConfigError as err:
            refusals.append(f"template={name!r}: {err}")
        else:
            _set(out, "engine.extra.chat_template" if serve else "input.template",
                 jinja if serve else name)  # fmt: skip
            if serve:
                _check_eos(name, str(data["model_name_or_path"]))
    adapters = _csv(data.get("adapter_name_or_path") or [])
    if len(adapters) > 1:
        refusals.append(
            f"adapter_name_or_path={data['adapter_name_or_path']!r}: raylm applies one "
            "adapter; merge the others into the base first (raylm train with "
            "export.merge_lora, or llamafactory-cli export)"
        )
    elif adapters and serve:
        name = _adapter_name(adapters[0])
        _set(out, "lora.adapters", {name: adapters[0]})
        _set(out, "lora.max_lora_rank", int(data.get("vllm_max_lora_rank") or LF_LORA_RANK))
        log.info(
            "adapter %s is served as LoRA %r: clients pass model='raylm:%s' (model "
            "'raylm' is the base model alone)", adapters[0], name, name,
        )  # fmt: skip
    elif adapters:
        _set(out, "lora_path", adapters[0])
    if serve and data.get("vllm_max_lora_rank") is not None:
        _set(out, "lora.max_lora_rank", int(data["vllm_max_lora_rank"]))
    return refusals


def _check_eos(template: str, model: str) -> None:
    """Warn where the server would not stop at the template's stop word: vLLM stops at
    the tokenizer's EOS, and LLaMA-Factory makes the stop word the EOS (replace_eos)."""
    from raylm import templates
    from raylm.config import resolve_path

    word = templates.get(template).eos_word
    path = os.path.join(resolve_path(model), "tokenizer_config.json")
    if word is None or not os.path.isfile(path):
        return
    try:
        with open(path) as f:
            eos = json.load(f).get("eos_token")
    except (OSError, json.JSONDecodeError):
        return
    eos = eos.get("content") if isinstance(eos, dict) else eos
    if eos != word:
        log.warning(
            "template %r ends replies with %r but %s's EOS is %r: the server stops at EOS, "
            "so send stop=[%r] with each request, or serve a tokenizer whose EOS is %r "
            "(raylm's train job saves final/ that way)", template, word, model, eos, word, word,
        )  # fmt: skip


def _engine(data: dict[str, Any], out: dict[str, Any]) -> list[str]:
    """infer_dtype, vllm_* and trust_remote_code onto the engine group."""
    for key, target in (("infer_dtype", "dtype"), ("vllm_gpu_util", "gpu_memory_utilization"),
                        ("vllm_enforce_eager", "enforce_eager")):  # fmt: skip
        if data.get(key) is not None:
            value = data[key]
            _set(out, f"engine.{target}", _bool(value) if key == "vllm_enforce_eager" else value)
    _set(out, "engine.max_model_len", int(data.get("vllm_maxlen") or LF_MAXLEN))
    if _bool(data.get("trust_remote_code")):
        _set(out, "engine.extra.trust_remote_code", True)
    extra = data.get("vllm_config")
    if isinstance(extra, str) and extra.strip().startswith("{"):
        try:
            extra = json.loads(extra)
        except json.JSONDecodeError as err:
            return [f"vllm_config={extra!r}: not a JSON object ({err})"]
    if extra is not None and not isinstance(extra, dict):
        return [f"vllm_config={extra!r}: expected a mapping of vLLM engine arguments"]
    for key, value in (extra or {}).items():
        _set(out, f"engine.extra.{key}", value)
    return []


def _sampling(data: dict[str, Any], out: dict[str, Any], job: str) -> list[str]:
    """Generating arguments: the server's default sampling parameters (serve, those the
    YAML names) or the generate job's sampling group (LLaMA-Factory's defaults fill in,
    as its do_predict uses them)."""
    given = {k: data[k] for k in keys.GENERATION if data.get(k) is not None}
    greedy = "do_sample" in data and not _bool(data["do_sample"])
    refusals = []
    new = given.get("max_new_tokens")
    if new is not None and int(new) <= 0:
        refusals.append(f"max_new_tokens={new}: give a positive completion budget")
    if job == "serve":
        if greedy:
            given["temperature"] = 0.0
        for key, value in given.items():
            _set(out, f"engine.extra.override_generation_config.{key}", value)
        return refusals
    lf = {"temperature": 0.95, "top_p": 0.7, "top_k": 50, "max_new_tokens": LF_MAX_NEW_TOKENS}
    values = lf | given | ({"temperature": 0.0} if greedy else {})
    names = {"max_new_tokens": "max_tokens"}
    for key, value in values.items():
        _set(out, f"sampling.{names.get(key, key)}", value)
    return refusals


def _predict(data: dict[str, Any], out: dict[str, Any]) -> list[str]:
    """The do_predict keys: which records, how long, where the results go."""
    refusals = []
    if not _bool(data.get("do_predict")):
        refusals.append(
            "do_predict is not true: a generate YAML from LLaMA-Factory predicts "
            "(do_predict: true); an inference YAML is served with `raylm serve FILE`"
        )
    if not _bool(data.get("predict_with_generate", False)):
        refusals.append(
            "predict_with_generate is not true: raylm generates and scores predictions; "
            "for the held-out loss use the eval job's perplexity"
        )
    if str(data.get("stage", "sft")) != "sft":
        refusals.append(f"stage={data['stage']!r}: do_predict scores sft models only")
    if not data.get("eval_dataset"):
        refusals.append("no eval_dataset: name the datasets to predict on")
        return refusals
    _set(out, "input.path", str(data.get("dataset_dir", "data")).rstrip("/") or ".")
    _set(out, "input.datasets", _csv(data["eval_dataset"]))
    if data.get("max_samples") is not None:
        _set(out, "input.limit", int(data["max_samples"]))
    if data.get("output_dir") is not None:
        _set(out, "output_dir", str(data["output_dir"]))
    cutoff = data.get("cutoff_len")
    if cutoff is not None:
        budget = int(out["sampling"]["max_tokens"])
        _set(out, "engine.max_model_len", int(cutoff) + budget)
    return refusals


def _not_predict(data: dict[str, Any], job: str) -> list[str]:
    """do_predict YAMLs belong to the generate job; dataset keys do nothing for serve."""
    if _bool(data.get("do_predict")) or _bool(data.get("predict_with_generate")):
        return [
            "do_predict: a prediction YAML runs as the generate job: `raylm generate FILE` "
            f"(not raylm {job})"
        ]
    return []


def _log_unused(data: dict[str, Any], source: str, job: str) -> None:
    """Every accepted key without an effect, with its reason: nothing is dropped silently."""
    mapped = set(keys.MAPPED)
    for key in data:
        if key in keys.NOOP:
            log.warning("%s: ignoring LLaMA-Factory key %r: %s", source, key, keys.NOOP[key])
        elif key in keys.REFUSED or key in mapped:
            continue
        elif key in train_keys.known():
            log.warning(
                "%s: ignoring LLaMA-Factory key %r: a training/data argument, and the %s "
                "job neither trains nor reads training data", source, key, job,
            )  # fmt: skip
    if job == "serve":
        for key in ("eval_dataset", "dataset_dir", "max_samples", "cutoff_len", "output_dir"):
            if key in data:
                log.warning("%s: ignoring %r: the serve job reads no dataset", source, key)


def _problems(source: str, job: str, unknown: list[str], refusals: list[str]) -> str:
    parts = [f"{source}:"]
    if unknown:
        parts.append(
            f"keys LLaMA-Factory and raylm do not know: {', '.join(unknown)} "
            "(docs/llamafactory.md lists every key)."
        )
    if refusals:
        parts.append(f"LLaMA-Factory settings raylm's {job} job cannot honour:")
        parts += [f"\n  - {r}" for r in refusals]
    return " ".join(parts).replace(" \n", "\n")


def _adapter_name(path: str) -> str:
    """The adapter's model-name suffix: its directory's name, when that is a valid one."""
    from raylm.serve.lora import valid_name

    name = os.path.basename(path.rstrip("/"))
    return name if valid_name(name) else "adapter"


def _set(out: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = out
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def _bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes", "on")
    return bool(value)


def _csv(value: Any) -> list[str]:
    if isinstance(value, list):
        return [str(v) for v in value]
    return [v.strip() for v in str(value).split(",") if v.strip()]
