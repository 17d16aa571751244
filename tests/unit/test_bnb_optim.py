"""bitsandbytes' optimizers (``train.optimizer`` adamw_8bit, paged_*, lion_*; LLaMA-Factory's
``optim``): raylm's optimizer, stepped by DeepSpeed's engine as a run steps it, takes the
same steps as bitsandbytes' optimizer built the way transformers' Trainer builds it for
LLaMA-Factory (``Trainer.create_optimizer`` in transformers 5, transcribed as ``hf_bnb``)
in a plain torch loop; every ZeRO stage trains with 8-bit state; the keys map and the
runs it cannot serve are named."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from llamafactory_helpers import lf
from test_train_optimizers_lf import ROOT, batch, max_diff

from raylm.config import ConfigError, load

LR, WD, STEPS = 1e-2, 0.1, 4


def llama() -> torch.nn.Module:
    """A small Llama whose embeddings, head and q/o projections have 4096+ elements, so
    8-bit state engages (bitsandbytes keeps smaller tensors' state in 32 bits)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=False)  # fmt: skip
    return LlamaForCausalLM(config)


def cfg_of(name: str, *overrides: str) -> Any:
    base = ["model.name_or_path=/m", "finetuning_type=full", "deepspeed.stage=0",
            f"train.lr={LR}", f"train.weight_decay={WD}", "train.lr_scheduler=constant",
            "train.max_grad_norm=0", f"train.optimizer={name}"]  # fmt: skip
    return load("train", [ROOT / "conf/train/sft_lora.yaml"], [*base, *overrides])


def engine_run(model: torch.nn.Module, cfg: Any) -> tuple[Any, list[float]]:
    """STEPS steps of DeepSpeed's engine over build_optimizer, as raylm's worker takes them."""
    import deepspeed

    from raylm.train.ds_config import deepspeed_config
    from raylm.train.model import build_optimizer

    optim, sched = build_optimizer(model, cfg, total_steps=STEPS)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optim, lr_scheduler=sched, config=deepspeed_config(cfg, 1)
    )
    losses = []
    for step in range(STEPS):
        ids = batch(step % 2)  # two batches, seen twice: the loss must fall
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return engine, losses


def hf_bnb(model: torch.nn.Module, name: str) -> Any:
    """transformers' Trainer.create_optimizer for ``optim: name`` (adam_beta1/2 0.9/0.999,
    adam_epsilon 1e-8), with its nn.Embedding override to 32-bit state."""
    import bitsandbytes as bnb
    from transformers import Trainer

    decay = Trainer.get_decay_parameter_names(None, model)  # type: ignore[arg-type]
    groups = [
        {"params": [p for n, p in model.named_parameters() if n in decay], "weight_decay": WD},
        {"params": [p for n, p in model.named_parameters() if n not in decay],
         "weight_decay": 0.0},
    ]  # fmt: skip
    cls = bnb.optim.Lion if "lion" in name else bnb.optim.AdamW
    kw: dict[str, Any] = {"betas": (0.9, 0.999)} | ({} if "lion" in name else {"eps": 1e-8})
    bits = 8 if "8bit" in name else 32
    optim = cls(groups, lr=LR, optim_bits=bits, is_paged="paged" in name, **kw)
    manager = bnb.optim.GlobalOptimManager.get_instance()
    manager.initialize()  # raylm's build resets it too: no other optimizer's overrides
    if bits == 8:
        for module in model.modules():
            if isinstance(module, torch.nn.Embedding):
                manager.register_module_override(module, "weight", {"optim_bits": 32})
    return optim


def state_bits(optim: Any) -> dict[str, set[torch.dtype]]:
    inner = getattr(optim, "optimizer", optim)
    kinds: dict[str, set[torch.dtype]] = {"8": set(), "32": set()}
    for state in inner.state.values():
        kinds["8" if state["state1"].dtype == torch.uint8 else "32"].add(state["state1"].shape)
    return kinds


@pytest.mark.parametrize("name", ["paged_adamw_8bit", "lion_8bit", "paged_adamw_32bit"])
@pytest.mark.usefixtures("dist")
def test_steps_as_transformers_trainer_builds_it(name: str) -> None:
    """Exact (0.0): the same class, groups, kwargs and overrides, and DeepSpeed's stage 0
    in fp32 steps the client optimizer on the params themselves, unclipped (clipping
    differs in the last bit between DeepSpeed and torch, and one bit can move an 8-bit
    quantization bucket)."""
    ours, theirs = llama(), llama()
    engine, _ = engine_run(ours, cfg_of(name))
    optim = hf_bnb(theirs, name)
    for step in range(STEPS):
        ids = batch(step % 2)
        theirs(input_ids=ids, labels=ids).loss.backward()
        optim.step()
        theirs.zero_grad(set_to_none=True)
    diff = max_diff(ours, theirs)
    print(f"{name}: max |raylm - transformers' Trainer| = {diff:.2e}")
    assert diff == 0.0
    assert state_bits(engine.optimizer) == state_bits(optim)
    if "8bit" in name:  # embeddings (64 x 64) stay 32-bit, q_proj (64 x 64) is 8-bit
        embed = optim.state[theirs.model.embed_tokens.weight]["state1"]
        q_proj = optim.state[theirs.model.layers[0].self_attn.q_proj.weight]["state1"]
        assert (embed.dtype, q_proj.dtype) == (torch.float32, torch.uint8)


STAGE0: list[float] = []


@pytest.mark.parametrize("stage", ["1", "2", "3", "3+offload"])
@pytest.mark.usefixtures("dist")
def test_every_zero_stage_trains_with_8bit_state(stage: str) -> None:
    """ZeRO-1/2/3 hand the optimizer one flat fp32 partition per group (in CPU memory
    with offload_optimizer): the decaying weights' (embeddings too) gets 8-bit state, the
    norms' (320 elements, under bitsandbytes' 4096) 32-bit; the loss falls as at stage 0,
    tracking it to quantization noise."""
    offload = [f"deepspeed.offload_optimizer={stage.endswith('offload')}"]
    cfg = cfg_of("paged_adamw_8bit", f"deepspeed.stage={stage[0]}", *offload)
    engine, losses = engine_run(llama(), cfg)
    STAGE0[:] = STAGE0 or engine_run(llama(), cfg_of("paged_adamw_8bit"))[1]
    print(f"stage {stage}: {losses}, stage 0: {STAGE0}")
    assert losses[-1] < losses[0] - 0.1 and losses[2] < losses[0]
    assert max(abs(a - b) for a, b in zip(losses, STAGE0, strict=True)) < 0.05
    assert state_bits(engine.optimizer) == {"8": {(69632,)}, "32": {(320,)}}


@pytest.mark.parametrize("stage", [0, 1])
@pytest.mark.usefixtures("dist")
def test_checkpoint_resumes_to_the_same_step(stage: int, tmp_path: Path) -> None:
    """The 8-bit state (moments, quantization maps, block maxima) round-trips through
    DeepSpeed's checkpoint: the step after a resume equals the unbroken run's, in bf16
    (stage 0: per-tensor fp32 copies; 1: DeepSpeed's BF16_Optimizer; ZeRO-3 passed too,
    left out for time)."""
    cfg = cfg_of("adamw_8bit", f"deepspeed.stage={stage}", "train.precision=bf16")
    whole, _ = engine_run(llama().to(torch.bfloat16), cfg)
    whole.save_checkpoint(str(tmp_path), tag="t")
    resumed, _ = engine_run(llama().to(torch.bfloat16), cfg)
    resumed.load_checkpoint(str(tmp_path), tag="t")
    for engine in (whole, resumed):
        ids = batch(7)
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
    assert max_diff(whole.module, resumed.module) == 0.0
    if stage == 0:  # the bf16 wrapper's fp32 copies keep positions: embeddings stay 32-bit
        inner = whole.optimizer.optimizer
        first = inner.param_groups[0]["params"][0]  # embed_tokens' copy
        assert (first.shape, inner.state[first]["state1"].dtype) == ((64, 64), torch.float32)


def test_a_misspelt_name_gets_a_suggestion() -> None:
    with pytest.raises(ConfigError, match=r"'adamw_8bt' is not one of .*mean 'adamw_8bit'"):
        load("train", [ROOT / "conf/train/sft_lora.yaml"],
             ["model.name_or_path=/m", "train.optimizer=adamw_8bt"])  # fmt: skip


def test_a_missing_bitsandbytes_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from raylm.train.model import build_optimizer

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import raises ImportError
    with pytest.raises(ConfigError, match=r"needs the bitsandbytes package: pip install "
                       r"bitsandbytes \(raylm's gpu and dev extras"):  # fmt: skip
        build_optimizer(llama(), cfg_of("adamw_8bit"), total_steps=2)


def test_groups_split_by_decay_as_the_trainer_splits_them() -> None:
    """transformers 5's rule: biases and norm weights never decay (RMSNorm included);
    LoRA+'s lr groups each split the same way."""
    from peft import LoraConfig, get_peft_model

    from raylm.train.bnb_optim import decay_groups

    model = llama()
    groups = decay_groups(model, cfg_of("adamw_8bit", "train.weight_decay=0.5"))
    names = {id(p): n for n, p in model.named_parameters()}
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(LR, 0.5), (LR, 0.0)]
    assert {names[id(p)] for p in groups[1]["params"]} == {n for n in names.values() if "norm" in n}
    lora = get_peft_model(llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    cfg = cfg_of("adamw_8bit", "finetuning_type=lora", "lora.loraplus_lr_ratio=16")
    groups = decay_groups(lora, cfg)
    assert [(g["lr"], g["weight_decay"], len(g["params"])) for g in groups] == [
        (LR, WD, 4), (LR * 16, WD, 4)]  # fmt: skip


OPTIM = {
    "adamw_8bit": "adamw_8bit", "adamw_bnb_8bit": "adamw_8bit",
    "paged_adamw_8bit": "paged_adamw_8bit", "paged_adamw_32bit": "paged_adamw_32bit",
    "lion_8bit": "lion_8bit", "lion_32bit": "lion_32bit", "paged_lion_8bit": "paged_lion_8bit",
    "paged_lion_32bit": "paged_lion_32bit", "adamw_torch": "adamw", "adamw_torch_fused": "adamw",
}  # fmt: skip


@pytest.mark.parametrize("optim", sorted(OPTIM))
def test_llamafactory_optim_maps(optim: str, tmp_path: Path) -> None:
    cfg = load("train", [lf(tmp_path, finetuning_type="full", optim=optim)])
    assert cfg.train.optimizer == OPTIM[optim]


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"optim": "adafactor"}, r"optim='adafactor': raylm builds .*adamw_8bit"),
        ({"optim": "paged_ademamix_8bit"}, r"optim='paged_ademamix_8bit': .*paged_lion_32bit"),
        ({"optim": "lion_8bit", "use_galore": True}, r"optim=lion_8bit and use_galore"),
    ],
)
def test_llamafactory_optim_refusals_list_what_is_accepted(
    extra: dict, match: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=match):
        load("train", [lf(tmp_path, finetuning_type="full", **extra)])
