"""Perplexity under a small causal LM: the model-based quality filter's score.

Perplexity = exp(mean negative log-likelihood of a document's first ``max_tokens``
tokens). Text a language model finds unlikely (boilerplate soup, mangled encodings,
keyword spam) scores high; CCNet ranks Common Crawl this way with KenLM models.

It is computed in the per-record stage (``raylm.data.steps``), in each block's task, so
the scores are saved with the block and a resumed job does not compute them again
(``raylm.data.resume``); the model is loaded once per worker process. The percentile
cut needs every document's score, so it runs on the driver afterwards
(``raylm.data.perplexity_cut``).
"""

from __future__ import annotations

import math
import os
from functools import lru_cache
from typing import Any

from raylm.data.config_filters import PerplexityConfig


def pick_device(device: str) -> str:
    """``auto`` -> cuda when this process sees a GPU (a Ray task does only when it asked
    for one), else cpu."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@lru_cache(maxsize=1)
def load(model: str, device: str) -> tuple[Any, Any]:
    """(model, tokenizer), once per worker process: a block task that follows another
    on the same worker reuses them. bfloat16 on cuda, float32 on cpu."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raylm.config import local_model

    path = local_model(model)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return lm, AutoTokenizer.from_pretrained(path)


def token_ids(texts: list[str], tokenizer: Any, max_tokens: int) -> list[list[int]]:
    """Each text's first ``max_tokens`` tokens, after the tokenizer's BOS token when it
    has one (then the first text token is predicted too; without one it is context)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    encoded = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_tokens)
    return [([bos] if bos is not None else []) + ids for ids in encoded["input_ids"]]


def nll_sums(model: Any, batch: list[list[int]]) -> tuple[list[float], list[int]]:
    """Summed NLL and predicted-token count of each sequence, in one padded forward pass.

    Right padding with an attention mask: a causal model's real tokens never attend to
    the pads after them, and pad positions are left out of the sums, so a document
    scores the same alone and in a padded batch.
    """
    import torch

    width = max(len(ids) for ids in batch)
    device = next(model.parameters()).device
    ids = torch.zeros((len(batch), width), dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, seq in enumerate(batch):
        ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, : len(seq)] = 1
    ids, mask = ids.to(device), mask.to(device)
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), ids[:, 1:], reduction="none"
        )
        keep = mask[:, 1:].float()
        sums = (nll * keep).sum(dim=1)
    return sums.cpu().tolist(), keep.sum(dim=1).long().cpu().tolist()


def perplexities(
    texts: list[str], model: Any, tokenizer: Any, batch_size: int, max_tokens: int
) -> list[float | None]:
    """Each text's perplexity (None where no token is predicted: an empty text, or one
    token without a BOS), batched by length so a batch's padding stays small."""
    seqs = token_ids(texts, tokenizer, max_tokens)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    scores: list[float | None] = [None] * len(seqs)
    scorable = [i for i in order if len(seqs[i]) >= 2]
    for start in range(0, len(scorable), batch_size):
        chunk = scorable[start : start + batch_size]
        sums, counts = nll_sums(model, [seqs[i] for i in chunk])
        for i, total, n in zip(chunk, sums, counts, strict=True):
            scores[i] = math.exp(total / n)
    return scores


def score(texts: list[str], cfg: PerplexityConfig) -> list[float | None]:
    """``perplexities`` with the configured model on this process's device."""
    if not texts or cfg.model is None:
        return [None] * len(texts)
    model, tokenizer = load(cfg.model, pick_device(cfg.device))
    return perplexities(texts, model, tokenizer, cfg.batch_size, cfg.max_tokens)


def gpus_per_block(cfg: PerplexityConfig, on: bool) -> float:
    """The GPU share each block task asks for: ``gpus_per_task`` when scoring on cuda
    (``auto`` on a cluster with GPUs), else 0. ``cuda`` on a cluster without GPUs fails
    here: its tasks would wait forever for a GPU."""
    import ray

    from raylm.config import ConfigError

    if not on or cfg.device == "cpu":
        return 0.0
    has_gpu = ray.cluster_resources().get("GPU", 0) > 0
    if cfg.device == "cuda" and not has_gpu:
        raise ConfigError("filters.perplexity.device=cuda but the Ray cluster has no GPU")
    return cfg.gpus_per_task if has_gpu else 0.0


def model_identity(model: str | None) -> str:
    """What a resumed block's scores depend on besides the config's text: for a local
    model directory, the size and mtime of its files (retrained weights at the same path
    are another model); a hub id or URI as given."""
    from raylm.config import resolve_model

    if model is None:
        return ""
    path = resolve_model(model)
    if "://" in path or not os.path.isdir(path):
        return path
    names = sorted(os.listdir(path))
    stats = [(n, os.stat(os.path.join(path, n))) for n in names]
    return ";".join(f"{n}:{s.st_size}:{s.st_mtime_ns}" for n, s in stats)
