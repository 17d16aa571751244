"""``final/`` written a shard at a time: what eval and serve load must equal the model.

The ZeRO-3 gathers are collectives; here (one process, no partitioning) they are no-ops,
and the integration tests that compare final weights across runs cover the gathered path.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from raylm.config import load
from raylm.train.export import export_to

ROOT = Path(__file__).resolve().parents[2]


def _cfg(tiny_model: Path, *overrides: str):
    return load(
        "train",
        [ROOT / "conf/train/pt_full.yaml"],
        [f"model.name_or_path={tiny_model}", *overrides],
    )


def test_a_model_over_one_shard_is_split_and_loads_back_equal(
    tiny_model: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    module = AutoModelForCausalLM.from_pretrained(tiny_model)
    cfg = _cfg(tiny_model, "export.shard_mb=1")
    export_to(cfg, module, AutoTokenizer.from_pretrained(tiny_model), tmp_path / "final", rank=0)
    final = tmp_path / "final"
    shards = sorted(p.name for p in final.glob("*.safetensors"))
    assert len(shards) > 1 and all(p.stat().st_size <= 2**20 + 2**16 for p in final.glob("*.s*"))
    index = json.loads((final / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    assert not (tmp_path / ".final.weights").exists()
    back = AutoModelForCausalLM.from_pretrained(final)
    want = module.state_dict()
    for name, tensor in back.state_dict().items():
        assert torch.equal(tensor, want[name]), name


def test_lora_exports_only_the_adapter(tiny_model: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    module = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    cfg = _cfg(tiny_model, "finetuning_type=lora", "export.shard_mb=1")
    export_to(cfg, module, AutoTokenizer.from_pretrained(tiny_model), tmp_path / "final", rank=0)
    names = sorted(p.name for p in (tmp_path / "final").iterdir())
    assert "adapter_model.safetensors" in names and "adapter_config.json" in names
    assert not any(n.startswith("model") for n in names)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "final" / "adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved)


def test_shard_size_must_be_positive(tiny_model: Path) -> None:
    from raylm.config import ConfigError

    with pytest.raises(ConfigError, match=r"export\.shard_mb"):
        _cfg(tiny_model, "export.shard_mb=0")
