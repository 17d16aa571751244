"""Training rows streamed from Parquet, a few row groups at a time, in a resumable order.

A train worker never holds its whole shard: it reads the row groups its steps need,
directly with pyarrow (no Ray Data read tasks: on a small node the training workers hold
every CPU, and a task that needs one would never be scheduled), so its memory stays
flat as the corpus grows. A data job's shards are written in row groups of
``raylm.data.shards.ROW_GROUP_ROWS`` rows; foreign Parquet with huge row groups works,
but a worker then holds ``shuffle_row_groups`` of those.

Ordering semantics (what exact resume and the sample audit rely on):

1. The dataset is a list of *pieces*, one per row group, in canonical order: files
   sorted by name, row groups in file order (``max_samples`` keeps the first rows).
2. Epoch ``e`` permutes the pieces with ``default_rng([seed, e])`` and cuts the
   permutation into *windows* of ``shuffle_row_groups`` consecutive pieces. The rows of
   window ``w`` are shuffled with ``default_rng([seed, e, w])``. Concatenated, the
   windows make the epoch's *stream*: a function of (data, seed, epoch) only, the same
   at every world size.
3. Rank ``r`` of ``W`` takes stream positions ``[r*n, (r+1)*n)`` with ``n = N // W``:
   equal slices (at most ``W - 1`` rows of the epoch go unused, different ones each
   epoch), so every rank takes the same number of steps and collectives never hang.
4. Step ``k`` of an epoch takes the rank's positions ``[k*b, (k+1)*b)`` with ``b`` =
   micro batch x gradient accumulation. The position is a pure function of the step:
   resuming at step ``s`` computes it and reads only the window(s) it falls in, never
   what it skips. Each example is seen once per epoch.
5. A run resumed on another worker count (``Worlds``: the size from each step on) keeps
   the epoch's stream: the positions no rank has reached yet are laid end to end and
   split again by rules 3 and 4 over the new ranks (``segment_of``), so no example of
   that epoch is seen twice or skipped; the next epoch starts whole at the new size.
   The history must travel with the checkpoint (``RankStream.resized``), and an
   epochs-based run's length in steps is counted from it (``stop_step``): a rest of the
   epoch split over fewer ranks takes more steps, over more ranks fewer.

Ids for the audit (``checkpoint.log_sample_ids``): a row's ``id`` column when it has one,
else ``<file name>:<row in file>``.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import os
from collections.abc import Sequence
from functools import cached_property
from typing import Any

import numpy as np
import pyarrow as pa

MEMORY = "<memory>"
"""The file name of a plan whose one Parquet file travels with it as bytes."""


@dataclasses.dataclass(frozen=True)
class Piece:
    """One row group (or its first ``rows`` rows, where ``max_samples`` cuts it)."""

    file: int
    """Index into ``Plan.files``."""

    group: int
    """Row group in that file."""

    first_row: int
    """Row number in the file of the group's first row (for audit ids)."""

    rows: int
    """Rows of the group that are used."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """What every rank gets from the driver: where the rows are, never the rows (except
    for a small raw dataset tokenized on the fly, which travels as Parquet bytes)."""

    base: str
    """Directory (path or URI) of the files; ``""`` for an in-memory plan."""

    files: tuple[str, ...]
    """File names under ``base``, sorted (``(MEMORY,)`` for an in-memory plan)."""

    pieces: tuple[Piece, ...]
    """Row groups in canonical order."""

    columns: tuple[str, ...]
    """Columns to read (those the objective needs that the files have)."""

    shuffle_row_groups: int = 1
    """Row groups whose rows are shuffled together (see the module docstring)."""

    blob: bytes | None = None
    """The one Parquet file of an in-memory plan."""

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.pieces)

    def has_columns(self, names: Sequence[str]) -> bool:
        return all(c in self.columns for c in names)


def plan_of_table(table: pa.Table, shuffle_row_groups: int = 1) -> Plan:
    """An in-memory plan: ``table`` as one Parquet file of one row group (a small raw
    dataset tokenized in the driver; the whole set is shuffled together)."""
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=max(1, table.num_rows))
    pieces = (Piece(0, 0, 0, table.num_rows),) if table.num_rows else ()
    return Plan("", (MEMORY,), pieces, tuple(table.column_names), shuffle_row_groups,
                sink.getvalue().to_pybytes())  # fmt: skip


def pieces_of(row_group_rows: Sequence[Sequence[int]], limit: int | None) -> tuple[Piece, ...]:
    """Pieces of files whose row groups hold ``row_group_rows[file]`` rows, in canonical
    order, keeping only the first ``limit`` rows overall (None: all)."""
    pieces, left = [], limit if limit is not None else float("inf")
    for f, groups in enumerate(row_group_rows):
        first = 0
        for g, n in enumerate(groups):
            take = int(min(n, left))
            if take > 0:
                pieces.append(Piece(f, g, first, take))
            left -= take
            first += n
    return tuple(pieces)


# ---- the order: a function of (plan, seed, epoch) -----------------------------------------


def epoch_windows(n_pieces: int, window: int, seed: int, epoch: int) -> list[list[int]]:
    """Piece indices of each window of the epoch, in stream order."""
    order = np.random.default_rng([seed, epoch]).permutation(n_pieces).tolist()
    return [order[i : i + window] for i in range(0, n_pieces, window)]


def window_order(n_rows: int, seed: int, epoch: int, window: int) -> np.ndarray:
    """The shuffled order of one window's rows."""
    return np.random.default_rng([seed, epoch, window]).permutation(n_rows)


def rank_range(total: int, rank: int, world: int) -> tuple[int, int]:
    """Stream positions ``[start, end)`` of one rank: equal, contiguous slices."""
    n = total // world
    return rank * n, rank * n + n


# ---- which positions a step reads: segments of one world size -----------------------------

Ranges = tuple[tuple[int, int], ...]
Worlds = tuple[tuple[int, int], ...]
"""``((first_step, world_size), ...)``: the world size from each step on, sorted, the first
at step 0. One entry for a run that never changed size; a run resumed on another worker
count (elastic resume) adds ``(resume step, new size)``."""


@dataclasses.dataclass(frozen=True)
class Segment:
    """Consecutive steps of one epoch at one world size. They split ``ranges`` (the part of
    the epoch's stream not yet taken when the segment began) into equal rank slices, as in
    rule 3 of the module docstring; a whole epoch at one size is one segment of
    ``((0, N),)``."""

    epoch: int
    first_step: int
    steps: int
    world: int
    ranges: Ranges

    @property
    def per_rank(self) -> int:
        return _length(self.ranges) // self.world


def _length(ranges: Ranges) -> int:
    return sum(b - a for a, b in ranges)


def _sub(ranges: Ranges, start: int, end: int) -> Ranges:
    """Stream ranges of the virtual positions ``[start, end)`` of ``ranges`` laid end to end."""
    out, offset = [], 0
    for a, b in ranges:
        lo, hi = max(a, a + start - offset), min(b, a + end - offset)
        if lo < hi:
            out.append((lo, hi))
        offset += b - a
    return tuple(out)


def _rest(ranges: Ranges, world: int, taken: int) -> Ranges:
    """What is left of ``ranges`` once each of ``world`` ranks took the first ``taken``
    positions of its slice (the rows no rank reached yet, and the unsplit tail)."""
    n = _length(ranges) // world
    parts = [_sub(ranges, r * n + taken, (r + 1) * n) for r in range(world)]
    parts.append(_sub(ranges, world * n, _length(ranges)))
    return tuple(rng for part in parts for rng in part)


def segment_of(step: int, worlds: Worlds, total: int, per_step: int) -> Segment:
    """The segment holding ``step``. Within an epoch, a resize re-splits what is left, so
    no row is taken twice or skipped across it; an epoch ends when its segment has no
    whole step left for every rank, and the next starts on the whole stream."""
    epoch, first, ranges, i = 0, 0, ((0, total),), 0
    while True:
        world = worlds[i][1]
        resize = worlds[i + 1][0] if i + 1 < len(worlds) else None
        end = first + (_length(ranges) // world) // per_step
        if resize is not None and resize < end:  # resized mid-epoch
            if step < resize:
                return Segment(epoch, first, resize - first, world, ranges)
            ranges, first, i = _rest(ranges, world, (resize - first) * per_step), resize, i + 1
            continue
        if step < end:
            return Segment(epoch, first, end - first, world, ranges)
        if end == first and ranges == ((0, total),):
            raise ValueError(f"{total} rows give no step of {per_step} to each of {world} ranks")
        epoch, first, ranges = epoch + 1, end, ((0, total),)
        i += resize is not None and resize <= end  # resized at the epoch's end


def stop_step(epochs: float, worlds: Worlds, total: int, per_step: int) -> int:
    """The step a run of ``epochs`` passes over the data ends at, given its world sizes
    (the last one taken to hold from then on).

    What is honoured is each epoch's rows, not a step count: whole epochs end where
    ``segment_of`` ends them, so a run resized mid-epoch takes the steps that finish what
    is left of that epoch at the new size (2 -> 1 workers: twice as many steps for the
    rest; no row twice, none skipped), not ``epochs`` x the new size's steps per epoch.
    A fractional last epoch takes ``ceil(epochs * S) - int(epochs) * S`` steps' worth of
    rows, ``S`` its steps at the size it starts with; at one size throughout this is
    ``ceil(epochs * S)`` steps in all, as a run that never resized counts them."""
    whole = int(epochs)
    step, target = 0, -1
    while True:
        seg = segment_of(step, worlds, total, per_step)
        if seg.epoch > whole or (seg.epoch == whole and epochs == whole):
            return step
        if seg.epoch == whole:
            take = seg.world * per_step
            if target < 0:  # the partial epoch's first segment: its size's steps per epoch
                whole_steps = seg.per_rank // per_step
                target = (math.ceil(epochs * whole_steps) - whole * whole_steps) * take
            if target <= seg.steps * take:
                return seg.first_step + math.ceil(target / take)
            target -= seg.steps * take
        step = seg.first_step + seg.steps


def rows_taken(step: int, worlds: Worlds, per_step: int) -> int:
    """Rows all ranks together trained on in steps ``[0, step)`` (``samples_seen``)."""
    ends = [first for first, _ in worlds[1:]] + [step]
    spans = zip(worlds, ends, strict=True)
    return sum(max(0, min(step, end) - first) * world * per_step for (first, world), end in spans)


class Epoch:
    """The stream of one epoch: window boundaries and each window's row order."""

    def __init__(self, plan: Plan, seed: int, epoch: int) -> None:
        self.plan, self.seed, self.epoch = plan, seed, epoch
        self.windows = epoch_windows(len(plan.pieces), plan.shuffle_row_groups, seed, epoch)
        sizes = [sum(plan.pieces[i].rows for i in w) for w in self.windows]
        self.starts = np.cumsum([0, *sizes]).tolist()

    def locate(self, position: int) -> tuple[int, int]:
        """(window, offset in the window) of a stream position."""
        w = bisect.bisect_right(self.starts, position) - 1
        return w, position - self.starts[w]

    def order(self, w: int) -> np.ndarray:
        return window_order(self.starts[w + 1] - self.starts[w], self.seed, self.epoch, w)


# ---- reading ----------------------------------------------------------------------------


class RankStream:
    """The rows of one rank, step by step: reads a window when a step first needs it and
    keeps only that one (plus the open Parquet files of its pieces)."""

    def __init__(
        self, plan: Plan, seed: int, rank: int, world: int, per_step: int = 1,
        worlds: Worlds | None = None,
    ) -> None:  # fmt: skip
        self.plan, self.seed, self.rank, self.per_step = plan, seed, rank, per_step
        self.worlds: Worlds = worlds or ((0, world),)
        """World sizes so far (``Worlds``); a run resumed at another size extends it."""
        self.start, end = rank_range(plan.rows, rank, world)
        self.rows_per_rank = end - self.start
        self.steps_per_epoch = self.rows_per_rank // per_step
        """Steps of an epoch run wholly at this world size."""
        self._epoch: Epoch | None = None
        self._segment: Segment | None = None
        self._window: tuple[int, int, pa.Table, np.ndarray] | None = None
        self.windows_read = 0
        """Windows loaded so far (a resumed run reads only what it needs: tests check)."""

    def resized(self, worlds: Worlds | None, saved_world: int, step: int) -> Worlds:
        """Continue the sizes a checkpoint recorded (``worlds``; None from a checkpoint that
        recorded only ``saved_world``), adding this run's size from ``step`` when it
        differs; returns what the next checkpoint should record."""
        worlds = tuple(map(tuple, worlds or ((0, saved_world),)))  # type: ignore[arg-type]
        world = self.worlds[-1][1]
        self.worlds = worlds if worlds[-1][1] == world else (*worlds, (step, world))
        self._segment = None
        return self.worlds

    def step(self, step: int) -> tuple[int, list[dict[str, Any]]]:
        """(epoch, this rank's ``per_step`` rows) of optimizer step ``step``."""
        seg = self._segment
        if seg is None or not seg.first_step <= step < seg.first_step + seg.steps:
            seg = self._segment = segment_of(step, self.worlds, self.plan.rows, self.per_step)
        first = self.rank * seg.per_rank + (step - seg.first_step) * self.per_step
        return seg.epoch, self._read(seg.epoch, _sub(seg.ranges, first, first + self.per_step))

    def rows(self, epoch: int, start: int, count: int) -> list[dict[str, Any]]:
        """This rank's rows at its positions ``[start, start + count)`` of ``epoch``, read
        as one world size reads a whole epoch."""
        if start + count > self.rows_per_rank:
            raise IndexError(f"rows {start}..{start + count} past this rank's {self.rows_per_rank}")
        return self._read(epoch, ((self.start + start, self.start + start + count),))

    def _read(self, epoch: int, ranges: Ranges) -> list[dict[str, Any]]:
        """The rows at stream positions ``ranges`` of ``epoch``, in order."""
        if self._epoch is None or self._epoch.epoch != epoch:
            self._epoch = Epoch(self.plan, self.seed, epoch)
        out: list[dict[str, Any]] = []
        for pos, end in ranges:
            while pos < end:
                w, offset = self._epoch.locate(pos)
                table, order = self._load(epoch, w)
                take = min(end - pos, len(order) - offset)
                out += table.take(pa.array(order[offset : offset + take])).to_pylist()
                pos += take
        return out

    def _load(self, epoch: int, w: int) -> tuple[pa.Table, np.ndarray]:
        if self._window is None or self._window[:2] != (epoch, w):
            assert self._epoch is not None
            self._window = None  # drop the old window before reading the next
            pieces = [self.plan.pieces[i] for i in self._epoch.windows[w]]
            table = pa.concat_tables([self._piece(p) for p in pieces], promote_options="permissive")
            self._window = (epoch, w, table, self._epoch.order(w))
            self.windows_read += 1
        return self._window[2], self._window[3]

    def _piece(self, piece: Piece) -> pa.Table:
        """One piece's rows, with an ``id`` for the audit when the file has none."""
        table = self._file(piece.file).read_row_group(piece.group, columns=list(self.plan.columns))
        table = table.slice(0, piece.rows)
        if "id" not in table.column_names:
            name = os.path.basename(self.plan.files[piece.file])
            ids = [f"{name}:{piece.first_row + i}" for i in range(piece.rows)]
            table = table.append_column("id", pa.array(ids, pa.string()))
        return table

    def _file(self, index: int) -> Any:
        """An open ParquetFile; the few a window needs are kept (their footers are small)."""
        cache = self._files
        if index not in cache:
            if len(cache) >= 2 * self.plan.shuffle_row_groups:
                cache.pop(next(iter(cache)))
            cache[index] = self._open(index)
        return cache[index]

    @cached_property
    def _files(self) -> dict[int, Any]:
        return {}

    def _open(self, index: int) -> Any:
        """A ParquetFile of the plan's ``index``-th file (or of its in-memory bytes)."""
        import pyarrow.parquet as pq

        if self.plan.blob is not None:
            return pq.ParquetFile(pa.BufferReader(self.plan.blob))
        fs, root = self._fs
        return pq.ParquetFile(f"{root}/{self.plan.files[index]}", filesystem=fs, pre_buffer=False)

    @cached_property
    def _fs(self) -> tuple[Any, str]:
        """The files' filesystem, resolved once per worker (credentials from its env)."""
        from raylm import storage

        return storage.filesystem(self.plan.base)
