"""raylm.rl's GRPO advantages and loss against TRL 1.16's own code on the same random inputs.

The reference is TRL's implementation, run on a ``GRPOTrainer`` made with
``object.__new__`` and given only the attributes the two methods read:

- advantages: ``GRPOTrainer._generate_and_score_completions`` with ``_generate`` stubbed
  to return fixed token ids (no model, no vLLM) and TRL's own ``_calculate_rewards``
  calling reward functions that return fixed values (None included); what comes back is
  TRL's ``advantages`` and the reward metrics it logged, and on its vLLM path the
  importance-sampling ratio and ``sampling/*`` metrics, and the truncated-completion mask;
- loss: ``GRPOTrainer._compute_loss`` with ``_get_per_token_logps_and_entropies`` stubbed
  to return fixed log-probabilities (a leaf tensor, so gradients compare too).

PPO's GAE, which has no TRL counterpart in 1.16, and the config are checked in
test_rl_gae_config.py.
"""

from __future__ import annotations

import collections
import contextlib
import types
from typing import Any

import pytest
import torch

from raylm.rl.advantages import group_advantages
from raylm.rl.config import LOSS_TYPES, SCALE_REWARDS, GRPOConfig
from raylm.rl.loss import LossScale, grpo_loss
from raylm.rl.rollout import rollout_is_ratio, truncated_mask

pytestmark = pytest.mark.unit
TOL = 1e-6
G = 4  # completions per prompt
B, T = 8, 7  # completions, completion tokens


def _accelerator() -> Any:
    """A single-process accelerate stand-in: gather and reduce are the identity."""
    return types.SimpleNamespace(
        device=torch.device("cpu"),
        num_processes=1,
        process_index=0,
        is_main_process=True,
        sync_gradients=True,
        gather=lambda x: x,
        gather_for_metrics=lambda x: x,
        reduce=lambda x, reduction="sum": x,
    )


def _trainer(**fields: Any) -> Any:
    """A bare GRPOTrainer: TRL's methods, only the attributes they read."""
    from accelerate import PartialState
    from trl.trainer.grpo_trainer import GRPOTrainer

    PartialState()  # TRL's logger (accelerate's) refuses to log before this exists
    self = object.__new__(GRPOTrainer)
    base = {
        "accelerator": _accelerator(),
        "model": types.SimpleNamespace(training=True, is_gradient_checkpointing=False),
        "_metrics": {m: collections.defaultdict(list) for m in ("train", "eval")},
        "use_vllm": False,
        "vllm_importance_sampling_correction": False,
    }
    for key, value in {**base, **fields}.items():
        object.__setattr__(self, key, value)
    return self


def trl_score(
    table: list[list[float | None]],
    weights: list[float],
    scale: str = "group",
    aggregation: str = "sum_then_normalize",
    completion_ids: list[list[int]] | None = None,
    **rollout: Any,
) -> tuple[dict[str, Any], dict[str, float]]:
    """TRL's ``_generate_and_score_completions`` output and the metrics it logged, for
    reward ``table[function][completion]``; ``rollout`` switches on its vLLM path
    (``old``: the trainer's log-probs, ``sampling``: the engine's, as lists)."""
    n, k = len(table[0]), len(table)
    ids = completion_ids or [[3, 4, 5]] * n

    def reward_func(i: int) -> Any:
        def f(prompts: list, completions: list, idx: list[int], **_: Any) -> list:
            return [table[i][j] for j in idx]

        f.__name__ = f"reward_{i}"
        return f

    stub = _trainer(
        environment_factories=None,
        environments=None,
        tools=None,
        _generate=lambda prompts: (
            [[1, 2]] * n,
            ids,
            None,
            ["c"] * n,
            rollout.get("sampling"),
            {},
            None,
            None,
        ),
        _get_per_token_logps_and_entropies=lambda *a, **kw: (rollout.get("old"), None, None),
        _tokenizer=types.SimpleNamespace(pad_token_id=0),
        eos_token_ids=[2],
        pad_to_multiple_of=None,
        mask_truncated_completions=rollout.get("mask_truncated", False),
        use_vllm="old" in rollout,
        vllm_importance_sampling_correction="old" in rollout,
        vllm_importance_sampling_mode=rollout.get("mode"),
        vllm_importance_sampling_clip_min=rollout.get("clip_min"),
        vllm_importance_sampling_clip_max=rollout.get("clip_max"),
        args=types.SimpleNamespace(
            per_device_train_batch_size=n,
            steps_per_generation=1,
            gradient_accumulation_steps=1,
            gradient_checkpointing_kwargs=None,
            report_to=[],
        ),
        num_iterations=1,
        beta=0.0,
        state=types.SimpleNamespace(global_step=0),
        reward_funcs=[reward_func(i) for i in range(k)],
        reward_processing_classes=[None] * k,
        reward_func_names=[f"reward_{i}" for i in range(k)],
        reward_weights=torch.tensor(weights, dtype=torch.float32),
        num_generations=G,
        scale_rewards=scale,
        multi_objective_aggregation=aggregation,
        _logs=collections.defaultdict(list),
        _pending_extra_logs={},
        _pending_metrics={},
        log_multimodal=False,
    )
    stub._logs.update(rewards=collections.defaultdict(list), extra=collections.defaultdict(list))
    inputs = [{"prompt": "p", "idx": j} for j in range(n)]
    with contextlib.redirect_stdout(None):
        out = stub._generate_and_score_completions(inputs)
    return out, {k: v[-1] for k, v in stub._metrics["train"].items()}


def _reward_table(k: int, seed: int, with_none: bool) -> list[list[float | None]]:
    """Random rewards on a 0-1 grid (ties, like verifiers), some None, one group uniform."""
    gen = torch.Generator().manual_seed(seed)
    table: list[list[float | None]] = []
    for _ in range(k):
        row: list[float | None] = [round(v, 2) for v in torch.rand(3 * G, generator=gen).tolist()]
        row[:G] = [1.0] * G  # a group whose rewards are all equal: std 0
        table.append(row)
    if with_none:
        table[0][G + 1] = None
        for row in table:  # completion 2G+2: every function skipped it
            row[2 * G + 2] = None
    return table


@pytest.mark.parametrize("scale", SCALE_REWARDS)
@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
@pytest.mark.parametrize("k, with_none", [(1, False), (2, True), (3, False)])
def test_advantages_equal_trl(scale: str, aggregation: str, k: int, with_none: bool) -> None:
    table = _reward_table(k, seed=k, with_none=with_none)
    weights = [1.0, 0.5, 2.0][:k]
    out, their_metrics = trl_score(table, weights, scale, aggregation)
    theirs = out["advantages"]
    per_func = torch.tensor(
        [[float("nan") if v is None else v for v in col] for col in zip(*table, strict=True)]
    )
    ours = group_advantages(per_func, G, weights, scale, aggregation)
    torch.testing.assert_close(ours.advantages, theirs, atol=TOL, rtol=0)
    assert set(ours.metrics) == set(their_metrics)
    for key, value in their_metrics.items():
        assert ours.metrics[key] == pytest.approx(value, abs=TOL, nan_ok=True), key


def _rollout(seed: int) -> tuple[list[list[int]], torch.Tensor, list[list[float | None]]]:
    """Completions of varied length (EOS is 2; two are cut off), the trainer's log-probs
    (padded) and the engine's, a little off, as lists with a few None (vLLM's NaN)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (3 * G,), generator=gen).tolist()
    ids = [[5] * (n - 1) + [2] for n in lengths]
    ids[1], ids[6] = [5] * T, [5, 5, 5]  # cut off: no EOS
    old = -3 * torch.rand(3 * G, T, generator=gen)
    noise = 0.4 * torch.randn(3 * G, T, generator=gen)
    sampling: list[list[float | None]] = [
        (old[i, : len(c)] + noise[i, : len(c)]).tolist() for i, c in enumerate(ids)
    ]
    sampling[2][0] = None
    sampling[7][-1] = None
    return ids, old, sampling


@pytest.mark.parametrize(
    "mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]
)
@pytest.mark.parametrize("clip_min, clip_max", [(None, 3.0), (0.5, 1.5), (0.8, None)])
def test_rollout_is_ratio_equals_trl(
    mode: str, clip_min: float | None, clip_max: float | None
) -> None:
    ids, old, sampling = _rollout(4)
    table = _reward_table(1, seed=4, with_none=False)
    rollout = {"old": old, "sampling": sampling, "mode": mode}
    out, metrics = trl_score(
        table, [1.0], completion_ids=ids, clip_min=clip_min, clip_max=clip_max, **rollout
    )
    sampled = torch.tensor(
        [
            [float("nan") if v is None else v for v in row] + [0.0] * (T - len(row))
            for row in sampling
        ]
    )
    ratio, ours = rollout_is_ratio(old, sampled, out["completion_mask"], mode, clip_min, clip_max)
    torch.testing.assert_close(ratio, out["importance_sampling_ratio"], atol=TOL, rtol=0)
    for key, value in ours.items():
        assert value == pytest.approx(metrics[key], abs=TOL), key


def test_truncated_mask_equals_trl() -> None:
    ids, _, _ = _rollout(5)
    table = _reward_table(1, seed=5, with_none=False)
    out, _ = trl_score(table, [1.0], completion_ids=ids, mask_truncated=True)
    full = (torch.arange(T).unsqueeze(0) < torch.tensor([len(c) for c in ids]).unsqueeze(1)).long()
    ours = truncated_mask(ids, full, eos_ids=[2], pad_id=0)
    assert torch.equal(ours, out["completion_mask"])
    assert not ours[1].any() and not ours[6].any() and ours[0].any()


def _loss_inputs(seed: int) -> dict[str, torch.Tensor]:
    """Random log-probs with the policy moved off the sampler (so ratios clip), a
    reference, mixed-sign advantages and right-padded masks, one row empty."""
    gen = torch.Generator().manual_seed(seed)
    logps = -3 * torch.rand(B, T, generator=gen)
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    lengths[3] = 0
    mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).long()
    return {
        "logps": logps,
        "old": logps + 0.3 * torch.randn(B, T, generator=gen),
        "ref": logps + 0.2 * torch.randn(B, T, generator=gen),
        "adv": torch.randn(B, generator=gen).masked_fill(torch.arange(B) == 5, 0.0),
        "mask": mask,
        "entropies": torch.rand(B, T, generator=gen),
        "is_ratio": torch.exp(0.1 * torch.randn(B, T, generator=gen)),
    }


def trl_loss(
    cfg: GRPOConfig, x: dict[str, torch.Tensor], scale: LossScale, with_is: bool
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """TRL's loss, its gradient w.r.t. the policy log-probs, and the metrics it logged."""
    logps = x["logps"].clone().requires_grad_(True)
    stub = _trainer(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, x["entropies"], None),
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        _entropy_bonus_enabled=False,
        importance_sampling_level=cfg.importance_sampling_level,
        beta=cfg.beta,
        loss_type=cfg.loss_type,
        epsilon_low=cfg.epsilon_low,
        epsilon_high=cfg.epsilon_upper,
        max_completion_length=cfg.max_completion_length,
        current_gradient_accumulation_steps=scale.accumulation_steps,
        use_vllm=with_is,
        vllm_importance_sampling_correction=with_is,
        args=types.SimpleNamespace(
            use_bias_correction_kl=cfg.use_bias_correction_kl,
            delta=cfg.delta,
            steps_per_generation=scale.steps_per_generation or scale.accumulation_steps,
            **{k: getattr(cfg, k) for k in vars(cfg) if k.startswith(("sapo_", "vespo_"))},
        ),
    )
    inputs = {
        "prompt_ids": torch.ones(B, 1, dtype=torch.long),
        "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": torch.ones(B, T, dtype=torch.long),
        "completion_mask": x["mask"],
        "advantages": x["adv"],
        "ref_per_token_logps": x["ref"],
        "num_items_in_batch": torch.tensor(float(scale.num_items_in_batch or x["mask"].sum())),
    }
    if x["old"] is not None:  # absent: TRL takes the detached policy log-probs
        inputs["old_per_token_logps"] = x["old"]
    if with_is:
        inputs["importance_sampling_ratio"] = x["is_ratio"]
    loss = stub._compute_loss(None, inputs)
    loss.backward()
    return loss.detach(), logps.grad, {k: v[-1] for k, v in stub._metrics["train"].items()}


def ours_loss(
    cfg: GRPOConfig, x: dict[str, torch.Tensor], scale: LossScale, with_is: bool
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    logps = x["logps"].clone().requires_grad_(True)
    out = grpo_loss(
        logps,
        x["old"],
        x["adv"],
        x["mask"],
        cfg,
        ref_logps=x["ref"],
        is_ratio=x["is_ratio"] if with_is else None,
        entropies=x["entropies"],
        scale=scale,
    )
    out.loss.backward()
    return out.loss.detach(), logps.grad, out.metrics


def _assert_same(
    cfg: GRPOConfig, scale: LossScale, with_is: bool, x: dict[str, Any] | None = None
) -> None:
    x = x or _loss_inputs(0)
    (l1, g1, m1), (l2, g2, m2) = ours_loss(cfg, x, scale, with_is), trl_loss(cfg, x, scale, with_is)
    torch.testing.assert_close(l1, l2, atol=TOL, rtol=0)
    torch.testing.assert_close(g1, g2, atol=TOL, rtol=0)
    assert set(m1) == set(m2)
    for key, value in m2.items():
        assert m1[key] == pytest.approx(value, abs=TOL, nan_ok=True), key


def _cfg(loss_type: str, **kw: Any) -> GRPOConfig:
    """DAPO's asymmetric clip by default; cispo's epsilon_high is a cap on the ratio;
    token-level rollout ratios, the kind vespo takes."""
    high = 1.2 if loss_type == "cispo" else 0.28
    base = {"epsilon_high": high, "max_completion_length": T, "rollout_is_mode": "token_mask"}
    return GRPOConfig(loss_type=loss_type, **{**base, **kw})


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_equals_trl(loss_type: str, level: str, beta: float) -> None:
    cfg = _cfg(loss_type, importance_sampling_level=level, beta=beta)
    _assert_same(cfg, LossScale(), with_is=False)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_with_rollout_is_ratio_and_accumulation_equals_trl(loss_type: str) -> None:
    """vLLM's importance-sampling correction, two-sided clipping (delta below 1 +
    epsilon_high, so the cap shows in the clip metrics), 2 micro-batches per step, 4 per
    generation batch and a global token count other than this micro-batch's."""
    cfg = _cfg(loss_type, beta=0.04, delta=1.2, use_bias_correction_kl=False)
    scale = LossScale(accumulation_steps=2, steps_per_generation=4, num_items_in_batch=97.0)
    _assert_same(cfg, scale, with_is=True, x=_loss_inputs(1))


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_loss_on_policy_equals_trl(loss_type: str) -> None:
    """num_iterations=1: no old log-probs, the ratio is exactly 1 and only advantages push."""
    x: dict[str, Any] = {**_loss_inputs(2), "old": None}
    _assert_same(_cfg(loss_type, epsilon_high=None, beta=0.04), LossScale(), with_is=False, x=x)
