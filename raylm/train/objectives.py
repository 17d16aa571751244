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


def lm_loss(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Mean next-token NLL over target tokens, and how many targets there were."""
    logps = token_logps(forward_logits(model, batch), batch["input_ids"])
    mask = batch["loss_mask"][:, 1:].to(logps.dtype)
    n = int(mask.sum().item())
    return -(logps * mask).sum() / max(n, 1), n


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
