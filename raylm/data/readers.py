"""The raw rows of a job's inputs as a Ray Dataset, read in parallel by plain Ray tasks.

Line-oriented files (JSONL, line-per-document text) are read as several byte ranges,
one Ray task and one block each, so a single big file does not put the whole per-record
stage on one core. Range boundaries sit on line starts (the driver reads a few bytes
around each split point) and each range's first line number comes from parallel newline
counts, so ids are the same as reading the file whole. Which files and formats:
``raylm.data.sources``; how one file becomes rows: ``raylm.data.rows``.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, replace
from typing import Any, BinaryIO

import pyarrow as pa

from raylm.data.rows import (
    ROW_SCHEMA,
    count_newlines,
    open_random,
    read_file,
    read_range,
)
from raylm.data.sources import Source, file_kind

MIB = 1 << 20
SPREAD_MIN_BYTES = MIB
"""Line-oriented inputs at least this big are split over the whole cluster."""

MIN_SPREAD_RANGE = 256 << 10
"""Smallest range made only to use more CPUs: smaller ones cost more in task overhead."""

SCAN_CHUNK = 8 << 10
"""Bytes the driver reads at a time when looking for the line start after a split point."""

SCAN_LIMIT = MIB
"""Most bytes the driver scans per split point; a longer line just merges two ranges."""


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
    with open_random(path) as f:
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
        with open_random(path) as f:
            return f.seek(0, os.SEEK_END)
    except OSError:
        return None


def plan_reads(
    sources: list[Source], text_unit: str, block_bytes: int, min_ranges: int
) -> list[list[ReadSpec]]:
    """Every file's read tasks, in input order (range line numbers not yet known)."""
    srcs = [s.for_task() for s in sources]
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


def min_ranges() -> int:
    """Ranges a small corpus is spread over: two per cluster CPU."""
    return 2 * _cluster_cpus()


def read_specs(
    sources: list[Source], text_unit: str, read_block_mb: float, spread: int | None = None
) -> list[ReadSpec]:
    """Every read task in input order, numbered; ``spread``: ``min_ranges()`` unless
    given (a resumed data job passes its first run's, so its blocks are the same)."""
    block_bytes = max(1, int(read_block_mb * MIB))
    spread = min_ranges() if spread is None else spread
    return _number_ranges(plan_reads(sources, text_unit, block_bytes, spread))


def read_dataset(
    sources: list[Source], text_column: str, text_unit: str, read_block_mb: float = 16.0
) -> Any:
    """A Ray Dataset of raw rows in input order, one block per read task.

    JSONL and line-text files are cut into byte ranges (see ``read_block_mb``); other
    files are read whole. Blocks are built by plain tasks and handed over in order with
    ``from_arrow_refs``: a Ray Data map would emit them in completion order.
    """
    import ray

    specs = read_specs(sources, text_unit, read_block_mb)
    if not specs:
        return ray.data.from_arrow(ROW_SCHEMA.empty_table())
    read = ray.remote(read_spec).options(scheduling_strategy="SPREAD")
    return ray.data.from_arrow_refs([read.remote(s, text_column, text_unit) for s in specs])
