"""The export's shard-by-shard merge against PEFT's own, and the check that catches a
wrong merge or an adapter that does nothing (tiny model, CPU, no Ray)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from lora_helpers import lora_adapter

from raylm import config
from raylm.config import ConfigError
from raylm.export.check import MergeCheckFailed
from raylm.export.job import CHECK_FILE, export_model, resolve_sources


@pytest.fixture(scope="module")
def sharded_base(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model saved in several shards (with an index), as large models are."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("sharded")
    AutoModelForCausalLM.from_pretrained(tiny_model).save_pretrained(out, max_shard_size="300KB")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    assert len(list(out.glob("model-*.safetensors"))) > 1
    return out


def _cfg(model: Path, adapters: list[Path], out: Path, *extra: str):
    over = [f"model={model}", f"adapters=[{','.join(map(str, adapters))}]", f"output_dir={out}"]
    return config.load("export", [], [*over, *extra])


def _export(model: Path, adapters: list[Path], out: Path, *extra: str) -> dict:
    cfg = _cfg(model, adapters, out, *extra)
    return export_model(cfg, resolve_sources(cfg), str(out))


def _peft_merged(base: Path, adapters: list[Path]) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    for a in adapters:
        model = PeftModel.from_pretrained(model, str(a)).merge_and_unload()
    return model.state_dict()


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def test_two_adapters_merge_shard_by_shard_as_peft_does(sharded_base: Path, tmp_path: Path) -> None:
    a1 = lora_adapter(sharded_base, tmp_path / "a1", seed=1)
    a2 = lora_adapter(sharded_base, tmp_path / "a2", seed=2, use_rslora=True)
    out = tmp_path / "merged"
    figures = _export(sharded_base, [a1, a2], out)
    assert figures["method"] == "shard_by_shard" and figures["shards"] > 1
    assert sorted(p.name for p in out.glob("model-*.safetensors")) == sorted(
        p.name for p in sharded_base.glob("model-*.safetensors")
    )
    want, got = _peft_merged(sharded_base, [a1, a2]), _weights(out)
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=key)
    check = json.loads((out / CHECK_FILE).read_text())["check"]
    assert all(r["merged_vs_reference"] <= check["tolerance"] < r["adapters_effect"]
               for r in check["prompts"])  # fmt: skip


def test_a_wrong_merge_fails_the_check(tiny_model: Path, tmp_path: Path, monkeypatch) -> None:
    from raylm.export import merge

    adapter = lora_adapter(tiny_model, tmp_path / "a", seed=3)
    # A deliberately broken merge: every update at half its scale.
    monkeypatch.setattr(merge.Delta, "tensor", lambda d: (d.b.float() @ d.a.float()) * d.scale / 2)
    with pytest.raises(MergeCheckFailed, match="differ from base \\+ adapters"):
        _export(tiny_model, [adapter], tmp_path / "out")


def test_an_adapter_that_does_nothing_fails_the_check(tiny_model: Path, tmp_path: Path) -> None:
    adapter = lora_adapter(tiny_model, tmp_path / "zero", seed=4, zero=True)  # B = 0
    with pytest.raises(MergeCheckFailed, match="indistinguishable from the base"):
        _export(tiny_model, [adapter], tmp_path / "out")


def test_an_adapter_for_another_model_is_named(tiny_model: Path, tmp_path: Path) -> None:
    adapter = lora_adapter(tiny_model, tmp_path / "a", seed=5)
    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    from safetensors.torch import load_file, save_file

    weights = load_file(str(other / "model.safetensors"))
    save_file({k.replace("q_proj", "query"): v for k, v in weights.items()},
              str(other / "model.safetensors"))  # fmt: skip
    with pytest.raises(ConfigError, match="match no weight of the base model"):
        _export(other, [adapter], tmp_path / "out", "check.enabled=false")


def test_template_is_baked_into_tokenizer_and_stop_tokens(tiny_model: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer, GenerationConfig

    adapter = lora_adapter(tiny_model, tmp_path / "a", seed=6)
    out = tmp_path / "out"
    _export(tiny_model, [adapter], out, "template=chatml", "check.enabled=false")
    tok = AutoTokenizer.from_pretrained(out)
    assert "<|im_start|>" in tok.chat_template
    eos = GenerationConfig.from_pretrained(out).eos_token_id
    assert tok.convert_tokens_to_ids("<|im_end|>") in (eos if isinstance(eos, list) else [eos])


def test_bad_inputs_fail_at_setup(tiny_model: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a PEFT adapter"):
        resolve_sources(_cfg(tiny_model, [tmp_path], tmp_path / "out"))
    with pytest.raises(ConfigError, match="template"):
        _cfg(tiny_model, [], tmp_path / "out", "template=chatmll")


def test_a_servable_quantized_copy_is_what_the_next_stage_takes(tmp_path: Path) -> None:
    from raylm.export.job import ExportJob, Sources

    job = ExportJob()
    job.sources = Sources(base="/base", adapters=[], tokenizer="/base", trained=None)
    out = str(tmp_path / "export")
    llmc = job._output(out, {"method": "gptq", "hf_model_dir": True})
    assert (llmc.path, llmc.source) == (f"{out}/quantized", out)  # export_eval compares them
    gguf = job._output(out, {"method": "gguf", "hf_model_dir": False})
    assert (gguf.path, gguf.source) == (out, None)  # engines serve the merged model
