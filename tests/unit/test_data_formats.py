"""Format normalisation and the tokenization/packing contract the train job reads."""

from __future__ import annotations

import json

import pytest

from raylm.data.formats import detect_format, to_messages, to_preference, to_text
from raylm.data.tokenize import pack, tokenize_preference, tokenize_pt, tokenize_sft


def test_alpaca_with_input_system_and_history() -> None:
    rec = {
        "instruction": "Translate",
        "input": "bonjour",
        "output": "hello",
        "system": "You translate.",
        "history": [["hi", "hey"]],
    }
    assert to_messages(rec, "alpaca") == [
        {"role": "system", "content": "You translate."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hey"},
        {"role": "user", "content": "Translate\nbonjour"},
        {"role": "assistant", "content": "hello"},
    ]


def test_sharegpt_and_openai_agree() -> None:
    share = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    oai = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    assert to_messages(share, "sharegpt") == to_messages(oai, "openai")


def test_columns_mapping_renames_fields() -> None:
    rec = {"q": "why", "a": "because"}
    msgs = to_messages(rec, "alpaca", {"prompt": "q", "response": "a"})
    assert msgs[-1] == {"role": "assistant", "content": "because"}


@pytest.mark.parametrize(
    ("record", "fmt", "needle"),
    [
        ({"instruction": "x"}, "alpaca", "'output'"),
        ({"instruction": 3, "output": "y"}, "alpaca", "must be a string"),
        ({"conversations": [{"from": "alien", "value": "x"}]}, "sharegpt", "not a known role"),
        ({"messages": [{"role": "user", "content": "x"}]}, "openai", "end with an assistant"),
        ({"messages": "nope"}, "openai", "non-empty list"),
        ({"text": "x"}, "sharegpt", "missing field 'conversations'"),
    ],
)
def test_malformed_records_name_the_field(record: dict, fmt: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        to_messages(record, fmt)


def test_sharegpt_tags_name_the_role_values() -> None:
    """LLaMA-Factory's ``tags`` (merged into columns by the registry reader) rename the
    role key and the role values."""
    rec = {"conv": [{"who": "customer", "says": "q"}, {"who": "agent", "says": "a"}]}
    cols = {"messages": "conv", "role_tag": "who", "content_tag": "says",
            "user_tag": "customer", "assistant_tag": "agent"}  # fmt: skip
    assert to_messages(rec, "sharegpt", cols) == [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    ]
    with pytest.raises(ValueError, match="'agent' is not a known role"):
        to_messages(rec, "sharegpt", {**cols, "assistant_tag": "bot"})


def test_detect_format_prefers_the_jobs_kind() -> None:
    both = {"text": "doc", "instruction": "x", "output": "y"}
    assert detect_format(both, {}) == "alpaca"
    assert detect_format(both, {}, kind="pt") == "text"
    assert detect_format({"conv": []}, {"messages": "conv"}) == "sharegpt"
    assert detect_format({"q": "a", "good": "b", "bad": "c"},
                         {"chosen": "good", "rejected": "bad"}) == "preference"  # fmt: skip
    with pytest.raises(ValueError, match=r"cannot tell the record's format from its keys \['x'\]"):
        detect_format({"x": 1}, {})


def test_text_column_falls_back_to_a_registrys_prompt_column() -> None:
    """LLaMA-Factory registers pretraining sets as ``"columns": {"prompt": "content"}``."""
    assert to_text({"content": "doc"}, {"prompt": "content"}) == "doc"
    assert to_text({"body": "doc"}, {}, text_column="body") == "doc"
    assert to_text({"text": "doc", "body": "no"}, {"text": "text"}, text_column="body") == "doc"


def test_preference_shapes() -> None:
    prompt, chosen, rejected = to_preference({"prompt": "p", "chosen": "good", "rejected": "bad"})
    assert (prompt, chosen, rejected) == ([{"role": "user", "content": "p"}], "good", "bad")
    hh = {
        "chosen": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "good"}],
        "rejected": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "bad"}],
    }
    assert to_preference(hh) == ([{"role": "user", "content": "p"}], "good", "bad")
    with pytest.raises(ValueError, match="'rejected'"):
        to_preference({"prompt": "p", "chosen": "good"})


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import PreTrainedTokenizerFast

    from raylm.models.tiny import TinySpec, train_tokenizer

    tok = train_tokenizer(TinySpec())
    assert isinstance(tok, PreTrainedTokenizerFast)
    return tok


def _masked_text(tok, out: dict, prefix: str = "") -> str:
    ids, mask = out[f"{prefix}input_ids"], out[f"{prefix}loss_mask"]
    return tok.decode([i for i, m in zip(ids, mask, strict=True) if m])


def test_sft_mask_covers_exactly_assistant_content_and_end_of_turn(tokenizer) -> None:
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello friend."},
        {"role": "user", "content": "More?"},
        {"role": "assistant", "content": "No."},
    ]
    out = tokenize_sft(msgs, tokenizer, None)
    assert _masked_text(tokenizer, out) == "Hello friend.<|im_end|>No.<|im_end|>"
    full = tokenizer.apply_chat_template(msgs, tokenize=False)
    assert tokenizer.decode(out["input_ids"]) == full
    short = tokenize_sft(msgs, tokenizer, 10)
    assert len(short["input_ids"]) == 10 and short["input_ids"] == out["input_ids"][:10]


def test_pt_appends_eos_and_trains_everything(tokenizer) -> None:
    out = tokenize_pt("some plain text", tokenizer, None)
    assert out["input_ids"][-1] == tokenizer.eos_token_id
    assert set(out["loss_mask"]) == {1}


def test_preference_masks_only_the_response(tokenizer) -> None:
    prompt = [{"role": "user", "content": "Pick one"}]
    out = tokenize_preference(prompt, "the good answer", "bad", tokenizer, None)
    assert _masked_text(tokenizer, out, "chosen_") == "the good answer<|im_end|>"
    assert _masked_text(tokenizer, out, "rejected_") == "bad<|im_end|>"
    n = len(tokenizer.apply_chat_template(prompt, add_generation_prompt=True))
    assert out["chosen_input_ids"][:n] == out["rejected_input_ids"][:n]


def test_pack_restarts_positions_and_never_overflows() -> None:
    examples = [
        {"id": str(i), "input_ids": [i] * n, "loss_mask": [1] * n}
        for i, n in enumerate([5, 3, 8, 2, 6, 1])
    ]
    rows = list(pack(examples, block_len=8))
    assert all(len(r["input_ids"]) <= 8 for r in rows)
    assert sorted(s for r in rows for s in r["source_ids"]) == [str(i) for i in range(6)]
    assert sum(len(r["input_ids"]) for r in rows) == 25
    for r in rows:
        starts = [p for p, pos in enumerate(r["position_ids"]) if pos == 0]
        assert len(starts) == len(r["source_ids"])
        assert len(r["loss_mask"]) == len(r["position_ids"]) == len(r["input_ids"])


# ---- LLaMA-Factory's tool calls, KTO tags and identity placeholders ------------------------


def test_sharegpt_function_calls_become_tool_calls_and_tools_are_wrapped() -> None:
    from raylm.data.formats import payload_kind, to_payload

    call = {"name": "search", "arguments": {"q": "rice"}}
    rec = {
        "conversations": [
            {"from": "human", "value": "find rice recipes"},
            {"from": "function_call", "value": json.dumps(call)},
            {"from": "observation", "value": '{"found": 2}'},
            {"from": "gpt", "value": "I found two."},
        ],
        "tools": json.dumps([{"name": "search", "parameters": {"type": "object"}}]),
    }
    payload = to_payload(rec, "sharegpt", {"messages": "conversations", "tools": "tools"}, "text")
    assert payload["messages"][1:3] == [
        {"role": "assistant", "content": "",
         "tool_calls": [{"type": "function", "function": call}]},
        {"role": "tool", "content": '{"found": 2}'},
    ]  # fmt: skip
    assert payload["tools"] == [
        {"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}
    ]
    assert payload_kind(payload) == "sft"
    rec["conversations"][1]["value"] = "search(rice)"
    with pytest.raises(ValueError, match="function_call turn 1 is not valid JSON"):
        to_payload(rec, "sharegpt", {"tools": "tools"}, "text")
    rec["conversations"] = rec["conversations"][:1] + rec["conversations"][2:]
    with pytest.raises(ValueError, match="turn 1 has role 'tool' but 'assistant' was expected"):
        to_payload(rec, "sharegpt", {}, "text")


def test_openai_tool_calls_pass_through() -> None:
    calls = [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]
    rec = {"messages": [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "content": "done"},
        {"role": "assistant", "content": "ok"},
    ]}  # fmt: skip
    assert to_messages(rec, "openai")[1] == {
        "role": "assistant",
        "content": "",
        "tool_calls": calls,
    }


def test_kto_tag_keeps_a_boolean_label() -> None:
    from raylm.data.formats import payload_kind, to_payload

    cols = {"messages": "messages", "kto_tag": "label"}
    turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    payload = to_payload({"messages": turns, "label": False}, "sharegpt", cols, "text")
    assert (payload["kto_label"], payload_kind(payload)) == (False, "kto")
    plain = to_payload({"messages": turns, "label": "no"}, "sharegpt", cols, "text")
    assert "kto_label" not in plain  # LLaMA-Factory tags only booleans


def test_placeholders_fill_every_string_and_report_the_rest() -> None:
    from raylm.data.formats import fill_placeholders

    rec = {"instruction": "Who are you?", "output": "I am {{name}}, by {{ author }}.",
           "history": [["hi {{name}}", "{{other}}"]], "n": 3}  # fmt: skip
    filled, left = fill_placeholders(rec, {"name": "Raylm"})
    assert filled["output"] == "I am Raylm, by {{ author }}."
    assert filled["history"] == [["hi Raylm", "{{other}}"]] and filled["n"] == 3
    assert left == {"author", "other"}
    assert fill_placeholders(rec, {"name": "R", "author": "A", "other": "O"})[1] == set()
