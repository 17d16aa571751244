"""Dynamic INT8 export (raylm.export.int8): written by the export job, loaded back by
``load_int8`` with int8 Linear layers and logits close to the source's, and its
perplexity figures (tiny model, CPU, no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lora_helpers import reference_perplexity

from raylm import config
from raylm.export.gguf import held_out_docs
from raylm.export.int8 import META_FILE, STATE_FILE, load_int8, quantize_model
from raylm.export.job import CHECK_FILE, export_model, resolve_sources

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Licenses: MIT, Apache, GPL 3.0"]
TOLERANCE = 5e-2
"""Largest |int8 - float| logit difference over the largest |logit| (int8 weights per
output channel and int8 activations per batch, on this random model)."""


@pytest.fixture(scope="module")
def exported(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("int8") / "export"
    over = [f"model={tiny_model}", f"output_dir={out}", "quantize.method=int8_dynamic"]
    cfg = config.load("export", [], over)
    figures = export_model(cfg, resolve_sources(cfg), str(out))["quantize"]
    return out, figures


def _logits(model, tok) -> list[torch.Tensor]:
    with torch.inference_mode():
        return [model(**tok(p, return_tensors="pt")).logits[0] for p in PROMPTS]


def test_int8_loads_back_with_int8_linears_and_logits_close(exported, tiny_model: Path) -> None:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = exported
    quantized = out / "quantized"
    assert (quantized / STATE_FILE).is_file() and (quantized / "tokenizer.json").is_file()
    assert json.loads((quantized / META_FILE).read_text())["load"].endswith("load_int8(dir)")
    model, tok = load_int8(quantized)
    linears = [m for m in model.modules() if isinstance(m, DynamicLinear)]
    assert len(linears) == 4 * 7 + 1  # q k v o gate up down per layer, and lm_head
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    source = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    want, got = _logits(source, tok), _logits(model, tok)
    worst = max(float((g - w).abs().max() / w.abs().max()) for g, w in zip(got, want, strict=True))
    assert 1e-5 < worst <= TOLERANCE, worst
    # the saved state equals what quantize_model computes in memory
    again = _logits(quantize_model(source), AutoTokenizer.from_pretrained(tiny_model))
    for a, g in zip(again, got, strict=True):
        torch.testing.assert_close(a, g, rtol=0, atol=0)


def test_int8_figures(exported, tiny_model: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, figures = exported
    assert figures == json.loads((out / CHECK_FILE).read_text())["quantize"]
    (f,) = figures["files"]
    assert f["type"] == "int8_dynamic" and f["seconds"] > 0
    assert figures["hf_model_dir"] is False
    assert f["bytes"] == (out / "quantized" / STATE_FILE).stat().st_size
    assert f["bytes"] < 0.45 * figures["merged_bytes"]  # int8 Linears; embeddings float32
    # the merged figure is the source's perplexity, batched as unbatched
    source = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    docs = held_out_docs(None)
    want = reference_perplexity(source, AutoTokenizer.from_pretrained(tiny_model), docs, 1024)
    assert figures["merged_perplexity"] == pytest.approx(want, rel=1e-4)
    assert figures["eval_docs"] == len(docs)
    assert f["perplexity_ratio"] == pytest.approx(f["perplexity"] / want, rel=1e-4)
    assert f["perplexity"] != figures["merged_perplexity"]  # int8 moved the logits
    assert 0.9 < f["perplexity_ratio"] < 1.1  # and by little
