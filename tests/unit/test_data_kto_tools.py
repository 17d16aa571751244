"""LLaMA-Factory's KTO feedback data and tool-call data through the data job's steps
(parse -> normalise -> filters -> PII -> sign -> tokenize): nothing is lost, and the
tokenized rows are exactly the train job's raw-path rows for the same records."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
from llamafactory_helpers import LF, TOOLS_TEMPLATE

from raylm.data import pipeline, shards, steps
from raylm.data.config import DataJobConfig, FilterConfig, PiiConfig, TokenizeConfig
from raylm.data.sources import registry_sources

REGISTRY = str(LF / "data" / "dataset_info.json")
CUTOFF = 2048
# Nothing that rewrites text: then the data job must hand the tokenizer what the train job does.
NO_FILTERS = DataJobConfig(inputs=["x"], filters=FilterConfig(enabled=False))
AS_IS = {"filters": FilterConfig(enabled=False, nfkc=False), "pii": PiiConfig(enabled=False)}


@pytest.fixture(scope="module")
def tools_tokenizer(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny model's tokenizer with a template that renders tools, as a directory."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("tools_tok")
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = TOOLS_TEMPLATE
    tok.save_pretrained(out)
    return str(out)


def _demo(name: str):
    from raylm.data.rows import records

    (src,) = registry_sources(REGISTRY, [name])
    return src, [r for _, r in records(src)]


def _rows(src, records: list) -> list[dict]:
    """Records as the data job's readers hand them to the steps."""
    return [
        {"id": f"{src.name}:{i}", "source": src.name, "raw": json.dumps(r), "error": "",
         "fmt": src.fmt, "columns": json.dumps(src.columns), "nbytes": len(json.dumps(r))}
        for i, r in enumerate(records, 1)
    ]  # fmt: skip


def _data_job(src, records, kind: str, tokenizer: str, template: str | None = None, **cfg):
    """The rows out of the data job's steps, and its tokenized batch of the kept ones."""
    tokenize = TokenizeConfig(enabled=True, tokenizer=tokenizer, template=template,
                              cutoff_len=CUTOFF)  # fmt: skip
    job = DataJobConfig(inputs=["x"], tokenize=tokenize, **cfg)
    out, counts = steps.process_rows(_rows(src, records), job, kind)
    kept = [r for r in out if not r["status"]]
    batch = pa.table({"id": [r["id"] for r in kept], "doc": [r["doc"] for r in kept]})
    return out, counts, shards.tokenize_batch(job)(batch).to_pylist()


def test_tool_call_rows_are_the_train_jobs_rows(tools_tokenizer: str) -> None:
    from raylm.tokenizer import load_tokenizer
    from raylm.train.data import tokenize_record

    src, records = _demo("glaive_toolcall_en_demo")
    out, counts, rows = _data_job(src, records, "sft", tools_tokenizer, **AS_IS)
    assert counts["parse"].get("quarantined", 0) == 0 and len(rows) == len(records) == 300
    tok = load_tokenizer(tools_tokenizer)
    calls = 0
    for record, row in zip(records, rows, strict=True):
        want = tokenize_record(record, src, "sft", tok, CUTOFF)
        assert row["input_ids"] == want["input_ids"] and row["loss_mask"] == want["loss_mask"]
        calls += "function_call" in json.dumps(record)
    assert calls > 100  # most of the demo calls a tool
    doc = json.loads(out[0]["doc"])
    assert doc["tools"] and any(m.get("tool_calls") for m in doc["messages"])
    text = tok.decode(rows[0]["input_ids"])
    assert '"name": "search_recipes"' in text and "<tool_call>" in text  # schema and call


def test_tools_survive_normalisation_pii_and_the_default_filters(tools_tokenizer: str) -> None:
    """With everything on, the tool schemas stay, and PII inside a call's arguments is
    scrubbed like PII anywhere else (the JSON stays valid)."""
    src, records = _demo("glaive_toolcall_en_demo")
    record = {
        "conversations": [
            {"from": "human", "value": "Please e-mail the report to my boss."},
            {"from": "function_call", "value": json.dumps(
                {"name": "send_email", "arguments": {"to": "boss@example.com",
                                                     "body": "Ｒeport attached"}})},
            {"from": "observation", "value": '{"status": "sent"}'},
            {"from": "gpt", "value": "Done: the report is on its way to your boss."},
        ],
        "tools": json.dumps([{"name": "send_email", "description": "Send an e-mail",
                              "parameters": {"type": "object", "properties": {
                                  "to": {"type": "string"}, "body": {"type": "string"}}}}]),
    }  # fmt: skip
    filters = FilterConfig(max_dup_line_fraction=1.0, max_top_ngram_fraction=1.0,
                           max_dup_ngram_fraction=1.0, max_symbol_ratio=1.0)  # fmt: skip
    out, _, rows = _data_job(src, [*records, record], "sft", tools_tokenizer, filters=filters)
    kept = {r["id"]: json.loads(r["doc"]) for r in out if not r["status"]}
    with_tools = {
        f"{src.name}:{i}" for i, r in enumerate(records, 1) if json.loads(r["tools"] or "[]")
    }
    assert len(with_tools) == 191 and all(kept[i]["tools"] for i in with_tools if i in kept)
    assert len(kept) >= 290, [r["status"] for r in out if r["status"]]
    mine = kept[f"{src.name}:{len(records) + 1}"]
    (call,) = mine["messages"][1]["tool_calls"]
    assert call["function"] == {
        "name": "send_email",
        "arguments": {"to": "<EMAIL>", "body": "Report attached"},
    }
    assert mine["tools"][0]["function"]["name"] == "send_email"
    assert out[-1]["pii_email"] == 1
    assert len(rows) == len(kept)


def test_kto_records_parse_and_tokenize_as_the_train_job_does(tiny_model: Path) -> None:
    from raylm.data.tokenize import with_kl_rows
    from raylm.tokenizer import load_tokenizer
    from raylm.train.data import tokenize_record

    src, records = _demo("kto_en_demo")
    assert pipeline.decide_kind(DataJobConfig(inputs=["x"]), [src]) == "kto"
    _, counts, rows = _data_job(src, records, "kto", str(tiny_model), "qwen3_nothink", **AS_IS)
    assert counts["parse"].get("quarantined", 0) == 0 and len(rows) == 300
    tok = load_tokenizer(str(tiny_model), "qwen3_nothink")
    want = [tokenize_record(r, src, "kto", tok, CUTOFF) for r in records]
    assert [{k: row[k] for k in ("input_ids", "loss_mask", "kto_label")} for row in rows] == want
    assert [row["kto_label"] for row in rows] == [r["label"] for r in records]
    # The KL pairs the shards get are the ones the train job builds for raw rows.
    table = shards.kl_batch(CUTOFF)(pa.Table.from_pylist(rows)).to_pylist()
    paired = with_kl_rows(want, CUTOFF)
    assert [(r["kl_input_ids"], r["kl_loss_mask"]) for r in table] == [
        (r["kl_input_ids"], r["kl_loss_mask"]) for r in paired
    ]
    # A KTO record without its boolean label is no KTO example: quarantined, named.
    bad, _, _ = _data_job(src, [{**records[0], "label": "yes"}], "kto", str(tiny_model),
                          "qwen3_nothink")  # fmt: skip
    assert bad[0]["status"] == "quarantine:malformed: record is sft data but this job is kto"


def test_dedup_key_is_the_whole_example_with_its_label() -> None:
    src, records = _demo("kto_en_demo")
    good = {**records[0], "label": True}
    same, flipped = dict(good), {**good, "label": False}
    out, _ = steps.process_rows(_rows(src, [good, same, flipped]), NO_FILTERS,
                                "kto")  # fmt: skip
    assert out[0]["exact_hash"] == out[1]["exact_hash"] != out[2]["exact_hash"]
    a, c = (set(pa.py_buffer(out[i]["shingles"]).to_pybytes()[k : k + 8]
                for k in range(0, len(out[i]["shingles"]), 8)) for i in (0, 2))  # fmt: skip
    assert a and c and not a & c  # fuzzy dedup never sees the two labels as near-duplicates
    # Tool calls are part of the example: other arguments, another example.
    src, records = _demo("glaive_toolcall_en_demo")
    record = next(r for r in records if "function_call" in json.dumps(r))
    turns = [dict(t) for t in record["conversations"]]
    call = next(t for t in turns if t["from"] == "function_call")
    call["value"] = call["value"].replace('"arguments": {"', '"arguments": {"x": 1, "')
    out, _ = steps.process_rows(_rows(src, [record, {**record, "conversations": turns}]),
                                NO_FILTERS, "sft")  # fmt: skip
    assert out[0]["exact_hash"] != out[1]["exact_hash"]
