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

Ids for the audit (``checkpoint.log_sample_ids``): a row's ``id`` column when it has one,
else ``<file name>:<row in file>``.
"""

from __future__ import annotations

import bisect
import dataclasses
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

    def __init__(self, plan: Plan, seed: int, rank: int, world: int) -> None:
        self.plan, self.seed = plan, seed
        self.start, end = rank_range(plan.rows, rank, world)
        self.rows_per_rank = end - self.start
        self._epoch: Epoch | None = None
        self._window: tuple[int, int, pa.Table, np.ndarray] | None = None
        self.windows_read = 0
        """Windows loaded so far (a resumed run reads only what it needs: tests check)."""

    def rows(self, epoch: int, start: int, count: int) -> list[dict[str, Any]]:
        """This rank's rows at its positions ``[start, start + count)`` of ``epoch``."""
        if start + count > self.rows_per_rank:
            raise IndexError(f"rows {start}..{start + count} past this rank's {self.rows_per_rank}")
        if self._epoch is None or self._epoch.epoch != epoch:
            self._epoch = Epoch(self.plan, self.seed, epoch)
        out: list[dict[str, Any]] = []
        pos = self.start + start
        while count > 0:
            w, offset = self._epoch.locate(pos)
            table, order = self._load(epoch, w)
            take = min(count, len(order) - offset)
            out += table.take(pa.array(order[offset : offset + take])).to_pylist()
            pos, count = pos + take, count - take
        return out

    def _load(self, epoch: int, w: int) -> tuple[pa.Table, np.ndarray]:
        if self._window is None or self._window[:2] != (epoch, w):
            assert self._epoch is not None
            self._window = None  # drop the old window before reading the next
            pieces = [self.plan.pieces[i] for i in self._epoch.windows[w]]
            table = pa.concat_tables([self._read(p) for p in pieces], promote_options="permissive")
            self._window = (epoch, w, table, self._epoch.order(w))
            self.windows_read += 1
        return self._window[2], self._window[3]

    def _read(self, piece: Piece) -> pa.Table:
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
