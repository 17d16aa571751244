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
from collections.abc import Iterator
from typing import Any, BinaryIO

import pyarrow as pa

from raylm import storage
from raylm.data.sources import Source, file_kind

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
