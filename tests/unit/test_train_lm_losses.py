"""LLaMA-Factory's SFT loss variants (dft, eaft, asft; ``loss.type``) against a
transcription of its own functions (``train/trainer_utils.py`` at ff6d4d12), and the
asft reference of a LoRA run being the base model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from raylm.config import ConfigError, load
from raylm.train import objectives as obj
from raylm.train.config_methods import LossConfig

ROOT = Path(__file__).resolve().parents[2]
IGNORE = -100


def lf_dft(source, target):
    """LLaMA-Factory's ``_dft_cross_entropy`` (no ``num_items_in_batch``)."""
    per_token = F.cross_entropy(source, target, ignore_index=IGNORE, reduction="none")
    valid = per_token[target != IGNORE]
    with torch.no_grad():
        probs = torch.exp(-valid)
    return (valid * probs).mean()


def lf_eaft(source, target, alpha):
    """LLaMA-Factory's ``_eaft_cross_entropy`` (no ``num_items_in_batch``)."""
    per_token = F.cross_entropy(source, target, ignore_index=IGNORE, reduction="none")
    valid_mask = target != IGNORE
    valid = per_token[valid_mask]
    with torch.no_grad():
        top, _ = torch.topk(source[valid_mask].detach(), k=20, dim=-1)
        logp = top - torch.logsumexp(top, dim=-1, keepdim=True)
        entropy = -(torch.exp(logp) * logp).sum(dim=-1)
        weight = torch.pow(entropy / 3.0, alpha)
    return (valid * weight).mean()


def lf_asft(logits, labels, ref_logits, alpha):
    """LLaMA-Factory's ``asft_loss_func``: shift, flatten, dft + alpha * KL(ref || policy)."""
    vocab = logits.size(-1)
    source = logits[..., :-1, :].reshape(-1, vocab)
    ref = ref_logits[..., :-1, :].reshape(-1, vocab)
    target = labels[..., 1:].reshape(-1)
    kl = F.kl_div(F.log_softmax(source, -1), F.softmax(ref, -1), reduction="none").sum(-1)
    mask = (target != IGNORE).float()
    return lf_dft(source, target) + alpha * (kl * mask).sum() / mask.sum()


def lf_flat(logits, labels):
    """LLaMA-Factory's ``dft_loss_func`` / ``eaft_loss_func`` label shift."""
    labels = F.pad(labels, (0, 1), value=IGNORE)[..., 1:].reshape(-1)
    return logits.reshape(-1, logits.size(-1)), labels


@pytest.fixture
def batch():
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (3, 9))
    mask = torch.zeros(3, 9, dtype=torch.long)
    mask[0, 3:] = 1
    mask[1, 5:8] = 1
    mask[2, 1:] = 1
    logits = torch.randn(3, 9, 64, dtype=torch.float64) * 3
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, IGNORE))
    return {"input_ids": ids, "loss_mask": mask}, logits, labels


def _grad(fn, logits):
    x = logits.clone().requires_grad_(True)
    loss = fn(x)
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("kind", ["dft", "eaft", "asft"])
def test_variants_match_llamafactory(batch, kind: str) -> None:
    b, logits, labels = batch
    cfg = LossConfig(type=kind, asft_alpha=0.05, eaft_alpha=0.7)
    ref_logits = torch.randn_like(logits)

    def ours(x):
        return obj.weighted_lm_loss(x, b, kind, cfg, ref_logits)[0].double()

    def theirs(x):
        if kind == "asft":
            return lf_asft(x.float(), labels, ref_logits.float(), cfg.asft_alpha).double()
        if kind == "dft":
            return lf_dft(*lf_flat(x.float(), labels)).double()
        return lf_eaft(*lf_flat(x.float(), labels), cfg.eaft_alpha).double()

    got, got_grad = _grad(ours, logits)
    want, want_grad = _grad(theirs, logits)
    assert abs(got.item() - want.item()) < 1e-6
    assert torch.allclose(got_grad, want_grad, atol=1e-6)
    assert obj.weighted_lm_loss(logits, b, kind, cfg, ref_logits)[1] == int(labels.ne(-100).sum())
    plain = -(obj.token_logps(logits, b["input_ids"]) * b["loss_mask"][:, 1:]).sum() / 17
    assert abs(got.item() - plain.item()) > 1e-3  # a variant, not cross-entropy again


def test_weights_are_what_the_methods_say(batch) -> None:
    b, logits, _ = batch
    zero = LossConfig(type="eaft", eaft_alpha=0.0)  # (H/3)^0 = 1: plain cross-entropy
    plain = -(obj.token_logps(logits, b["input_ids"]) * b["loss_mask"][:, 1:]).sum() / 17
    assert torch.isclose(obj.weighted_lm_loss(logits, b, "eaft", zero)[0], plain.float())
    none = {"input_ids": b["input_ids"], "loss_mask": torch.zeros_like(b["loss_mask"])}
    x = logits.float().requires_grad_(True)
    loss, n = obj.weighted_lm_loss(x, none, "dft", LossConfig(type="dft"))
    assert (loss.item(), n) == (0.0, 0)
    loss.backward()  # no targets: a zero that still backpropagates (every rank steps)


def test_loss_config_is_checked(tiny_model: Path) -> None:
    def conf(*overrides: str):
        files = [ROOT / "conf/train/sft_lora.yaml"]
        return load("train", files, [f"model.name_or_path={tiny_model}", *overrides])

    assert conf().loss.type == "ce"
    assert conf("loss.type=dft", "finetuning_type=full").loss.type == "dft"
    with pytest.raises(ConfigError, match=r"loss\.type"):
        conf("loss.type=focal")
    with pytest.raises(ConfigError, match="pt/sft token loss"):
        conf("loss.type=dft", "stage=dpo")
    with pytest.raises(ConfigError, match="no longer the reference"):
        conf("loss.type=asft", "lora.init=pissa")


def test_asft_reference_of_a_lora_run_is_the_base(tiny_model: Path) -> None:
    """Under the disabled adapter the LoRA model computes the base's logits; with B = 0
    (a fresh adapter) the KL term is 0 and asft equals dft."""
    from transformers import AutoModelForCausalLM

    from raylm.train.model import add_lora, load_model

    files = [ROOT / "conf/train/sft_lora.yaml"]
    cfg = load("train", files, [f"model.name_or_path={tiny_model}", "loss.type=asft"])
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    model = load_model(cfg)
    torch.manual_seed(1)
    for name, p in model.named_parameters():  # a trained adapter: B no longer 0
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    ids = torch.tensor([[1, 17, 40, 99, 301, 7, 1200, 5]])
    b = {"input_ids": ids, "loss_mask": torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]]),
         "attention_mask": torch.ones_like(ids)}  # fmt: skip
    with torch.no_grad():
        ref = obj.reference_logits(model, None, b)
        want = base(input_ids=ids).logits
    assert torch.allclose(ref, want, atol=1e-5)
    asft, n = obj.lm_loss(model, b, cfg.loss)
    dft, _ = obj.lm_loss(model, b, LossConfig(type="dft"))
    assert n == 5 and asft.item() > dft.item()  # the adapter moved it off the reference
    fresh = add_lora(AutoModelForCausalLM.from_pretrained(str(tiny_model)), cfg)
    a, _ = obj.lm_loss(fresh, b, cfg.loss)
    d, _ = obj.lm_loss(fresh, b, LossConfig(type="dft"))
    assert torch.isclose(a, d, atol=1e-6)
    with pytest.raises(RuntimeError, match="needs a reference model"):
        obj.lm_loss(base, b, cfg.loss)
    same = obj.lm_loss(base, b, cfg.loss, ref=base)[0]  # full/freeze: the frozen copy
    assert torch.isclose(same, obj.lm_loss(base, b, LossConfig(type="dft"))[0])


@pytest.mark.parametrize(
    "rel, kind, alpha",
    [
        ("extras/dft/qwen2_full_sft.yaml", "dft", None),
        ("extras/eaft/qwen25_05b_eaft_full.yaml", "eaft", ("eaft_alpha", 1.0)),
        ("extras/asft/qwen2_full_asft.yaml", "asft", ("asft_alpha", 0.05)),
        ("extras/asft/llama2_full_asft.yaml", "asft", ("asft_alpha", 0.1)),
    ],
)
def test_llamafactory_loss_examples_map(rel, kind, alpha, tmp_path: Path, tiny_model: Path):
    from llamafactory_helpers import example

    cfg = load("train", [example(rel, tmp_path, tiny_model)])
    assert (cfg.stage, cfg.finetuning_type, cfg.loss.type) == ("sft", "full", kind)
    if alpha:
        assert getattr(cfg.loss, alpha[0]) == alpha[1]


def test_llamafactory_loss_keys_refused_together_or_off_sft(tmp_path: Path) -> None:
    from llamafactory_helpers import lf

    with pytest.raises(ConfigError, match="one SFT loss variant"):
        load("train", [lf(tmp_path, use_dft_loss=True, use_eaft_loss=True)])
    with pytest.raises(ConfigError, match="with stage sft"):
        load("train", [lf(tmp_path, use_asft_loss=True, stage="dpo")])
    cfg = load("train", [lf(tmp_path, use_eaft_loss=True, eaft_alpha="0.5")])
    assert (cfg.loss.type, cfg.loss.eaft_alpha) == ("eaft", 0.5)
