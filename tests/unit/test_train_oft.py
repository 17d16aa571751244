"""finetuning_type oft: PEFT's OFT built as LLaMA-Factory builds it, and a final/ that is
the merged model (vLLM serves no OFT adapters) computing what base + adapter computes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from raylm.config import ConfigError, load
from raylm.train.export import export_to
from raylm.train.oft import ADAPTER_DIR

ROOT = Path(__file__).resolve().parents[2]
IDS = torch.tensor([[1, 17, 40, 99, 301, 7, 1200, 5, 64, 3]])


def conf(tiny_model: Path, *overrides: str):
    files = [ROOT / "conf/train/sft_lora.yaml"]
    return load("train", files, [f"model.name_or_path={tiny_model}", "finetuning_type=oft",
                                 *overrides])  # fmt: skip


def test_only_the_rotations_train(tiny_model: Path) -> None:
    from peft import PeftModel

    from raylm.train.model import load_model

    model = load_model(conf(tiny_model, "oft.block_size=32"))
    assert isinstance(model, PeftModel) and model.peft_type == "OFT"
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    # 7 linear layers per block (q k v o gate up down), 4 blocks; the head stays out.
    assert len(trainable) == 28 and all(".oft_R." in n for n in trainable), trainable
    peft_cfg = model.peft_config["default"]
    assert (peft_cfg.r, peft_cfg.oft_block_size, peft_cfg.use_cayley_neumann) == (0, 32, True)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert (q.r["default"], q.oft_block_size["default"]) == (4, 32)  # 128 inputs / 32


def test_targets_and_sizes(tiny_model: Path) -> None:
    from raylm.train.model import load_model

    model = load_model(conf(tiny_model, "oft.target=[q_proj,v_proj]", "oft.rank=8",
                            "oft.block_size=0", "oft.module_dropout=0.1"))  # fmt: skip
    names = {n.split(".oft_R.")[0].rsplit(".", 1)[-1] for n, p in model.named_parameters()
             if p.requires_grad}  # fmt: skip
    assert names == {"q_proj", "v_proj"}
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert (q.r["default"], q.oft_block_size["default"]) == (8, 16)
    with pytest.raises(ConfigError, match="set exactly one"):
        conf(tiny_model, "oft.rank=8")  # beside the default block_size 32
    with pytest.raises(ConfigError, match="Module names in this model"):
        load_model(conf(tiny_model, "oft.target=[qproj]"))
    with pytest.raises(ConfigError, match=r"'oft.blocksize' \(did you mean 'block_size'"):
        conf(tiny_model, "oft.blocksize=16")
    with pytest.raises(ConfigError, match="stage rm with finetuning_type=oft"):
        conf(tiny_model, "stage=rm")


def test_final_is_the_merged_model_with_base_plus_adapter_logits(
    tiny_model: Path, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raylm.train.job import model_output
    from raylm.train.model import load_model

    cfg = conf(tiny_model)
    model = load_model(cfg)
    torch.manual_seed(0)
    with torch.no_grad():  # "training": the rotations move off the identity
        for _, p in ((n, p) for n, p in model.named_parameters() if p.requires_grad):
            p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=IDS).logits
    final = tmp_path / "final"
    export_to(cfg, model, AutoTokenizer.from_pretrained(tiny_model), final, rank=0)

    assert json.loads((final / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert (final / "tokenizer.json").is_file() and (final / "generation_config.json").is_file()
    adapter = final / ADAPTER_DIR
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "OFT"
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    with torch.no_grad():
        plain = base(input_ids=IDS).logits
        merged = AutoModelForCausalLM.from_pretrained(final).eval()(input_ids=IDS).logits
        on_base = PeftModel.from_pretrained(base, str(adapter)).eval()(input_ids=IDS).logits
    assert (trained - plain).abs().max() > 1e-2  # the adapter changes the model
    assert torch.allclose(on_base, trained, atol=1e-5), (on_base - trained).abs().max()
    assert torch.allclose(merged, on_base, atol=1e-4), (merged - on_base).abs().max()

    out = model_output(cfg, str(final))
    assert (out.path, out.adapter, out.merged) == (str(final), False, None)
    assert out.trained_adapter == str(adapter)


def test_llamafactory_oft_keys(tmp_path: Path, tiny_model: Path, workspace: Path) -> None:
    from llamafactory_helpers import example, lf

    cfg = load("train", [example("extras/oft/llama3_oft_sft.yaml", tmp_path, tiny_model)])
    assert (cfg.finetuning_type, cfg.oft.block_size, cfg.oft.rank, cfg.oft.target) == (
        "oft", 32, 0, ["all"],
    )  # fmt: skip
    mapped = load("train", [lf(tmp_path, finetuning_type="oft", oft_rank=4, module_dropout=0.1,
                               lora_target="q_proj,v_proj", additional_target="lm_head")])  # fmt: skip
    o = mapped.oft
    assert (o.rank, o.block_size, o.module_dropout, o.target, o.additional_target) == (
        4, 0, 0.1, ["q_proj", "v_proj"], ["lm_head"],
    )  # fmt: skip
    assert mapped.lora.additional_target == []
    with pytest.raises(ConfigError) as err:
        load("train", [lf(tmp_path, finetuning_type="oft", oft_target="q_proj",
                          lora_target="v_proj", use_dora=True, adapter_name_or_path="a")])  # fmt: skip
    text = str(err.value)
    for key in ("oft_target='q_proj' with lora_target", "use_dora=True: a LoRA variant",
                "adapter_name_or_path with finetuning_type oft"):  # fmt: skip
        assert key in text, text
    with pytest.raises(ConfigError, match="quantization_bit=4 with finetuning_type oft"):
        load("train", [lf(tmp_path, finetuning_type="oft", quantization_bit=4)])
