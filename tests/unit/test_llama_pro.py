"""LLaMA Pro: ``raylm llama-pro`` inserts blocks that leave the model's function as it
was, and freeze tuning with ``freeze.llama_pro`` trains exactly those blocks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from raylm.config import ConfigError, load
from raylm.train.llama_pro import expand, layer_ids

ROOT = Path(__file__).resolve().parents[2]
IDS = torch.tensor([[1, 17, 40, 99, 301, 7, 1200, 5, 64, 3]])


def test_layer_choice_is_llamafactorys() -> None:
    """LLaMA-Factory's range(stride - 1, num_layers + stride - 1, stride)."""
    assert layer_ids(40, 8, llama_pro=True) == [4, 9, 14, 19, 24, 29, 34, 39]
    assert layer_ids(16, 8, llama_pro=True) == [1, 3, 5, 7, 9, 11, 13, 15]
    assert layer_ids(6, 3, llama_pro=True) == [1, 3, 5]
    assert layer_ids(6, 2) == [4, 5] and layer_ids(6, -2) == [0, 1]  # last N / first N
    with pytest.raises(ConfigError, match="equal groups"):
        layer_ids(6, 4, llama_pro=True)
    with pytest.raises(ConfigError, match="has 4 layers"):
        layer_ids(4, 8, llama_pro=True)


def test_expansion_keeps_the_logits(tiny_model: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = expand(tiny_model, tmp_path / "pro", num_expand=2, shard_mb=1)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 6
    assert (out / "tokenizer.json").is_file() and (out / "model.safetensors.index.json").is_file()
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    pro = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        want, got = base(input_ids=IDS).logits, pro(input_ids=IDS).logits
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    # Layers 0 1 | 2 3 -> 0 1 [1'] 2 3 [3']: originals moved, copies with zeroed outputs.
    b, p = base.state_dict(), pro.state_dict()
    for old, new in ((0, 0), (1, 1), (2, 3), (3, 4)):
        for key in [k for k in b if k.startswith(f"model.layers.{old}.")]:
            assert torch.equal(p[key.replace(f".{old}.", f".{new}.", 1)], b[key]), key
    for copy, src in ((2, 1), (5, 3)):
        prefix = f"model.layers.{copy}."
        for key in [k for k in p if k.startswith(prefix)]:
            orig = b[key.replace(prefix, f"model.layers.{src}.", 1)]
            zeroed = "o_proj" in key or "down_proj" in key
            assert torch.equal(p[key], torch.zeros_like(orig) if zeroed else orig), key


def test_expansion_refuses_what_it_cannot_split(tiny_model: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="divide the model's 4 layers"):
        expand(tiny_model, tmp_path / "x", num_expand=3)
    with pytest.raises(ConfigError, match="not a local model directory"):
        expand(tmp_path / "missing", tmp_path / "y", num_expand=2)


def test_freeze_llama_pro_trains_only_the_inserted_blocks(tiny_model: Path, tmp_path: Path) -> None:
    from raylm.train.model import load_model

    pro = expand(tiny_model, tmp_path / "pro", num_expand=2)
    cfg = load(
        "train",
        [ROOT / "conf/train/pt_full.yaml"],
        [f"model.name_or_path={pro}", "finetuning_type=freeze", "freeze.trainable_layers=2",
         "freeze.llama_pro=true", "freeze.trainable_modules=[mlp]"],
    )  # fmt: skip
    model = load_model(cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(
        n.startswith(("model.layers.2.mlp.", "model.layers.5.mlp.")) for n in trainable
    )
    assert any(n.startswith("model.layers.2.") for n in trainable)
    assert any(n.startswith("model.layers.5.") for n in trainable)


def test_freeze_llama_pro_needs_positive_layers() -> None:
    from raylm.train.config import FreezeConfig

    with pytest.raises(ConfigError, match="must be positive"):
        FreezeConfig(trainable_layers=-2, llama_pro=True)


def test_cli_expands(tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from raylm.cli import main

    assert main(["llama-pro", str(tiny_model), str(tmp_path / "pro"), "--num-expand", "4"]) == 0
    assert json.loads((tmp_path / "pro/config.json").read_text())["num_hidden_layers"] == 8
    assert "freeze.trainable_layers=4 freeze.llama_pro=true" in capsys.readouterr().out


def test_llamafactory_use_llama_pro(tmp_path: Path, tiny_model: Path, workspace: Path) -> None:
    from llamafactory_helpers import example, lf

    rel = "extras/llama_pro/llama3_freeze_sft.yaml"
    cfg = load("train", [example(rel, tmp_path, tiny_model)])
    f = cfg.freeze
    assert (cfg.finetuning_type, f.trainable_layers, f.trainable_modules, f.llama_pro) == (
        "freeze", 8, ["all"], True,
    )  # fmt: skip
    for ftype in ("lora", "oft", "full"):
        extra = {"finetuning_type": ftype, "use_llama_pro": True}
        with pytest.raises(ConfigError, match=f"use_llama_pro with finetuning_type {ftype}"):
            load("train", [lf(tmp_path, **extra)])
