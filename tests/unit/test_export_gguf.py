"""GGUF export (raylm.export.gguf): files written by the export job, read back by gguf's
reader, loaded by transformers' GGUF loader with logits within each type's error, the
tokenizer carried over, the Modelfile, and the refusals (tiny model, CPU, no Ray)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from gguf import LlamaFileType
from lora_helpers import lora_adapter, reference_perplexity

from raylm import config
from raylm.config import ConfigError
from raylm.export.gguf import convert, held_out_docs, load_gguf
from raylm.export.job import CHECK_FILE, export_model, resolve_sources
from raylm.export.ollama import modelfile

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Licenses: MIT, Apache, GPL 3.0"]
TOLERANCE = {"f32": 1e-5, "f16": 2e-3, "bf16": 1.5e-2, "q8_0": 3e-2, "q5_0": 0.2, "q4_0": 0.3}
"""Largest |gguf - source| logit difference over the largest |logit|, by type: f32 is
the exact conversion (the q/k permutation undone by the loader), f16 its rounding,
q8_0 / q5_0 / q4_0 the block quantization's error on this random model's weights."""


@pytest.fixture(scope="module")
def gguf_dir(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gguf")
    for t in TOLERANCE:
        convert(tiny_model, out / f"model-{t}.gguf", t)
    return out


def _logits(model, tok) -> list[torch.Tensor]:
    with torch.inference_mode():
        return [model(**tok(p, return_tensors="pt")).logits[0] for p in PROMPTS]


@pytest.fixture(scope="module")
def source_logits(tiny_model: Path) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    return _logits(model, AutoTokenizer.from_pretrained(tiny_model))


def test_export_job_writes_gguf_files_modelfile_and_figures(tiny_model: Path, tmp_path: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = lora_adapter(tiny_model, tmp_path / "a", seed=5)
    out = tmp_path / "export"
    over = [f"model={tiny_model}", f"adapters=[{adapter}]", f"output_dir={out}",
            "quantize.method=gguf", "quantize.gguf_types=[q4_0,q4_k_m]"]  # fmt: skip
    cfg = config.load("export", [], over)
    figures = export_model(cfg, resolve_sources(cfg), str(out))["quantize"]
    assert figures == json.loads((out / CHECK_FILE).read_text())["quantize"]
    assert figures["hf_model_dir"] is False  # not for vLLM / eval / serve
    files = {f["type"]: f for f in figures["files"]}
    assert list(files) == ["q4_0", "q4_k_m"]
    for t, f in files.items():
        assert (out / "quantized" / f["file"]).stat().st_size == f["bytes"] > 0, t
        assert f["seconds"] > 0
        # llama.cpp itself loaded and ran the file
        assert f["llama_cpp"]["prompt_tokens_per_s"] > 0 < f["llama_cpp"]["generate_tokens_per_s"]
        assert 0.8 < f["perplexity_ratio"] < 1.25, t
    # the f16 file llama-quantize read is not left behind (it was not asked for)
    assert sorted(p.name for p in (out / "quantized").glob("*.gguf")) == [
        "model-q4_0.gguf",
        "model-q4_k_m.gguf",
    ]
    # sizes against float32: q4_0 (output.weight kept q8_0) and q4_k_m under 22%
    assert files["q4_0"]["bytes"] < 0.22 * figures["merged_bytes"]
    assert files["q4_k_m"]["bytes"] < 0.22 * figures["merged_bytes"]
    # the merged figure is the perplexity of the base with the adapter merged
    merged = (
        PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), adapter
        )
        .merge_and_unload()
        .eval()
    )
    docs = held_out_docs(None)
    want = reference_perplexity(merged, AutoTokenizer.from_pretrained(tiny_model), docs, 1024)
    assert figures["merged_perplexity"] == pytest.approx(want, rel=1e-4)
    assert figures["eval_docs"] == len(docs) > 5
    # written by llama-quantize: its file type; the tiny model's rows (128 and 384 wide)
    # do not split into k-quants' 256-value super-blocks, so llama.cpp falls back per tensor
    kv, types = _gguf_summary(out / "quantized" / "model-q4_k_m.gguf")
    assert kv["general.file_type"] == LlamaFileType.MOSTLY_Q4_K_M
    assert types <= {"F32", "Q5_0", "Q8_0", "Q4_K", "Q6_K"} and "Q5_0" in types
    mf = (out / "quantized" / "Modelfile").read_text()
    assert (
        mf.startswith("FROM ./model-q4_0.gguf\n") and figures["modelfile_from"] == "model-q4_0.gguf"
    )


def _gguf_summary(path: Path) -> tuple[dict, set[str]]:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    kv = {name: field.contents() for name, field in reader.fields.items()}
    return kv, {t.tensor_type.name for t in reader.tensors}


def test_gguf_types_are_checked_when_the_config_loads() -> None:
    with pytest.raises(ConfigError, match="unknown type q3"):
        config.load("export", [], ["model=m", "quantize.method=gguf", "quantize.gguf_types=[q3]"])
    with pytest.raises(ConfigError, match="imatrix"):
        config.load(
            "export", [], ["model=m", "quantize.method=gguf", "quantize.gguf_types=[iq2_xs]"]
        )
    cfg = config.load(
        "export", [], ["model=m", "quantize.method=gguf", "quantize.gguf_types=[Q4_K_M,f16]"]
    )
    assert list(cfg.quantize.gguf_types) == ["Q4_K_M", "f16"]  # normalised when used


def test_gguf_reader_lists_llama_tensors_and_tokenizer(gguf_dir: Path, tiny_model: Path) -> None:
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    hp = json.loads((tiny_model / "config.json").read_text())
    reader = GGUFReader(gguf_dir / "model-q8_0.gguf")
    kv = {name: field.contents() for name, field in reader.fields.items()}
    assert kv["general.architecture"] == "llama"
    assert kv["llama.block_count"] == hp["num_hidden_layers"]
    assert kv["llama.attention.head_count_kv"] == hp["num_key_value_heads"]
    assert kv["llama.embedding_length"] == hp["hidden_size"]
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "gpt-2"
    assert len(kv["tokenizer.ggml.tokens"]) == hp["vocab_size"]
    assert kv["tokenizer.ggml.tokens"][tok.eos_token_id] == "<|im_end|>"
    assert len(kv["tokenizer.ggml.merges"]) > 1000
    assert kv["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert kv["tokenizer.ggml.bos_token_id"] == tok.bos_token_id
    assert kv["tokenizer.ggml.padding_token_id"] == tok.pad_token_id
    assert kv["tokenizer.chat_template"] == tok.chat_template
    types = {t.name: t.tensor_type for t in reader.tensors}
    layer = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
    want = {"token_embd.weight", "output.weight", "output_norm.weight"} | {
        f"blk.{i}.{n}.weight"
        for i in range(hp["num_hidden_layers"])
        for n in [*layer, "attn_norm", "ffn_norm"]
    }
    assert set(types) == want
    assert types["blk.0.attn_q.weight"] == Q.Q8_0 and types["output.weight"] == Q.Q8_0
    assert types["blk.0.attn_norm.weight"] == Q.F32 and types["output_norm.weight"] == Q.F32
    q4 = {t.name: t.tensor_type for t in GGUFReader(gguf_dir / "model-q4_0.gguf").tensors}
    assert q4["blk.0.ffn_down.weight"] == Q.Q4_0 and q4["output.weight"] == Q.Q8_0


@pytest.mark.parametrize("gtype", list(TOLERANCE))
def test_transformers_loads_the_gguf_with_logits_within_tolerance(
    gguf_dir: Path, tiny_model: Path, source_logits: list[torch.Tensor], gtype: str
) -> None:
    from transformers import AutoTokenizer

    got = _logits(
        load_gguf(gguf_dir, f"model-{gtype}.gguf"), AutoTokenizer.from_pretrained(tiny_model)
    )
    worst = max(
        float((g - s).abs().max() / s.abs().max()) for g, s in zip(got, source_logits, strict=True)
    )
    assert worst <= TOLERANCE[gtype], (gtype, worst)
    if gtype in ("q8_0", "q4_0"):
        assert worst > 1e-4  # really quantized, not a float copy


def test_tokenizer_from_gguf_encodes_as_the_source(gguf_dir: Path, tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    src = AutoTokenizer.from_pretrained(tiny_model)
    back = AutoTokenizer.from_pretrained(gguf_dir, gguf_file="model-f16.gguf")
    text = "Hello <|im_start|>user\nwörld 🚀 3333 it's\n\n  tabs\tand spaces<|im_end|>"
    assert back.encode(text, add_special_tokens=False) == src.encode(text, add_special_tokens=False)


def test_modelfile_chatml_template_and_stops(tiny_model: Path, tmp_path: Path) -> None:
    mf = modelfile(tiny_model, "model-q8_0.gguf")
    assert mf.startswith("FROM ./model-q8_0.gguf\n")
    assert "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n" in mf
    assert mf.count('PARAMETER stop "<|im_end|>"') == 1
    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    (other / "chat_template.jinja").write_text(
        "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    )
    mf = modelfile(other, "m.gguf")
    assert not [line for line in mf.splitlines() if line.startswith("TEMPLATE")]
    assert "not ChatML" in mf
    assert 'PARAMETER stop "<|im_end|>"' in mf  # the eos of generation_config.json


def test_convert_leaves_k_quants_to_llama_cpp_and_refuses_other_architectures(
    tiny_model: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="llama-quantize"):
        convert(tiny_model, tmp_path / "x.gguf", "q4_k_m")
    with pytest.raises(ConfigError, match="unknown type"):
        convert(tiny_model, tmp_path / "x.gguf", "q3")
    other = tmp_path / "qwen"
    shutil.copytree(tiny_model, other)
    hp = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**hp, "architectures": ["Qwen2ForCausalLM"]}))
    with pytest.raises(ConfigError, match=r"Qwen2ForCausalLM.*convert_hf_to_gguf"):
        convert(other, tmp_path / "x.gguf", "f16")
    assert not (tmp_path / "x.gguf").exists()
