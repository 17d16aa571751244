"""PPO's pieces without Ray or vLLM: the clipped surrogate, the reward model's source
(an rm run's manifest or a model directory) and its refusals, the value head's step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from raylm.config import ConfigError
from raylm.manifest import Manifest
from raylm.outputs import ModelOutput
from raylm.rl.loss import ppo_policy_loss
from raylm.train.reward_model import reward_model_path


def test_ppo_policy_loss_clips_only_where_the_ratio_leaves_the_band() -> None:
    old = torch.zeros(1, 4)
    # ratios e^0.5 (above 1.2), e^-0.5 (below 0.8), 1, and a masked token
    logps = torch.tensor([[0.5, -0.5, 0.0, 3.0]], requires_grad=True)
    adv = torch.tensor([[1.0, 1.0, -2.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, m = ppo_policy_loss(logps, old, adv, mask, clip=0.2)
    r = torch.exp(logps.detach())[0]
    # token 0: A > 0, r > 1.2: the clipped term (-1.2) is the max -> no gradient;
    # token 1: A > 0, r < 0.8: -A r is the max (pessimistic) -> gradient; token 2: r = 1.
    expected = (-1.2 + -r[1] + 2.0) / 3
    assert float(loss) == pytest.approx(float(expected))
    loss.backward()
    grad = logps.grad[0]
    assert grad[0] == 0 and grad[3] == 0
    assert float(grad[1]) == pytest.approx(float(-r[1] / 3))
    assert float(grad[2]) == pytest.approx(2.0 / 3)
    assert m["clip_ratio"] == pytest.approx(1 / 3)
    assert m["approx_kl"] == pytest.approx(0.5 * (0.25 + 0.25) / 3)


def _model_dir(path: Path, arch: str) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"architectures": [arch]}))
    return path


def _rm_run(tmp: Path, stage: str, adapter: bool = False, status: str = "succeeded") -> Path:
    run = tmp / f"run-{stage}"
    final = _model_dir(run / "final", "LlamaForSequenceClassification")
    merged = _model_dir(final / "merged", "LlamaForSequenceClassification") if adapter else None
    out = ModelOutput(path=str(final), adapter=adapter, base_model="b", tokenizer=str(final),
                      cutoff_len=64, stage=stage, merged=str(merged) if merged else None)  # fmt: skip
    m = Manifest.start("train", {}, [])
    m.finish({}, {}, out.to_record())
    m.status = status
    m.write(run)
    return run


def test_reward_model_from_an_rm_run_manifest_or_a_model_dir(tmp_path: Path) -> None:
    assert reward_model_path(str(_rm_run(tmp_path, "rm"))) == str(tmp_path / "run-rm/final")
    lora = _rm_run(tmp_path / "l", "rm", adapter=True)
    assert reward_model_path(str(lora)) == str(lora / "final/merged")
    plain = _model_dir(tmp_path / "m", "MistralForSequenceClassification")
    assert reward_model_path(str(plain)) == str(plain)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda t: _rm_run(t, "sft"), "records a stage sft model; PPO scores completions"),
        (lambda t: _rm_run(t, "rm", status="failed"), "manifest says failed"),
        (lambda t: _model_dir(t / "lm", "LlamaForCausalLM"), "not a reward model"),
        (lambda t: t / "missing", "no such directory"),
    ],
)
def test_what_is_not_a_reward_model_is_refused_by_name(tmp_path: Path, make, message) -> None:
    with pytest.raises(ConfigError, match=message):
        reward_model_path(str(make(tmp_path)))
