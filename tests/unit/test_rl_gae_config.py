"""PPO's GAE and value loss, and the RL config's defaults and refusals.

TRL 1.16 ships no PPO trainer (not even in trl.experimental), so GAE is checked against
the GAE paper's definition written out below as a sum (the implementation is a
recursion), on right padding and on a masked hole mid-sequence.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from raylm.rl.advantages import gae, kl_shaped_rewards, whiten
from raylm.rl.config import GRPOConfig
from raylm.rl.loss import kl_k3, value_loss

pytestmark = pytest.mark.unit
TOL = 1e-6


def test_config_defaults_are_trls() -> None:
    """Every GRPOConfig field whose docstring names a TRL key has TRL 1.16's default, so a
    TRL recipe means the same here (max_completion_length is the one TRL leaves optional)."""
    import dataclasses
    import re

    from trl import GRPOConfig as TRLConfig

    from raylm.config import field_doc

    theirs = {f.name: f.default for f in dataclasses.fields(TRLConfig)}
    checked = 0
    for f in dataclasses.fields(GRPOConfig):
        m = re.search(r"TRL: ``(\w+)``", field_doc(GRPOConfig, f.name))
        if m and m.group(1) in theirs and not callable(f.default_factory):
            assert f.default == theirs[m.group(1)], (f.name, m.group(1))
            checked += 1
    assert checked >= 15


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"loss_type": "dr-grpo"}, "did you mean 'dr_grpo'"),
        ({"scale_rewards": "groups"}, "did you mean 'group'"),
        ({"num_generations": 1}, "at least 2"),
        ({"rewards": []}, "at least one"),
        ({"rewards": [{"function": "maths"}]}, "did you mean 'math'"),
        ({"rollout_is_mode": "token"}, "did you mean 'token_mask'"),
        ({"loss_type": "vespo"}, "use rollout_is_mode token_truncate or token_mask"),
        ({"rollout_is_mode": "token_truncate", "rollout_is_clip_max": None}, "needs rollout_is"),
        ({"rollout_is_clip_min": 2.0, "rollout_is_clip_max": 1.0}, "must be < rollout_is_clip_max"),
    ],
)
def test_config_refuses_bad_values(kw: dict[str, Any], match: str) -> None:
    from raylm.config import ConfigError

    with pytest.raises(ConfigError, match=match):
        GRPOConfig(**kw)


def gae_reference(r: list[float], v: list[float], gamma: float, lam: float) -> list[float]:
    """The GAE paper's definition (Schulman et al. 2016, eq. 16), as a sum, not a recursion:
    A_t = sum_l (gamma lam)^l delta_{t+l}, delta_t = r_t + gamma V_{t+1} - V_t, V_T = 0."""
    n = len(r)
    nxt = [*v[1:], 0.0]
    delta = [r[t] + gamma * nxt[t] - v[t] for t in range(n)]
    return [sum((gamma * lam) ** i * delta[t + i] for i in range(n - t)) for t in range(n)]


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 1.0), (0.99, 0.0), (1.0, 1.0)])
def test_gae_equals_the_papers_sum(gamma: float, lam: float) -> None:
    """Right padding and a hole in the middle (tool output): masked tokens are not steps."""
    gen = torch.Generator().manual_seed(3)
    rewards, values = torch.randn(4, 6, generator=gen), torch.randn(4, 6, generator=gen)
    mask = torch.tensor(
        [[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0]]
    )
    adv, returns = gae(rewards, values, mask, gamma, lam)
    for row in range(4):
        keep = mask[row].bool()
        ref = gae_reference(rewards[row][keep].tolist(), values[row][keep].tolist(), gamma, lam)
        torch.testing.assert_close(adv[row][keep], torch.tensor(ref), atol=TOL, rtol=0)
        torch.testing.assert_close(returns[row][keep], adv[row][keep] + values[row][keep])
        assert not adv[row][~keep].any() and not returns[row][~keep].any()
    if (gamma, lam) == (1.0, 1.0):  # Monte Carlo: the return is the sum of rewards to go
        mc = rewards[0].flip(0).cumsum(0).flip(0)
        torch.testing.assert_close(returns[0], mc, atol=1e-5, rtol=0)


def test_kl_shaped_rewards_and_whiten() -> None:
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    logps, ref = -torch.rand(3, 4), -torch.rand(3, 4)
    out = kl_shaped_rewards(torch.tensor([1.0, -2.0, 5.0]), logps, ref, mask, kl_coef=0.1)
    expected = -0.1 * (logps - ref) * mask
    expected[0, 2] += 1.0
    expected[1, 0] -= 2.0
    torch.testing.assert_close(out, expected)
    x = torch.randn(3, 4) * 5 + 3
    w = whiten(x, mask)
    kept = w[mask.bool()]
    assert abs(kept.mean().item()) < 1e-5 and abs(kept.std().item() - 1) < 1e-3
    assert not w[~mask.bool()].any()


def test_value_loss_clips_toward_the_rollout_values() -> None:
    old = torch.tensor([[0.0, 0.0, 0.0]])
    new = torch.tensor([[0.5, 0.1, -0.5]], requires_grad=True)
    returns = torch.tensor([[1.0, 1.0, -1.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, metrics = value_loss(new, old, returns, mask, clip=0.2)
    # token 0: unclipped (0.5-1)^2=0.25, clipped (0.2-1)^2=0.64, max 0.64 (clip binds)
    # token 1: both (0.1-1)^2=0.81; token 2 masked
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81) / 2)
    assert metrics["vf_clipfrac"] == pytest.approx(0.5)
    loss.backward()
    assert new.grad[0, 0] == 0  # the clipped branch carries no gradient to V
    assert new.grad[0, 2] == 0


def test_kl_k3_is_nonnegative_and_zero_at_equality() -> None:
    a, b = -torch.rand(5, 5), -torch.rand(5, 5)
    assert (kl_k3(a, b) >= 0).all()
    assert not kl_k3(a, a).any()
