"""The everyday training knobs (gradient checkpointing, attention kernel, LoRA variants,
LoRA+, freeze variants, continuing an adapter, warmup steps), each checked for its
effect on the model the train job's own loader builds from the tiny model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from raylm.config import ConfigError, load
from raylm.train.model import (
    build_optimizer,
    check_attention_device,
    check_knobs,
    load_model,
    param_groups,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def cfg(tiny_model: Path):
    """The LoRA SFT config on the tiny model, with overrides."""

    def make(*overrides: str):
        files = [ROOT / "conf/train/sft_lora.yaml"]
        return load("train", files, [f"model.name_or_path={tiny_model}", *overrides])

    return make


def ids() -> torch.Tensor:
    return torch.tensor([[1, 17, 40, 99, 301, 7, 1200, 5]])


def lora_layers(model) -> list:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def test_gradient_checkpointing_and_attention_reach_the_model(cfg) -> None:
    model = load_model(cfg("model.gradient_checkpointing=true", "model.attn_implementation=eager"))
    base = model.get_base_model()
    assert model.training  # transformers loads in eval mode, where checkpointing is off
    assert base.is_gradient_checkpointing
    assert base.config._attn_implementation == "eager"
    # frozen embeddings, checkpointed blocks: the adapter still gets gradients
    model(input_ids=ids(), labels=ids()).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert grads and all(g is not None for g in grads)
    assert any(bool(g.abs().sum()) for g in grads)
    default = load_model(cfg("finetuning_type=full"))
    assert not default.is_gradient_checkpointing
    assert default.config._attn_implementation == "sdpa"  # auto: transformers' choice


def test_flash_attention_is_refused_with_what_it_needs(cfg) -> None:
    with pytest.raises(ConfigError, match="needs a CUDA GPU with flash-attn installed"):
        check_knobs(cfg("model.attn_implementation=flash_attention_2"))
    gpu = cfg("model.attn_implementation=flash_attention_2", "scaling.use_gpu=true")
    with pytest.raises(ConfigError, match="bf16 or fp16 only"):
        check_knobs(gpu)
    gpu = cfg(
        "model.attn_implementation=flash_attention_2", "scaling.use_gpu=true",
        "train.precision=bf16",
    )  # fmt: skip
    check_knobs(gpu)  # the config can work, on a GPU worker with the package
    with pytest.raises(ConfigError, match="this worker has no CUDA device"):
        check_attention_device(gpu, cuda_available=False)
    with pytest.raises(ConfigError, match="pip install flash-attn"):
        check_attention_device(gpu, cuda_available=True)  # flash_attn is not installed here
    with pytest.raises(ConfigError, match="flash_attention_2 needs a CUDA GPU"):
        load_model(gpu)  # the workers' path: refused before any weights load
    with pytest.raises(ConfigError, match="not one of"):
        cfg("model.attn_implementation=fa2")


def test_dora_adds_trainable_magnitudes(cfg) -> None:
    model = load_model(cfg("lora.use_dora=true"))
    mags = {n: p for n, p in model.named_parameters() if "lora_magnitude_vector" in n}
    assert len(mags) == len(lora_layers(model)) and all(p.requires_grad for p in mags.values())
    assert model.peft_config["default"].use_dora


def test_rslora_scales_by_alpha_over_sqrt_rank(cfg) -> None:
    rs = lora_layers(load_model(cfg("lora.use_rslora=true", "lora.rank=16", "lora.alpha=8")))
    assert all(m.scaling["default"] == pytest.approx(8 / math.sqrt(16)) for m in rs)
    plain = lora_layers(load_model(cfg("lora.rank=16", "lora.alpha=8")))
    assert all(m.scaling["default"] == pytest.approx(8 / 16) for m in plain)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_move_the_weights_into_the_adapter(
    cfg, tiny_model: Path, init: str
) -> None:
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    model = load_model(cfg(f"lora.init={init}"))
    q = model.get_base_model().model.layers[0].self_attn.q_proj
    original = base.model.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(q.base_layer.weight, original, atol=1e-4)  # the residual
    assert q.lora_B["default"].weight.abs().sum() > 0  # not the zero B of default init
    rebuilt = q.base_layer.weight + q.scaling["default"] * (
        q.lora_B["default"].weight @ q.lora_A["default"].weight
    )
    assert torch.allclose(rebuilt, original, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(
            model(input_ids=ids()).logits, base(input_ids=ids()).logits, atol=1e-5
        )


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["lora.init=pissa_niter_16"], "use lora.init=pissa"),
        (["lora.init=loftq"], "not one of"),
        (["stage=dpo", "lora.init=pissa"], "no longer the reference model"),
        (["finetuning_type=qlora", "lora.init=olora"], "use finetuning_type=lora"),
        (["finetuning_type=full", "lora.adapter_name_or_path=/a"], "needs finetuning_type lora"),
        (["lora.adapter_name_or_path=/a,/b"], "one adapter is continued"),
        (["lora.loraplus_lr_ratio=0"], "must be > 0"),
        (["train.warmup_steps=-1"], "must be >= 0"),
        (["freeze.trainable_layers=0"], "must not be 0"),
    ],
)
def test_knob_combinations_that_cannot_work_are_named(cfg, overrides, fragment) -> None:
    with pytest.raises(ConfigError, match=fragment):
        check_knobs(cfg(*overrides))
    check_knobs(cfg("stage=dpo", "dpo.loss_type=simpo", "lora.init=pissa"))  # no reference


def test_additional_target_trains_whole_modules_beside_the_adapter(cfg) -> None:
    model = load_model(cfg("lora.additional_target=[lm_head]"))
    saved = [n for n, p in model.named_parameters() if "modules_to_save" in n and p.requires_grad]
    assert saved == ["base_model.model.lm_head.modules_to_save.default.weight"]
    assert model.peft_config["default"].modules_to_save == ["lm_head"]


def test_loraplus_param_groups_and_their_schedule(cfg) -> None:
    c = cfg(
        "train.lr=1e-3", "lora.loraplus_lr_ratio=16", "lora.use_dora=true",
        "lora.target=[q_proj,embed_tokens]", "lora.loraplus_lr_embedding=1e-5",
        "lora.additional_target=[lm_head]", "train.lr_scheduler=constant_with_warmup",
        "train.warmup_steps=2",
    )  # fmt: skip
    model = load_model(c)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, c)
    assert [g["lr"] for g in groups] == [1e-3, 16e-3, 1e-5]
    a, b, emb = ([names[id(p)] for p in g["params"]] for g in groups)
    assert a and all("lora_A" in n or "lora_embedding_A" in n or "modules_to_save" in n for n in a)
    assert any("modules_to_save" in n for n in a)  # whole modules learn at train.lr
    assert b and all("lora_B" in n or "lora_magnitude_vector" in n for n in b)
    assert any("lora_magnitude_vector" in n for n in b)  # 1-D adapter weights go with B
    assert emb and all("lora_embedding_B" in n for n in emb)
    trainable = sum(p.requires_grad for p in model.parameters())
    assert len(a) + len(b) + len(emb) == trainable
    optim, sched = build_optimizer(model, c, total_steps=10)
    lrs = []
    for _ in range(3):
        lrs.append([g["lr"] for g in optim.param_groups])
        optim.step()
        sched.step()
    assert lrs == [[0.0] * 3, [5e-4, 8e-3, 5e-6], [1e-3, 16e-3, 1e-5]]  # one warmup for all
    assert sched.get_last_lr()[0] == 1e-3  # the first group is train.lr: what is logged
    assert len(param_groups(model, cfg("lora.use_dora=true"))) == 1  # no LoRA+: one group


@pytest.mark.parametrize(
    ("overrides", "warmup"),
    [
        (["train.warmup_steps=3"], 3),
        (["train.warmup_steps=3", "train.warmup_ratio=0.5"], 3),  # steps win, as in HF
        (["train.warmup_ratio=0.5"], 5),
        ([], 0),
    ],
)
def test_warmup_steps_win_over_the_ratio(cfg, overrides: list[str], warmup: int) -> None:
    c = cfg("train.lr=1.0", "train.lr_scheduler=linear", *overrides)
    assert c.train.warmup(10) == warmup
    layer = torch.nn.Linear(2, 2)
    optim, sched = build_optimizer(layer, c, total_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(optim.param_groups[0]["lr"])
        optim.step()
        sched.step()
    rise = [s / warmup for s in range(warmup)]
    assert lrs[:warmup] == pytest.approx(rise)
    assert lrs[warmup] == pytest.approx(1.0)
    assert lrs[warmup:] == pytest.approx([(10 - s) / (10 - warmup) for s in range(warmup, 10)])


def _saved_adapter(cfg, out: Path) -> dict[str, torch.Tensor]:
    """A rank-4 DoRA adapter with non-zero B, written as final/ would be; its weights."""
    from safetensors.torch import load_file

    torch.manual_seed(1)
    model = load_model(cfg("lora.rank=4", "lora.use_dora=true", "lora.target=[q_proj,v_proj]"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    model.save_pretrained(out)
    return load_file(out / "adapter_model.safetensors")


def _continued(model) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


def test_training_continues_from_a_saved_adapter(cfg, tmp_path: Path) -> None:
    saved = _saved_adapter(cfg, tmp_path / "adapter")
    model = load_model(cfg(f"lora.adapter_name_or_path={tmp_path / 'adapter'}", "lora.rank=8"))
    state = _continued(model)
    assert state.keys() == saved.keys()
    assert all(torch.equal(state[k], saved[k]) for k in saved)
    assert model.peft_config["default"].r == 4  # the adapter's own shape, not lora.rank
    assert model.peft_config["default"].base_model_name_or_path is None  # refilled at save
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == len(saved)
    with pytest.raises(ConfigError, match=r"lora.adapter_name_or_path=.*no such directory"):
        load_model(cfg(f"lora.adapter_name_or_path={tmp_path / 'nope'}"))
    with pytest.raises(ConfigError, match=r"holds no adapter_config\.json"):
        load_model(cfg(f"lora.adapter_name_or_path={tmp_path}"))


def test_an_adapter_in_a_bucket_is_continued(
    cfg, tmp_path: Path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from raylm import storage

    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    saved = _saved_adapter(cfg, tmp_path / "adapter")
    uri = storage.join(s3_bucket, "knobs", "adapter")
    storage.copy_dir(str(tmp_path / "adapter"), uri)
    state = _continued(load_model(cfg(f"lora.adapter_name_or_path={uri}")))
    assert all(torch.equal(state[k], saved[k]) for k in saved)


def test_freeze_trains_chosen_modules_of_chosen_layers(cfg) -> None:
    def trainable(*overrides: str) -> set[str]:
        model = load_model(cfg("finetuning_type=freeze", *overrides))
        return {n for n, p in model.named_parameters() if p.requires_grad}

    last = trainable("freeze.trainable_layers=1")
    assert last and all(n.startswith("model.layers.3.") for n in last)
    first = trainable("freeze.trainable_layers=-2")  # LLaMA-Factory's first N
    assert {n.split(".")[2] for n in first} == {"0", "1"}
    mlp = trainable("freeze.trainable_layers=2", "freeze.trainable_modules=[mlp,self_attn.q_proj]")
    assert mlp == {
        f"model.layers.{i}.{m}.weight"
        for i in (2, 3)
        for m in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "self_attn.q_proj")
    }
    extra = trainable("freeze.trainable_modules=[mlp]", "freeze.extra_modules=[norm,lm_head]")
    assert {"model.norm.weight", "lm_head.weight"} <= extra
    assert "model.embed_tokens.weight" not in extra
    with pytest.raises(ConfigError, match=r"no 'attn' in a decoder layer.*self_attn"):
        trainable("freeze.trainable_modules=[attn]")
    with pytest.raises(ConfigError, match=r"no 'head' outside the layers.*lm_head"):
        trainable("freeze.extra_modules=[head]")
    with pytest.raises(ConfigError, match="the model has 4 layers"):
        trainable("freeze.trainable_layers=-5")
