"""Perplexity, adapter loading and generation on the real tiny model (no Ray)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from raylm.eval.model import (
    ModelInfo,
    decode_answers,
    describe_model,
    generate_hf,
    load_model,
    perplexity_stats,
    render_prompt,
)
from raylm.eval.records import EvalDataError, EvalRecord

DOCS = [
    "The Licensor grants a perpetual, worldwide, royalty-free license to the Work.",
    "Short one.",
    "You must give any other recipients of the Work a copy of this License; " * 6,
]


@pytest.fixture(scope="module")
def tiny(tiny_model: Path):
    model, tokenizer, info = load_model(tiny_model)
    return model, tokenizer, info


def _own_loss_ppl(model, tokenizer, docs, max_length: int) -> float:
    """Independent reference: the model's own mean loss, one window at a time, token-weighted."""
    import torch

    total, count = 0.0, 0
    for doc in docs:
        ids = tokenizer(doc)["input_ids"]
        for i in range(0, len(ids), max_length):
            window = torch.tensor([ids[i : i + max_length]])
            if window.shape[1] < 2:
                continue
            with torch.inference_mode():
                loss = model(input_ids=window, labels=window).loss.item()
            total += loss * (window.shape[1] - 1)
            count += window.shape[1] - 1
    return math.exp(total / count)


@pytest.mark.parametrize(("max_length", "batch_size"), [(512, 3), (16, 2)])
def test_perplexity_equals_exp_of_models_own_mean_loss(tiny, max_length, batch_size) -> None:
    model, tokenizer, _ = tiny
    stats = perplexity_stats(model, tokenizer, DOCS, max_length=max_length, batch_size=batch_size)
    assert stats.shape == (3, 2)
    ours = math.exp(stats[:, 0].sum() / stats[:, 1].sum())
    assert ours == pytest.approx(_own_loss_ppl(model, tokenizer, DOCS, max_length), rel=1e-4)
    n_tokens = [len(tokenizer(d)["input_ids"]) for d in DOCS]
    if max_length >= max(n_tokens):
        assert stats[:, 1].tolist() == [n - 1 for n in n_tokens]


def test_peft_adapter_dir_is_detected_and_merged(tiny, tiny_model: Path, tmp_path: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    model, tokenizer, _ = tiny
    torch.manual_seed(0)
    peft_cfg = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(load_model(tiny_model)[0], peft_cfg)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)  # adapter_config.json names tiny_model as its base
    info = describe_model(adapter)
    assert (info.kind, info.base) == ("adapter", str(tiny_model))
    loaded, loaded_tok, _ = load_model(adapter)
    ids = torch.tensor([tokenizer("The Work is licensed")["input_ids"]])
    with torch.inference_mode():
        want = peft_model(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
        base = model(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-4)
    assert not torch.allclose(got, base, atol=1e-3)  # the adapter really changed the model
    assert loaded_tok.get_vocab() == tokenizer.get_vocab()  # tokenizer from the base


def test_adapter_base_override_and_bad_dirs(tmp_path: Path, tiny_model: Path) -> None:
    adapter = tmp_path / "a"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": None}))
    with pytest.raises(EvalDataError, match="set adapter_base"):
        describe_model(adapter)
    assert describe_model(adapter, adapter_base=str(tiny_model)).base == str(tiny_model)
    with pytest.raises(EvalDataError, match=r"neither a Hugging Face model \(config.json\)"):
        describe_model(tmp_path / "missing")


def test_greedy_generation_is_deterministic_and_batch_independent(tiny) -> None:
    model, tokenizer, _ = tiny
    records = [
        EvalRecord("a", ("x",), prompt="What version is the License?"),
        EvalRecord("b", ("x",), prompt="Who is the Licensor under this License, in short?"),
        EvalRecord("c", ("x",), messages=({"role": "user", "content": "Define Work."},)),
    ]
    prompts = [render_prompt(tokenizer, r, "auto") for r in records]
    batched = generate_hf(model, tokenizer, prompts, max_new_tokens=8, batch_size=3)
    assert batched == generate_hf(model, tokenizer, prompts, max_new_tokens=8, batch_size=3)
    single = [generate_hf(model, tokenizer, [p], 8, 1)[0] for p in prompts]
    assert batched == single  # left padding does not change a greedy answer
    texts, lengths = decode_answers(tokenizer, batched)
    assert all(0 <= n <= 8 for n in lengths) and len(texts) == 3


def test_prompt_rendering(tiny) -> None:
    _, tokenizer, _ = tiny
    rec = EvalRecord("a", ("x",), prompt="Hi there")
    chat = tokenizer.decode(render_prompt(tokenizer, rec, "auto"))
    assert chat == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(render_prompt(tokenizer, rec, "raw")) == "Hi there"


def test_decode_stops_at_the_first_special_token(tiny) -> None:
    _, tokenizer, _ = tiny
    words = tokenizer("License grant", add_special_tokens=False)["input_ids"]
    generated = [[*words, tokenizer.eos_token_id, *words], [tokenizer.eos_token_id]]
    texts, lengths = decode_answers(tokenizer, generated)
    assert texts == ["License grant", ""]
    assert lengths == [len(words), 0]


def test_a_model_and_an_adapter_in_a_bucket(
    tiny, tiny_model: Path, tmp_path: Path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """describe_model reads the bucket; load_model loads this node's copy of it, and the
    info keeps the URI (what the report names)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from raylm import storage

    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "home"))
    model_uri = storage.join(s3_bucket, "eval-models", "tiny")
    storage.copy_dir(str(tiny_model), model_uri)
    assert describe_model(model_uri) == ModelInfo(model_uri, "full", None)
    loaded, _, info = load_model(model_uri)
    assert info.path == model_uri
    ids = torch.tensor([tiny[1]("The Work")["input_ids"]])
    with torch.inference_mode():
        assert torch.equal(loaded(input_ids=ids).logits, tiny[0](input_ids=ids).logits)

    torch.manual_seed(0)
    peft_cfg = LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
    get_peft_model(load_model(tiny_model)[0], peft_cfg).save_pretrained(tmp_path / "adapter")
    adapter_uri = storage.join(s3_bucket, "eval-models", "adapter")
    storage.copy_dir(str(tmp_path / "adapter"), adapter_uri)
    info = describe_model(adapter_uri, adapter_base=model_uri)
    assert (info.kind, info.base) == ("adapter", model_uri)  # a base in the bucket too
    assert load_model(adapter_uri, adapter_base=model_uri)[2] == info
    missing = storage.join(s3_bucket, "eval-models", "nope")
    with pytest.raises(EvalDataError, match=f"base_model={missing} is neither.*nothing exists"):
        describe_model(missing, key="base_model")
