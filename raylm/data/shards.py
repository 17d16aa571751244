"""What the data job writes: shards (tokenized and packed, or cleaned records),
``dataset_meta.json``, the quarantine and the dedup removal records.

Shards are named ``part-<task>-<write id>.parquet``, the layout the train job globs for;
their row counts come back for ``stats.json``. Rows are written in row groups of
``ROW_GROUP_ROWS``: the unit the train job streams and shuffles (``raylm.train.stream``),
so a train worker's memory is bounded by a few row groups, whatever the corpus size.
``out`` is a local path or a bucket URI; Ray Data writes through its pyarrow filesystem.
"""

from __future__ import annotations

import json
from functools import cache
from typing import Any

import pyarrow as pa
import pyarrow.compute

from raylm import storage
from raylm.config import resolve_model
from raylm.data.config import DataJobConfig
from raylm.data.steps import QUARANTINE
from raylm.tokenizer import load_tokenizer, require_chat_template

ROW_GROUP_ROWS = 1024
"""Rows per Parquet row group of the shards (a train worker holds a few at a time)."""


def _target(out: str, sub: str) -> dict[str, Any]:
    """``path`` and ``filesystem`` arguments of a Ray Data write into ``out/sub``."""
    fs, path = storage.filesystem(storage.join(out, sub))
    return {"path": path, "filesystem": fs}


@cache
def _tokenizer(path: str, template: str | None) -> Any:
    """One tokenizer per worker process (``raylm.tokenizer.load_tokenizer``)."""
    return load_tokenizer(path, template)


def check_tokenizer(cfg: DataJobConfig, kind: str) -> None:
    """sft / dpo / kto need a chat template: a base tokenizer without one and no
    ``tokenize.template`` fails naming the key (call it as soon as the kind is known)."""
    if cfg.tokenize.enabled and cfg.tokenize.tokenizer:
        tok = _tokenizer(resolve_model(cfg.tokenize.tokenizer), cfg.tokenize.template)
        require_chat_template(tok, kind, "tokenize.template")


def tokenize_batch(cfg: DataJobConfig):
    """Token ids, loss masks and the counts that decide which examples are kept."""
    from raylm.data import tokenize as tk

    tokenizer = resolve_model(cfg.tokenize.tokenizer)  # here: tasks run in another cwd

    def fn(batch: pa.Table) -> pa.Table:
        tok = _tokenizer(tokenizer, cfg.tokenize.template)
        out: dict[str, list] = {"id": [], "n_loss": [], "n_tokens": []}
        for ident, doc in zip(
            batch.column("id").to_pylist(), batch.column("doc").to_pylist(), strict=True
        ):
            row = tk.tokenize_payload(json.loads(doc), tok, cfg.tokenize.cutoff_len)
            masks = [v for k, v in row.items() if k.endswith("loss_mask")]
            ids = [v for k, v in row.items() if k.endswith("input_ids")]
            out["id"].append(ident)
            out["n_loss"].append(min(sum(m) for m in masks))
            out["n_tokens"].append(sum(len(i) for i in ids))
            for key, value in row.items():
                out.setdefault(key, []).append(value)
        return _typed(out)

    return fn


def _typed(cols: dict[str, list]) -> pa.Table:
    arrays = {}
    for name, values in cols.items():
        if name.endswith("loss_mask"):
            arrays[name] = pa.array(values, type=pa.list_(pa.int8()))
        elif name.endswith(("input_ids", "position_ids")):
            arrays[name] = pa.array(values, type=pa.list_(pa.int32()))
        elif name in ("n_loss", "n_tokens"):
            arrays[name] = pa.array(values, type=pa.int64())
        elif name == "kto_label":
            arrays[name] = pa.array(values, type=pa.bool_())
        elif name == "source_ids":
            arrays[name] = pa.array(values, type=pa.list_(pa.string()))
        else:
            arrays[name] = pa.array(values, type=pa.string())
    return pa.table(arrays)


def pack_batch(block_len: int):
    from raylm.data import tokenize as tk

    def fn(batch: pa.Table) -> pa.Table:
        rows = batch.select(["id", "input_ids", "loss_mask"]).to_pylist()
        packed = list(tk.pack(rows, block_len))
        cols = {
            k: [r[k] for r in packed]
            for k in ("source_ids", "input_ids", "loss_mask", "position_ids")
        }
        cols["n_tokens"] = [len(r["input_ids"]) for r in packed]
        return _typed(cols)

    return fn


def kl_batch(cutoff_len: int):
    """KTO rows -> the same rows with ``kl_input_ids`` / ``kl_loss_mask``: each prompt
    with the answer of the row before it in its batch of ``LF_BLOCK`` rows
    (``raylm.data.tokenize.with_kl_rows``, as the train job pairs raw rows), so the shards
    carry KTO's mismatched pairs and train at any micro batch size with exact resume."""
    from raylm.data import tokenize as tk

    def fn(batch: pa.Table) -> pa.Table:
        paired = tk.with_kl_rows(batch.select(["input_ids", "loss_mask"]).to_pylist(), cutoff_len)
        for name, kind in (("kl_input_ids", pa.int32()), ("kl_loss_mask", pa.int8())):
            values = pa.array([r[name] for r in paired], type=pa.list_(kind))
            batch = batch.append_column(name, values)
        return batch

    return fn


def with_positions(batch: pa.Table) -> pa.Table:
    lengths = pa.compute.list_value_length(batch.column("input_ids")).to_numpy()
    pos = [list(range(n)) for n in lengths]
    return batch.append_column("position_ids", pa.array(pos, type=pa.list_(pa.int32())))


def records_batch(kind: str):
    """Untokenized output: the cleaned records with typed columns (conversations: role /
    content turns, their tool schemas and calls as JSON in ``tools``, a KTO label)."""
    message = pa.struct([("role", pa.string()), ("content", pa.string())])

    def fn(batch: pa.Table) -> pa.Table:
        ids = batch.column("id").to_pylist()
        docs = [json.loads(d) for d in batch.column("doc").to_pylist()]
        if kind == "pt":
            return pa.table({"id": ids, "text": [d["text"] for d in docs]})
        if kind in ("sft", "kto"):
            msgs = pa.array([_plain_turns(d["messages"]) for d in docs], type=pa.list_(message))
            tools = pa.array([_tools_json(d) for d in docs], type=pa.string())
            table = pa.table({"id": ids, "messages": msgs, "tools": tools})
            if kind == "kto":
                labels = pa.array([bool(d["kto_label"]) for d in docs], type=pa.bool_())
                table = table.append_column("kto_label", labels)
            return table
        return pa.table(
            {
                "id": ids,
                "prompt": pa.array([d["prompt"] for d in docs], type=pa.list_(message)),
                "chosen": [d["chosen"] for d in docs],
                "rejected": [d["rejected"] for d in docs],
            }
        )

    return fn


def _plain_turns(messages: list[dict]) -> list[dict]:
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _tools_json(doc: dict) -> str | None:
    """A conversation's tool schemas and each turn's tool calls, as JSON (the role/content
    ``messages`` struct has no place for them): ``{"tools": [...], "tool_calls": {turn:
    [...]}}``, None when it has neither."""
    calls = {str(i): m["tool_calls"] for i, m in enumerate(doc["messages"]) if m.get("tool_calls")}
    if not (doc.get("tools") or calls):
        return None
    return json.dumps({"tools": doc.get("tools") or [], "tool_calls": calls}, ensure_ascii=False)


class PartNames:
    """``part-00000-<write id>.parquet`` names: the layout the train job globs for."""

    def __new__(cls, ext: str) -> Any:
        from ray.data.datasource import FilenameProvider

        class Provider(FilenameProvider):
            def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
                return f"part-{task_index:05d}-{write_uuid}.{ext}"

        return Provider(file_format=ext)


def _sum(ds: Any, column: str) -> int:
    return int(ds.sum(column) or 0) if ds.count() else 0


def _quarantine_rows(batch: pa.Table) -> pa.Table:
    """Every quarantined row with its reason and the raw text, to fix and re-run."""
    status = pa.compute.starts_with(batch.column("status"), f"{QUARANTINE}:")
    batch = batch.filter(status)
    reasons = [s.removeprefix(f"{QUARANTINE}:") for s in batch.column("status").to_pylist()]
    return pa.table(
        {
            "id": batch.column("id"),
            "source": batch.column("source"),
            "reason": reasons,
            "raw": batch.column("raw"),
        }
    )


def is_packed(cfg: DataJobConfig, kind: str) -> bool:
    """Whether the shards are packed blocks (tokenized pt / sft with ``tokenize.pack``)."""
    return bool(cfg.tokenize.enabled and cfg.tokenize.pack and kind in ("pt", "sft"))


def write_shards(docs: Any, cfg: DataJobConfig, kind: str, out: str) -> dict[str, Any]:
    """Write shards/ and dataset_meta.json; returns counts for stats.json."""
    documents = docs.count()
    if cfg.tokenize.enabled:
        rows, kept, num_rows, num_tokens = _tokenized(docs, cfg, kind)
    else:
        rows = docs.map_batches(records_batch(kind), batch_format="pyarrow")
        num_rows, num_tokens, kept = documents, 0, documents
    write_rows(rows, num_rows, out)
    write_meta(cfg, kind, out, num_rows, num_tokens)
    return {
        "dropped_no_loss": documents - kept,
        "documents_out": kept,
        "rows_out": num_rows,
        "tokens_out": num_tokens,
    }


def write_rows(rows: Any, num_rows: int, out: str) -> None:
    """``out/shards``: the train job's layout (part names, row groups); nothing if empty."""
    if num_rows:
        rows.write_parquet(
            **_target(out, "shards"),
            filename_provider=PartNames("parquet"),
            row_group_size=ROW_GROUP_ROWS,
        )


def write_meta(
    cfg: DataJobConfig, kind: str, out: str, num_rows: int, num_tokens: int, **extra: Any
) -> None:
    """``out/dataset_meta.json``, which the train job reads to know what the shards hold."""
    tok = cfg.tokenize
    meta = {
        "kind": kind if tok.enabled else "text",
        "task": kind,
        "tokenized": tok.enabled,
        "packed": is_packed(cfg, kind),
        "tokenizer": tok.tokenizer if tok.enabled else None,
        "template": tok.template if tok.enabled else None,
        "cutoff_len": tok.cutoff_len,
        "num_rows": num_rows,
        "num_tokens": num_tokens,
        **extra,
    }
    storage.write_text(storage.join(out, "dataset_meta.json"), json.dumps(meta, indent=2))


def shaped(good: Any, cfg: DataJobConfig, kind: str, wrap: Any = None) -> Any:
    """Tokenized examples as the rows the train job reads: packed blocks, DPO pairs as
    they are, KTO rows with their KL pairs, or each with its positions. ``wrap``
    adapts the packing function (the mix keeps each block's sources)."""
    if is_packed(cfg, kind):
        pack = pack_batch(cfg.tokenize.cutoff_len)
        fn = wrap(pack) if wrap else pack
        return good.map_batches(fn, batch_size=4096, batch_format="pyarrow")
    if kind == "dpo":
        return good
    if kind == "kto":  # no position_ids: the train job's raw kto rows have none either
        from raylm.data.tokenize import LF_BLOCK

        kl = kl_batch(cfg.tokenize.cutoff_len)
        return good.map_batches(kl, batch_size=LF_BLOCK, batch_format="pyarrow")
    return good.map_batches(with_positions, batch_format="pyarrow")


def _tokenized(docs: Any, cfg: DataJobConfig, kind: str) -> tuple[Any, int, int, int]:
    """(rows to write, documents kept, rows, tokens): examples without enough trainable tokens
    are dropped (and counted by the caller), the rest packed or given positions."""
    from ray.data.expressions import col

    check_tokenizer(cfg, kind)  # once here, not in every task
    tok = docs.map_batches(tokenize_batch(cfg), batch_format="pyarrow").materialize()
    good = tok.filter(expr=col("n_loss") >= cfg.tokenize.min_loss_tokens).materialize()
    rows = shaped(good, cfg, kind).materialize()
    num_rows, num_tokens = rows.count(), _sum(rows, "n_tokens")
    rows = rows.drop_columns([c for c in ("n_loss", "n_tokens") if c in rows.columns()])
    return rows, good.count(), num_rows, num_tokens


def write_quarantine(processed: Any, out: str) -> None:
    """``quarantine/*.jsonl``: each quarantined row with its reason, to fix and re-run."""
    processed.map_batches(_quarantine_rows, batch_format="pyarrow").write_json(
        **_target(out, QUARANTINE), filename_provider=PartNames("jsonl")
    )


def write_removed(removed: Any, out: str) -> dict[str, int]:
    """``dedup/``: one record per removed duplicate (id, dup_of, method); counts by method."""
    from raylm.data.dedup_apply import method_counts

    removed = removed.materialize()
    counts = method_counts(removed)
    if removed.count():
        removed.write_parquet(**_target(out, "dedup"), filename_provider=PartNames("parquet"))
    return counts
