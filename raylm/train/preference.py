"""Preference losses of stage dpo: sigmoid (DPO, cDPO), hinge, ipo, simpo and orpo.

The variants are LLaMA-Factory's ``pref_loss`` values, computed as LLaMA-Factory and TRL
compute them (``tests/unit/test_train_preference.py`` runs TRL's own loss code on the same
inputs): sigmoid and hinge compare summed log-probs of the response tokens; ipo, simpo
and orpo compare per-token averages, so a long answer neither wins nor loses by its
length. simpo and orpo use no reference model at all.

One forward over ``objectives.pair_batch`` (chosen rows, then rejected rows) gives every
variant what it needs: the summed log-probs and the number of target tokens per row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from raylm.train.config import DPOConfig
from raylm.train.objectives import forward_logits, token_logps


@dataclass(frozen=True)
class PairLogps:
    """Log-probs of the chosen and rejected responses of a batch of pairs, each [pairs].

    Sums and token counts are kept apart, not pre-averaged, so the one forward serves
    every loss type, and so summed reference log-probs precomputed by an earlier pass
    (``ref_chosen_logps`` columns) still give ipo its per-token averages.
    """

    chosen: torch.Tensor
    """Summed log-prob of each chosen response's target tokens."""

    rejected: torch.Tensor
    """Summed log-prob of each rejected response's target tokens."""

    chosen_tokens: torch.Tensor
    """Target tokens per chosen response (the averaging length)."""

    rejected_tokens: torch.Tensor
    """Target tokens per rejected response."""

    def averaged(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token mean log-probs; an empty response counts as one token, as TRL does,
        so it scores 0 instead of NaN."""
        return (
            self.chosen / self.chosen_tokens.clamp(min=1),
            self.rejected / self.rejected_tokens.clamp(min=1),
        )

    def scores(self, length_normalized: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """What a loss type compares: per-token means or sums."""
        return self.averaged() if length_normalized else (self.chosen, self.rejected)

    def with_sums(self, chosen: torch.Tensor, rejected: torch.Tensor) -> PairLogps:
        """Another model's sums over the same tokens (the reference model's, or columns
        precomputed from it, which arrive as CPU tensors): the token counts, dtype and
        device are this batch's."""
        like = {"dtype": self.chosen.dtype, "device": self.chosen.device}
        return PairLogps(
            chosen.to(**like), rejected.to(**like), self.chosen_tokens, self.rejected_tokens
        )


def pair_logps(model: Any, batch: dict[str, torch.Tensor]) -> PairLogps:
    """Score a ``pair_batch`` (first half chosen, second half rejected) in one forward."""
    logps = token_logps(forward_logits(model, batch), batch["input_ids"])
    mask = batch["loss_mask"][:, 1:].to(logps.dtype)
    chosen, rejected = (logps * mask).sum(-1).chunk(2)
    chosen_tokens, rejected_tokens = mask.sum(-1).chunk(2)
    return PairLogps(chosen, rejected, chosen_tokens, rejected_tokens)


def preference_loss(
    cfg: DPOConfig, policy: PairLogps, ref: PairLogps | None
) -> tuple[torch.Tensor, dict[str, float]]:
    """The mean loss over the pairs, and metrics to log (means over the pairs).

    ``ref`` is the reference model's scores of the same batch; it is ignored (and may be
    None) for simpo and orpo, which need none (``cfg.needs_reference``).
    """
    if cfg.needs_reference and ref is None:
        raise ValueError(f"dpo.loss_type={cfg.loss_type!r} needs the reference model's logps")
    chosen, rejected = policy.scores(cfg.length_normalized)
    extra: dict[str, torch.Tensor] = {}
    if cfg.loss_type == "simpo":
        losses = simpo_loss(chosen, rejected, cfg.beta, cfg.simpo_gamma)
    elif cfg.loss_type == "orpo":
        losses, extra = orpo_loss(chosen, rejected, cfg.beta)
    else:
        assert ref is not None
        ref_chosen, ref_rejected = ref.scores(cfg.length_normalized)
        delta = (chosen - ref_chosen) - (rejected - ref_rejected)
        losses = _reference_loss(cfg, delta)
    if cfg.sft_weight:
        sft = -policy.averaged()[0]
        losses = losses + cfg.sft_weight * sft
        extra["sft_loss"] = sft.mean()
    return losses.mean(), _metrics(cfg, policy, ref, extra)


def _reference_loss(cfg: DPOConfig, delta: torch.Tensor) -> torch.Tensor:
    """The variants that score the policy's log-ratio against the reference's."""
    if cfg.loss_type == "sigmoid":
        return sigmoid_loss(delta, cfg.beta, cfg.label_smoothing)
    if cfg.loss_type == "hinge":
        return hinge_loss(delta, cfg.beta)
    if cfg.loss_type == "ipo":
        return ipo_loss(delta, cfg.beta)
    raise ValueError(f"unknown dpo.loss_type={cfg.loss_type!r}")


def sigmoid_loss(delta: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO (Rafailov et al. 2023) per pair; ``label_smoothing`` > 0 is cDPO, the expected
    DPO loss when each label is flipped with that probability."""
    losses = -F.logsigmoid(beta * delta) * (1 - label_smoothing)
    if label_smoothing:
        losses = losses - F.logsigmoid(-beta * delta) * label_smoothing
    return losses


def hinge_loss(delta: torch.Tensor, beta: float) -> torch.Tensor:
    """SLiC's hinge (Zhao et al. 2023): zero once the scaled margin passes 1."""
    return torch.relu(1 - beta * delta)


def ipo_loss(delta: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO (Azar et al. 2023, eq. 17) on length-averaged log-ratios: a squared error to the
    target margin 1/(2 beta), so the margin stops growing where DPO's would run away."""
    return (delta - 1 / (2 * beta)) ** 2


def simpo_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, beta: float, gamma: float
) -> torch.Tensor:
    """SimPO (Meng et al. 2024): no reference; the length-averaged log-prob is the reward,
    and the chosen one must beat the rejected one by the margin gamma."""
    return -F.logsigmoid(beta * ((chosen - rejected) - gamma / beta))


def orpo_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, beta: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ORPO (Hong et al. 2024) on length-averaged log-probs: the chosen response's NLL
    plus beta times -log sigmoid of the log odds ratio, so one stage both fits the chosen
    answers and pushes the rejected ones down. Also its two parts, for logging."""
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    nll = -chosen
    parts = {
        "nll_loss": nll.mean(),
        "log_odds_ratio": ratio.mean(),
        "log_odds_chosen": log_odds.mean(),
    }
    return nll - beta * ratio, parts


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0 without cancellation (the branch TRL's ORPO uses): the
    odds of a likely answer (x near 0) would otherwise round to log(0)."""
    return torch.where(
        x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x))
    )


def _metrics(
    cfg: DPOConfig, policy: PairLogps, ref: PairLogps | None, extra: dict[str, torch.Tensor]
) -> dict[str, float]:
    """TRL's names and definitions: the reward is beta times the summed log-ratio to the
    reference, or for simpo/orpo beta times the length-averaged log-prob."""
    with torch.no_grad():
        chosen, rejected = policy.scores(not cfg.needs_reference)
        if cfg.needs_reference:
            assert ref is not None
            chosen_r, rejected_r = (
                cfg.beta * (chosen - ref.chosen),
                cfg.beta * (rejected - ref.rejected),
            )
        else:
            chosen_r, rejected_r = cfg.beta * chosen, cfg.beta * rejected
        values = {
            "rewards/chosen": chosen_r.mean(),
            "rewards/rejected": rejected_r.mean(),
            "rewards/accuracies": (chosen_r > rejected_r).float().mean(),
            "rewards/margins": (chosen_r - rejected_r).mean(),
            "logps/chosen": chosen.mean(),
            "logps/rejected": rejected.mean(),
            **extra,
        }
        # One device-to-host copy for all of them, not one sync per metric.
        floats = torch.stack([v.detach().float() for v in values.values()]).tolist()
    return dict(zip(values, floats, strict=True))
