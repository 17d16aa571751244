"""Plain Ray tasks over blocks (Arrow tables held as object refs): map, and shuffle by key.

The data job's steps after reading run this way rather than as Ray Data operators: a
Ray Data execution costs about 0.5 s of start-up on a small cluster, and its hash
shuffle starts aggregator actors per call (about 10 s per shuffle on a 2-core machine),
while dedup alone takes a dozen steps. The driver holds only refs and small counts.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa


def partitions() -> int:
    """How many partitions a shuffle makes: one per cluster CPU, two at least."""
    import ray

    return max(2, int(ray.cluster_resources().get("CPU", 2)))


def partition_of(keys: np.ndarray, parts: int) -> np.ndarray:
    """The partition of each key in a shuffle of ``parts``: pandas' hash is seeded with a
    constant, so stable across nodes, and a task can tell where a key will land."""
    return pd.util.hash_array(keys) % parts


def _split(table: pa.Table, key: str, parts: int, columns: list[str] | None) -> list[pa.Table]:
    if columns is not None and table.num_rows:
        table = table.select(columns)
    if table.num_rows == 0:
        return [table] * parts
    codes = partition_of(table.column(key).to_numpy(zero_copy_only=False), parts)
    return [table.filter(pa.array(codes == p)) for p in range(parts)]


def _reduce(fn: Any, *tables: pa.Table) -> pa.Table:
    frames = [t.to_pandas() for t in tables if t.num_rows] or [tables[0].to_pandas()]
    df = pd.concat(frames, ignore_index=True)  # blocks may differ in string vs large_string
    return pa.Table.from_pandas(fn(df), preserve_index=False)


def shuffle_blocks(
    refs: list, key: str, fn: Any, columns: list[str] | None = None, parts: int | None = None
) -> list:
    """Run ``fn`` on hash partitions of the blocks ``refs``: all rows of a key meet in one call.

    A map-reduce of plain tasks: each block is split by the hash of ``key`` into
    ``parts`` pieces (``partitions()`` by default), and each partition's pieces meet in
    one pandas call.
    """
    import ray

    parts = parts or partitions()
    split = ray.remote(_split).options(num_returns=parts)
    reduce = ray.remote(_reduce)
    pieces = [split.remote(ref, key, parts, columns) for ref in refs]
    return [reduce.remote(fn, *[p[i] for p in pieces]) for i in range(parts)] if pieces else []


def map_blocks(refs: list, fn: Any, *args: Any, num_returns: int = 1) -> list:
    """``fn(table, *args)`` on every block as a plain task (no Ray Data executor start-up)."""
    import ray

    task = ray.remote(fn).options(num_returns=num_returns)
    return [task.remote(ref, *args) for ref in refs]


def combine(refs: list, fn: Any) -> Any:
    """``fn(*blocks)`` once, as one task (a ref): what every block then needs (the ids of
    all candidate pairs) is built once, not once per block from every block."""
    import ray

    return ray.remote(fn).remote(*refs)


def unique_values(*columns: str) -> Any:
    """A ``combine`` function: the distinct values of ``columns`` over all blocks (the
    ends of every pair, the removed ids); null-typed when every block is empty."""

    def fn(*tables: pa.Table) -> pa.Array:
        arrays = [t[c].combine_chunks() for t in tables if t.num_rows for c in columns]
        if not arrays:
            return pa.array([], pa.null())
        return pa.concat_arrays([a.cast(arrays[0].type) for a in arrays]).unique()

    return fn


def apply_pandas(table: pa.Table, fn: Any) -> pa.Table:
    return pa.Table.from_pandas(fn(table.to_pandas()), preserve_index=False)


def num_rows(refs: list) -> int:
    import ray

    return sum(ray.get(map_blocks(refs, lambda t: t.num_rows)))
