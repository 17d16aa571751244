"""LLaMA-Factory training keys that map onto raylm knobs (issue 14): train_on_prompt,
mask_history, neftune_noise_alpha, default_system, label_smoothing_factor. Each is
checked for its mapping and for its effect on the tiny model's tokenizer or model,
through the path a train job takes (raw data tokenized by the driver, ``load_model``,
``lm_loss``), so a setting that were silently ignored fails here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from llamafactory_helpers import lf

from raylm.config import ConfigError, load
from raylm.data.tokenize import infer_seqlen, tokenize_sft
from raylm.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[2]
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello friend."},
    {"role": "user", "content": "More?"},
    {"role": "assistant", "content": "No more today."},
]


@pytest.fixture
def cfg(tiny_model: Path, tmp_path: Path):
    """The LoRA SFT config on the tiny model, training on a raw file of CHAT (twice)."""
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": CHAT}) + "\n" for _ in range(2)))

    def make(*overrides: str):
        files = [ROOT / "conf/train/sft_lora.yaml"]
        base = [f"model.name_or_path={tiny_model}", f"data.path={data}", "data.format=auto"]
        return load("train", files, [*base, *overrides])

    return make


def raw_rows(cfg) -> list[dict]:
    """What the train job's driver tokenizes from raw data (``raylm.train.data``)."""
    from raylm.train.data import _tokenize_raw, data_inputs

    return _tokenize_raw(cfg, data_inputs(cfg))


def targets(tok, row: dict) -> str:
    return tok.decode([i for i, m in zip(row["input_ids"], row["loss_mask"], strict=True) if m])


def test_the_keys_map_and_no_longer_refuse(tmp_path: Path) -> None:
    c = load("train", [lf(tmp_path, train_on_prompt=True, neftune_noise_alpha=5,
                          default_system="Be kind.", label_smoothing_factor="0.1")])  # fmt: skip
    assert (c.loss.train_on_prompt, c.loss.mask_history, c.loss.label_smoothing) == (
        True, False, 0.1,
    )  # fmt: skip
    assert (c.train.neftune_noise_alpha, c.model.default_system) == (5.0, "Be kind.")
    assert load("train", [lf(tmp_path, mask_history="true")]).loss.mask_history
    with pytest.raises(ConfigError, match="LLaMA-Factory refuses the pair"):
        load("train", [lf(tmp_path, train_on_prompt=True, mask_history=True)])
    with pytest.raises(ConfigError, match="sft loss masks; not for stage dpo"):
        load("train", [lf(tmp_path, stage="dpo", mask_history=True)])
    with pytest.raises(ConfigError, match=r"label_smoothing with stage sft, loss\.type dft"):
        load("train", [lf(tmp_path, label_smoothing_factor=0.1, use_dft_loss=True)])
    with pytest.raises(ConfigError, match="reasoning of the earlier replies"):
        load("train", [lf(tmp_path, template="qwen3", mask_history=True)])


# ---- train_on_prompt / mask_history: the sft masks ---------------------------------------


def test_train_on_prompt_trains_every_token_of_the_raw_rows(cfg, tiny_model: Path) -> None:
    tok = load_tokenizer(str(tiny_model))
    (plain, _), (prompt, _) = raw_rows(cfg()), raw_rows(cfg("loss.train_on_prompt=true"))
    assert targets(tok, plain) == "Hello friend.<|im_end|>No more today.<|im_end|>"
    assert prompt["input_ids"] == plain["input_ids"]
    assert all(prompt["loss_mask"]) and sum(prompt["loss_mask"]) > 2 * sum(plain["loss_mask"])


def test_mask_history_trains_the_last_reply_of_the_raw_rows(cfg, tiny_model: Path) -> None:
    tok = load_tokenizer(str(tiny_model))
    row = raw_rows(cfg("loss.mask_history=true"))[0]
    assert targets(tok, row) == "No more today.<|im_end|>"
    assert tok.decode(row["input_ids"]) == tok.apply_chat_template(CHAT, tokenize=False)


def lf_mask_history(tok, cutoff: int) -> tuple[list[int], list[int]]:
    """LLaMA-Factory's ``SupervisedDatasetProcessor._encode_data_example`` with
    mask_history, on (prompt, reply) pairs of ChatML ids: pairs last first, each cut by
    ``infer_seqlen``; the reply of the last pair only labelled (1 here, -100 as 0)."""
    im = "<|im_start|>{}\n{}<|im_end|>\n"
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    pairs = [(enc(im.format("system", "Be brief.") + im.format("user", "Hi there")
                  + "<|im_start|>assistant\n"), enc("Hello friend.<|im_end|>\n")),
             (enc(im.format("user", "More?") + "<|im_start|>assistant\n"),
              enc("No more today.<|im_end|>\n"))]  # fmt: skip
    ids, labels, total = [], [], 0
    for turn, (source, target) in enumerate(reversed(pairs)):
        if total >= cutoff:
            break
        n_src, n_tgt = infer_seqlen(len(source), len(target), cutoff - total)
        source, target = source[:n_src], target[:n_tgt]
        total += n_src + n_tgt
        ids = source + target + ids
        labels = [0] * n_src + [int(turn == 0)] * n_tgt + labels
    return ids, labels


@pytest.mark.parametrize("cutoff", [12, 20, 28, 40, 1000])
def test_mask_history_cuts_earlier_turns_first_as_llamafactory(tiny_model: Path, cutoff) -> None:
    tok = load_tokenizer(str(tiny_model))
    out = tokenize_sft(CHAT, tok, cutoff, mask_history=True)
    want_ids, want_labels = lf_mask_history(tok, cutoff)
    assert out["input_ids"] == want_ids
    last_reply = [i for i, m in zip(want_ids, want_labels, strict=True) if m]
    assert targets(tok, out) == tok.decode(last_reply).removesuffix("\n")  # raylm: no "\n"
    if cutoff < 1000:  # the default cut keeps the front: the last reply is lost
        plain = tokenize_sft(CHAT, tok, cutoff)
        assert "No more" not in targets(tok, plain) and "No more" in targets(tok, out)


def test_shards_refuse_settings_only_raw_data_carries(cfg) -> None:
    from raylm.train.data import check_dataset

    def check(c) -> None:
        c.loss.raw_only(c.model.default_system, "data.path='shards'")

    check(cfg())
    for key in ("loss.train_on_prompt=true", "loss.mask_history=true", "model.default_system=x"):
        with pytest.raises(ConfigError, match=f"without {key.split('=')[0]}, which act"):
            check(cfg(key))
        with pytest.raises(ConfigError, match="tokenized shards"):  # the train job's check
            check_dataset(None, cfg(key), "shards")  # type: ignore[arg-type]


def test_tokenized_sets_record_the_masks_and_system(cfg) -> None:
    from raylm.train.tokenized import settings

    made = settings(cfg("loss.mask_history=true", "model.default_system=x"))
    assert (made["mask_history"], made["train_on_prompt"], made["default_system"]) == (
        True, False, "x",
    )  # fmt: skip


# ---- default_system ---------------------------------------------------------------------


def test_default_system_in_the_raw_rows_and_the_saved_template(cfg, tiny_model: Path) -> None:
    from raylm.train.model import load_tokenizer as run_tokenizer

    no_system = CHAT[1:3]
    c = cfg("model.default_system=Answer in French.")
    tok = run_tokenizer(c)
    text = tok.decode(raw_rows(c)[0]["input_ids"])
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")  # its own kept
    rendered = tok.apply_chat_template(no_system, tokenize=False)
    assert rendered.startswith("<|im_start|>system\nAnswer in French.<|im_end|>\n<|im_start|>user")
    empty = [{"role": "system", "content": ""}, *no_system]
    assert tok.apply_chat_template(empty, tokenize=False) == rendered
    plain = run_tokenizer(cfg()).apply_chat_template(no_system, tokenize=False)
    assert "French" not in plain and plain == rendered.split("<|im_end|>\n", 1)[1]
    # final/ saves this tokenizer: the default travels with the chat template
    assert "Answer in French." in tok.chat_template


def test_default_system_replaces_a_named_templates_default(tiny_model: Path) -> None:
    chat = CHAT[1:3]
    alpaca = load_tokenizer(str(tiny_model), "alpaca").apply_chat_template(chat, tokenize=False)
    assert alpaca.startswith("Below is an instruction")
    mine = load_tokenizer(str(tiny_model), "alpaca", "Be terse.\n\n")
    assert mine.apply_chat_template(chat, tokenize=False).startswith("Be terse.\n\n### Instr")
    cleared = load_tokenizer(str(tiny_model), "alpaca", "")
    assert cleared.apply_chat_template(chat, tokenize=False).startswith("### Instruction")
    with pytest.raises(ConfigError, match=r"model\.default_system=''"):
        load("train", [ROOT / "conf/train/sft_lora.yaml"], ["model.default_system=''"])


# ---- neftune_noise_alpha ----------------------------------------------------------------


def test_neftune_noise_while_training_only(cfg) -> None:
    from raylm.train.model import load_model
    from raylm.train.neftune import input_embeddings

    ids = torch.tensor([[1, 17, 40, 99, 301, 7, 1200, 5]])
    for overrides in (["finetuning_type=full"], []):  # full, and under a PEFT wrapper
        plain = load_model(cfg(*overrides))
        noisy = load_model(cfg("train.neftune_noise_alpha=5", *overrides))
        emb = input_embeddings(noisy)
        clean = torch.nn.functional.embedding(ids, emb.weight)
        a, b = emb(ids), emb(ids)
        bound = 5 / (ids.shape[1] * clean.shape[-1]) ** 0.5
        assert not torch.equal(a, b) and 0 < (a - clean).abs().max() <= bound
        assert (a - clean).abs().max() > bound / 2  # uniform over the whole range
        with torch.no_grad():
            assert not torch.equal(noisy(ids).logits, plain(ids).logits)
            noisy.eval(), plain.eval()
            assert torch.equal(emb(ids), clean)
            assert torch.allclose(noisy(ids).logits, plain(ids).logits)
        assert not hasattr(input_embeddings(plain), "neftune_noise_alpha")
        assert set(noisy.state_dict()) == set(plain.state_dict())  # nothing saved


# ---- label_smoothing_factor -------------------------------------------------------------


def test_label_smoothing_is_transformers_label_smoother(tiny_model: Path) -> None:
    from transformers import AutoModelForCausalLM
    from transformers.trainer_pt_utils import LabelSmoother

    from raylm.train import objectives as obj
    from raylm.train.config_methods import LossConfig

    tok = load_tokenizer(str(tiny_model))
    rows = [tokenize_sft(CHAT, tok, None), tokenize_sft(CHAT[1:3], tok, None)]
    batch = obj.collate(rows, "", tok.pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model)).eval()
    with torch.no_grad():  # sharper than the random init's near-uniform next-token guesses
        model.get_output_embeddings().weight.mul_(30)
    labels = batch["input_ids"].masked_fill(batch["loss_mask"] == 0, -100)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        want = LabelSmoother(epsilon=0.1)({"logits": logits}, labels, shift_labels=True)
        got, n = obj.lm_loss(model, batch, LossConfig(label_smoothing=0.1))
        ce, _ = obj.lm_loss(model, batch, LossConfig())
    assert n == int((labels[:, 1:] != -100).sum())
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, ce, atol=1e-2)
    assert torch.allclose(obj.lm_loss(model, batch, LossConfig(label_smoothing=0.0))[0], ce)
