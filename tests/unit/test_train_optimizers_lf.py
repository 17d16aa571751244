"""LLaMA-Factory's optimizer extras (``train.optimizer`` galore, apollo, adam_mini, badam):
raylm's optimizer, stepped by DeepSpeed's engine at ZeRO stage 0 as a run steps it, takes
the same steps as the package's optimizer built and stepped the way LLaMA-Factory does
(``train/trainer_utils.py`` at ff6d4d12, transcribed below as ``lf_*``), on a small
Llama; and the keys, their bad values and the runs they cannot serve are named."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from raylm.config import ConfigError, load

ROOT = Path(__file__).resolve().parents[2]
LR, WD, STEPS = 1e-2, 0.1, 3


def llama(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A small Llama (3 layers, grouped-query attention), the same weights every call."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=False)  # fmt: skip
    return LlamaForCausalLM(config).to(dtype)


def batch(step: int) -> torch.Tensor:
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(step))


def cfg_of(*overrides: str) -> Any:
    base = ["model.name_or_path=/m", "finetuning_type=full", "deepspeed.stage=0",
            f"train.lr={LR}", f"train.weight_decay={WD}", "train.lr_scheduler=constant"]  # fmt: skip
    return load("train", [ROOT / "conf/train/sft_lora.yaml"], [*base, *overrides])


def engine_of(model: torch.nn.Module, cfg: Any) -> Any:
    """DeepSpeed's engine over build_optimizer, as raylm's worker builds it."""
    import deepspeed

    from raylm.train.ds_config import deepspeed_config
    from raylm.train.model import build_optimizer

    optim, sched = build_optimizer(model, cfg, total_steps=STEPS)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optim, lr_scheduler=sched, config=deepspeed_config(cfg, 1)
    )
    return engine


def raylm_run(model: torch.nn.Module, cfg: Any, steps: range = range(STEPS)) -> Any:
    """Steps as raylm's worker takes them: DeepSpeed's engine over build_optimizer."""
    engine = engine_of(model, cfg)
    for step in steps:
        ids = batch(step)
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
    return engine


def lf_run(model: torch.nn.Module, optim: Any, max_grad_norm: float) -> None:
    """STEPS steps as transformers' Trainer takes them (clip, step, zero); a layerwise
    optimizer (None) has stepped inside backward already."""
    for step in range(STEPS):
        ids = batch(step)
        model(input_ids=ids, labels=ids).loss.backward()
        if optim is not None:
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            optim.step()
            model.zero_grad(set_to_none=True)


def max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(
        (p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters(), strict=True)
    )


def moved(a: torch.nn.Module, start: torch.nn.Module) -> set[str]:
    return {
        n
        for (n, p), q in zip(a.named_parameters(), start.parameters(), strict=True)
        if not p.equal(q)
    }


# --- LLaMA-Factory's construction, transcribed (trainer_utils.py, model_utils/misc.py) ---


def lf_groups(model: torch.nn.Module) -> tuple[list, list, list]:
    """_create_galore_optimizer's split: projected Linear weights, decay, no decay."""
    from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS
    from transformers.trainer_pt_utils import get_parameter_names

    targets = {n.split(".")[-1] for n, m in model.named_modules() if "lm_head" not in n
               and "Linear" in type(m).__name__ and "Embedding" not in type(m).__name__}  # fmt: skip
    proj = [p for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
            and any(t in n for t in targets) for p in m.parameters() if p.requires_grad
            and len(p.shape) > 1]  # fmt: skip
    decay_names = [n for n in get_parameter_names(model, ALL_LAYERNORM_LAYERS) if "bias" not in n]
    ids = {id(p) for p in proj}
    decay = [p for n, p in model.named_parameters() if id(p) not in ids and n in decay_names]
    nodecay = [p for n, p in model.named_parameters() if id(p) not in ids and n not in decay_names]
    return proj, decay, nodecay


def lf_projected(model: torch.nn.Module, cls: type, extra: dict, layerwise: bool) -> Any:
    """GaLore / APOLLO as LLaMA-Factory builds them; layerwise: one optimizer per weight,
    stepped from a post-accumulate-grad hook (returns None)."""
    proj, decay, nodecay = lf_groups(model)
    kw = dict(lr=LR, betas=(0.9, 0.999), eps=1e-8)
    if not layerwise:
        return cls([dict(params=nodecay, weight_decay=0.0),
                    dict(params=decay, weight_decay=WD),
                    dict(params=proj, weight_decay=WD, **extra)], **kw)  # fmt: skip
    optims = {p: cls([dict(params=[p], weight_decay=0.0)], **kw) for p in nodecay}
    optims |= {p: cls([dict(params=[p], weight_decay=WD)], **kw) for p in decay}
    optims |= {p: cls([dict(params=[p], weight_decay=WD, **extra)], **kw) for p in proj}

    def hook(p: torch.nn.Parameter) -> None:
        if p.grad is not None:
            optims[p].step()
            optims[p].zero_grad()

    for p in optims:
        p.register_post_accumulate_grad_hook(hook)
    return None


CLIP_TOL = 1e-4
"""Where both clip (at 1.0): DeepSpeed's clip coefficient and torch's round differently
(~1e-7), and an SVD's top-r subspace is that sensitive where singular values are close:
GaLore's weights then differ by up to ~1.4e-5 after 3 steps of lr 1e-2 (~0.1% of a
step); unclipped they are bit-identical."""


@pytest.mark.parametrize(
    ("layerwise", "norm"), [(False, 0.0), (False, 1.0), (True, 0.0)],
    ids=["whole", "whole-clipped", "layerwise"],
)  # fmt: skip
@pytest.mark.parametrize("name", ["galore", "apollo"])
def test_projected_optimizer_steps_as_llamafactory(
    name: str, layerwise: bool, norm: float, dist
) -> None:
    """Layerwise: LLaMA-Factory's per-weight optimizers in backward hooks against raylm's
    one optimizer after backward, which asks for no clipping."""
    import apollo_torch
    import galore_torch

    cfg = cfg_of(f"train.optimizer={name}", f"{name}.rank=4", f"{name}.update_interval=2",
                 f"{name}.layerwise={layerwise}", f"train.max_grad_norm={norm}")  # fmt: skip
    extra = dict(rank=4, update_proj_gap=2, proj_type="std")
    if name == "galore":
        cls, extra = galore_torch.GaLoreAdamW, extra | dict(scale=2.0)
    else:
        cls = apollo_torch.APOLLOAdamW
        extra |= dict(proj="random", scale=32.0, scale_type="channel", scale_front=False)
    ours, theirs, start = llama(), llama(), llama()
    raylm_run(ours, cfg)
    lf_run(theirs, lf_projected(theirs, cls, extra, layerwise), norm)
    diff = max_diff(ours, theirs)
    print(f"{name} layerwise={layerwise} clip={norm}: max |raylm - LLaMA-Factory| = {diff:.2e}")
    assert diff <= (CLIP_TOL if norm else 0.0)
    assert moved(ours, start) == {n for n, _ in ours.named_parameters()}


def test_adam_mini_steps_as_llamafactory(dist) -> None:
    from adam_mini import Adam_mini

    ours, theirs, start = llama(), llama(), llama()
    raylm_run(ours, cfg_of("train.optimizer=adam_mini"))
    c = theirs.config
    optim = Adam_mini(named_parameters=theirs.named_parameters(), lr=LR, betas=(0.9, 0.999),
                      eps=1e-8, weight_decay=WD, model_sharding=False, dim=c.hidden_size,
                      n_heads=c.num_attention_heads, n_kv_heads=c.num_key_value_heads)  # fmt: skip
    lf_run(theirs, optim, 1.0)
    diff = max_diff(ours, theirs)
    print(f"adam_mini: max |raylm - LLaMA-Factory| = {diff:.2e}")
    assert diff < 1e-6
    assert moved(ours, start) == {n for n, _ in ours.named_parameters()}


def lf_badam(model: torch.nn.Module, interval: int) -> Any:
    """_create_badam_optimizer, layer mode: torch AdamW with transformers' kwargs (no
    weight_decay: torch's default 0.01 is what badam's block groups take)."""
    from badam import BlockOptimizer
    from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS
    from transformers.trainer_pt_utils import get_parameter_names

    decay_names = [n for n in get_parameter_names(model, ALL_LAYERNORM_LAYERS) if "bias" not in n]
    decay = [p for n, p in model.named_parameters() if n in decay_names]
    nodecay = [p for n, p in model.named_parameters() if n not in decay_names]
    base = torch.optim.AdamW([dict(params=nodecay, weight_decay=0.0),
                              dict(params=decay, weight_decay=WD)],
                             lr=LR, betas=(0.9, 0.999), eps=1e-8)  # fmt: skip
    return BlockOptimizer(base_optimizer=base, named_parameters_list=list(model.named_parameters()),
                          block_prefix_list=None, switch_block_every=interval, start_block=None,
                          switch_mode="ascending", verbose=0)  # fmt: skip


def test_badam_steps_as_llamafactory_switching_blocks(dist) -> None:
    """One block a step (switch_interval 1, ascending): layers 0, 1, 2 move in turn, the
    embeddings, final norm and head never; weight decay 0.01 as LLaMA-Factory's is."""
    cfg = cfg_of("train.optimizer=badam", "badam.switch_interval=1", "train.weight_decay=0.01",
                 "train.max_grad_norm=1.0")  # fmt: skip
    ours, theirs, start = llama(), llama(), llama()
    raylm_run(ours, cfg)
    lf_run(theirs, lf_badam(theirs, 1), 1.0)
    diff = max_diff(ours, theirs)
    print(f"badam: max |raylm - LLaMA-Factory| = {diff:.2e}")
    assert diff < 1e-6
    assert moved(ours, start) == {n for n, _ in ours.named_parameters() if ".layers." in n}


def test_badam_resumes_on_the_same_block_with_its_moments() -> None:
    from raylm.train.badam_optim import build_badam

    cfg = cfg_of("train.optimizer=badam", "badam.switch_interval=2", "badam.switch_mode=descending")
    a = llama()
    first = build_badam(a, cfg)
    # badam 1.4 switches after step k when (k + 1) % interval == 0: block 2 trains for
    # step 1 only, block 1 for steps 2 and 3; saved after step 2, block 1 has moments
    for step in range(2):
        ids = batch(step)
        a(input_ids=ids, labels=ids).loss.backward()
        first.step()
        a.zero_grad(set_to_none=True)
    saved, weights = copy.deepcopy(first.state_dict()), copy.deepcopy(a.state_dict())
    assert (saved["badam"]["active_block"], first.global_step) == (1, 2)
    assert saved["base"]["state"], "block 1's Adam moments"
    b = llama()
    b.load_state_dict(weights)
    second = build_badam(b, cfg)
    second.load_state_dict(saved)
    assert (second.active_block, second.current_block_idx, second.global_step) == (1, 0, 2)
    assert [n for n, p in b.named_parameters() if p.requires_grad] == [
        n for n, p in a.named_parameters() if p.requires_grad
    ]
    for model, optim in ((a, first), (b, second)):
        ids = batch(9)
        model(input_ids=ids, labels=ids).loss.backward()
        optim.step()
    assert max_diff(a, b) == 0.0


@pytest.mark.parametrize("name", ["galore", "apollo", "adam_mini", "badam"])
def test_bf16_checkpoint_resumes_to_the_same_step(name: str, tmp_path: Path, dist) -> None:
    """bf16 at stage 0 (DeepSpeed's per-tensor fp32 copies; BAdam's own): a checkpoint
    after step 2 loads into a fresh engine whose step 3 equals the unbroken run's."""
    cfg = cfg_of(f"train.optimizer={name}", "train.precision=bf16", "galore.rank=4",
                 "apollo.rank=4", "badam.switch_interval=2")  # fmt: skip
    whole = raylm_run(llama(torch.bfloat16), cfg, range(2))
    whole.save_checkpoint(str(tmp_path), tag="t")
    raylm_run_more(whole, 2)
    resumed = engine_of(llama(torch.bfloat16), cfg)
    resumed.load_checkpoint(str(tmp_path), tag="t")
    raylm_run_more(resumed, 2)
    assert max_diff(whole.module, resumed.module) == 0.0


def raylm_run_more(engine: Any, step: int) -> None:
    ids = batch(step)
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["train.optimizer=galore", "galore.rank=0"], r"galore\.rank=0 must be > 0"),
        (["galore.proj_type=diag"], r"galore\.proj_type='diag' is not one of \['std', 'reverse"),
        (["apollo.proj_type=full"], r"apollo\.proj_type='full' is not one of \['std', 'right'"),
        (["apollo.scale_type=row"], r"apollo\.scale_type='row' is not one of \['channel'"),
        (["badam.mode=bogus"], r"badam\.mode='bogus' is not one of \['layer', 'ratio'\]"),
        (["badam.switch_mode=up"], r"badam\.switch_mode='up' is not one of \['ascending'"),
        (["badam.switch_interval=-1"], r"badam\.switch_interval=-1 must be > 0.*fixed"),
        (["train.optimizer=badam", "badam.mode=ratio"], r"badam\.mode=ratio .* not built"),
        (["train.optimizer=galore", "deepspeed.stage=3"], r"needs deepspeed\.stage=0, not 3"),
        (
            ["train.optimizer=adam_mini", "deepspeed.stage=1"],
            r"needs deepspeed\.stage=0, not 1: .*row or head",
        ),
        (["train.optimizer=badam", "deepspeed.stage=2"], r"needs deepspeed\.stage=0, not 2"),
        (["train.optimizer=galore", "finetuning_type=lora"], r"full or freeze, not lora"),
        (["train.optimizer=badam", "finetuning_type=freeze"], r"needs finetuning_type full"),
        (["train.optimizer=apollo", "apollo.layerwise=true"], r"train\.max_grad_norm=0 and"),
        (["train.optimizer=galore", "galore.layerwise=true", "train.grad_accum=2"], r"accum=1"),
        (["train.optimizer=lion"], r"'lion' is not one of \['adamw', 'muon', 'galore'"),
    ],
)
def test_bad_values_and_runs_are_named(overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        cfg_of(*overrides)


def test_a_missing_package_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from raylm.train.model import build_optimizer

    monkeypatch.setitem(sys.modules, "galore_torch", None)  # import raises ImportError
    with pytest.raises(ConfigError, match="needs the galore-torch package: pip install galore"):
        build_optimizer(llama(), cfg_of("train.optimizer=galore"), total_steps=2)


def test_a_deepspeed_file_must_say_stage_0(tmp_path: Path) -> None:
    (tmp_path / "z3.json").write_text('{"zero_optimization": {"stage": 3}}')
    (tmp_path / "z0.json").write_text('{"zero_optimization": {"stage": 0}}')
    with pytest.raises(ConfigError, match=r"train\.optimizer=apollo needs deepspeed\.stage=0"):
        cfg_of("train.optimizer=apollo", f"deepspeed.config_file={tmp_path / 'z3.json'}")
    cfg = cfg_of("train.optimizer=apollo", "deepspeed.stage=3",
                 f"deepspeed.config_file={tmp_path / 'z0.json'}")  # fmt: skip
    from raylm.train.ds_config import deepspeed_config

    assert deepspeed_config(cfg, 1)["zero_optimization"]["stage"] == 0


def test_badam_leaves_bf16_to_badam() -> None:
    from raylm.train.ds_config import deepspeed_config

    bf16 = ["train.precision=bf16"]
    assert not deepspeed_config(cfg_of("train.optimizer=badam", *bf16), 1)["bf16"]["enabled"]
    assert deepspeed_config(cfg_of("train.optimizer=galore", *bf16), 1)["bf16"]["enabled"]


EXAMPLES = {
    "extras/galore/llama3_full_sft.yaml": (
        "galore", "bf16", 0.0, dict(target=["all"], rank=128, scale=2.0, layerwise=True)),
    "extras/apollo/llama3_full_sft.yaml": (
        "apollo", "bf16", 0.0,
        dict(rank=128, scale=32.0, scale_type="channel", layerwise=True, proj="random")),
    "extras/badam/llama3_full_sft.yaml": (
        "badam", "fp32", 1.0,
        dict(mode="layer", switch_mode="ascending", switch_interval=50, verbose=2)),
    "extras/adam_mini/qwen2_full_sft.yaml": ("adam_mini", "bf16", 1.0, {}),
}  # fmt: skip


@pytest.mark.parametrize("rel", sorted(EXAMPLES))
def test_llamafactory_examples_map_every_key(rel: str, tmp_path: Path, workspace) -> None:
    from llamafactory_helpers import example

    name, precision, norm, group = EXAMPLES[rel]
    cfg = load("train", [example(rel, tmp_path, "/m")])
    assert (cfg.train.optimizer, cfg.deepspeed.stage) == (name, 0)  # no deepspeed: -> DDP
    assert (cfg.train.precision, cfg.train.max_grad_norm) == (precision, norm)
    for key, value in group.items():
        assert getattr(getattr(cfg, name), key) == value, key


def test_llamafactory_keys_and_conflicts(tmp_path: Path) -> None:
    from llamafactory_helpers import lf

    cfg = load("train", [lf(tmp_path, finetuning_type="full", use_apollo=True, apollo_rank=8,
                            apollo_proj="svd", apollo_proj_type="left", apollo_scale_type="tensor",
                            apollo_scale_front=True, apollo_update_interval=5,
                            apollo_target="q_proj,v_proj")])  # fmt: skip
    a = cfg.apollo
    assert (a.rank, a.proj, a.proj_type, a.scale_type, a.scale_front, a.update_interval) == (
        8, "svd", "left", "tensor", True, 5)  # fmt: skip
    assert a.target == ["q_proj", "v_proj"] and not a.layerwise
    with pytest.raises(ConfigError, match="use_galore, use_muon: each picks the optimizer"):
        load("train", [lf(tmp_path, finetuning_type="full", use_galore=True, use_muon=True)])
    with pytest.raises(ConfigError, match=r"galore\.rank=0 must be > 0"):
        load("train", [lf(tmp_path, finetuning_type="full", use_galore=True, galore_rank=0)])
    with pytest.raises(ConfigError, match=r"badam\.mode='bogus' is not one of"):
        load("train", [lf(tmp_path, finetuning_type="full", use_badam=True, badam_mode="bogus")])
    with pytest.raises(ConfigError, match=r"galore\.proj_type='diag'"):
        load("train", [lf(tmp_path, use_galore=True, galore_proj_type="diag")])


def test_the_session_gloo_rank_leaves_no_distributed_environment(gloo_rank) -> None:
    """Outside ``dist`` the process has no MASTER_PORT / WORLD_SIZE: a Ray cluster the
    session starts later hands its environment to its workers, where accelerate (lm-eval's
    hf model) would init a process group on the port this process listens on."""
    import torch.distributed as d

    assert d.is_initialized()
    assert not {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"} & set(os.environ)
