"""Loading a model dir (full or PEFT adapter), perplexity, and greedy HF generation.

Heavy imports (torch, transformers, peft) stay inside functions: this module is imported
by the job driver, which only needs them inside the Ray tasks.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raylm import storage
from raylm.eval.records import EvalDataError, EvalRecord

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass(frozen=True)
class ModelInfo:
    """What was actually loaded, for eval.json and the report."""

    path: str
    kind: str
    """full (a Hugging Face model dir) or adapter (PEFT, merged into its base for eval)."""
    base: str | None
    """The base model under an adapter."""


def describe_model(
    path: str | Path, adapter_base: str | None = None, key: str = "model"
) -> ModelInfo:
    """Classify a model dir (local or in a bucket) without loading it, failing early on a
    wrong path; ``key`` names the config key in the error."""
    p = str(path)
    adapter_config = storage.join(p, "adapter_config.json")
    if storage.is_file(adapter_config):
        declared = json.loads(storage.read_text(adapter_config)).get("base_model_name_or_path")
        base = adapter_base or declared
        if not base:
            raise EvalDataError(
                f"{key}={p} is a PEFT adapter without base_model_name_or_path; set adapter_base"
            )
        return ModelInfo(p, "adapter", str(base))
    if storage.is_file(storage.join(p, "config.json")):
        from raylm.models.mod_marker import refuse_mod_model

        refuse_mod_model(p, key, "eval")  # vLLM and a plain load drop the MoD routers
        return ModelInfo(p, "full", None)
    where = "" if storage.exists(p) else " (nothing exists at that path)"
    raise EvalDataError(
        f"{key}={p} is neither a Hugging Face model (config.json) nor a PEFT adapter "
        f"(adapter_config.json){where}"
    )


def load_model(path: str | Path, adapter_base: str | None = None) -> tuple[Any, Any, ModelInfo]:
    """(model in eval mode, tokenizer, info); an adapter is merged into its base.

    A model (or base) in a bucket is loaded from this node's copy (``storage.local_dir``);
    ``info`` keeps the path as given, for the report."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = describe_model(path, adapter_base)
    local = storage.local_dir(info.path, key="model")
    weights = storage.local_dir(info.base, key="adapter_base") if info.base else local
    model = AutoModelForCausalLM.from_pretrained(weights, dtype=torch.float32)
    if info.kind == "adapter":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, local).merge_and_unload()
    has_tok = any((Path(local) / f).is_file() for f in TOKENIZER_FILES)
    tokenizer = AutoTokenizer.from_pretrained(local if has_tok else weights)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer, info


def render_prompt(tokenizer: Any, record: EvalRecord, prompt_format: str) -> list[int]:
    """Token ids the model continues from: the same for the hf and vllm engines."""
    use_chat = record.messages is not None or prompt_format == "chat"
    if prompt_format == "auto" and record.messages is None:
        use_chat = bool(getattr(tokenizer, "chat_template", None))
    if use_chat:
        if not getattr(tokenizer, "chat_template", None):
            raise EvalDataError(
                f"record {record.id} needs a chat template, but the tokenizer has none; "
                "use prompt records with generation.prompt_format=raw"
            )
        turns = list(record.messages or [{"role": "user", "content": record.prompt}])
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(record.prompt)["input_ids"]


def doc_token_ids(tokenizer: Any, doc: str | list[dict]) -> list[int]:
    if isinstance(doc, list):
        text = tokenizer.apply_chat_template(doc, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(doc)["input_ids"]


def perplexity_stats(
    model: Any,
    tokenizer: Any,
    docs: Sequence[str | list[dict]],
    max_length: int = 512,
    batch_size: int = 4,
) -> np.ndarray:
    """Per-document [summed NLL (nats), scored tokens]; long documents in windows.

    The first token of each window has no context and is not scored, exactly as the
    model's own shifted loss does it.
    """
    windows: list[tuple[int, list[int]]] = []
    for d, doc in enumerate(docs):
        ids = doc_token_ids(tokenizer, doc)
        windows += [(d, ids[i : i + max_length]) for i in range(0, len(ids), max_length)]
    stats = np.zeros((len(docs), 2), dtype=np.float64)
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        nll, count = _window_nll(model, tokenizer, [ids for _, ids in batch])
        for (d, _), s, c in zip(batch, nll, count, strict=True):
            stats[d] += (s, c)
    return stats


def _window_nll(model: Any, tokenizer: Any, windows: list[list[int]]) -> tuple[list, list]:
    import torch

    width = max(len(w) for w in windows)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([w + [pad] * (width - len(w)) for w in windows])
    mask = torch.tensor([[1] * len(w) + [0] * (width - len(w)) for w in windows])
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none"
    )
    scored = mask[:, 1:].to(nll.dtype)
    return (nll * scored).sum(1).tolist(), scored.sum(1).tolist()


def generate_hf(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    batch_size: int,
) -> list[list[int]]:
    """Generated token ids per prompt: greedy and batched (left padding), so reruns agree."""
    import torch

    outputs: list[list[int]] = []
    pad = tokenizer.pad_token_id
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=pad,
            )
        outputs += out[:, width:].tolist()
    return outputs


def decode_answers(tokenizer: Any, generated: Sequence[list[int]]) -> tuple[list[str], list[int]]:
    """(answer texts, answer lengths in tokens): text up to the first end token, and how
    many tokens the model spent on it (what a token budget limits; engine-independent)."""
    stops = set(tokenizer.all_special_ids)
    texts, lengths = [], []
    for ids in generated:
        end = next((i for i, t in enumerate(ids) if t in stops), len(ids))
        texts.append(tokenizer.decode(ids[:end], skip_special_tokens=True).strip())
        lengths.append(end)
    return texts, lengths
