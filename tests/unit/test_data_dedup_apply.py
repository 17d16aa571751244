"""Applying dedup's verdicts block by block: the text never enters dedup's shuffles, each
block drops exactly its removed ids, and one record is kept per removed id."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa

from raylm.data import dedup_apply
from raylm.data.blocks import unique_values
from raylm.data.steps import PROCESSED_SCHEMA


def _block(rows: list[tuple[str, str, str]]) -> pa.Table:
    """Processed rows (id, status, doc) with the other columns null."""
    cols = {name: pa.nulls(len(rows), field.type) for name, field in
            zip(PROCESSED_SCHEMA.names, PROCESSED_SCHEMA, strict=True)}  # fmt: skip
    for i, name in enumerate(("id", "status", "doc")):
        cols[name] = pa.array([r[i] for r in rows], pa.string())
    return pa.table(cols, schema=PROCESSED_SCHEMA)


def test_dedup_input_carries_no_text_and_sortable_ids() -> None:
    block = _block([("a.jsonl:10", "", "ten"), ("a.jsonl:9", "filter:short", "x")])
    out = dedup_apply._dedup_input(block)
    assert "doc" not in out.column_names and "raw" not in out.column_names
    assert out.num_rows == 1  # the filtered row is not a dedup candidate
    assert out["id"][0].as_py() == dedup_apply.sort_key("a.jsonl:10")


def test_kept_docs_drops_exactly_the_removed_ids_in_input_order() -> None:
    block = _block([("f:1", "", "one"), ("f:2", "", "two"), ("f:3", "quarantine:json", ""),
                    ("f:4", "", "four"), ("f:10", "", "ten")])  # fmt: skip
    removals = [
        pa.table({"id": ["f:2"], "dup_of": ["f:1"], "method": ["exact"]}),
        dedup_apply.REMOVAL_SCHEMA.empty_table(),
        pa.table({"id": ["f:10", "g:7"], "dup_of": ["f:4", "g:1"], "method": ["fuzzy"] * 2}),
    ]
    kept = dedup_apply._kept_docs(block, unique_values("id")(*removals))
    assert kept.to_pydict() == {"id": ["f:1", "f:4"], "doc": ["one", "four"]}
    assert dedup_apply._kept_docs(block).column("id").to_pylist() == ["f:1", "f:2", "f:4", "f:10"]


def test_one_record_per_removed_id_exact_first_with_original_ids() -> None:
    key = dedup_apply.sort_key
    df = pd.DataFrame(
        {"id": [key("f:9"), key("f:9"), key("f:12")], "dup_of": [key("f:3"), key("f:1"), key("f:2")],
         "method": ["fuzzy", "exact", "fuzzy"]}
    )  # fmt: skip
    out = dedup_apply._removal_records(pa.Table.from_pandas(dedup_apply._one_per_id(df)))
    assert out.schema == dedup_apply.REMOVAL_SCHEMA
    rows = sorted(out.to_pylist(), key=lambda r: r["id"])
    assert rows == [{"id": "f:12", "dup_of": "f:2", "method": "fuzzy"},
                    {"id": "f:9", "dup_of": "f:1", "method": "exact"}]  # fmt: skip
    empty = pa.Table.from_pandas(df.iloc[:0].astype(object))
    assert dedup_apply._removal_records(empty).schema == dedup_apply.REMOVAL_SCHEMA
