"""Stage kto: KTO (Ethayarajh et al. 2024) on answers labelled desirable or undesirable.

As LLaMA-Factory's ``CustomKTOTrainer`` runs it (TRL's ``kto`` loss, which
``tests/unit/test_train_rm_kto.py`` checks against TRL's own code): an answer's
implied reward is beta times its log-ratio to the reference model, r = beta *
(log pi(y|x) - log ref(y|x)) summed over the answer's tokens; the reference point z0 is
a KL estimate, the batch mean of the same log-ratio on *mismatched* prompt/answer pairs
(clamped at 0, no gradient, averaged over ranks as TRL gathers it); desirable answers
lose 1 - sigmoid(beta * (ratio - z0)), undesirable ones 1 - sigmoid(beta * (z0 - ratio)),
weighted by ``kto.desirable_weight`` / ``kto.undesirable_weight`` and averaged.

The mismatched pairs are built once, from the tokenized rows, as LLaMA-Factory's feedback
processor builds them: example i's prompt with example i-1's answer (the first takes the
last's), within blocks of 1000 rows (its ``map`` batch). Doing it in the data, not in the
micro-batch as TRL's collator does, keeps the estimate meaningful at micro_batch_size 1,
which LLaMA-Factory's KTO example uses.

The label judges the last answer only, so only the last assistant turn is a target
(``tokenize_kto``); earlier turns are prompt, as LLaMA-Factory encodes a KTO example.
``tokenize_kto`` and ``with_kl_rows`` live in ``raylm.data.tokenize``, so the data job
writes kto shards with the very rows (and KL pairs) the train job builds from raw files.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F

from raylm.data.tokenize import LF_BLOCK, tokenize_kto, with_kl_rows
from raylm.train.config import KTOConfig
from raylm.train.objectives import collate, forward_logits, token_logps

__all__ = ["LF_BLOCK", "answer_logps", "kto_loss", "kto_step", "tokenize_kto", "with_kl_rows"]


def _kl_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The mismatched rows of a micro-batch: precomputed (``with_kl_rows``: raw rows, and
    the data job's kto shards), or, for rows that lack them (foreign Parquet), TRL's way,
    each prompt with the previous row's answer."""
    if all("kl_input_ids" in r for r in rows):
        return [{"input_ids": r["kl_input_ids"], "loss_mask": r["kl_loss_mask"]} for r in rows]
    if len(rows) < 2:
        raise ValueError(
            "stage kto without kl_input_ids columns pairs prompts with other rows' answers "
            "within a micro batch: set train.micro_batch_size >= 2 (as TRL requires)"
        )
    cycled = with_kl_rows(rows, None)
    return [{"input_ids": r["kl_input_ids"], "loss_mask": r["kl_loss_mask"]} for r in cycled]


def answer_logps(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of each row's answer tokens, and how many there are."""
    logps = token_logps(forward_logits(model, batch), batch["input_ids"])
    mask = batch["loss_mask"][:, 1:].to(logps.dtype)
    return (logps * mask).sum(-1), mask.sum(-1)


def kto_step(
    cfg: KTOConfig, policy: Any, ref: Any | None, rows: list[dict[str, Any]], pad: int
) -> tuple[torch.Tensor, dict[str, float], int]:
    """One micro-batch: the loss, its metrics and its token count. ``ref`` is the frozen
    reference model (full/freeze); None means ``policy`` with its LoRA adapter disabled."""
    target = collate(rows, "", pad)
    kl_rows = _kl_rows(rows)
    labels = torch.tensor([bool(r["kto_label"]) for r in rows])
    logps, tokens = answer_logps(policy, target)
    with torch.no_grad():
        kl_logps, _ = answer_logps(policy, collate(kl_rows, "", pad))
        # One reference forward scores the answers and the mismatched pairs together.
        both = [{"input_ids": r["input_ids"], "loss_mask": r["loss_mask"]} for r in rows]
        module = getattr(policy, "module", policy)  # the DeepSpeed engine's model
        context = module.disable_adapter() if ref is None else contextlib.nullcontext()
        with context:
            ref_both, _ = answer_logps(ref if ref is not None else module,
                                       collate(both + kl_rows, "", pad))  # fmt: skip
        ref_logps, ref_kl = ref_both.to(logps.device).chunk(2)
        kl = _mean_over_ranks((kl_logps - ref_kl.to(kl_logps.device)).mean()).clamp(min=0)
    loss, metrics = kto_loss(cfg, logps, tokens, ref_logps, labels.to(logps.device), kl)
    return loss, metrics, int(target["attention_mask"].sum())


def _mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """TRL gathers the KL estimate from every process and averages it."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / dist.get_world_size()


def kto_loss(
    cfg: KTOConfig,
    logps: torch.Tensor,
    tokens: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    kl: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The mean KTO loss of a batch (``logps``/``ref_logps``: summed answer log-probs of
    policy and reference; ``labels``: desirable or not; ``kl``: the clamped estimate) and
    its metrics.

    Metrics are LLaMA-Factory's running sums and counts (``rewards/chosen_sum``,
    ``count/chosen``, ...), not means: a micro batch may hold no desirable example, and
    the worker averages every key over micro batches and ranks, so the mean reward of
    the step's desirable examples is ``rewards/chosen_sum / count/chosen`` of a logged
    record, exactly as LLaMA-Factory divides them when it logs.
    """
    ratios = logps - ref_logps
    chosen, rejected = ratios[labels], ratios[~labels]
    losses = torch.cat(
        (
            cfg.desirable_weight * (1 - F.sigmoid(cfg.beta * (chosen - kl))),
            cfg.undesirable_weight * (1 - F.sigmoid(cfg.beta * (kl - rejected))),
        )
    )
    loss = losses.nanmean()
    n_chosen = int(labels.sum())
    if cfg.sft_weight > 1e-6 and n_chosen:  # LLaMA-Factory's pref_ftx, rescaled as it does
        sft = -(logps[labels] / tokens[labels].clamp(min=1))
        loss = loss + cfg.sft_weight * sft.nanmean() / n_chosen * len(labels)
    with torch.no_grad():
        values = {
            "kl": kl,
            "rewards/chosen_sum": (cfg.beta * chosen).nansum(),
            "rewards/rejected_sum": (cfg.beta * rejected).nansum(),
            "logps/chosen_sum": logps[labels].nansum(),
            "logps/rejected_sum": logps[~labels].nansum(),
            "count/chosen": torch.tensor(float(n_chosen)),
            "count/rejected": torch.tensor(float(len(labels) - n_chosen)),
        }
        floats = torch.stack([v.detach().float().cpu().reshape(()) for v in values.values()])
    return loss, dict(zip(values, floats.tolist(), strict=True))
