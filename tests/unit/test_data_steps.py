"""The per-record steps: quarantine reasons, PII inside conversations, and each step's counts."""

from __future__ import annotations

import json

from raylm.data import steps
from raylm.data.config import DataJobConfig, FilterConfig


def _row(raw: str, fmt: str = "auto", ident: str = "f:1", error: str = "") -> dict:
    return {
        "id": ident,
        "source": ident,
        "raw": raw,
        "error": error,
        "fmt": fmt,
        "columns": "{}",
        "nbytes": len(raw),
    }


def _process(raw: str, fmt: str = "auto", kind: str = "sft", **cfg) -> dict:
    [out], _ = steps.process_rows([_row(raw, fmt)], DataJobConfig(inputs=["x"], **cfg), kind)
    return out


def test_processing_quarantines_malformed_records_with_reasons() -> None:
    good = json.dumps({"instruction": "Say hi to the people", "output": "Hello there, people!"})
    assert _process(good)["status"] == ""
    assert _process('{"instruction": ')["status"].startswith("quarantine:bad JSON")
    assert "missing field 'output'" in _process('{"instruction": "x"}')["status"]
    assert "this job is sft" in _process(json.dumps({"text": "plain"}), kind="sft")["status"]
    assert "must be a string" in _process('{"text": 5}', fmt="text", kind="pt")["status"]
    assert "missing id column" in _process(good, id_column="uid")["status"]
    assert (
        _process(
            json.dumps({"uid": 7, "instruction": "Say hi to all", "output": "Hi all of you"}),
            id_column="uid",
        )["id"]
        == "7"
    )


def test_processing_scrubs_pii_inside_conversations() -> None:
    raw = json.dumps(
        {
            "messages": [
                {"role": "user", "content": "mail me at bob@example.com please"},
                {"role": "assistant", "content": "I will write to you at bob@example.com soon."},
            ]
        }
    )
    out = _process(raw)
    assert out["pii_email"] == 2 and "bob@" not in out["doc"]


def test_a_record_that_looks_like_two_formats_reads_as_the_jobs_kind() -> None:
    both = json.dumps({"text": "A document about rivers and lakes.", "instruction": "unused"})
    assert _process(both, kind="pt")["status"] == ""
    assert json.loads(_process(both, kind="pt")["doc"]) == {
        "text": "A document about rivers and lakes."
    }


def test_each_step_counts_what_it_did_and_the_counts_add_up() -> None:
    docs = [
        "A plain document about rivers, written by ann@example.org for the test.",
        "Ｆｕｌｌ width letters become plain ones after normalisation here.",
        "short",
    ]
    rows = [_row(json.dumps({"text": d}), ident=f"f:{i}") for i, d in enumerate(docs, 1)]
    rows += [_row('{"text": ', ident="f:4"), _row("", ident="f:5", error="undecodable bytes")]
    cfg = DataJobConfig(inputs=["x"], filters=FilterConfig(min_words=3))
    out, counts = steps.process_rows(rows, cfg, "pt")
    assert counts["parse"] == {"documents": 5, "bytes": sum(r["nbytes"] for r in rows),
                               "quarantined": 2}  # fmt: skip
    assert counts["normalise"] == {"changed": 1}
    assert counts["filter"] == {"min_words": 1}
    assert counts["pii"]["email"] == 1 and set(counts["pii"]) == set(steps.PII_KINDS)
    assert counts["sign"] == {"signed": 2}
    kept = [r for r in out if not r["status"]]
    assert len(kept) == 2 and all(r["exact_hash"] and r["sig"] for r in kept)
    assert [r["status"].split(":")[0] for r in out] == [
        "",
        "",
        "filter",
        "quarantine",
        "quarantine",
    ]
    total = steps.sum_stats([counts, counts])
    assert total["parse"]["documents"] == 10 and total["filter"]["min_words"] == 2
