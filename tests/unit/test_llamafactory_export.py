"""LLaMA-Factory's merge_lora YAMLs run as ``raylm export FILE`` (model and adapter
paths replaced, nothing else)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from llamafactory_helpers import LF
from lora_helpers import lora_adapter
from transformers import AutoTokenizer

from raylm import config
from raylm.config import ConfigError
from raylm.export.job import CHECK_FILE, export_model, resolve_sources


def _yaml(rel: str, tmp_path: Path, **paths: object) -> Path:
    data = yaml.safe_load((LF / "examples" / rel).read_text()) | paths
    path = tmp_path / Path(rel).name
    path.write_text(yaml.safe_dump(data))
    return path


def test_lora_merge_yaml_exports_a_checked_model(tiny_model: Path, tmp_path: Path) -> None:
    adapter = lora_adapter(tiny_model, tmp_path / "sft", seed=7)
    out = tmp_path / "merged"
    path = _yaml("merge_lora/qwen3_lora_sft.yaml", tmp_path, model_name_or_path=str(tiny_model),
                 adapter_name_or_path=str(adapter), export_dir=str(out))  # fmt: skip
    cfg = config.load("export", [path])
    assert (cfg.adapters, cfg.template, cfg.trust_remote_code) == (
        [str(adapter)],
        "qwen3_nothink",
        True,
    )
    export_model(cfg, resolve_sources(cfg), str(out))
    assert json.loads((out / CHECK_FILE).read_text())["method"] == "shard_by_shard"
    assert "<|im_start|>" in AutoTokenizer.from_pretrained(out).chat_template


def test_full_model_and_gptq_yamls_load(tiny_model: Path, tmp_path: Path) -> None:
    full = config.load("export", [_yaml("merge_lora/qwen3_full_sft.yaml", tmp_path,
                                        model_name_or_path=str(tiny_model))])  # fmt: skip
    assert (full.model, full.adapters, full.output_dir) == (
        str(tiny_model),
        [],
        "saves/qwen3_sft_merged",
    )
    assert full.quantize.method == "none"
    # LLaMA-Factory's GPTQ export (optimum / auto-gptq) runs as llmcompressor's GPTQModifier
    gptq = config.load("export", [_yaml("merge_lora/qwen3_gptq.yaml", tmp_path,
                                        export_quantization_nsamples=64,
                                        export_quantization_maxlen=256)])  # fmt: skip
    q = gptq.quantize
    assert (q.method, q.bits, q.dataset, q.nsamples, q.max_length) == (
        "gptq",
        4,
        "data/c4_demo.jsonl",
        64,
        256,
    )
    assert (gptq.output_dir, gptq.template) == ("saves/qwen3_gptq", "qwen3_nothink")
    with pytest.raises(ConfigError, match=r"quantize.bits=5: gptq takes \[2, 3, 4, 8\]"):
        config.load("export", [_yaml("merge_lora/qwen3_gptq.yaml", tmp_path,
                                     export_quantization_bit=5)])  # fmt: skip
    with pytest.raises(ConfigError, match=r"needs quantize\.dataset"):
        config.load("export", [_yaml("merge_lora/qwen3_gptq.yaml", tmp_path,
                                     export_quantization_dataset=None)])  # fmt: skip


def test_training_keys_and_typos_are_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model_name_or_path": "/m", "export_dir": "/o",
                                   "learning_rate": 1e-4, "export_sise": 5}))  # fmt: skip
    with pytest.raises(ConfigError) as err:
        config.load("export", [bad])
    assert "'export_sise' (did you mean 'export_size'?)" in str(err.value)
    assert "learning_rate: a training argument" in str(err.value)
