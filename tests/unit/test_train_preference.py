"""raylm's preference losses against TRL's own loss code on the same model and inputs.

Which TRL code each variant is checked against (trl 1.16):

- sigmoid, hinge, ipo: ``DPOTrainer._compute_loss`` with that ``loss_type``.
- sigmoid with label_smoothing (cDPO): TRL 1.16's ``sigmoid`` dropped label smoothing
  (LLaMA-Factory pins trl <= 0.24, whose ``sigmoid`` had it). Its ``aot`` loss computes
  exactly the cDPO formula on a batch of one pair (sorting one value changes nothing),
  so it is run pair by pair.
- sft_weight (LLaMA-Factory's ``pref_ftx``): DPO's ``loss_types=["sigmoid", "sft"]``,
  pair by pair: TRL's ``sft`` is a token mean over the whole batch, LLaMA-Factory's a
  per-pair mean; on one pair they agree.
- simpo: ``trl.experimental.cpo.CPOTrainer.get_batch_loss_metrics`` with
  ``loss_type="simpo", cpo_alpha=0`` (TRL's SimPO setting).
- orpo: ``trl.experimental.orpo.ORPOTrainer``. Its odds-ratio term and metrics are
  compared directly. Its NLL covers prompt and response tokens; raylm follows
  LLaMA-Factory (``train/dpo/trainer.py``: ``sft_loss = -chosen_logps_avg``, the
  response's per-token mean), which the test computes with TRL's ``get_batch_logps``.

TRL's methods are called unbound on a stand-in ``self`` holding exactly what they read;
``accelerator.gather*`` are the identity, which is what accelerate does on one process.
"""

from __future__ import annotations

import collections
import re
import types
from typing import Any

import pytest
import torch

from raylm.config import ConfigError
from raylm.train.config import DPOConfig
from raylm.train.objectives import collate, pair_batch, sequence_logps
from raylm.train.preference import PairLogps, pair_logps, preference_loss

PROMPTS = [
    ([{"role": "user", "content": "What color is the sky?"}], "It is blue.", "Green, I think."),
    ([{"role": "user", "content": "Name a pet."}], "A cat.", "The number seven is odd, really."),
]
REF_CHOSEN = torch.tensor([-40.0, -35.5])
REF_REJECTED = torch.tensor([-42.25, -31.0])
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")
METRICS += ("logps/chosen", "logps/rejected")


@pytest.fixture(scope="module")
def setup(tiny_model) -> tuple[Any, list[dict[str, list[int]]], int]:
    """The tiny model in eval mode (no dropout) and two tokenized pairs of unequal length."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raylm.data.tokenize import tokenize_preference

    tok = AutoTokenizer.from_pretrained(tiny_model)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    rows = [tokenize_preference(p, c, r, tok, 64) for p, c, r in PROMPTS]
    return model, rows, tok.pad_token_id


def ours(
    setup: tuple[Any, list, int], cfg: DPOConfig, ref: tuple[torch.Tensor, torch.Tensor] | None
) -> tuple[torch.Tensor, dict[str, float]]:
    model, rows, pad = setup
    with torch.no_grad():
        policy = pair_logps(model, pair_batch(rows, pad))
        return preference_loss(cfg, policy, policy.with_sums(*ref) if ref else None)


# ---- DPO family: DPOTrainer._compute_loss ---------------------------------------------------
def _dpo_self(model: Any, beta: float, loss_types: list[str], **kw: Any) -> Any:
    identity = lambda x: x  # noqa: E731
    return types.SimpleNamespace(
        model=model,
        ref_model=None,
        accelerator=types.SimpleNamespace(
            device=torch.device("cpu"), gather_for_metrics=identity, gather=identity
        ),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=loss_types,
        loss_weights=kw.pop("loss_weights", [1.0] * len(loss_types)),
        beta=beta,
        label_smoothing=kw.pop("label_smoothing", 0.0),
        use_weighting=False,
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
        args=types.SimpleNamespace(gradient_checkpointing_kwargs=None),
    )


def trl_dpo(
    setup: tuple[Any, list, int], rows: list, ref: tuple[torch.Tensor, torch.Tensor], **kw: Any
) -> tuple[float, dict[str, float]]:
    """TRL's DPO loss on ``rows`` and the metrics it logged."""
    from trl.trainer.dpo_trainer import DPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    model, _, pad = setup
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    batch = pair_batch(rows, pad)
    inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "completion_mask": batch["loss_mask"],
        "ref_chosen_logps": ref[0],
        "ref_rejected_logps": ref[1],
    }
    self = _dpo_self(model, kw.pop("beta"), kw.pop("loss_types"), **kw)
    with torch.no_grad():
        loss = DPOTrainer._compute_loss(self, model, inputs, False)
    return float(loss), {k: v[-1] for k, v in self._metrics["eval"].items()}


def trl_dpo_per_pair(setup: tuple[Any, list, int], **kw: Any) -> float:
    """TRL's DPO loss run on each pair alone, averaged: the batch mean raylm takes."""
    _, rows, _ = setup
    losses = [
        trl_dpo(setup, [row], (REF_CHOSEN[i : i + 1], REF_REJECTED[i : i + 1]), **dict(kw))[0]
        for i, row in enumerate(rows)
    ]
    return sum(losses) / len(losses)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_reference_losses_equal_trl_dpo(setup, loss_type: str, beta: float) -> None:
    loss, metrics = ours(
        setup, DPOConfig(beta=beta, loss_type=loss_type), (REF_CHOSEN, REF_REJECTED)
    )
    theirs, their_metrics = trl_dpo(
        setup, setup[1], (REF_CHOSEN, REF_REJECTED), beta=beta, loss_types=[loss_type]
    )
    # float32: IPO's loss at beta 0.1 is ~8.5, where one ulp is 9.5e-7; the two sums
    # may round differently by a few ulps (2 seen), so the bound is relative there.
    assert float(loss) == pytest.approx(theirs, rel=1e-6, abs=1e-6)
    for key in METRICS:
        assert metrics[key] == pytest.approx(their_metrics[key], abs=1e-5), key


def test_ipo_averages_over_response_tokens(setup) -> None:
    """The two pairs' responses differ in length, so a summed IPO would differ from TRL's."""
    _, rows, _ = setup
    lengths = {sum(r["chosen_loss_mask"]) for r in rows} | {
        sum(r["rejected_loss_mask"]) for r in rows
    }
    assert len(lengths) > 1
    loss, _ = ours(setup, DPOConfig(beta=0.1, loss_type="ipo"), (REF_CHOSEN, REF_REJECTED))
    model, _, pad = setup
    with torch.no_grad():
        c, r = sequence_logps(model, pair_batch(rows, pad)).chunk(2)
    naive = (((c - REF_CHOSEN) - (r - REF_REJECTED) - 1 / (2 * 0.1)) ** 2).mean()
    assert abs(float(loss) - float(naive)) > 1e-3


@pytest.mark.parametrize("label_smoothing", [0.1, 0.3])
def test_cdpo_equals_trl_aot_per_pair(setup, label_smoothing: float) -> None:
    cfg = DPOConfig(beta=0.2, label_smoothing=label_smoothing)
    loss, _ = ours(setup, cfg, (REF_CHOSEN, REF_REJECTED))
    theirs = trl_dpo_per_pair(setup, beta=0.2, loss_types=["aot"], label_smoothing=label_smoothing)
    assert float(loss) == pytest.approx(theirs, abs=1e-6)
    plain, _ = ours(setup, DPOConfig(beta=0.2), (REF_CHOSEN, REF_REJECTED))
    assert float(loss) != pytest.approx(float(plain), abs=1e-4)


def test_sft_weight_equals_trl_sft_loss_per_pair(setup) -> None:
    cfg = DPOConfig(beta=0.1, sft_weight=0.7)
    loss, metrics = ours(setup, cfg, (REF_CHOSEN, REF_REJECTED))
    theirs = trl_dpo_per_pair(
        setup, beta=0.1, loss_types=["sigmoid", "sft"], loss_weights=[1.0, 0.7]
    )
    assert float(loss) == pytest.approx(theirs, abs=1e-6)
    assert metrics["sft_loss"] > 0


# ---- reference-free: TRL's experimental CPO (SimPO) and ORPO trainers ------------------------
def side_batch(setup: tuple[Any, list, int]) -> dict[str, torch.Tensor]:
    """The chosen_*/rejected_* tensors CPO and ORPO read: labels are -100 off the response."""
    _, rows, pad = setup
    out: dict[str, torch.Tensor] = {}
    for side in ("chosen", "rejected"):
        b = collate(rows, f"{side}_", pad)
        out[f"{side}_input_ids"] = b["input_ids"]
        out[f"{side}_attention_mask"] = b["attention_mask"]
        out[f"{side}_labels"] = b["input_ids"].masked_fill(b["loss_mask"] == 0, -100)
    return out


def _stand_in(trainer: type, methods: tuple[str, ...], **attrs: Any) -> Any:
    identity = lambda x: x  # noqa: E731
    self = types.SimpleNamespace(
        accelerator=types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=identity),
        is_encoder_decoder=False,
        aux_loss_enabled=False,
        concatenated_inputs=trainer.concatenated_inputs,
        get_batch_logps=trainer.get_batch_logps,
        **attrs,
    )
    for name in methods:
        setattr(self, name, types.MethodType(getattr(trainer, name), self))
    return self


@pytest.mark.parametrize(("beta", "gamma"), [(2.0, 0.5), (2.5, 1.4), (0.1, 0.0)])
def test_simpo_equals_trl_cpo_simpo(setup, beta: float, gamma: float) -> None:
    from trl.experimental.cpo import CPOTrainer

    loss, metrics = ours(setup, DPOConfig(beta=beta, loss_type="simpo", simpo_gamma=gamma), None)
    self = _stand_in(
        CPOTrainer, ("concatenated_forward", "cpo_loss"), pad_token_id=setup[2],
        loss_type="simpo", cpo_alpha=0.0, alpha=0.0, beta=beta, simpo_gamma=gamma,
        label_smoothing=0.0,
    )  # fmt: skip
    with torch.no_grad():
        theirs, their_metrics = CPOTrainer.get_batch_loss_metrics(self, setup[0], side_batch(setup))
    assert float(loss) == pytest.approx(float(theirs), abs=1e-6)
    for key in METRICS:
        assert metrics[key] == pytest.approx(their_metrics[key], abs=1e-6), key


@pytest.mark.parametrize("beta", [0.1, 0.25])
def test_orpo_equals_trl_odds_ratio_plus_llamafactory_nll(setup, beta: float) -> None:
    from trl.experimental.orpo import ORPOTrainer

    model = setup[0]
    loss, metrics = ours(setup, DPOConfig(beta=beta, loss_type="orpo"), None)
    self = _stand_in(
        ORPOTrainer, ("concatenated_forward", "odds_ratio_loss"), padding_value=setup[2], beta=beta
    )
    batch = side_batch(setup)
    with torch.no_grad():
        theirs, their_metrics = ORPOTrainer.get_batch_loss_metrics(self, model, batch)
        chosen_logits = model(
            batch["chosen_input_ids"], attention_mask=batch["chosen_attention_mask"]
        ).logits
        chosen_avg = ORPOTrainer.get_batch_logps(chosen_logits, batch["chosen_labels"], True)
    odds_ratio_term = float(theirs) - their_metrics["nll_loss"]  # beta * -mean(log sigmoid)
    llamafactory_nll = float(-chosen_avg.mean())
    assert float(loss) == pytest.approx(llamafactory_nll + odds_ratio_term, abs=1e-6)
    assert metrics["nll_loss"] == pytest.approx(llamafactory_nll, abs=1e-6)
    for key in (*METRICS, "log_odds_ratio", "log_odds_chosen"):
        assert metrics[key] == pytest.approx(their_metrics[key], abs=1e-6), key


# ---- the pieces the worker uses ------------------------------------------------------------
def test_pair_logps_sums_match_sequence_logps(setup) -> None:
    model, rows, pad = setup
    batch = pair_batch(rows, pad)
    with torch.no_grad():
        policy = pair_logps(model, batch)
        chosen, rejected = sequence_logps(model, batch).chunk(2)
    assert torch.allclose(policy.chosen, chosen) and torch.allclose(policy.rejected, rejected)
    assert policy.chosen_tokens.tolist() == [sum(r["chosen_loss_mask"][1:]) for r in rows]


def test_reference_free_losses_need_no_reference_and_others_do() -> None:
    logps = PairLogps(
        torch.tensor([-3.0]), torch.tensor([-6.0]), torch.tensor([3.0]), torch.tensor([2.0])
    )
    for loss_type in ("simpo", "orpo"):
        cfg = DPOConfig(loss_type=loss_type)
        assert not cfg.needs_reference
        loss, _ = preference_loss(cfg, logps, None)
        assert torch.isfinite(loss)
    for loss_type in ("sigmoid", "hinge", "ipo"):
        cfg = DPOConfig(loss_type=loss_type)
        assert cfg.needs_reference
        with pytest.raises(ValueError, match="needs the reference"):
            preference_loss(cfg, logps, None)


def test_metrics_on_known_logps() -> None:
    """Rewards are beta times the log-ratios; accuracy counts pairs with chosen ahead."""
    policy = PairLogps(
        torch.tensor([-2.0, -9.0]), torch.tensor([-4.0, -1.0]), torch.ones(2), torch.ones(2)
    )
    ref = policy.with_sums(torch.tensor([-3.0, -3.0]), torch.tensor([-3.0, -3.0]))
    _, m = preference_loss(DPOConfig(beta=0.5), policy, ref)
    assert m["rewards/chosen"] == pytest.approx((0.5 - 3.0) / 2)
    assert m["rewards/rejected"] == pytest.approx((-0.5 + 1.0) / 2)
    assert m["rewards/accuracies"] == pytest.approx(0.5)
    assert m["rewards/margins"] == pytest.approx(m["rewards/chosen"] - m["rewards/rejected"])


def test_empty_response_scores_zero_not_nan() -> None:
    logps = PairLogps(torch.zeros(1), torch.tensor([-2.0]), torch.zeros(1), torch.ones(1))
    loss, _ = preference_loss(DPOConfig(loss_type="simpo"), logps, None)
    assert torch.isfinite(loss)


# ---- config ---------------------------------------------------------------------------------
def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"only applies to dpo.loss_type=sigmoid"):
        DPOConfig(loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ConfigError, match=r"label_smoothing=0.5 must be in \[0, 0.5\)"):
        DPOConfig(label_smoothing=0.5)
    with pytest.raises(ConfigError, match=re.escape("dpo.loss_type='kto_pair' is not one of")):
        DPOConfig(loss_type="kto_pair")
    with pytest.raises(ConfigError, match="did you mean 'simpo'"):
        DPOConfig(loss_type="simpo_")
    with pytest.raises(ConfigError, match=re.escape("dpo.simpo_gamma=-1")):
        DPOConfig(loss_type="simpo", simpo_gamma=-1)
    with pytest.raises(ConfigError, match=re.escape("dpo.sft_weight=-0.1")):
        DPOConfig(sft_weight=-0.1)
    with pytest.raises(ConfigError, match=re.escape("dpo.beta=0")):
        DPOConfig(loss_type="orpo", beta=0)
