"""File bytes -> raw rows, every record kept, malformed or not (runs inside Ray tasks).

Ray Data's own JSON reader fails a whole file on one bad line and has no line numbers,
so files are read here: each file becomes rows of ``(id, source, raw, error, fmt,
columns, nbytes)`` with every line kept, so the data job can quarantine a bad one with
a reason instead of losing it, and the train job can stop naming it. ``id`` is
``file:line`` (or ``file:#row``), deterministic across runs and cluster sizes.

A ``.json`` file is a JSON array, or one JSON value, or (as Hugging Face's json loader
also accepts) JSON Lines under a ``.json`` name; any extension not listed in
``sources.EXTENSIONS`` is plain text.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import pyarrow as pa

from raylm import storage
from raylm.data.formats import fill_placeholders
from raylm.data.sources import Source, file_kind, held_out, mix_order

ROW_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("raw", pa.string()),
        ("error", pa.string()),
        ("fmt", pa.string()),
        ("columns", pa.string()),
        ("nbytes", pa.int64()),
    ]
)

COUNT_CHUNK = 4 << 20
"""Bytes a newline-counting task holds at once."""

HEAD_BYTES = 1 << 20
"""Bytes of a JSONL file the driver reads to peek at its first record."""


class BadRow(ValueError):
    """A row that holds no record: unreadable file, undecodable bytes, invalid JSON.
    Its message is the quarantine reason."""


def open_random(path: str) -> BinaryIO:
    """A seekable handle (local file or pyarrow's random-access file), to read ranges."""
    if storage.is_remote(path):
        filesystem, inner = storage.filesystem(path)
        return filesystem.open_input_file(inner)  # type: ignore[return-value]
    return open(path.removeprefix("file://"), "rb")


def _open_bytes(path: str) -> bytes:
    if storage.is_remote(path):
        return storage.read_bytes(path)
    with open(path.removeprefix("file://"), "rb") as f:
        return f.read()


def _read_at(path: str, start: int, end: int) -> bytes:
    with open_random(path) as f:
        f.seek(start)
        return f.read(end - start)


def count_newlines(path: str, start: int, end: int) -> int:
    """Newlines in bytes [start, end): how far the line numbers of later ranges shift.

    Reads in chunks, so a task's memory stays bounded whatever the range size.
    """
    count = 0
    with open_random(path) as f:
        f.seek(start)
        for offset in range(start, end, COUNT_CHUNK):
            count += f.read(min(COUNT_CHUNK, end - offset)).count(b"\n")
    return count


def _row(src: dict, ident: str, raw: str, error: str, nbytes: int) -> dict[str, Any]:
    return {
        "id": ident,
        "source": ident,
        "raw": raw,
        "error": error,
        "fmt": src["fmt"],
        "columns": src["columns"],
        "nbytes": nbytes,
    }


def _lines(data: bytes, first_line: int = 1) -> list[tuple[int, bytes]]:
    """Non-blank lines with their 1-based numbers; blank ones are skipped but counted."""
    numbered = enumerate(data.split(b"\n"), start=first_line)
    return [(n, line) for n, line in numbered if line.strip()]


def _decode(line: bytes) -> tuple[str, str]:
    try:
        return line.decode("utf-8").rstrip("\r"), ""
    except UnicodeDecodeError as err:
        return line.decode("utf-8", errors="replace"), f"undecodable bytes: {err}"


def read_file(src: dict, text_column: str, text_unit: str) -> list[dict[str, Any]]:
    """Every record of one file as a row; malformed ones carry an ``error``."""
    path, name = src["path"], src["name"]
    try:
        data = _open_bytes(path)
    except OSError as err:
        return [_row(src, f"{name}:0", "", f"unreadable file: {err}", 0)]
    kind = file_kind(path)
    if kind == "parquet":
        return _read_parquet(src, data)
    if kind == "json":
        return _read_json(src, data)
    if kind == "text" and text_unit == "file":
        text, error = _decode(data)
        return [_row(src, f"{name}:1", json.dumps({text_column: text}), error, len(data))]
    return _line_rows(src, data, 1, text_column)


def read_range(
    src: dict, start: int, end: int, first_line: int, text_column: str
) -> list[dict[str, Any]]:
    """The rows of bytes [start, end) of a line-oriented file whose first line is number
    ``first_line``: exactly the rows ``read_file`` gives for those lines.

    ``start`` must be a line start. A range that cannot be read gives one error row
    numbered ``first_line``, which no other range uses.
    """
    try:
        data = _read_at(src["path"], start, end)
    except OSError as err:
        return [_row(src, f"{src['name']}:{first_line}", "", f"unreadable file: {err}", 0)]
    return _line_rows(src, data, first_line, text_column)


def _line_rows(src: dict, data: bytes, first_line: int, text_column: str) -> list[dict[str, Any]]:
    """One row per non-blank line; plain-text lines are wrapped as ``{text_column: line}``."""
    wrap = file_kind(src["path"]) == "text"
    rows = []
    for n, line in _lines(data, first_line):
        text, error = _decode(line)
        raw = json.dumps({text_column: text}) if wrap else text
        rows.append(_row(src, f"{src['name']}:{n}", raw, error, len(line)))
    return rows


def _read_json(src: dict, data: bytes) -> list[dict[str, Any]]:
    """An array (one row per element), one value, or JSON Lines named ``.json``."""
    name = src["name"]
    text, error = _decode(data)
    if error:
        return [_row(src, f"{name}:#0", text, error, len(data))]
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        if text.lstrip().startswith("["):  # a broken array is one bad document
            return [_row(src, f"{name}:#0", text, f"bad JSON: {err}", len(data))]
        return _line_rows(src, data, 1, "")
    records = value if isinstance(value, list) else [value]
    rows = []
    for i, rec in enumerate(records):
        raw = json.dumps(rec, ensure_ascii=False)
        rows.append(_row(src, f"{name}:#{i}", raw, "", len(raw.encode())))
    return rows


def _read_parquet(src: dict, data: bytes) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    name = src["name"]
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowInvalid, OSError) as err:
        return [_row(src, f"{name}:#0", "", f"unreadable parquet: {err}", len(data))]
    rows = []
    for i, rec in enumerate(table.to_pylist()):
        raw = json.dumps(rec, ensure_ascii=False, default=str)
        rows.append(_row(src, f"{name}:#{i}", raw, "", len(raw.encode())))
    return rows


def parse_row(row: dict[str, Any]) -> Any:
    """The record a row holds; ``BadRow`` with the reason when it holds none."""
    if row["error"]:
        raise BadRow(row["error"])
    try:
        return json.loads(row["raw"])
    except json.JSONDecodeError as err:
        raise BadRow(f"bad JSON: {err}") from None


def records(src: Source, text_column: str = "text") -> Iterator[tuple[str, Any]]:
    """``(id, record)`` of every record of a file, read whole in this process (small
    files only); a row without a record raises ``BadRow`` naming its id."""
    for row in read_file(src.for_task(), text_column, "line"):
        try:
            yield row["id"], parse_row(row)
        except BadRow as err:
            raise BadRow(f"{row['id']}: {err}") from None


def _head_rows(src: Source, text_column: str) -> list[dict[str, Any]]:
    """Rows of a file's first MiB for JSONL (the driver must not read a whole corpus)."""
    meta = {"path": src.path, "name": src.name, "fmt": src.fmt, "columns": "{}"}
    if file_kind(src.path) != "jsonl":
        return read_file(meta, text_column, "line")
    with open_random(src.path) as f:  # a bucket's object too: never the whole corpus
        head = f.read(HEAD_BYTES)
    lines = head.split(b"\n")[:-1] or [head]
    return [
        _row(meta, f"{src.name}:{n}", _decode(line)[0], "", len(line))
        for n, line in enumerate(lines, 1)
        if line.strip()
    ]


def peek_first_record(sources: list[Source], text_column: str) -> dict | None:
    """The first well-formed record, to decide the job's kind when format is auto."""
    for src in sources:
        if file_kind(src.path) == "text":
            return {text_column: ""}
        for row in _head_rows(src, text_column)[:100]:
            try:
                rec = parse_row(row)
            except BadRow:
                continue
            if isinstance(rec, dict):
                return rec
    return None


# ---- several datasets in one run (the train job's raw path: small sets, in memory) -------

Record = tuple[str, Any, Source]
"""``(id, record, source)`` of one example."""


@dataclass
class Mixed:
    """A run's examples after LLaMA-Factory's ``max_samples``, ``mix_strategy`` and
    ``val_size``, with where every record of every dataset went."""

    train: list[Record]
    """What is trained on, in mixed order (interleave_over may repeat a record)."""

    held_out: list[Record]
    """The ``val_size`` split, never trained on."""

    counts: list[dict[str, Any]]
    """Per dataset: ``in`` = ``out`` + sum(``removed``) + ``quarantined`` (records), and
    ``out`` + ``repeats`` = ``train_rows`` + ``held_out_rows`` (examples)."""


@dataclass
class Datasets:
    """The records a run reads, by dataset (a registry name, else the file)."""

    records: dict[str, list[Record]]
    """The first ``max_samples`` records of each, in reading order, placeholders filled."""

    totals: dict[str, int]
    """Rows of each dataset's files, those past ``max_samples`` counted but not parsed."""

    placeholders: dict[str, set[str]]
    """``{{key}}`` placeholders left unfilled, per dataset."""


def dataset_records(
    sources: list[Source], replacements: dict[str, str], limit: int | None
) -> Datasets:
    """Each dataset's first ``limit`` records (LLaMA-Factory's ``max_samples``) with
    ``{{key}}`` placeholders filled. A row without a record raises ``BadRow`` naming its
    id; rows past the limit are only counted, as LLaMA-Factory never looks at them."""
    out = Datasets({}, {}, {})
    for src in sources:
        name = src.dataset or src.path
        found = out.records.setdefault(name, [])
        for row in read_file(src.for_task(), "text", "line"):
            out.totals[name] = out.totals.get(name, 0) + 1
            if limit is not None and len(found) >= limit:
                continue
            try:
                record = parse_row(row)
            except BadRow as err:
                raise BadRow(f"{row['id']}: {err}") from None
            filled, missing = fill_placeholders(record, replacements)
            found.append((row["id"], filled, src))
            if missing:
                out.placeholders.setdefault(name, set()).update(missing)
    return out


def mix_datasets(
    data: Datasets, strategy: str, probs: list[float] | None, val_size: float, seed: int
) -> Mixed:
    """LLaMA-Factory's order of operations: each dataset's first ``max_samples`` records
    (``dataset_records``), mixed (``raylm.data.sources.mix_order``), then ``val_size``
    held out of the mix (``raylm.data.sources.held_out``)."""
    names = list(data.records)
    kept = [data.records[n] for n in names]
    order = mix_order([len(k) for k in kept], strategy, probs, seed)
    train_pos, held_pos = (
        held_out(len(order), val_size, seed) if val_size else (range(len(order)), [])
    )
    train = [kept[d][r] for d, r in (order[i] for i in train_pos)]
    held = [kept[d][r] for d, r in (order[i] for i in held_pos)]
    tally = {
        "train_rows": Counter(order[i][0] for i in train_pos),
        "held_out_rows": Counter(order[i][0] for i in held_pos),
        "drawn": Counter(d for d, _ in set(order)),
        "draws": Counter(d for d, _ in order),
    }
    counts = [
        _counts(n, data.totals.get(n, 0), len(kept[d]), d, tally) for d, n in enumerate(names)
    ]
    return Mixed(train, held, counts)


def _counts(name: str, n_in: int, n_kept: int, d: int, tally: dict[str, Counter]) -> dict[str, Any]:
    """One dataset's line of ``Mixed.counts``."""
    drawn = tally["drawn"][d]
    return {
        "dataset": name,
        "in": n_in,
        "out": drawn,
        "removed": {"max_samples": n_in - n_kept, "not_drawn": n_kept - drawn},
        "quarantined": 0,
        "repeats": tally["draws"][d] - drawn,
        "train_rows": tally["train_rows"][d],
        "held_out_rows": tally["held_out_rows"][d],
    }


def accounted(c: dict[str, Any]) -> bool:
    """Both identities of a dataset's counts hold (see ``Mixed.counts``)."""
    records_ok = c["in"] == c["out"] + sum(c["removed"].values()) + c["quarantined"]
    return records_ok and c["out"] + c["repeats"] == c["train_rows"] + c["held_out_rows"]


def stats_document(train: Mixed, evals: Mixed, settings: dict[str, Any]) -> dict[str, Any]:
    """Where every record of a run's datasets went: ``train`` (trained on, or held out by
    val_size) and ``evals`` (eval datasets, all held out), with the mixing ``settings``.
    ``held_out_evaluated`` starts False; the train job sets it when it scores them
    (``eval.strategy``)."""
    held = [{**c, "train_rows": 0, "held_out_rows": c["train_rows"]} for c in evals.counts]
    per = [{"role": "train", **c} for c in train.counts] + [{"role": "eval", **c} for c in held]
    return {
        "datasets": per,
        "train_rows": len(train.train),
        "held_out_rows": len(train.held_out) + len(evals.train),
        "held_out_evaluated": False,
        **settings,
        "accounting_ok": all(accounted(c) for c in per),
    }
