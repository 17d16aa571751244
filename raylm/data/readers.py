"""Input discovery (driver: paths only) and file reading (Ray tasks: the bytes).

Ray Data's own JSON reader fails a whole file on one bad line and has no line numbers,
so files are read here: each file becomes rows of ``(id, source, raw, error, fmt,
columns, nbytes)`` with every line kept, malformed or not, so the pipeline can
quarantine it with a reason instead of losing it. ``id`` is ``file:line`` (or
``file:#row``), deterministic across runs and cluster sizes.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from raylm.config import ConfigError, resolve_path

EXTENSIONS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".txt": "text",
    ".md": "text",
    ".text": "text",
}

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


@dataclass
class Source:
    """One input file and how to interpret its records."""

    path: str
    """Local path or URI of the file."""

    name: str
    """Short name used in ids (relative to the input's root)."""

    fmt: str
    """Record format, or ``auto`` to detect per record."""

    columns: dict[str, str] = field(default_factory=dict)
    """Canonical name -> record key."""


def file_kind(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    return EXTENSIONS.get(ext, "text")


def expand_inputs(inputs: list[str], fmt: str, columns: dict[str, str]) -> list[Source]:
    """Every input file, expanding globs, directories and LLaMA-Factory registries."""
    sources: list[Source] = []
    for spec in inputs:
        path, _, names = spec.partition("#")
        if os.path.basename(path) == "dataset_info.json":
            sources += _from_dataset_info(resolve_path(path), names)
            continue
        files = _list_files(path)
        if not files:
            raise ConfigError(f"input {spec!r} matches no file")
        root = _common_root(files)
        sources += [Source(f, _rel(f, root), fmt, dict(columns)) for f in files]
    names_seen = [s.name for s in sources]
    if len(set(names_seen)) != len(names_seen):  # ids must stay unique across inputs
        sources = [Source(s.path, s.path, s.fmt, s.columns) for s in sources]
    return sources


def _rel(path: str, root: str) -> str:
    return os.path.relpath(path, root) if "://" not in path else path.removeprefix(root)


def _common_root(files: list[str]) -> str:
    if len(files) == 1:
        return os.path.dirname(files[0])
    return os.path.commonpath(files) if "://" not in files[0] else ""


def _list_files(spec: str) -> list[str]:
    if "://" in spec and not spec.startswith("file://"):
        return _list_uri(spec)
    path = resolve_path(spec.removeprefix("file://"))
    if any(ch in path for ch in "*?["):
        return sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
    if os.path.isdir(path):
        return sorted(
            str(p) for p in Path(path).rglob("*") if p.is_file() and not p.name.startswith(".")
        )
    return [path] if os.path.isfile(path) else []


def _list_uri(uri: str) -> list[str]:
    from pyarrow import fs

    filesystem, root = fs.FileSystem.from_uri(uri)
    info = filesystem.get_file_info(root)
    scheme = uri.split("://", 1)[0]
    if info.type == fs.FileType.File:
        return [uri]
    selector = fs.FileSelector(root, recursive=True)
    return sorted(f"{scheme}://{i.path}" for i in filesystem.get_file_info(selector) if i.is_file)


def _from_dataset_info(path: str, names: str) -> list[Source]:
    """LLaMA-Factory's registry: file_name, formatting, ranking, columns and tags per dataset."""
    if not os.path.isfile(path):
        raise ConfigError(f"dataset registry not found: {path}")
    try:
        registry = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from None
    wanted = [n for n in names.split(",") if n] or list(registry)
    missing = [n for n in wanted if n not in registry]
    if missing:
        raise ConfigError(f"{path} has no dataset(s) {missing}; it has {sorted(registry)}")
    sources = []
    for name in wanted:
        entry = registry[name]
        if "file_name" not in entry:
            raise ConfigError(
                f"{path}: dataset {name!r} needs 'file_name' (hub/script datasets cannot be "
                "read offline); keys present: " + ", ".join(sorted(entry))
            )
        formatting = entry.get("formatting", "alpaca")
        if formatting not in ("alpaca", "sharegpt"):
            raise ConfigError(f"{path}: dataset {name!r} formatting={formatting!r} unsupported")
        fmt = "preference" if entry.get("ranking") else formatting
        columns = {**entry.get("columns", {}), **entry.get("tags", {})}
        target = os.path.join(os.path.dirname(path), entry["file_name"])
        files = _list_files(target)
        if not files:
            raise ConfigError(f"{path}: dataset {name!r} file {target} not found")
        sources += [Source(f, f"{name}/{os.path.basename(f)}", fmt, columns) for f in files]
    return sources


# ---- reading (inside Ray tasks) ------------------------------------------------------


def _open_bytes(path: str) -> bytes:
    if "://" in path and not path.startswith("file://"):
        from pyarrow import fs

        filesystem, inner = fs.FileSystem.from_uri(path)
        with filesystem.open_input_stream(inner) as f:
            return f.read()
    with open(path.removeprefix("file://"), "rb") as f:
        return f.read()


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


def _lines(data: bytes) -> list[tuple[int, bytes]]:
    return [(n, line) for n, line in enumerate(data.split(b"\n"), start=1) if line.strip()]


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
    rows = []
    for n, line in _lines(data):
        text, error = _decode(line)
        raw = json.dumps({text_column: text}) if kind == "text" else text
        rows.append(_row(src, f"{name}:{n}", raw, error, len(line)))
    return rows


def _read_json(src: dict, data: bytes) -> list[dict[str, Any]]:
    name = src["name"]
    text, error = _decode(data)
    if error:
        return [_row(src, f"{name}:#0", text, error, len(data))]
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        return [_row(src, f"{name}:#0", text, f"bad JSON: {err}", len(data))]
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


def read_dataset(sources: list[Source], text_column: str, text_unit: str) -> Any:
    """A Ray Dataset of raw rows: one read task per file, spread over the cluster."""
    import ray

    items = [
        {"path": s.path, "name": s.name, "fmt": s.fmt, "columns": json.dumps(s.columns)}
        for s in sources
    ]

    def read_batch(batch: dict[str, Any]) -> pa.Table:
        rows = []
        for i in range(len(batch["path"])):
            src = {k: str(batch[k][i]) for k in ("path", "name", "fmt", "columns")}
            rows += read_file(src, text_column, text_unit)
        return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)

    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    return ds.map_batches(read_batch, batch_size=1, batch_format="numpy")


def _head_rows(src: Source, text_column: str) -> list[dict[str, Any]]:
    """Rows of a file's first MiB for JSONL (the driver must not read a whole corpus)."""
    meta = {"path": src.path, "name": src.name, "fmt": src.fmt, "columns": "{}"}
    if file_kind(src.path) != "jsonl" or "://" in src.path:
        return read_file(meta, text_column, "line")
    with open(src.path, "rb") as f:
        head = f.read(1 << 20)
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
        rows = _head_rows(src, text_column)
        for row in rows[:100]:
            if row["error"]:
                continue
            try:
                rec = json.loads(row["raw"])
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                return rec
    return None
