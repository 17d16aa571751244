"""``export.pissa_convert`` (LLaMA-Factory's ``pissa_convert``): a trained PiSSA/OLoRA
adapter rewritten as a plain LoRA that, put on the original base, computes what the
trained model computed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from raylm.config import ConfigError, load
from raylm.train.pissa import BACKUP, convert_pissa

ROOT = Path(__file__).resolve().parents[2]
IDS = torch.tensor([[1, 17, 40, 99, 301, 7, 1200, 5]])


def conf(tiny_model: Path, *overrides: str):
    files = [ROOT / "conf/train/sft_lora.yaml"]
    return load("train", files, [f"model.name_or_path={tiny_model}", *overrides])


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_converted_adapter_on_the_original_base_is_the_trained_model(
    init: str, tiny_model: Path, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from raylm.train.model import load_model

    cfg = conf(tiny_model, f"lora.init={init}", "lora.rank=4", "export.pissa_convert=true")
    model = load_model(cfg)  # the base is now the residual
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:  # "training": the adapter moves off its initial values
                p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=IDS).logits
    final = tmp_path / "final"
    model.save_pretrained(str(final))  # as write_final saves a LoRA run's adapter
    convert_pissa(cfg, final)

    config = json.loads((final / "adapter_config.json").read_text())
    assert (config["r"], config["init_lora_weights"]) == (8, True)
    assert json.loads((final / BACKUP / "adapter_config.json").read_text())["r"] == 4
    assert not (final / "pissa_init").exists()
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    with torch.no_grad():
        plain = base(input_ids=IDS).logits
        converted = PeftModel.from_pretrained(base, str(final)).eval()(input_ids=IDS).logits
    assert (trained - plain).abs().max() > 1e-2  # the adapter changes the model
    assert torch.allclose(converted, trained, atol=1e-4), (converted - trained).abs().max()


def test_pissa_convert_needs_a_new_pissa_or_olora_adapter(tiny_model: Path) -> None:
    assert conf(tiny_model, "lora.init=pissa", "export.pissa_convert=true").export.pissa_convert
    for overrides in (
        ["export.pissa_convert=true"],
        ["export.pissa_convert=true", "lora.init=pissa", "finetuning_type=full"],
    ):
        with pytest.raises(ConfigError, match="pissa_convert converts"):
            conf(tiny_model, *overrides)


def test_llamafactory_pissa_example_converts(tmp_path: Path, tiny_model: Path) -> None:
    from llamafactory_helpers import example

    cfg = load("train", [example("extras/pissa/llama3_lora_sft.yaml", tmp_path, tiny_model)])
    assert (cfg.lora.init, cfg.export.pissa_convert) == ("pissa", True)
