"""LLaMA-Factory's demo data (tests/assets/llamafactory/data, copied from LLaMA-Factory
ff6d4d12e) through the train job's one data path: several datasets and their counts,
reading by stage, tool calls through the chat template, KTO's tag."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from llamafactory_helpers import LF, TOOLS_TEMPLATE, example, lf

from raylm import config
from raylm.config import ConfigError

# ---- the demo data, through the train job's one data path ---------------------------------


def demo(name: str):
    """The registry's source for one demo dataset, and its records."""
    from raylm.data.rows import records
    from raylm.data.sources import registry_sources

    (src,) = registry_sources(str(LF / "data" / "dataset_info.json"), [name])
    return src, list(records(src))


def test_identity_and_alpaca_demo_train_rows_and_counts(
    tmp_path: Path, tiny_model: Path, workspace: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from raylm.tokenizer import load_tokenizer
    from raylm.train.data import STATS, _tokenize_raw, data_inputs, write_stats

    path = example("train_lora/qwen3_lora_sft.yaml", tmp_path, tiny_model)
    overrides = ["data.max_samples=40", "data.val_size=0.1", "data.cutoff_len=256",
                 "data.replacements.name=Raylm"]  # fmt: skip
    cfg = config.load("train", [path], overrides)
    source = data_inputs(cfg)
    with caplog.at_level(logging.WARNING):
        rows = _tokenize_raw(cfg, source)
    stats = source["stats"]
    by = {c["dataset"]: c for c in stats["datasets"]}
    assert [(c["in"], c["out"], c["removed"]["max_samples"]) for c in by.values()] == [
        (91, 40, 51), (999, 40, 959),
    ]  # fmt: skip
    assert all(c["train_rows"] + c["held_out_rows"] == 40 for c in by.values())
    assert (stats["held_out_rows"], stats["train_rows"], len(rows)) == (8, 72, 72)
    assert stats["accounting_ok"] and not stats["held_out_evaluated"]  # eval_strategy unset
    held = source["held_out"]  # tokenized for the workers all the same
    assert len(held) == 8 and all(r["id"].startswith("eval-") and r["input_ids"] for r in held)
    assert "dataset 'identity' holds placeholders {{author}}" in caplog.text
    assert "8 examples held out" in caplog.text
    tok = load_tokenizer(str(tiny_model), "qwen3_nothink")
    texts = [tok.decode(r["input_ids"]) for r in rows]
    assert any("I am Raylm" in t for t in texts) and not any("{{name}}" in t for t in texts)
    (tmp_path / "saves" / "run").mkdir(parents=True)
    written = json.loads(Path(write_stats(cfg, stats)).read_text())
    assert written == stats and Path(tmp_path / "saves" / "run" / STATS).is_file()


def test_pretrain_and_dpo_demo_read_by_stage(
    tmp_path: Path, tiny_model: Path, workspace: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from raylm.train.data import _tokenize_raw, data_inputs

    with caplog.at_level(logging.WARNING):
        pt = config.load("train", [example("train_lora/qwen3_lora_pretrain.yaml", tmp_path,
                                           tiny_model)], ["data.max_samples=3"])  # fmt: skip
    assert "LLaMA-Factory packs documents" in caplog.text
    rows = _tokenize_raw(pt, data_inputs(pt))
    assert len(rows) == 3 and all(len(r["input_ids"]) > 10 for r in rows)
    dpo = config.load("train", [example("train_lora/qwen3_lora_dpo.yaml", tmp_path, tiny_model)],
                      ["data.max_samples=3", "data.cutoff_len=128"])  # fmt: skip
    rows = _tokenize_raw(dpo, data_inputs(dpo))
    assert len(rows) == 3 and {"chosen_input_ids", "rejected_input_ids"} <= set(rows[0])
    sft_on_pairs = config.load("train", [example("train_lora/qwen3_lora_dpo.yaml", tmp_path,
                                                 tiny_model)], ["stage=sft"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"dataset 'dpo_en_demo' is dpo data .* but stage='sft'"):
        data_inputs(sft_on_pairs)


def test_tool_calls_render_through_the_chat_template(tiny_model: Path) -> None:
    from raylm.tokenizer import load_tokenizer
    from raylm.train.data import tokenize_record

    src, records = demo("glaive_toolcall_en_demo")
    record = next(r for _, r in records if "function_call" in json.dumps(r))
    tok = load_tokenizer(str(tiny_model))  # its template knows no tools
    with pytest.raises(ConfigError, match=r"dataset 'glaive_toolcall_en_demo' has tool calls, "
                       r"but the chat template of the tokenizer cannot render them \(it drops "
                       r"tool 'search_recipes'\)"):  # fmt: skip
        tokenize_record(record, src, "sft", tok, 2048)
    named = load_tokenizer(str(tiny_model), "qwen3_nothink")
    with pytest.raises(ConfigError, match=r"chat template 'qwen3_nothink' cannot render them: "
                       r".*tool definitions are not supported"):  # fmt: skip
        tokenize_record(record, src, "sft", named, 2048, "'qwen3_nothink'")
    tok.chat_template = TOOLS_TEMPLATE
    row = tokenize_record(record, src, "sft", tok, 2048)
    text = tok.decode(row["input_ids"])
    assert '{"type": "function", "function": {"name": "search_recipes"' in text  # tools
    assert '<tool_call>\n{"name": "search_recipes", "arguments": {"ingredients"' in text
    assert '<tool_response>\n{"recipes": [' in text
    trained = tok.decode([t for t, m in zip(row["input_ids"], row["loss_mask"], strict=True) if m])
    assert "I found two recipes for you" in trained and "<tool_response>" not in trained
    assert '<tool_call>\n{"name": "search_recipes"' in trained  # the call is the model's to make


def test_kto_tag_is_kept_in_the_rows(tmp_path: Path, tiny_model: Path, workspace: Path) -> None:
    from raylm.tokenizer import load_tokenizer
    from raylm.train.data import COLUMNS, _tokenize_raw, data_inputs, tokenize_record

    src, records = demo("kto_en_demo")
    tok = load_tokenizer(str(tiny_model), "qwen3_nothink")
    sample = records[:12]
    rows = [tokenize_record(r, src, "kto", tok, 256) for _, r in sample]
    assert [row["kto_label"] for row in rows] == [r["label"] for _, r in sample]
    assert {True, False} <= {row["kto_label"] for row in rows}
    assert all(set(COLUMNS["kto"]) <= set(row) for row in rows)
    cfg = config.load(
        "train", [lf(tmp_path, dataset="kto_en_demo", model_name_or_path=str(tiny_model))]
    )
    with pytest.raises(ConfigError, match=r"dataset 'kto_en_demo' is KTO feedback data .* but "
                       r"stage='sft'; train it with stage kto"):  # fmt: skip
        data_inputs(cfg)
    kto = config.load("train", [example("train_lora/qwen3_lora_kto.yaml", tmp_path, tiny_model)],
                      ["data.max_samples=6", "data.cutoff_len=256"])  # fmt: skip
    rows = _tokenize_raw(kto, data_inputs(kto))  # with KTO's mismatched pairs (KL rows)
    assert len(rows) == 6 and all({"kl_input_ids", "kl_loss_mask", "kto_label"} <= set(r)
                                  for r in rows)  # fmt: skip
