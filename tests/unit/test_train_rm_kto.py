"""Stages rm and kto against TRL's own loss code, and the reward model's export.

- rm: ``trl.RewardTrainer.compute_loss`` (trl 1.16) on the same sequence-classification
  model and pair batch; the score is also checked to be the head at the last attended
  token, the index LLaMA-Factory's pairwise trainer reads.
- kto: ``trl.KTOTrainer._compute_loss`` (trl 1.16 keeps the KTO loss inline there, with
  LLaMA-Factory's ``kto_chosen_weight`` / ``kto_rejected_weight`` as its
  ``desirable_weight`` / ``undesirable_weight``) on the same policy, reference model,
  rows and mismatched KL rows; TRL computes its own log-probs (fused LM head).
- export: the scores a trained LoRA / full reward model gives in training are the scores
  ``AutoModelForSequenceClassification.from_pretrained`` gives on ``final/`` (merged).

TRL's methods run unbound on a stand-in ``self`` holding what they read, as in
tests/unit/test_train_preference.py; ``accelerator.gather*`` are the identity.
"""

from __future__ import annotations

import collections
import copy
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from raylm.config import ConfigError, load
from raylm.train.config import KTOConfig, RMConfig
from raylm.train.kto import kto_loss, kto_step, tokenize_kto, with_kl_rows
from raylm.train.objectives import collate, pair_batch
from raylm.train.reward import pair_scores, reward_loss, rm_step

ROOT = Path(__file__).resolve().parents[2]
PAIRS = [
    ([{"role": "user", "content": "What color is the sky?"}], "It is blue.", "Green, I think."),
    ([{"role": "user", "content": "Name a pet."}], "A cat.", "The number seven is odd, really."),
    ([{"role": "user", "content": "Two plus two?"}], "Four.", "Five, or maybe six."),
]
FEEDBACK = [  # (conversation, desirable?)
    ([("user", "What color is the sky?"), ("assistant", "It is blue.")], True),
    ([("user", "Name a pet."), ("assistant", "The number seven is odd, really.")], False),
    ([("user", "Hi."), ("assistant", "Hello!"), ("user", "2+2?"), ("assistant", "Four.")], True),
    ([("user", "Say a fruit."), ("assistant", "A car, a truck and a boat.")], False),
    ([("user", "Where do fish live?"), ("assistant", "In water.")], True),
]


def _identity(x: Any) -> Any:
    return x


def _metrics_store() -> Any:
    return collections.defaultdict(lambda: collections.defaultdict(list))


@pytest.fixture(scope="module")
def tok(tiny_model: Path) -> Any:
    from raylm.tokenizer import load_tokenizer

    return load_tokenizer(str(tiny_model))


@pytest.fixture(scope="module")
def pair_rows(tok: Any) -> list[dict[str, list[int]]]:
    from raylm.data.tokenize import tokenize_preference

    return [tokenize_preference(p, c, r, tok, 64) for p, c, r in PAIRS]


@pytest.fixture(scope="module")
def kto_rows(tok: Any) -> list[dict[str, Any]]:
    rows = []
    for turns, label in FEEDBACK:
        messages = [{"role": r, "content": c} for r, c in turns]
        rows.append(tokenize_kto({"messages": messages, "kto_label": label}, tok, 64))
    return with_kl_rows(rows, 64)


def _scorer(tiny_model: Path, pad: int, seed: int = 0) -> Any:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_model, num_labels=1, pad_token_id=pad, dtype=torch.float32
    ).eval()
    with torch.no_grad():  # a head that separates: the fresh one scores near 0
        model.score.weight.normal_(0, 1.0)
    return model


# ---- rm: TRL's RewardTrainer ------------------------------------------------------------
@pytest.mark.parametrize("center", [0.0, 0.01])
def test_rm_loss_equals_trl_reward_trainer(tiny_model, tok, pair_rows, center: float) -> None:
    from trl import RewardTrainer

    model = _scorer(tiny_model, tok.pad_token_id)
    with torch.no_grad():
        loss, metrics, _ = rm_step(RMConfig(center), model, pair_rows, tok.pad_token_id)
    batch = pair_batch(pair_rows, tok.pad_token_id)
    self = types.SimpleNamespace(
        model=model,
        args=types.SimpleNamespace(center_rewards_coefficient=center or None),
        accelerator=types.SimpleNamespace(gather=_identity, gather_for_metrics=_identity),
        _metrics=_metrics_store(),
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        theirs = RewardTrainer.compute_loss(self, model, inputs)
    assert float(loss) == pytest.approx(float(theirs), abs=1e-6)
    logged = {k: v[-1] for k, v in self._metrics["eval"].items()}
    for ours, trl_name in (("accuracy", "accuracy"), ("margin", "margin"),
                           ("mean_reward", "mean_reward")):  # fmt: skip
        assert metrics[ours] == pytest.approx(logged[trl_name], abs=1e-6), ours
    assert 0 < metrics["accuracy"] < 1  # the pairs disagree: the check is not vacuous


def test_rm_score_is_the_head_at_the_last_real_token(tiny_model, tok, pair_rows) -> None:
    """The score transformers pools is the head applied at ``attention_mask.sum() - 1``,
    the token LLaMA-Factory's value head reads, on right-padded pairs of unequal length."""
    model = _scorer(tiny_model, tok.pad_token_id)
    batch = pair_batch(pair_rows, tok.pad_token_id)
    assert len(set(batch["attention_mask"].sum(-1).tolist())) > 1
    with torch.no_grad():
        chosen, rejected = pair_scores(model, batch)
        hidden = model.model(batch["input_ids"], attention_mask=batch["attention_mask"])
        values = model.score(hidden.last_hidden_state).squeeze(-1)
    last = batch["attention_mask"].sum(-1) - 1
    lf = values.gather(-1, last.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(torch.cat((chosen, rejected)), lf, atol=1e-6)


def test_rm_loss_and_metrics_on_known_scores() -> None:
    chosen, rejected = torch.tensor([2.0, -1.0]), torch.tensor([0.0, 1.0])
    loss, m = reward_loss(RMConfig(), chosen, rejected)
    want = -torch.nn.functional.logsigmoid(torch.tensor([2.0, -2.0])).mean()
    assert float(loss) == pytest.approx(float(want))
    assert (m["accuracy"], m["margin"], m["rewards/chosen"]) == (0.5, 0.0, 0.5)
    centered, _ = reward_loss(RMConfig(center_rewards_coefficient=0.1), chosen, rejected)
    assert float(centered) == pytest.approx(float(want) + 0.1 * (4 + 0) / 2)


# ---- the reward model the worker trains, and what final/ gives back -----------------------
def _rm_cfg(tiny_model: Path, *overrides: str):
    return load(
        "train",
        [ROOT / "conf/train/dpo_lora.yaml"],
        [f"model.name_or_path={tiny_model}", "stage=rm", *overrides],
    )


@pytest.mark.parametrize("ftype", ["lora", "full"])
def test_exported_reward_model_scores_as_in_training(
    tiny_model: Path, tok, pair_rows, tmp_path: Path, ftype: str
) -> None:
    from transformers import AutoModelForSequenceClassification

    from raylm.train.export import export_to
    from raylm.train.reward import load_reward_model

    cfg = _rm_cfg(tiny_model, f"finetuning_type={ftype}")
    torch.manual_seed(cfg.train.seed)
    model = load_reward_model(cfg, None, tok.pad_token_id)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".score." in f".{n}" for n in trainable)  # the head trains (LoRA: its copy)
    with torch.no_grad():  # "training": move every trainable weight (LoRA's B starts at 0)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    batch = pair_batch(pair_rows, tok.pad_token_id)
    with torch.no_grad():
        trained = torch.cat(pair_scores(model, batch))
    export_to(cfg, model, tok, tmp_path / "final", rank=0)
    final = tmp_path / "final"
    loadable = final / "merged" if ftype == "lora" else final
    back = AutoModelForSequenceClassification.from_pretrained(loadable).eval()
    assert back.config.architectures == ["LlamaForSequenceClassification"]
    assert (back.config.num_labels, back.config.pad_token_id) == (1, tok.pad_token_id)
    with torch.no_grad():
        assert torch.allclose(torch.cat(pair_scores(back, batch)), trained, atol=1e-5)
    if ftype == "lora":  # the adapter itself: base with a one-output head, under PEFT
        from peft import PeftModel

        base = AutoModelForSequenceClassification.from_pretrained(
            tiny_model, num_labels=1, pad_token_id=tok.pad_token_id
        )
        adapter = PeftModel.from_pretrained(base, str(final)).eval()
        with torch.no_grad():
            assert torch.allclose(torch.cat(pair_scores(adapter, batch)), trained, atol=1e-5)


def test_freeze_trains_the_last_layers_and_the_head(tiny_model: Path, tok) -> None:
    from raylm.train.reward import load_reward_model

    cfg = _rm_cfg(tiny_model, "finetuning_type=freeze", "freeze.trainable_layers=1")
    model = load_reward_model(cfg, None, tok.pad_token_id)
    trainable = {n.split(".")[0] if n.startswith("score") else ".".join(n.split(".")[:3])
                 for n, p in model.named_parameters() if p.requires_grad}  # fmt: skip
    assert trainable == {"score", "model.layers.3"}


# ---- kto: TRL's KTOTrainer -------------------------------------------------------------------
def _kto_inputs(rows: list[dict], pad: int) -> dict[str, torch.Tensor]:
    """TRL's KTO batch for ``rows`` and their ``kl_*`` rows (completion = raylm's targets)."""
    target, kl = collate(rows, "", pad), collate(rows, "kl_", pad)
    return {
        "input_ids": target["input_ids"],
        "attention_mask": target["attention_mask"],
        "completion_mask": target["loss_mask"],
        "label": torch.tensor([r["kto_label"] for r in rows]),
        "KL_input_ids": kl["input_ids"],
        "KL_attention_mask": kl["attention_mask"],
        "KL_completion_mask": kl["loss_mask"],
    }


def _trl_kto(policy: Any, ref: Any, inputs: dict[str, torch.Tensor], cfg: KTOConfig):
    """TRL's KTO loss and logged metrics; ``ref`` None: ``inputs`` carry ``ref_logps``."""
    from trl import KTOTrainer

    self = types.SimpleNamespace(
        model=policy,
        ref_model=ref,
        args=types.SimpleNamespace(gradient_checkpointing_kwargs=None),
        accelerator=types.SimpleNamespace(
            device=torch.device("cpu"), gather_for_metrics=_identity, gather=_identity
        ),
        calculate_KL=True,
        precompute_ref_logps=ref is None,
        aux_loss_enabled=False,
        loss_type="kto",
        beta=cfg.beta,
        desirable_weight=cfg.desirable_weight,
        undesirable_weight=cfg.undesirable_weight,
        _metrics=_metrics_store(),
        _total_train_tokens=0,
        _tp_size=1,
    )
    self._compute_kl_logps = types.MethodType(KTOTrainer._compute_kl_logps, self)
    with torch.no_grad():
        loss = KTOTrainer._compute_loss(self, policy, inputs, False)
    return float(loss), {k: v[-1] for k, v in self._metrics["eval"].items()}


@pytest.fixture
def kto_models(tiny_model: Path) -> tuple[Any, Any]:
    """The tiny model as policy and a perturbed copy as the reference (so the log-ratios
    and the KL estimate are not zero)."""
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    ref = copy.deepcopy(policy)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return policy, ref


@pytest.mark.parametrize(
    ("beta", "desirable", "undesirable"), [(0.1, 1.0, 1.0), (0.5, 1.33, 0.7), (2.0, 1.0, 1.0)]
)
def test_kto_loss_equals_trl_kto_trainer(
    kto_models, kto_rows, tok, beta: float, desirable: float, undesirable: float
) -> None:
    """End to end: each side computes its own log-probs of policy and reference (TRL with
    its fused LM head), so sums of ~50 token log-probs agree to float32 rounding."""
    from trl.trainer.utils import add_fused_lm_head

    policy, ref = kto_models
    cfg = KTOConfig(beta=beta, desirable_weight=desirable, undesirable_weight=undesirable)
    with torch.no_grad():
        loss, m, _ = kto_step(cfg, policy, ref, kto_rows, tok.pad_token_id)
    for model in (policy, ref):
        add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits"))
    theirs, logged = _trl_kto(policy, ref, _kto_inputs(kto_rows, tok.pad_token_id), cfg)
    assert float(loss) == pytest.approx(theirs, abs=1e-6)
    assert m["kl"] == pytest.approx(logged["kl"], rel=1e-5)
    assert m["kl"] > 0  # the reference point is exercised, not clamped away
    for side in ("chosen", "rejected"):
        n = m[f"count/{side}"]
        assert m[f"rewards/{side}_sum"] / n == pytest.approx(logged[f"rewards/{side}"], rel=1e-5)
        assert m[f"logps/{side}_sum"] / n == pytest.approx(logged[f"logps/{side}"], rel=1e-5)
    assert (m["count/chosen"], m["count/rejected"]) == (3.0, 2.0)


class _GivenLogps(torch.nn.Module):
    """A stand-in for TRL's fused-head model: the log-probs it returns are given, the sum
    of each row at its first position, so TRL's loss code runs on exactly these values."""

    def __init__(self, by_input: dict[int, torch.Tensor]) -> None:
        super().__init__()
        self.by_input = by_input

    def forward(self, input_ids: torch.Tensor, **kw: Any) -> Any:
        sums = self.by_input[id(input_ids)]
        per_token = torch.zeros(input_ids.shape[0], input_ids.shape[1] - 1)
        per_token[:, 0] = sums
        zeros = torch.zeros_like(per_token)
        return types.SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize(("beta", "desirable", "undesirable"), [(0.1, 1.0, 1.0), (0.3, 1.2, 0.8)])
def test_kto_loss_on_given_logps_equals_trl(
    kto_rows, tok, seed: int, beta: float, desirable: float, undesirable: float
) -> None:
    """The same log-probs into both loss codes, reference ones precomputed (TRL's
    ``ref_logps`` / ``ref_KL_logps``); some seeds give a negative KL mean, clamped to 0."""
    g = torch.Generator().manual_seed(seed)
    n = len(kto_rows)
    logps, kl_logps, ref, ref_kl = (-30 + 5 * torch.randn(n, generator=g) for _ in range(4))
    inputs = _kto_inputs(kto_rows, tok.pad_token_id) | {"ref_logps": ref, "ref_KL_logps": ref_kl}
    policy = _GivenLogps({id(inputs["input_ids"]): logps, id(inputs["KL_input_ids"]): kl_logps})
    cfg = KTOConfig(beta=beta, desirable_weight=desirable, undesirable_weight=undesirable)
    theirs, logged = _trl_kto(policy.eval(), None, inputs, cfg)
    kl = (kl_logps - ref_kl).mean().clamp(min=0)
    tokens = inputs["completion_mask"][:, 1:].sum(-1).float()
    loss, m = kto_loss(cfg, logps, tokens, ref, inputs["label"], kl)
    assert float(loss) == pytest.approx(theirs, abs=1e-6)
    assert m["kl"] == pytest.approx(logged["kl"], abs=1e-6)
    assert m["rewards/chosen_sum"] / m["count/chosen"] == pytest.approx(
        logged["rewards/chosen"], abs=1e-6
    )


def test_kto_sft_weight_adds_llamafactorys_rescaled_nll() -> None:
    """LLaMA-Factory's pref_ftx: weight x mean(-avg logp of desirable answers) / n_desirable
    x batch size, added to the mean KTO loss."""
    logps, tokens = torch.tensor([-6.0, -3.0, -8.0]), torch.tensor([3.0, 1.0, 4.0])
    ref, labels, kl = torch.tensor([-5.0, -4.0, -8.5]), torch.tensor([True, False, True]), 0.2
    plain, _ = kto_loss(KTOConfig(), logps, tokens, ref, labels, torch.tensor(kl))
    with_sft, _ = kto_loss(KTOConfig(sft_weight=0.5), logps, tokens, ref, labels, torch.tensor(kl))
    nll = ((6.0 / 3) + (8.0 / 4)) / 2
    assert float(with_sft) == pytest.approx(float(plain) + 0.5 * nll / 2 * 3)


def test_a_batch_of_one_label_has_finite_loss_and_zero_counts() -> None:
    logps, ref = torch.tensor([-3.0, -4.0]), torch.tensor([-3.5, -4.0])
    loss, m = kto_loss(KTOConfig(), logps, torch.ones(2), ref, torch.tensor([True, True]),
                       torch.tensor(0.0))  # fmt: skip
    assert torch.isfinite(loss) and m["count/rejected"] == 0 and m["rewards/rejected_sum"] == 0


# ---- kto rows ----------------------------------------------------------------------------------
def test_only_the_last_answer_is_a_target(tok, kto_rows) -> None:
    multi = kto_rows[2]  # Hi. / Hello! / Two plus two? / Four.
    trained = tok.decode([t for t, m in zip(multi["input_ids"], multi["loss_mask"], strict=True)
                          if m])  # fmt: skip
    assert "Four." in trained and "Hello" not in trained
    assert [r["kto_label"] for r in kto_rows] == [label for _, label in FEEDBACK]
    with pytest.raises(ValueError, match="must end with the assistant answer"):
        tokenize_kto({"messages": [{"role": "user", "content": "Hi"}], "kto_label": True}, tok, 64)


def test_kl_rows_pair_each_prompt_with_the_previous_answer(tok, kto_rows) -> None:
    """LLaMA-Factory's offset: prompt i with answer i-1, the first with the last."""

    def parts(ids: list[int], mask: list[int]) -> tuple[str, str]:
        start = mask.index(1)
        return tok.decode(ids[:start]), tok.decode(ids[start:])

    n = len(kto_rows)
    for i, row in enumerate(kto_rows):
        prompt, answer = parts(row["kl_input_ids"], row["kl_loss_mask"])
        assert prompt == parts(row["input_ids"], row["loss_mask"])[0]
        prev = kto_rows[(i - 1) % n]
        assert answer == parts(prev["input_ids"], prev["loss_mask"])[1]
    cut = with_kl_rows(kto_rows, 12)
    assert all(len(r["kl_input_ids"]) == len(r["kl_loss_mask"]) <= 12 for r in cut)


def test_kl_rows_cycle_within_blocks_of_1000() -> None:
    rows = [{"input_ids": [0, i], "loss_mask": [0, 1], "kto_label": True} for i in range(1001)]
    out = with_kl_rows(rows, None)
    assert [r["kl_input_ids"][1] for r in out[:2]] == [999, 0]
    assert out[1000]["kl_input_ids"] == [0, 1000]  # a block of one pairs with itself


def test_micro_batch_without_kl_columns_cycles_or_refuses(kto_models, kto_rows, tok) -> None:
    policy, ref = kto_models
    bare = [{k: r[k] for k in ("input_ids", "loss_mask", "kto_label")} for r in kto_rows]
    with torch.no_grad():
        a, _, _ = kto_step(KTOConfig(), policy, ref, bare, tok.pad_token_id)
        b, _, _ = kto_step(KTOConfig(), policy, ref, kto_rows, tok.pad_token_id)
    assert float(a) == pytest.approx(float(b), abs=1e-6)  # the same cycle over one batch
    with pytest.raises(ValueError, match="micro_batch_size >= 2"):
        kto_step(KTOConfig(), policy, ref, bare[:1], tok.pad_token_id)


# ---- config and data kinds ---------------------------------------------------------------------
def test_config_groups_and_stage_data(tiny_model: Path, tmp_path: Path) -> None:
    from raylm.train.data import data_inputs

    with pytest.raises(ConfigError, match=r"kto\.beta"):
        KTOConfig(beta=0)
    with pytest.raises(ConfigError, match=r"kto\.undesirable_weight"):
        KTOConfig(undesirable_weight=-1)
    with pytest.raises(ConfigError, match=r"rm\.center_rewards_coefficient"):
        RMConfig(center_rewards_coefficient=-0.1)
    cfg = _rm_cfg(tiny_model, f"data.path={ROOT / 'conf/train/data/dpo_demo.jsonl'}")
    assert cfg.stage == "rm" and data_inputs(cfg)["kind"] == "raw"
    sft = ROOT / "conf/train/data/alpaca_demo.json"
    with pytest.raises(ConfigError, match=r"is sft data .* but stage='rm'"):
        data_inputs(_rm_cfg(tiny_model, f"data.path={sft}", "data.format=alpaca"))
