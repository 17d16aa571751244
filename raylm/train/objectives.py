"""Losses for pt / sft / dpo over padded batches of the shard columns.

``loss_mask[t] == 1`` means token t is a target (the data contract), so the
causal shift is: logits at t-1 predict token t, weighted by ``loss_mask[t]``.
SFT is the same loss as PT; the difference lives entirely in the mask (responses only).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def collate(rows: list[dict[str, Any]], prefix: str, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``{prefix}input_ids`` / ``{prefix}loss_mask`` (and position_ids) to a batch."""
    ids = [r[f"{prefix}input_ids"] for r in rows]
    masks = [r[f"{prefix}loss_mask"] for r in rows]
    width = max(len(x) for x in ids)
    batch = {
        "input_ids": torch.tensor([x + [pad_id] * (width - len(x)) for x in ids]),
        "loss_mask": torch.tensor([m + [0] * (width - len(m)) for m in masks]),
        "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
    }
    if all("position_ids" in r for r in rows) and not prefix:
        pos = [r["position_ids"] + list(range(len(r["position_ids"]), width)) for r in rows]
        batch["position_ids"] = torch.tensor(pos)
        # A packed row's first token of each sample is not predictable from the previous one.
        batch["loss_mask"] = batch["loss_mask"] * (batch["position_ids"] != 0)
    return batch


def forward_logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Packed rows (position_ids restarting) go without an attention mask, so transformers
    builds the block-diagonal mask from position_ids and samples do not see each other."""
    if "position_ids" in batch and bool(batch["attention_mask"].all()):
        out = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        )
    else:
        kwargs = {
            k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch
        }
        out = model(**kwargs, use_cache=False)
    return out.logits


def token_logps(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(token t | tokens < t) for t >= 1, shape [batch, len - 1]."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    return torch.gather(logp, 2, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def lm_loss(
    model: Any, batch: dict[str, torch.Tensor], loss: Any = None, ref: Any = None
) -> tuple[torch.Tensor, int]:
    """The pt/sft loss over target tokens, and how many targets there were: mean
    next-token NLL, or the ``loss.type`` variant (a ``LossConfig``; None: ce). asft's
    reference is ``ref``, or the model under its disabled adapter when ``ref`` is None."""
    logits = forward_logits(model, batch)
    kind = "ce" if loss is None else loss.type
    if kind == "ce" and loss is not None and loss.label_smoothing:
        return smoothed_lm_loss(logits, batch, loss.label_smoothing)
    if kind == "ce":
        logps = token_logps(logits, batch["input_ids"])
        mask = batch["loss_mask"][:, 1:].to(logps.dtype)
        n = int(mask.sum().item())
        return -(logps * mask).sum() / max(n, 1), n
    ref_logits = reference_logits(model, ref, batch) if kind == "asft" else None
    return weighted_lm_loss(logits, batch, kind, loss, ref_logits)


def smoothed_lm_loss(
    logits: torch.Tensor, batch: dict[str, torch.Tensor], epsilon: float
) -> tuple[torch.Tensor, int]:
    """Label-smoothed cross-entropy (``loss.label_smoothing``), transformers'
    ``LabelSmoother`` with shifted labels as its Trainer applies it to a causal LM: over
    the target tokens, (1 - epsilon) x the mean NLL + epsilon x the mean over targets and
    vocabulary of -log p."""
    mask = batch["loss_mask"][:, 1:].bool()
    n = int(mask.sum().item())
    logp = F.log_softmax(logits[:, :-1].float()[mask], dim=-1)  # [n, vocab]
    nll = -logp.gather(-1, batch["input_ids"][:, 1:][mask].unsqueeze(-1)).sum()
    smooth = -logp.sum() / logp.size(-1)
    return ((1 - epsilon) * nll + epsilon * smooth) / max(n, 1), n


def weighted_lm_loss(
    logits: torch.Tensor,
    batch: dict[str, torch.Tensor],
    kind: str,
    loss: Any,
    ref_logits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """LLaMA-Factory's ``_dft_cross_entropy`` / ``_eaft_cross_entropy`` /
    ``_asft_cross_entropy`` (``train/trainer_utils.py`` at ff6d4d12) over the target
    tokens: each token's cross-entropy times a detached weight, averaged over the targets
    (its ``mean`` branch; raylm normalises every loss per micro batch), plus asft's
    ``asft_alpha * KL(ref || model)`` averaged over the same tokens."""
    mask = batch["loss_mask"][:, 1:].bool()
    n = int(mask.sum().item())
    source = logits[:, :-1].float()[mask]  # [n, vocab]
    target = batch["input_ids"][:, 1:][mask]
    per_token = F.cross_entropy(source, target, reduction="none")
    with torch.no_grad():
        if kind in ("dft", "asft"):  # the target's probability
            weight = torch.exp(-per_token)
        elif kind == "eaft":  # entropy of the top-20 distribution, over 3, to a power
            top = torch.topk(source, k=min(20, source.size(-1)), dim=-1).values
            logp = top - torch.logsumexp(top, dim=-1, keepdim=True)
            entropy = -(logp.exp() * logp).sum(-1)
            weight = torch.pow(entropy / 3.0, loss.eaft_alpha)
        else:
            raise ValueError(f"unknown token loss {kind!r}")
    out = (per_token * weight).sum() / max(n, 1)
    if kind == "asft":
        assert ref_logits is not None
        q = F.softmax(ref_logits[:, :-1].float()[mask], dim=-1)
        kl = F.kl_div(F.log_softmax(source, dim=-1), q, reduction="none").sum(-1)
        out = out + loss.asft_alpha * kl.sum() / max(n, 1)
    return out, n


def reference_logits(model: Any, ref: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The reference model's logits, without gradients: ``ref`` (full/freeze: a frozen
    copy of the base), else the LoRA model under its disabled adapter (the base)."""
    with torch.no_grad():
        if ref is not None:
            return forward_logits(ref, batch)
        base = getattr(model, "module", model)  # under a DeepSpeed engine: the PEFT model
        if not hasattr(base, "disable_adapter"):
            raise RuntimeError(
                "loss.type=asft needs a reference model: pass one (full/freeze) or train LoRA"
            )
        with base.disable_adapter():
            return forward_logits(base, batch)


def sequence_logps(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed log-prob of each row's target tokens (the response), as DPO scores it."""
    logps = token_logps(forward_logits(model, batch), batch["input_ids"])
    return (logps * batch["loss_mask"][:, 1:].to(logps.dtype)).sum(-1)


def pair_batch(rows: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows in one padded batch: one forward scores both."""
    merged = [
        {"input_ids": r["chosen_input_ids"], "loss_mask": r["chosen_loss_mask"]} for r in rows
    ]
    merged += [
        {"input_ids": r["rejected_input_ids"], "loss_mask": r["rejected_loss_mask"]} for r in rows
    ]
    return collate(merged, "", pad_id)
