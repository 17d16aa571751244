"""LLaMA-Factory users bring their YAML and data unchanged: each of its text-model example
recipes (tests/assets/llamafactory, copied from LLaMA-Factory ff6d4d12e) loads as a raylm
train config or is refused naming the key and what it needs, and its demo data reads
through the train job's one data path."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path

import pytest
from llamafactory_helpers import ASSETS, LF, PARTITION, QLORA, demo_hub, example, lf

from raylm import config
from raylm.config import ConfigError
from raylm.train import llamafactory_keys as keys

OLD_ASSET = ASSETS / "llamafactory_llama3_lora_sft.yaml"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "llamafactory.md"


def refused_keys(err: ConfigError) -> list[str]:
    """The keys named on the error's ``  - key...`` lines."""
    return sorted(re.findall(r"^  - (\w+)", str(err), flags=re.M))


def test_every_example_yaml_is_in_the_partition() -> None:
    found = {str(p.relative_to(LF / "examples")) for p in (LF / "examples").rglob("*.yaml")}
    assert found == set(PARTITION)


@pytest.mark.parametrize("rel", sorted(PARTITION))
def test_example_loads_or_is_refused_naming_its_keys(
    rel: str, tmp_path: Path, tiny_model: Path, workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from raylm.train.data import data_inputs
    from raylm.train.ds_config import deepspeed_config
    from raylm.train.model import check_qlora_device

    want = PARTITION[rel]
    path = example(rel, tmp_path, tiny_model)
    if isinstance(want, str):  # an inference / do_predict YAML: train names the job to use
        config.load(want, [path])
        with pytest.raises(ConfigError, match=f"`raylm {want} FILE`"):
            config.load("train", [path])
        return
    if want is not None:
        with pytest.raises(ConfigError) as err:
            config.load("train", [path])
        assert refused_keys(err.value) == sorted(want), str(err.value)
        return
    cfg = config.load("train", [path])
    assert cfg.model.name_or_path == str(tiny_model)
    assert (cfg.storage_path, cfg.run_name) == (str(tmp_path / "saves"), "run")
    with demo_hub(monkeypatch, tmp_path / "hub"):  # REMOTE:llamafactory/demo_data
        sources = data_inputs(cfg)["sources"]  # the registry resolves every named dataset
    assert sorted({s.dataset for s in sources}) == sorted(cfg.data.datasets)
    deepspeed_config(cfg, world_size=2)  # the named DeepSpeed file merges
    if rel in QLORA:
        assert cfg.finetuning_type == "qlora"
        with pytest.raises(ConfigError, match="needs CUDA GPUs"):
            check_qlora_device(cfg, cuda_available=False)


def test_qwen3_lora_sft_maps_onto_the_train_config(tmp_path: Path, tiny_model: Path) -> None:
    cfg = config.load("train", [example("train_lora/qwen3_lora_sft.yaml", tmp_path, tiny_model)])
    assert (cfg.stage, cfg.finetuning_type, cfg.model.template) == ("sft", "lora", "qwen3_nothink")
    assert (cfg.data.path, cfg.data.datasets) == ("data", ["identity", "alpaca_en_demo"])
    assert (cfg.data.cutoff_len, cfg.data.max_samples, cfg.data.mix_strategy) == (
        2048, 1000, "concat",
    )  # fmt: skip
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.target) == (8, 16, ["all"])
    assert (cfg.train.micro_batch_size, cfg.train.grad_accum, cfg.train.lr) == (1, 8, 1e-4)
    assert (cfg.train.epochs, cfg.train.warmup_ratio, cfg.train.precision) == (3.0, 0.1, "bf16")
    assert (cfg.checkpoint.save_steps, cfg.train.logging_steps, cfg.report_to) == (500, 10, [])
    assert (cfg.model.gradient_checkpointing, cfg.model.attn_implementation) == (True, "auto")


def test_old_llama3_asset_still_loads(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        cfg = config.load("train", [OLD_ASSET], ["train.lr=5e-5", "lora.rank=16"])
    assert cfg.model.name_or_path == "/models/Meta-Llama-3-8B-Instruct"
    assert (cfg.model.template, cfg.data.path, cfg.data.datasets) == (
        "llama3",
        "/data",
        ["identity"],
    )
    assert (cfg.storage_path, cfg.run_name) == ("saves/llama3-8b/lora", "sft")
    assert (cfg.train.lr, cfg.lora.rank) == (5e-5, 16)  # raylm keys override
    for key in ("plot_loss", "ddp_timeout", "preprocessing_num_workers", "overwrite_cache"):
        assert f"'{key}'" in caplog.text, f"ignoring {key} was not reported"


def load_lf(tmp_path: Path, **extra: object):
    return config.load("train", [lf(tmp_path, **extra)])


def test_unknown_and_refused_keys_are_named_together(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_lf(tmp_path, lerning_rate=1e-4, galore_rnk=8, use_llama_pro=True, stage="dpo",
                pref_bco_weight=0.1)  # fmt: skip
    msg = str(err.value)
    assert "'lerning_rate' (did you mean 'learning_rate'?)" in msg
    assert "'galore_rnk' (did you mean 'galore_rank'?)" in msg
    assert refused_keys(err.value) == ["pref_bco_weight", "use_llama_pro"]
    assert "LLaMA Pro" in msg and "BCO" in msg


def test_refused_keys_at_their_default_are_accepted(tmp_path: Path) -> None:
    cfg = load_lf(tmp_path, pissa_convert=False, pref_bco_weight=0.0,
                  create_new_adapter=False, enable_thinking=True, logging_strategy="steps",
                  resume_from_checkpoint=None, packing=False)  # fmt: skip
    assert cfg.stage == "sft"
    with pytest.raises(ConfigError, match=r"pref_bco_weight=0\.1"):
        load_lf(tmp_path, pref_bco_weight=0.1)


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_8bit"])
def test_adam_betas_and_epsilon_reach_the_optimizer(tmp_path: Path, optim: str) -> None:
    import torch

    from raylm.train.model import build_optimizer

    cfg = load_lf(tmp_path, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6, optim=optim,
                  deepspeed=None)  # fmt: skip
    assert (cfg.train.adam_beta1, cfg.train.adam_beta2, cfg.train.adam_epsilon) == (0.8, 0.95, 1e-6)
    optim_, _ = build_optimizer(torch.nn.Linear(8, 8), cfg, total_steps=4)
    assert {(g["betas"], g["eps"]) for g in optim_.param_groups} == {((0.8, 0.95), 1e-6)}
    with pytest.raises(ConfigError, match=r"train.adam_beta2=1.0 must be in \[0, 1\)"):
        load_lf(tmp_path, adam_beta2=1.0)


def test_datasets_and_mixing_keys(tmp_path: Path) -> None:
    cfg = load_lf(tmp_path, dataset="identity, alpaca_en_demo", dataset_dir="/lf/data",
                  mix_strategy="interleave_under", interleave_probs="0.25,0.75",
                  max_samples=10, val_size=0.1)  # fmt: skip
    d = cfg.data
    assert (d.path, d.datasets, d.mix_strategy) == ("/lf/data", ["identity", "alpaca_en_demo"],
                                                   "interleave_under")  # fmt: skip
    assert (d.interleave_probs, d.max_samples, d.val_size) == ([0.25, 0.75], 10, 0.1)
    ev = load_lf(tmp_path, eval_dataset="alpaca_en_demo,identity").data.eval_datasets
    assert ev == ["alpaca_en_demo", "identity"]
    with pytest.raises(ConfigError, match="interleave_probs has 1 values for 2"):
        load_lf(tmp_path, dataset="a,b", mix_strategy="interleave_over", interleave_probs="1.0")
    with pytest.raises(ConfigError, match="both hold examples out"):
        load_lf(tmp_path, eval_dataset="a", val_size=0.1)
    assert load_lf(tmp_path, dataset_dir="REMOTE:org/x").data.path == "hf://datasets/org/x"


def test_ray_keys_map_onto_scaling_and_storage(tmp_path: Path) -> None:
    cfg = load_lf(tmp_path, ray_num_workers=4, resources_per_worker={"GPU": 1, "CPU": 3},
                  placement_strategy="SPREAD", ray_storage_path="s3://b/runs",
                  ray_run_name="lf")  # fmt: skip
    s = cfg.scaling
    assert (s.num_workers, s.use_gpu, s.cpus_per_worker, s.placement_strategy) == (
        4, True, 3.0, "SPREAD",
    )  # fmt: skip
    assert (cfg.storage_path, cfg.run_name) == ("s3://b/runs", "lf")
    named = load_lf(tmp_path, output_dir="saves/x/sft", run_name="exp1")
    assert (named.storage_path, named.run_name) == ("saves/x/sft", "exp1")
    with pytest.raises(ConfigError) as err:
        load_lf(tmp_path, resources_per_worker={"GPU": 2, "TPU": 1}, ray_init_kwargs={"a": 1})
    assert refused_keys(err.value) == ["ray_init_kwargs", "resources_per_worker",
                                       "resources_per_worker"]  # fmt: skip


def test_quantization(tmp_path: Path) -> None:
    qlora = load_lf(
        tmp_path, quantization_bit=4, quantization_method="bnb", lora_target="q_proj,v_proj"
    )
    assert (qlora.finetuning_type, qlora.lora.target) == ("qlora", ["q_proj", "v_proj"])
    for method in ("gptq", "awq", "aqlm", "hqq", "eetq"):
        with pytest.raises(ConfigError, match=f"quantization_method='{method}': .*bitsandbytes"):
            load_lf(tmp_path, quantization_bit=4, quantization_method=method)
    with pytest.raises(ConfigError, match="supports 4 only"):
        load_lf(tmp_path, quantization_bit=8)


def test_prequantized_checkpoint_is_refused(tmp_path: Path) -> None:
    model = tmp_path / "llama-gptq"
    model.mkdir()
    (model / "config.json").write_text(
        json.dumps({"quantization_config": {"quant_method": "gptq"}})
    )
    with pytest.raises(ConfigError, match="model_name_or_path: a gptq-quantized checkpoint"):
        config.load("train", [lf(tmp_path, model_name_or_path=str(model))])


def test_stages_and_values_raylm_has_no_counterpart_for(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="stage ppo: LLaMA-Factory's ppo YAML is not translated"):
        load_lf(tmp_path, stage="ppo")
    with pytest.raises(ConfigError, match="lr_scheduler_type='polynomial'"):
        load_lf(tmp_path, lr_scheduler_type="polynomial")
    with pytest.raises(ConfigError, match=r"report_to=\['swanlab'\]"):
        load_lf(tmp_path, report_to="swanlab")
    assert load_lf(tmp_path, max_steps=-1, lora_rank=16).train.max_steps is None
    assert load_lf(tmp_path, lora_rank=16).lora.alpha == 32  # LLaMA-Factory: 2 x rank


def test_preference_keys(tmp_path: Path) -> None:
    """pref_loss / pref_beta / pref_ftx / simpo_gamma / dpo_label_smoothing reach cfg.dpo."""
    simpo = load_lf(tmp_path, stage="dpo", pref_loss="simpo", pref_beta=2.5, simpo_gamma=1.25,
                    pref_ftx="1e-1")  # fmt: skip
    d = simpo.dpo
    assert (simpo.stage, d.loss_type, d.beta, d.simpo_gamma, d.sft_weight) == (
        "dpo", "simpo", 2.5, 1.25, 0.1,
    )  # fmt: skip
    assert not d.needs_reference
    cdpo = load_lf(tmp_path, stage="dpo", dpo_label_smoothing=0.1)
    assert (cdpo.dpo.loss_type, cdpo.dpo.label_smoothing) == ("sigmoid", 0.1)
    with pytest.raises(ConfigError, match="pref_loss='kto_pair' is not supported"):
        load_lf(tmp_path, stage="dpo", pref_loss="kto_pair")
    with pytest.raises(ConfigError, match=r"only applies to dpo\.loss_type=sigmoid"):
        load_lf(tmp_path, stage="dpo", pref_loss="ipo", dpo_label_smoothing=0.1)


def test_kto_and_rm_keys(tmp_path: Path, tiny_model: Path) -> None:
    """With stage kto, pref_beta / pref_ftx are KTO's; kto_*_weight are its class weights.
    The two example recipes load as their stages."""
    kto = load_lf(tmp_path, stage="kto", pref_beta=0.3, pref_ftx="1e-1", kto_chosen_weight=1.2,
                  kto_rejected_weight="0.8")  # fmt: skip
    k = kto.kto
    assert (kto.stage, k.beta, k.sft_weight, k.desirable_weight, k.undesirable_weight) == (
        "kto", 0.3, 0.1, 1.2, 0.8,
    )  # fmt: skip
    assert (kto.dpo.beta, kto.dpo.sft_weight) == (0.1, 0.0)  # left at DPO's defaults
    assert load_lf(tmp_path, stage="dpo", pref_beta=0.3).kto.beta == 0.1
    rel = "train_lora/qwen3_lora_kto.yaml"
    cfg = config.load("train", [example(rel, tmp_path, tiny_model)])
    assert (cfg.stage, cfg.finetuning_type, cfg.kto.beta) == ("kto", "lora", 0.1)
    cfg = config.load("train", [example("train_lora/qwen3_lora_reward.yaml", tmp_path, tiny_model)])
    assert (cfg.stage, cfg.data.datasets) == ("rm", ["dpo_en_demo"])


# LLaMA-Factory keys -> the raylm values they give (the first row: LLaMA-Factory's defaults)
MAPS: list[tuple[dict[str, object], dict[str, object]]] = [
    ({}, {"model.gradient_checkpointing": True, "model.attn_implementation": "auto",
          "lora.init": "default", "lora.adapter_name_or_path": None}),
    ({"flash_attn": "sdpa"}, {"model.attn_implementation": "sdpa"}),
    ({"flash_attn": "disabled"}, {"model.attn_implementation": "eager"}),
    ({"flash_attn": "fa2", "bf16": True}, {"model.attn_implementation": "flash_attention_2"}),
    ({"disable_gradient_checkpointing": True}, {"model.gradient_checkpointing": False}),
    ({"disable_gradient_checkpointing": True, "gradient_checkpointing": True},
     {"model.gradient_checkpointing": True}),  # transformers' Trainer turns it on
    ({"gradient_checkpointing": False}, {"model.gradient_checkpointing": True}),  # LF's own
    ({"use_dora": True, "use_rslora": "true"}, {"lora.use_dora": True, "lora.use_rslora": True}),
    ({"additional_target": "embed_tokens, lm_head"},
     {"lora.additional_target": ["embed_tokens", "lm_head"]}),
    ({"loraplus_lr_ratio": 16, "loraplus_lr_embedding": "1e-5"},
     {"lora.loraplus_lr_ratio": 16.0, "lora.loraplus_lr_embedding": 1e-5}),
    ({"pissa_init": True, "pissa_iter": 16}, {"lora.init": "pissa"}),
    ({"adapter_name_or_path": "saves/a"}, {"lora.adapter_name_or_path": "saves/a"}),
    ({"finetuning_type": "freeze", "freeze_trainable_layers": -2,
      "freeze_trainable_modules": "mlp,self_attn", "freeze_extra_modules": "embed_tokens"},
     {"freeze.trainable_layers": -2, "freeze.trainable_modules": ["mlp", "self_attn"],
      "freeze.extra_modules": ["embed_tokens"]}),
    ({"freeze_trainable_modules": "all"}, {"freeze.trainable_modules": ["all"]}),
    ({"warmup_steps": 100}, {"train.warmup_steps": 100, "train.warmup_ratio": 0.0}),
    ({"warmup_steps": 0.1}, {"train.warmup_steps": 0, "train.warmup_ratio": 0.1}),  # HF 5
]  # fmt: skip
REFUSALS: list[tuple[dict[str, object], str]] = [
    ({"flash_attn": "fa3"}, r"flash_attn='fa3': raylm supports flash_attention_2 only"),
    ({"flash_attn": "xformers"}, r"flash_attn='xformers': expected auto, sdpa, disabled or fa2"),
    ({"pissa_convert": True}, r"pissa_convert=True converts a PiSSA adapter: it needs "
     r"pissa_init: true"),
    ({"adapter_name_or_path": "a, b"}, r"adapter_name_or_path='a, b': .*merge the adapters "
     r"into the base first"),
    ({"adapter_name_or_path": "a", "create_new_adapter": True},
     r"create_new_adapter=True: .*merge the adapters into the base first"),
    ({"warmup_steps": 2.5}, r"warmup_steps=2\.5: a whole number of steps"),
    ({"warmup_steps": -1}, r"warmup_steps=-1: a whole number of steps"),
]  # fmt: skip


def value_at(cfg: object, dotted: str) -> object:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize(("extra", "want"), MAPS)
def test_knob_keys_map(extra: dict, want: dict, tmp_path: Path, tiny_model: Path) -> None:
    cfg = load_lf(tmp_path, model_name_or_path=str(tiny_model), **extra)
    assert {k: value_at(cfg, k) for k in want} == want


@pytest.mark.parametrize(("extra", "match"), REFUSALS)
def test_knob_values_raylm_cannot_honour(extra: dict, match: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=match) as err:
        load_lf(tmp_path, **extra)
    assert len(refused_keys(err.value)) == 1


def test_knob_notes_fa2_and_examples(
    tmp_path: Path, tiny_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The no-ops and differences are logged; fa2 meets raylm's own check at start; the
    loraplus and (without pissa_convert) pissa examples load. What the raylm keys build
    from the tiny model: tests/unit/test_train_knobs.py."""
    from raylm.train.model import check_knobs

    with caplog.at_level(logging.WARNING):
        load_lf(tmp_path, use_reentrant_gc=True, gradient_checkpointing_kwargs={"a": 1},
                gradient_checkpointing=False, pissa_init=True)  # fmt: skip
        load_lf(tmp_path, pissa_init=True, pissa_iter=-1)
    for line in (
        "'use_reentrant_gc': raylm's gradient checkpointing (model.gradient_checkpo",
        "'gradient_checkpointing_kwargs': raylm's gradient checkpointing (model.",
        "'pissa_iter': raylm's PiSSA (lora.init=pissa) is the exact SVD",
        "pissa_init: raylm's PiSSA is the exact SVD (LLaMA-Factory's pissa_iter: -1)",
        "gradient_checkpointing=false: LLaMA-Factory checkpoints activations anyway",
    ):
        assert line in caplog.text
    fa2 = load_lf(tmp_path, model_name_or_path=str(tiny_model), flash_attn="fa2", bf16=True)
    with pytest.raises(ConfigError, match="needs a CUDA GPU with flash-attn"):
        check_knobs(fa2)
    rel = "extras/pissa/llama3_lora_sft.yaml"
    pissa = config.load("train", [example(rel, tmp_path, tiny_model, pissa_convert=False)])
    assert (pissa.lora.init, pissa.lora.target) == ("pissa", ["all"])
    rel = "extras/loraplus/llama3_lora_sft.yaml"
    assert config.load("train", [example(rel, tmp_path, tiny_model)]).lora.loraplus_lr_ratio == 16


def test_key_tables_cover_every_argument_once() -> None:
    """Every LLaMA-Factory argument (ff6d4d12e) and every transformers training argument
    has exactly one fate, and docs/llamafactory.md lists each."""
    from transformers import Seq2SeqTrainingArguments

    tables = [keys.MAPPED, keys.SPECIAL, keys.NOOP, keys.REFUSED]
    everything = [k for t in tables for k in t]
    assert len(everything) == len(set(everything)), "a key in two tables"
    lines = (LF / "hparams_keys.txt").read_text().splitlines()
    lf_args = [ln for ln in lines if ln and not ln.startswith("#")]
    hf_args = [f.name for f in dataclasses.fields(Seq2SeqTrainingArguments) if f.init]
    assert sorted(set(lf_args + hf_args) - set(everything)) == []
    assert set(keys.DEFAULTS) <= set(keys.REFUSED)
    documented = set(re.findall(r"^\| `(\w+)` \|", DOCS.read_text(), flags=re.M))
    assert sorted(set(everything) - documented) == []
