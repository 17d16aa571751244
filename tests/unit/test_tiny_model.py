"""The tiny model is a real HF directory, deterministic, in the promised size range."""

from __future__ import annotations

from pathlib import Path

import torch

from raylm.models.tiny import TinySpec, build


def test_tiny_model_loads_like_a_hub_model(tiny_model: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (tiny_model / name).exists(), name
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    params = sum(p.numel() for p in model.parameters())
    assert 1_000_000 <= params <= 5_000_000
    text = "Licensed under the Apache License 你好 🙂"
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level BPE: no unknowns
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    with torch.no_grad():
        out = model(
            **tok(["the license"], return_tensors="pt"),
            labels=tok(["the license"], return_tensors="pt")["input_ids"],
        )
    # A random init predicts ~uniformly: loss near ln(vocab), not 0 and not huge.
    assert abs(out.loss.item() - torch.log(torch.tensor(float(len(tok)))).item()) < 1.0


def test_same_seed_same_weights_other_seed_differs(tmp_path: Path, tiny_model: Path) -> None:
    from safetensors.torch import load_file

    base = load_file(tiny_model / "model.safetensors")
    again = load_file(build(tmp_path / "same") / "model.safetensors")
    other = load_file(build(tmp_path / "other", TinySpec(seed=1)) / "model.safetensors")
    assert all(torch.equal(base[k], again[k]) for k in base)
    assert not all(torch.equal(base[k], other[k]) for k in base)
