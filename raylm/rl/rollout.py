"""What the trainer does with a rollout before the loss, as TRL 1.16 does it for vLLM:
the importance-sampling ratio between the trainer's and the rollout engine's
log-probabilities, and masking completions cut off at ``max_completion_length``.

vLLM samples with its own kernels (and, mid-run, possibly weights one sync behind), so
its log-probabilities differ from the trainer's recomputation of the same tokens. The
loss is then off-policy by that ratio; TRL weights each token's loss by it, bounded
(truncated or masked) so a few extreme tokens cannot dominate the step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from raylm.config import choice
from raylm.rl.config import IS_MODES


def rollout_is_ratio(
    old_logps: Tensor,
    sampling_logps: Tensor,
    mask: Tensor,
    mode: str = "sequence_mask",
    clip_min: float | None = None,
    clip_max: float | None = 3.0,
) -> tuple[Tensor, dict[str, float]]:
    """(ratio, metrics): exp(trainer logp - rollout logp), (batch, tokens) for token_*
    modes, (batch, 1) for sequence_* modes (the product over the sequence's tokens).

    ``old_logps`` are the trainer's log-probabilities of the sampled tokens before the
    update; ``sampling_logps`` the engine's, NaN where it gave none (those tokens get
    ratio 1). truncate modes clamp to [clip_min, clip_max]; mask modes set ratios outside
    them to 0, dropping those tokens or sequences from the loss. The metrics are TRL's
    ``sampling/*`` ones for this batch.
    """
    choice("grpo.rollout_is_mode", mode, IS_MODES)
    diff = torch.nan_to_num((old_logps - sampling_logps) * mask, nan=0.0)
    sequence = mode.startswith("sequence")
    ratio = torch.exp(diff.sum(dim=-1, keepdim=True) if sequence else diff)
    if mode.endswith("_truncate"):
        ratio = torch.clamp(ratio, min=clip_min, max=clip_max)
    else:
        lo = -math.inf if clip_min is None else clip_min
        hi = math.inf if clip_max is None else clip_max
        ratio = ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)
    return ratio, _sampling_metrics(old_logps, sampling_logps, mask, ratio, sequence)


def _sampling_metrics(
    old: Tensor, sampling: Tensor, mask: Tensor, ratio: Tensor, sequence: bool
) -> dict[str, float]:
    """How far the engine's log-probs were from the trainer's, and the ratios applied."""
    delta = torch.abs(old - sampling)
    delta = delta[mask.bool() & ~torch.isnan(delta)]
    flat = ratio.flatten() if sequence else ratio[mask.bool()]
    prefix = "sampling/importance_sampling_ratio"
    return {
        "sampling/sampling_logp_difference/mean": _or_zero(delta, torch.mean),
        "sampling/sampling_logp_difference/max": _or_zero(delta, torch.max),
        f"{prefix}/min": _or_zero(flat, torch.min),
        f"{prefix}/mean": _or_zero(flat, torch.mean),
        f"{prefix}/max": _or_zero(flat, torch.max),
    }


def _or_zero(x: Tensor, op: Callable[[Tensor], Tensor]) -> float:
    """``op`` of a possibly empty tensor; 0.0 when empty, as TRL logs it."""
    return op(x).item() if x.numel() else 0.0


def truncated_mask(
    completion_ids: Sequence[Sequence[int]], mask: Tensor, eos_ids: Sequence[int], pad_id: int
) -> Tensor:
    """``mask`` with every completion that did not end in EOS (or padding) zeroed: it was
    cut at max_completion_length, so its reward says little about the tokens it has
    (DAPO's overlong filtering; TRL's ``mask_truncated_completions``)."""
    stops = {*eos_ids, pad_id}
    cut = torch.tensor([bool(ids) and ids[-1] not in stops for ids in completion_ids])
    return mask * (~cut).unsqueeze(1).to(mask.dtype)
