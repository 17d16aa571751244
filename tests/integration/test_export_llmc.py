"""GPTQ, AWQ and W8A8 exports with llmcompressor on the tiny model, each produced in the
llmcompressor venv (built on first use, then reused: one build per machine and pin set),
loaded back (compressed-tensors decompresses it) and scored against the merged model on
held-out text. LLaMA-Factory's GPTQ export YAML runs through the export job's task."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from lora_helpers import lora_adapter

from raylm import config
from raylm.export import llmc
from raylm.export.config import ExportJobConfig, QuantizeConfig
from raylm.export.job import CHECK_FILE, export_model, resolve_sources

LF = Path(__file__).resolve().parents[1] / "assets" / "llamafactory"
C4 = LF / "data" / "c4_demo.jsonl"
SMALL = {"nsamples": 4, "max_length": 64}
"""Calibration small enough for CI's 2 cores (the bench runs the defaults)."""

FORMATS = {"gptq": "pack-quantized", "awq": "pack-quantized", "w8a8": "int-quantized"}


@pytest.fixture(scope="session")
def llmc_env() -> Path:
    """The llmcompressor venv, built once (minutes the first time on a machine)."""
    start = time.perf_counter()
    python, _ = llmc.ensure_env()
    print(f"llmcompressor venv ready in {time.perf_counter() - start:.0f} s: {python}")
    return python


def _check_figures(fig: dict, method: str, out: Path) -> None:
    assert fig["method"] == method and fig["format"] == "compressed-tensors"
    assert fig["hf_model_dir"] is True
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == FORMATS[method]
    assert "model.safetensors" in fig["files"] and "tokenizer.json" in fig["files"]
    # the quantized Linear weights are packed; embeddings and lm_head stay float32
    assert 0.2 < fig["size_ratio"] < 0.95, fig["size_ratio"]
    assert fig["calibration_windows"] == SMALL["nsamples"] and fig["eval_tokens"] > 500
    # a random tiny model: perplexity near its vocabulary size; quantized stays close
    assert 0.8 < fig["perplexity_ratio"] < 1.25, (fig["perplexity"], fig["merged_perplexity"])
    assert fig["versions"]["compressed_tensors"] == "0.19.0"


@pytest.mark.timeout(900)
@pytest.mark.parametrize("method", ["awq", "w8a8"])
def test_llmc_formats_load_back_and_score(
    llmc_env: Path, tiny_model: Path, tmp_path: Path, method: str
) -> None:
    cfg = ExportJobConfig(model=str(tiny_model),
                          quantize=QuantizeConfig(method=method, dataset=str(C4), **SMALL))  # fmt: skip
    fig = llmc.quantize(cfg, tiny_model, tmp_path / "quantized")
    _check_figures(fig, method, tmp_path / "quantized")
    assert fig["env_build_s"] == 0.0  # the session's venv was reused
    if method == "w8a8":
        groups = json.loads((tmp_path / "quantized" / "config.json").read_text())
        acts = groups["quantization_config"]["config_groups"]["group_0"]["input_activations"]
        assert (acts["num_bits"], acts["type"], acts["dynamic"]) == (8, "int", True)


@pytest.mark.timeout(900)
def test_llamafactory_gptq_yaml_exports_a_scored_gptq_copy(
    llmc_env: Path, tiny_model: Path, tmp_path: Path
) -> None:
    adapter = lora_adapter(tiny_model, tmp_path / "sft", seed=3)
    data = yaml.safe_load((LF / "examples" / "merge_lora" / "qwen3_gptq.yaml").read_text())
    out = tmp_path / "gptq"
    data |= {"model_name_or_path": str(tiny_model), "adapter_name_or_path": str(adapter),
             "export_dir": str(out), "export_quantization_dataset": str(C4),
             "export_quantization_nsamples": SMALL["nsamples"],
             "export_quantization_maxlen": SMALL["max_length"]}  # fmt: skip
    (tmp_path / "gptq.yaml").write_text(yaml.safe_dump(data))
    cfg = config.load("export", [tmp_path / "gptq.yaml"])
    figures = export_model(cfg, resolve_sources(cfg), str(out))
    assert figures["check"]  # merged and checked first, then quantized
    fig = json.loads((out / CHECK_FILE).read_text())["quantize"]
    _check_figures(fig, "gptq", out / "quantized")
    assert fig["scheme"].startswith("W4A16")
    assert fig["eval_text"].endswith("(last 30 documents)")  # c4_demo's tail held out
