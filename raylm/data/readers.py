"""Input discovery (driver: paths only) and file reading (Ray tasks: the bytes).

Ray Data's own JSON reader fails a whole file on one bad line and has no line numbers,
so files are read here: each file becomes rows of ``(id, source, raw, error, fmt,
columns, nbytes)`` with every line kept, malformed or not, so the pipeline can
quarantine it with a reason instead of losing it. ``id`` is ``file:line`` (or
``file:#row``), deterministic across runs and cluster sizes.

Line-oriented files (JSONL, line-per-document text) are read as several byte ranges,
one Ray task and one block each, so a single big file does not put the whole per-record
stage on one core. Range boundaries sit on line starts (the driver reads a few bytes
around each split point) and each range's first line number comes from parallel newline
counts, so ids are the same as reading the file whole.
"""

from __future__ import annotations

import glob
import itertools
import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

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

MIB = 1 << 20
SPREAD_MIN_BYTES = MIB
"""Line-oriented inputs at least this big are split over the whole cluster."""

MIN_SPREAD_RANGE = 256 << 10
"""Smallest range made only to use more CPUs: smaller ones cost more in task overhead."""

SCAN_CHUNK = 8 << 10
"""Bytes the driver reads at a time when looking for the line start after a split point."""

SCAN_LIMIT = MIB
"""Most bytes the driver scans per split point; a longer line just merges two ranges."""

COUNT_CHUNK = 4 * MIB
"""Bytes a newline-counting task holds at once."""


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


def _open_random(path: str) -> BinaryIO:
    """A seekable handle (local file or pyarrow's random-access file), to read ranges."""
    if "://" in path and not path.startswith("file://"):
        from pyarrow import fs

        filesystem, inner = fs.FileSystem.from_uri(path)
        return filesystem.open_input_file(inner)  # type: ignore[return-value]
    return open(path.removeprefix("file://"), "rb")


def _read_at(path: str, start: int, end: int) -> bytes:
    with _open_random(path) as f:
        f.seek(start)
        return f.read(end - start)


def count_newlines(path: str, start: int, end: int) -> int:
    """Newlines in bytes [start, end): how far the line numbers of later ranges shift.

    Reads in chunks, so a task's memory stays bounded whatever the range size.
    """
    count = 0
    with _open_random(path) as f:
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


# ---- planning the reads (driver: sizes and a few bytes per split point) -----------------


@dataclass(frozen=True)
class ReadSpec:
    """What one read task reads: a whole file, or a byte range of a line-oriented one."""

    src: dict[str, str]
    """path, name, fmt and columns (JSON) of the file."""

    start: int = 0
    """First byte of the range (a line start)."""

    end: int | None = None
    """End of the range (exclusive); None reads the whole file with ``read_file``."""

    first_line: int = 1
    """Number of the range's first line in the file."""


def next_line_start(f: BinaryIO, pos: int, limit: int) -> int | None:
    """The first line start at or after ``pos``, scanning no further than ``limit``.

    A line start is 0 or the offset after a newline. None when no newline is found
    before ``limit`` or the end of the file: the caller drops that split point.
    """
    if pos <= 0:
        return 0
    offset = pos - 1  # a newline just before pos makes pos itself a line start
    f.seek(offset)
    while offset < limit:
        chunk = f.read(min(SCAN_CHUNK, limit - offset))
        if not chunk:
            return None
        hit = chunk.find(b"\n")
        if hit >= 0:
            return offset + hit + 1
        offset += len(chunk)
    return None


def line_ranges(path: str, size: int, n: int) -> list[tuple[int, int]]:
    """About ``n`` byte ranges of a file covering it, each starting at a line start.

    The driver reads at most ``SCAN_LIMIT`` bytes per split point (never a whole file);
    points without a newline close by are dropped, so long lines make bigger ranges.
    """
    if n <= 1 or size <= 1:
        return [(0, size)]
    points = [k * size // n for k in range(1, n)]
    with _open_random(path) as f:
        found = [
            next_line_start(f, p, min(size, nxt, p - 1 + SCAN_LIMIT))
            for p, nxt in zip(points, [*points[1:], size], strict=True)
        ]
    cuts = sorted({c for c in found if c is not None and 0 < c < size})
    bounds = [0, *cuts, size]
    return list(itertools.pairwise(bounds))


def is_line_oriented(path: str, text_unit: str) -> bool:
    """Files whose records are lines, so any line start is a safe place to split them."""
    kind = file_kind(path)
    return kind == "jsonl" or (kind == "text" and text_unit == "line")


def ranges_per_file(sizes: list[int], block_bytes: int, min_ranges: int) -> list[int]:
    """How many ranges to cut each line-oriented file into.

    One per ``block_bytes`` bounds a task's memory; a corpus of at least
    ``SPREAD_MIN_BYTES`` also gets ``min_ranges`` in all (spread by size, none smaller
    than ``MIN_SPREAD_RANGE``) so that a single file still keeps every CPU busy.
    """
    counts = [max(1, math.ceil(size / block_bytes)) for size in sizes]
    total = sum(sizes)
    if total < SPREAD_MIN_BYTES or sum(counts) >= min_ranges:
        return counts
    return [
        max(n, min(math.ceil(min_ranges * size / total), size // MIN_SPREAD_RANGE))
        for n, size in zip(counts, sizes, strict=True)
    ]


def _size_or_none(path: str) -> int | None:
    try:
        with _open_random(path) as f:
            return f.seek(0, os.SEEK_END)
    except OSError:
        return None


def plan_reads(
    sources: list[Source], text_unit: str, block_bytes: int, min_ranges: int
) -> list[list[ReadSpec]]:
    """Every file's read tasks, in input order (range line numbers not yet known)."""
    srcs = [
        {"path": s.path, "name": s.name, "fmt": s.fmt, "columns": json.dumps(s.columns)}
        for s in sources
    ]
    sizes = {
        i: size
        for i, src in enumerate(srcs)
        if is_line_oriented(src["path"], text_unit)
        and (size := _size_or_none(src["path"])) is not None
    }
    counts = ranges_per_file(list(sizes.values()), block_bytes, min_ranges)
    n_ranges = dict(zip(sizes, counts, strict=True))
    return [_file_specs(src, sizes.get(i), n_ranges.get(i, 1)) for i, src in enumerate(srcs)]


def _file_specs(src: dict[str, str], size: int | None, n: int) -> list[ReadSpec]:
    """A line-oriented file's ranges; one whole-file task for other files and for files
    the driver cannot stat or open (that task reports them as unreadable)."""
    if size is None:
        return [ReadSpec(src)]
    try:
        ranges = line_ranges(src["path"], size, n)
    except OSError:
        return [ReadSpec(src)]
    return [ReadSpec(src, start, end) for start, end in ranges]


def number_lines(specs: list[ReadSpec], newlines: list[int]) -> list[ReadSpec]:
    """Each range's first line number: the prefix sum of the newlines before it.

    ``newlines`` has one count per range but the last (whose count nobody needs).
    """
    firsts = itertools.accumulate(newlines, initial=1)
    return [replace(spec, first_line=n) for spec, n in zip(specs, firsts, strict=True)]


# ---- the dataset (the driver submits, tasks read) -------------------------------------


def read_spec(spec: ReadSpec, text_column: str, text_unit: str) -> pa.Table:
    """Run one read task: its rows as one block."""
    if spec.end is None:
        rows = read_file(spec.src, text_column, text_unit)
    else:
        rows = read_range(spec.src, spec.start, spec.end, spec.first_line, text_column)
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


def _count_or_none(path: str, start: int, end: int) -> int | None:
    """A newline count, or None if the file became unreadable (read it whole instead)."""
    try:
        return count_newlines(path, start, end)
    except OSError:
        return None


def _cluster_cpus() -> int:
    import ray

    ray.get_runtime_context()  # connects the way any Ray call would (ray.init if needed)
    return int(ray.cluster_resources().get("CPU", 1))


def _number_ranges(plan: list[list[ReadSpec]]) -> list[ReadSpec]:
    """Every read task with its first line number, from newline counts done in parallel
    tasks (each reads only its range; a file's last range needs no count)."""
    import ray

    count = ray.remote(_count_or_none).options(scheduling_strategy="SPREAD")
    pending = [[count.remote(s.src["path"], s.start, s.end) for s in specs[:-1]] for specs in plan]
    newlines = iter(ray.get([ref for refs in pending for ref in refs]))
    numbered: list[ReadSpec] = []
    for specs in plan:
        counts = list(itertools.islice(newlines, len(specs) - 1))
        if None in counts:
            numbered.append(ReadSpec(specs[0].src))  # read it whole: it reports the error
        else:
            numbered += number_lines(specs, counts)
    return numbered


def read_dataset(
    sources: list[Source], text_column: str, text_unit: str, read_block_mb: float = 16.0
) -> Any:
    """A Ray Dataset of raw rows in input order, one block per read task.

    JSONL and line-text files are cut into byte ranges (see ``read_block_mb``); other
    files are read whole. Blocks are built by plain tasks and handed over in order with
    ``from_arrow_refs``: a Ray Data map would emit them in completion order.
    """
    import ray

    block_bytes = max(1, int(read_block_mb * MIB))
    specs = _number_ranges(plan_reads(sources, text_unit, block_bytes, 2 * _cluster_cpus()))
    if not specs:
        return ray.data.from_arrow(ROW_SCHEMA.empty_table())
    read = ray.remote(read_spec).options(scheduling_strategy="SPREAD")
    return ray.data.from_arrow_refs([read.remote(s, text_column, text_unit) for s in specs])


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
