"""A LLaMA-Factory training YAML loads as a raylm train config, or says which key is wrong."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from raylm import config
from raylm.config import ConfigError

ASSET = Path(__file__).resolve().parents[1] / "assets" / "llamafactory_llama3_lora_sft.yaml"


def test_llamafactory_example_maps_onto_train_config(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        cfg = config.load("train", [ASSET])
    assert cfg.model.name_or_path == "/models/Meta-Llama-3-8B-Instruct"
    assert cfg.model.trust_remote_code is True
    assert (cfg.stage, cfg.finetuning_type) == ("sft", "lora")
    assert (cfg.lora.rank, cfg.lora.target) == (8, ["all"])
    assert cfg.data.path == "/data/identity"
    assert (cfg.data.cutoff_len, cfg.data.max_samples) == (2048, 1000)
    assert (cfg.storage_path, cfg.run_name) == ("saves/llama3-8b/lora", "sft")
    assert (cfg.train.micro_batch_size, cfg.train.grad_accum) == (1, 8)
    assert cfg.train.lr == pytest.approx(1e-4)
    assert (cfg.train.epochs, cfg.train.lr_scheduler, cfg.train.warmup_ratio) == (
        3.0,
        "cosine",
        0.1,
    )
    assert cfg.train.precision == "bf16"
    assert (cfg.train.logging_steps, cfg.checkpoint.save_steps) == (10, 500)
    assert cfg.report_to == []
    ignored = caplog.text
    for key in ("template", "plot_loss", "ddp_timeout", "preprocessing_num_workers"):
        assert f"'{key}'" in ignored, f"ignoring {key} was not reported"


def test_llamafactory_overrides_use_raylm_keys() -> None:
    cfg = config.load("train", [ASSET], ["train.lr=5e-5", "lora.rank=16"])
    assert (cfg.train.lr, cfg.lora.rank) == (5e-5, 16)


def lf(tmp_path: Path, **extra: object) -> Path:
    keys: dict[str, object] = {"model_name_or_path": "/m", "stage": "sft", "dataset": "d"}
    lines = [f"{k}: {v}" for k, v in (keys | extra).items()]
    path = tmp_path / "lf.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_unknown_llamafactory_key_is_named_with_suggestion(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        config.load("train", [lf(tmp_path, lerning_rate=1e-4, galore_rank=8)])
    msg = str(err.value)
    assert "'lerning_rate' (did you mean 'learning_rate'?)" in msg
    assert "'galore_rank'" in msg


def test_llamafactory_special_keys(tmp_path: Path) -> None:
    cfg = config.load(
        "train", [lf(tmp_path, quantization_bit=4, lora_target="q_proj,v_proj", report_to="wandb")]
    )
    assert cfg.finetuning_type == "qlora"
    assert cfg.lora.target == ["q_proj", "v_proj"]
    assert cfg.report_to == ["wandb"]


def test_llamafactory_values_raylm_cannot_honour(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="one dataset"):
        config.load("train", [lf(tmp_path, dataset="a,b")])
    with pytest.raises(ConfigError, match="supports 4 only"):
        config.load("train", [lf(tmp_path, quantization_bit=8)])


def test_llamafactory_preference_keys(tmp_path: Path) -> None:
    """pref_loss / pref_beta / pref_ftx / simpo_gamma / dpo_label_smoothing reach cfg.dpo."""
    simpo = config.load(
        "train",
        [
            lf(
                tmp_path,
                stage="dpo",
                pref_loss="simpo",
                pref_beta=2.5,
                simpo_gamma=1.25,
                pref_ftx="1e-1",
            )
        ],
    )
    d = simpo.dpo
    assert (simpo.stage, d.loss_type, d.beta, d.simpo_gamma, d.sft_weight) == (
        "dpo", "simpo", 2.5, 1.25, 0.1,
    )  # fmt: skip
    assert not d.needs_reference
    cdpo = config.load("train", [lf(tmp_path, stage="dpo", dpo_label_smoothing=0.1)])
    assert (cdpo.dpo.loss_type, cdpo.dpo.label_smoothing) == ("sigmoid", 0.1)


def test_llamafactory_preference_values_raylm_refuses(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="pref_loss='kto_pair' is not supported"):
        config.load("train", [lf(tmp_path, stage="dpo", pref_loss="kto_pair")])
    with pytest.raises(ConfigError, match=r"only applies to dpo\.loss_type=sigmoid"):
        config.load("train", [lf(tmp_path, stage="dpo", pref_loss="ipo", dpo_label_smoothing=0.1)])
    with pytest.raises(ConfigError) as err:
        config.load("train", [lf(tmp_path, stage="dpo", simpo_gama=0.5, pref_bco_weight=0.1)])
    assert "'simpo_gama' (did you mean 'simpo_gamma'?)" in str(err.value)
    assert "'pref_bco_weight'" in str(err.value)
