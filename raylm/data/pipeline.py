"""The data job as one Ray Data pipeline: read -> normalise -> filter -> PII -> dedup -> tokenize.

Per-record stages run fused in one ``map_batches`` pass that never drops a row: it
sets ``status`` (empty = kept, ``quarantine:...``, ``filter:<name>``) so every input
row is counted exactly once. Cross-record stages (dedup) shuffle by key in
``raylm.data.dedup``; the driver only ever sees per-block counts and a few examples.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from collections import Counter
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute

from raylm.config import ConfigError, resolve_model, resolve_path
from raylm.data import dedup, filters, formats, pii, readers
from raylm.data.config import DataJobConfig

log = logging.getLogger(__name__)

PII_KINDS = tuple(pii.PLACEHOLDERS)
QUARANTINE = "quarantine"


# ---- per-record processing ------------------------------------------------------------


def detect_format(record: dict, columns: dict[str, str], text_column: str) -> str:
    """The format a record looks like, from its keys (LLaMA-Factory column names honoured)."""
    keys = set(record)
    if {columns.get("chosen", "chosen"), columns.get("rejected", "rejected")} <= keys:
        return "preference"
    if columns.get("messages", "messages") in keys and "messages" in keys:
        return "openai"
    if columns.get("messages", "conversations") in keys or "conversations" in keys:
        return "sharegpt"
    if columns.get("prompt", "instruction") in keys:
        return "alpaca"
    if columns.get("text", text_column) in keys:
        return "text"
    raise ValueError(f"cannot tell the record's format from its keys {sorted(keys)}")


def to_payload(record: Any, fmt: str, columns: dict[str, str], text_column: str) -> dict:
    """The canonical payload: {"text"} (pt), {"messages"} (sft) or {"prompt","chosen","rejected"}."""
    if not isinstance(record, dict):
        raise ValueError(f"record must be a JSON object, got {type(record).__name__}")
    if fmt == "auto":
        fmt = detect_format(record, columns, text_column)
    if fmt == "text":
        return {"text": formats.to_text(record, {"text": text_column, **columns})}
    if fmt == "preference":
        prompt, chosen, rejected = formats.to_preference(record, columns)
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    return {"messages": formats.to_messages(record, fmt, columns)}


def payload_kind(payload: dict) -> str:
    return "pt" if "text" in payload else "dpo" if "chosen" in payload else "sft"


def map_strings(payload: dict, fn: Any) -> dict:
    """Apply ``fn`` to every piece of text a payload holds (contents, answers)."""
    if "text" in payload:
        return {"text": fn(payload["text"])}
    if "messages" in payload:
        return {"messages": [{**m, "content": fn(m["content"])} for m in payload["messages"]]}
    prompt = [{**m, "content": fn(m["content"])} for m in payload["prompt"]]
    return {"prompt": prompt, "chosen": fn(payload["chosen"]), "rejected": fn(payload["rejected"])}


def strings_of(payload: dict) -> str:
    seen: list[str] = []
    map_strings(payload, lambda s: seen.append(s) or s)
    return "\n".join(seen)


PROCESSED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("status", pa.string()),
        ("doc", pa.string()),
        ("raw", pa.string()),
        ("nbytes", pa.int64()),
        ("exact_hash", pa.string()),
        ("sig", pa.binary()),
        ("shingles", pa.binary()),
        *[(f"pii_{k}", pa.int32()) for k in PII_KINDS],
    ]
)


def _process_row(row: dict, cfg: DataJobConfig, kind: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": row["id"],
        "source": row["source"],
        "raw": row["raw"],
        "nbytes": row["nbytes"],
        "status": "",
        "doc": "",
        "exact_hash": "",
        "sig": b"",
        "shingles": b"",
        **{f"pii_{k}": 0 for k in PII_KINDS},
    }
    if row["error"]:
        out["status"] = f"{QUARANTINE}:{row['error']}"
        return out
    try:
        record = json.loads(row["raw"])
        columns = _columns(row["columns"])
        payload = to_payload(record, row["fmt"], columns, cfg.text_column)
        if payload_kind(payload) != kind:
            raise ValueError(f"record is {payload_kind(payload)} data but this job is {kind}")
        if cfg.id_column:
            if record.get(cfg.id_column) in (None, ""):
                raise ValueError(f"missing id column {cfg.id_column!r}")
            out["id"] = str(record[cfg.id_column])
    except json.JSONDecodeError as err:
        out["status"] = f"{QUARANTINE}:bad JSON: {err}"
        return out
    except ValueError as err:
        out["status"] = f"{QUARANTINE}:malformed: {err}"
        return out
    if cfg.filters.nfkc:
        payload = map_strings(payload, filters.nfkc)
    failed = filters.first_failure(strings_of(payload), cfg.filters)
    if failed:
        out["status"] = f"filter:{failed}"
        return out
    totals: Counter[str] = Counter()

    def scrub(text: str) -> str:
        clean, counts = pii.scrub(text, cfg.pii)
        totals.update(counts)
        return clean

    payload = map_strings(payload, scrub)
    out.update({f"pii_{k}": totals[k] for k in PII_KINDS})
    out["doc"] = json.dumps(payload, ensure_ascii=False)
    out[_TEXT] = strings_of(payload)
    return out


_TEXT = "_text"
"""Row key carrying a kept row's text to the batch's shingling (not a table column)."""


@cache
def _columns(spec: str) -> dict[str, str]:
    """One source's column mapping, parsed once per worker rather than once per row."""
    return json.loads(spec)


def process_batch(cfg: DataJobConfig, kind: str):
    """The fused per-record stage; signatures are computed per batch, vectorised."""

    def fn(batch: pa.Table) -> pa.Table:
        rows = [_process_row(r, cfg, kind) for r in batch.to_pylist()]
        kept = [r for r in rows if not r["status"]]
        if kept:
            for r, digest in zip(kept, dedup.exact_hashes([r[_TEXT] for r in kept]), strict=True):
                r["exact_hash"] = digest
        if cfg.dedup.fuzzy and kept:
            flat, lengths = dedup.shingle_batch([r[_TEXT] for r in kept], cfg.dedup.ngram)
            sigs = dedup.minhash_flat(flat, lengths, cfg.dedup.num_perm, cfg.dedup.seed)
            sets = np.split(flat, np.cumsum(lengths)[:-1])
            for r, sig, shingles in zip(kept, sigs, sets, strict=True):
                r["sig"] = sig.tobytes()
                r["shingles"] = shingles.tobytes() if cfg.dedup.verify else b""
        return pa.Table.from_pylist(rows, schema=PROCESSED_SCHEMA)

    return fn


# ---- accounting (per-block aggregates; the driver sums a few numbers) ------------------


def _block_stats(table: pa.Table) -> dict[str, Any]:
    status = table.column("status").to_pylist()
    reasons = Counter(_reason(s) for s in status)
    pii_counts = {k: int(pa.compute.sum(table.column(f"pii_{k}")).as_py() or 0) for k in PII_KINDS}
    return {
        "rows": table.num_rows,
        "bytes": int(pa.compute.sum(table.column("nbytes")).as_py() or 0),
        "reasons": dict(reasons),
        "pii": pii_counts,
    }


def _reason(status: str) -> str:
    """Statuses group by reason: quarantine details differ per row, the class does not."""
    return QUARANTINE if status.startswith(QUARANTINE) else status


def aggregate(ds: Any) -> dict[str, Any]:
    import ray

    stats_fn = ray.remote(_block_stats)
    parts = ray.get([stats_fn.remote(ref) for ref in ds.to_arrow_refs()])
    total: dict[str, Any] = {"rows": 0, "bytes": 0, "reasons": Counter(), "pii": Counter()}
    for p in parts:
        total["rows"] += p["rows"]
        total["bytes"] += p["bytes"]
        total["reasons"].update(p["reasons"])
        total["pii"].update(p["pii"])
    return total


def _examples(ds: Any, status: str, k: int) -> list[dict[str, str]]:
    from ray.data.expressions import col

    rows = ds.filter(expr=col("status") == status).select_columns(["id", "raw"]).take(k)
    return [{"id": r["id"], "text": r["raw"][:300]} for r in rows]


# ---- dedup application -----------------------------------------------------------------

_FINAL_SCHEMA = pa.schema(
    [("id", pa.string()), ("doc", pa.string()), ("dup_of", pa.string()), ("method", pa.string())]
)


def _resolve(df: pd.DataFrame) -> pd.DataFrame:
    """At each id: drop a doc that has a removal record; keep one record per removed id."""
    removal = df[df["method"].notna()].sort_values(["id", "method"])  # exact < fuzzy
    removal = removal.drop_duplicates("id")
    docs = df[df["method"].isna() & ~df["id"].isin(removal["id"])]
    return pd.concat([docs, removal], ignore_index=True)


def _as_final(columns: tuple[str, ...]):
    def fn(batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        cols = {
            name: batch.column(name) if name in columns else pa.nulls(n, pa.string())
            for name in _FINAL_SCHEMA.names
        }
        return pa.table(cols, schema=_FINAL_SCHEMA)

    return fn


_SEP = "\x00"


def sort_key(ident: str) -> str:
    """``a.jsonl:9`` sorts before ``a.jsonl:10``; the id itself follows, so keys stay unique."""
    return re.sub(r"\d+", lambda m: m.group().zfill(12), ident) + _SEP + ident


def _with_sort_keys(batch: pa.Table) -> pa.Table:
    keys = [sort_key(i) for i in batch.column("id").to_pylist()]
    return batch.set_column(batch.schema.get_field_index("id"), "id", pa.array(keys, pa.string()))


def _strip_sort_keys(batch: pa.Table) -> pa.Table:
    for name in ("id", "dup_of"):
        if name in batch.column_names:
            plain = [k.rpartition(_SEP)[2] for k in batch.column(name).to_pylist()]
            batch = batch.set_column(
                batch.schema.get_field_index(name), name, pa.array(plain, pa.string())
            )
    return batch


def _dedup_input(table: pa.Table) -> pa.Table:
    """Kept rows only, with the columns dedup needs and ids made sortable."""
    kept = table.filter(pa.compute.equal(table.column("status"), ""))
    return _with_sort_keys(kept.select(["id", "doc", "exact_hash", "sig", "shingles"]))


def _final_rows(removed: bool):
    """After the merge: documents (method is null) or removal records, original ids."""

    def fn(table: pa.Table) -> pa.Table:
        if "method" not in table.column_names:  # no removals at all: plain documents
            return _strip_sort_keys(table.select(["id", "doc"]))
        is_removal = pa.compute.is_valid(table.column("method"))
        mask = is_removal if removed else pa.compute.invert(is_removal)
        cols = ["id", "dup_of", "method"] if removed else ["id", "doc"]
        return _strip_sort_keys(table.filter(mask).select(cols))

    return fn


def apply_dedup(processed: Any, cfg: DataJobConfig) -> tuple[Any, Any | None, dict[str, Any]]:
    """(kept docs, removal records or None, dedup info) as materialised Datasets.

    The representative of a cluster is its smallest id in natural order (line 9 before
    line 10), so the first occurrence in the input is the one kept. Every step is a
    plain Ray task over block refs: a Ray Data execution costs ~0.5 s of start-up on a
    small cluster, and dedup has a dozen steps.
    """
    import ray

    refs = dedup.map_blocks(processed.to_arrow_refs(), _dedup_input)
    if cfg.id_column:
        _check_unique_ids(refs, cfg.id_column)
    removals, info = _removals(refs, cfg)
    if not removals:
        return ray.data.from_arrow_refs(dedup.map_blocks(refs, _final_rows(False))), None, info
    parts = dedup.map_blocks(refs, _as_final(("id", "doc")))
    parts += dedup.map_blocks(removals, _as_final(("id", "dup_of", "method")))
    merged = dedup.shuffle_blocks(parts, "id", _resolve)
    docs = ray.data.from_arrow_refs(dedup.map_blocks(merged, _final_rows(False)))
    removed = ray.data.from_arrow_refs(dedup.map_blocks(merged, _final_rows(True)))
    return docs, removed, info


def _repeated(df: pd.DataFrame) -> pd.DataFrame:
    counts = df["id"].value_counts()
    return pd.DataFrame({"id": counts.index[counts > 1], "n": counts[counts > 1].to_numpy()})


def _check_unique_ids(refs: list, id_column: str) -> None:
    """Dedup, the merge and the removal audit key on ids: two documents sharing one would
    be kept or dropped together. Fail naming the ids instead of guessing."""
    import ray

    parts = ray.get(
        dedup.map_blocks(
            dedup.shuffle_blocks(refs, "id", _repeated, ["id"]), lambda t: t.to_pylist()
        )
    )
    repeated = [r for part in parts for r in part]
    if repeated:
        examples = sorted(f"{r['id'].rpartition(_SEP)[2]!r} x{r['n']}" for r in repeated)[:5]
        raise ValueError(
            f"id_column={id_column!r} is not unique: {len(repeated)} id(s) repeat "
            f"(e.g. {', '.join(examples)}); fix the data, or set id_column=null to use "
            "file:line ids"
        )


def _removals(refs: list, cfg: DataJobConfig) -> tuple[list, dict[str, Any]]:
    """Blocks of removal records (exact, then fuzzy) and what the fuzzy pass did."""
    info: dict[str, Any] = {}
    removals = dedup.exact_duplicates(refs) if cfg.dedup.exact else []
    if cfg.dedup.fuzzy:
        bands, rows = cfg.dedup.bands, cfg.dedup.rows
        if bands is None or rows is None:
            bands, rows = dedup.optimal_bands_rows(
                cfg.dedup.threshold, cfg.dedup.num_perm, cfg.dedup.false_positive_weight
            )
        info.update(bands=bands, rows=rows, threshold=cfg.dedup.threshold)
        verify = cfg.dedup.threshold if cfg.dedup.verify else None
        fuzzy, rounds = dedup.fuzzy_duplicates(refs, bands, rows, cfg.dedup.max_rounds, verify)
        info["cc_rounds"] = rounds
        removals += fuzzy
    return removals, info


# ---- tokenization and output ------------------------------------------------------------


@cache
def _tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def tokenize_batch(cfg: DataJobConfig, kind: str):
    from raylm.data import tokenize as tk

    tokenizer = resolve_model(cfg.tokenize.tokenizer)  # here: tasks run in another cwd

    def fn(batch: pa.Table) -> pa.Table:
        tok = _tokenizer(tokenizer)
        out: dict[str, list] = {"id": [], "n_loss": [], "n_tokens": []}
        for ident, doc in zip(
            batch.column("id").to_pylist(), batch.column("doc").to_pylist(), strict=True
        ):
            payload = json.loads(doc)
            if kind == "pt":
                row = tk.tokenize_pt(payload["text"], tok, cfg.tokenize.cutoff_len)
            elif kind == "sft":
                row = tk.tokenize_sft(payload["messages"], tok, cfg.tokenize.cutoff_len)
            else:
                row = tk.tokenize_preference(
                    payload["prompt"],
                    payload["chosen"],
                    payload["rejected"],
                    tok,
                    cfg.tokenize.cutoff_len,
                )
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


def with_positions(batch: pa.Table) -> pa.Table:
    lengths = pa.compute.list_value_length(batch.column("input_ids")).to_numpy()
    pos = [list(range(n)) for n in lengths]
    return batch.append_column("position_ids", pa.array(pos, type=pa.list_(pa.int32())))


def records_batch(kind: str):
    """Untokenized output: the cleaned records with typed columns."""
    message = pa.struct([("role", pa.string()), ("content", pa.string())])

    def fn(batch: pa.Table) -> pa.Table:
        ids = batch.column("id").to_pylist()
        docs = [json.loads(d) for d in batch.column("doc").to_pylist()]
        if kind == "pt":
            return pa.table({"id": ids, "text": [d["text"] for d in docs]})
        if kind == "sft":
            msgs = pa.array([d["messages"] for d in docs], type=pa.list_(message))
            return pa.table({"id": ids, "messages": msgs})
        return pa.table(
            {
                "id": ids,
                "prompt": pa.array([d["prompt"] for d in docs], type=pa.list_(message)),
                "chosen": [d["chosen"] for d in docs],
                "rejected": [d["rejected"] for d in docs],
            }
        )

    return fn


class _PartNames:
    """``part-00000-<write id>.parquet`` names: the layout the train job globs for."""

    def __new__(cls, ext: str) -> Any:
        from ray.data.datasource import FilenameProvider

        class Provider(FilenameProvider):
            def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
                return f"part-{task_index:05d}-{write_uuid}.{ext}"

        return Provider(file_format=ext)


def _sum(ds: Any, column: str) -> int:
    return int(ds.sum(column) or 0) if ds.count() else 0


# ---- the job -----------------------------------------------------------------------------


def decide_kind(cfg: DataJobConfig, sources: list[readers.Source]) -> str:
    fmts = {s.fmt for s in sources}
    explicit = {formats.kind_of(f) for f in fmts if f != "auto"}
    if "auto" in fmts:
        first = readers.peek_first_record([s for s in sources if s.fmt == "auto"], cfg.text_column)
        if first is None:
            raise ConfigError(
                "format=auto but no well-formed record was found to detect it; set format"
            )
        explicit.add(payload_kind(to_payload(first, "auto", cfg.columns, cfg.text_column)))
    if len(explicit) != 1:
        raise ConfigError(
            f"inputs mix task kinds {sorted(explicit)} (pt text, sft conversations, dpo pairs); "
            "run one data job per kind"
        )
    return explicit.pop()


def run(cfg: DataJobConfig) -> dict[str, Any]:
    """Run the whole pipeline; returns stats (also written to ``stats.json``)."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
    out = Path(resolve_path(cfg.output_dir))
    for sub in ("shards", QUARANTINE, "dedup"):
        shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)

    sources = readers.expand_inputs(cfg.inputs, cfg.format, cfg.columns)
    kind = decide_kind(cfg, sources)
    log.info("data job: %d file(s), kind=%s", len(sources), kind)
    raw = readers.read_dataset(sources, cfg.text_column, cfg.text_unit, cfg.read_block_mb)
    clock = _Stopwatch()
    # Plain tasks, one per read block: the blocks are already sized for one task each.
    processed = ray.data.from_arrow_refs(
        dedup.map_blocks(raw.to_arrow_refs(), process_batch(cfg, kind))
    )
    totals = aggregate(processed)
    clock.lap("read_clean_sign")

    quarantined = totals["reasons"].get(QUARANTINE, 0)
    if quarantined:
        processed.map_batches(_quarantine_rows, batch_format="pyarrow").write_json(
            str(out / QUARANTINE), filename_provider=_PartNames("jsonl")
        )
    clock.lap("quarantine_write")
    docs, removed, dedup_info = apply_dedup(processed, cfg)
    clock.lap("dedup_plan")
    removed_counts: Counter[str] = Counter()
    if removed is not None:
        removed = removed.materialize()
        for method, n in _method_counts(removed).items():
            removed_counts[method] += n
        if removed.count():
            removed.write_parquet(str(out / "dedup"), filename_provider=_PartNames("parquet"))
    docs = docs.materialize()
    clock.lap("dedup_apply")
    shards_info = write_shards(docs, cfg, kind, out)
    clock.lap("tokenize_write")

    filter_counts = {
        r.removeprefix("filter:"): n
        for r, n in totals["reasons"].items()
        if r.startswith("filter:")
    }
    removed_all = {
        **{f"filter:{k}": v for k, v in filter_counts.items()},
        "exact_dup": removed_counts.get("exact", 0),
        "fuzzy_dup": removed_counts.get("fuzzy", 0),
        "no_trainable_tokens": shards_info.pop("dropped_no_loss", 0),
    }
    documents_out = shards_info["documents_out"]
    identity = totals["rows"] == documents_out + sum(removed_all.values()) + quarantined
    stats = {
        "kind": kind,
        "documents_in": totals["rows"],
        "bytes_in": totals["bytes"],
        "removed": removed_all,
        "removed_by_filter": filter_counts,
        "filter_examples": {
            name: _examples(processed, f"filter:{name}", cfg.filters.examples)
            for name in filter_counts
        },
        "pii_replacements": dict(totals["pii"]),
        "exact_dups": removed_all["exact_dup"],
        "fuzzy_dups": removed_all["fuzzy_dup"],
        "dedup": dedup_info,
        "quarantined": quarantined,
        "documents_out": documents_out,
        **shards_info,
        "accounting_ok": identity,
        "seconds": clock.laps,
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False))
    if not identity:
        raise RuntimeError(f"accounting identity broken (see {out / 'stats.json'})")
    return stats


class _Stopwatch:
    """Wall seconds per stage, for stats.json: where a slow run spends its time."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self._last, 3)
        self._last = now
        log.info("data job: %s took %.2f s", name, self.laps[name])


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


def _method_counts(removed: Any) -> dict[str, int]:
    import ray

    def count(table: pa.Table) -> dict[str, int]:
        if "method" not in table.column_names:  # an empty block may carry no schema
            return {}
        return dict(Counter(table.column("method").to_pylist()))

    total: Counter[str] = Counter()
    for part in ray.get([ray.remote(count).remote(r) for r in removed.to_arrow_refs()]):
        total.update(part)
    return dict(total)


def write_shards(docs: Any, cfg: DataJobConfig, kind: str, out: Path) -> dict[str, Any]:
    """Write shards/ and dataset_meta.json; returns counts for stats.json."""
    from ray.data.expressions import col

    documents = docs.count()
    meta = {
        "kind": kind if cfg.tokenize.enabled else "text",
        "task": kind,
        "tokenized": cfg.tokenize.enabled,
        "packed": bool(cfg.tokenize.enabled and cfg.tokenize.pack and kind != "dpo"),
        "tokenizer": cfg.tokenize.tokenizer if cfg.tokenize.enabled else None,
        "cutoff_len": cfg.tokenize.cutoff_len,
    }
    info: dict[str, Any] = {"dropped_no_loss": 0}
    if not cfg.tokenize.enabled:
        rows = docs.map_batches(records_batch(kind), batch_format="pyarrow")
        num_rows, num_tokens, kept = documents, 0, documents
    else:
        tok = docs.map_batches(tokenize_batch(cfg, kind), batch_format="pyarrow").materialize()
        good = tok.filter(expr=col("n_loss") >= cfg.tokenize.min_loss_tokens).materialize()
        kept = good.count()
        info["dropped_no_loss"] = documents - kept
        if meta["packed"]:
            rows = good.map_batches(
                pack_batch(cfg.tokenize.cutoff_len), batch_size=4096, batch_format="pyarrow"
            ).materialize()
        elif kind == "dpo":
            rows = good
        else:
            rows = good.map_batches(with_positions, batch_format="pyarrow")
        rows = rows.materialize()
        num_rows, num_tokens = rows.count(), _sum(rows, "n_tokens")
        rows = rows.drop_columns([c for c in ("n_loss", "n_tokens") if c in rows.columns()])
    if num_rows:
        rows.write_parquet(str(out / "shards"), filename_provider=_PartNames("parquet"))
    meta.update(num_rows=num_rows, num_tokens=num_tokens)
    (out / "dataset_meta.json").write_text(json.dumps(meta, indent=2))
    info.update(documents_out=kept, rows_out=num_rows, tokens_out=num_tokens)
    return info
