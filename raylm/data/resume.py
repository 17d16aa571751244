"""Resuming a killed data job: a completion marker per finished block, as datatrove
writes one per finished rank into its ``completions/`` folder.

The per-record stage (read, parse, normalise, filter, scrub, sign) is where a data job
spends its time, and it works on independent blocks: one per read task (a file, or a
byte range of a line-oriented one, ``raylm.data.readers``). Each block's task writes its
processed rows to ``_resume/blocks/<id>.parquet`` and then, once that file is whole, its
marker ``_resume/completions/<id>.json`` (one atomic write: a local rename, or a single
object PUT). A rerun of the job into the same ``output_dir`` loads the blocks whose
marker exists and whose fingerprint matches, and reads and processes only the others.
The stages after it (line and document dedup, tokenization, writing) see every block
and rerun whole; they are cheap next to it. ``_resume/`` is deleted once the job has
written ``stats.json``, so a finished job's directory holds only its outputs.

A marker is reused only for the same work: its fingerprint hashes the job's config
(less ``output_dir`` and ``ray``), the job's kind, this module's format, the block's
file and byte range, and the size and modification time of its file and of the filter
blocklists (what a bucket's listing shows, and what ``raylm.manifest`` hashes there). A
marker with another fingerprint is never mixed in: its block is redone, and the job logs
and counts it (``stats.json``'s ``resume.stale``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from raylm import storage
from raylm.config import to_dict
from raylm.data.config import DataJobConfig
from raylm.data.readers import ReadSpec, read_spec
from raylm.data.steps import PROCESSED_SCHEMA, process_block

log = logging.getLogger(__name__)

RESUME_DIR = "_resume"
FORMAT = 1
"""Bump when a processed block's meaning changes, so older markers are not reused."""

PAUSE_ENV = "RAYLM_DATA_TEST_BLOCK_PAUSE_S"
"""Tests only: seconds each block's task sleeps after writing its marker, so a test can
kill a job while some blocks are complete and the rest are not. Read by the driver."""


@dataclasses.dataclass(frozen=True)
class Block:
    """One read task's worth of input and what its marker must say to be reused."""

    spec: ReadSpec
    id: str
    """Names the block's files: a hash of its file and byte range."""

    fingerprint: str
    """Hash of config, kind, file identity and range (see the module docstring)."""


def file_identity(path: str) -> str:
    """``size:mtime_ns`` of a file (local or in a bucket), ``missing`` if absent: what
    changes when its bytes are rewritten, without reading them."""
    import pyarrow.fs as pafs

    fs, inner = storage.filesystem(path)
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.NotFound:
        return "missing"
    return f"{info.size}:{info.mtime_ns}"


def _sha(value: Any) -> str:
    body = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(body.encode()).hexdigest()


def config_fingerprint(cfg: DataJobConfig, kind: str) -> str:
    """What every block's work depends on besides its own bytes."""
    settings = {k: v for k, v in to_dict(cfg).items() if k not in ("output_dir", "ray")}
    blocklists = {p: file_identity(p) for p in cfg.filters.blocklist}
    return _sha([FORMAT, kind, settings, blocklists, str(PROCESSED_SCHEMA)])


def plan_blocks(specs: list[ReadSpec], config_fp: str) -> list[Block]:
    """Each read task as a block with its id and fingerprint (one stat per file)."""
    identity = {p: file_identity(p) for p in {s.src["path"] for s in specs}}
    blocks = []
    for spec in specs:
        where = [spec.src["path"], spec.start, spec.end]
        fp = _sha([config_fp, dataclasses.asdict(spec), identity[spec.src["path"]]])
        blocks.append(Block(spec, _sha(where)[:24], fp))
    return blocks


class Store:
    """Where one job's markers and processed blocks live: ``<output_dir>/_resume``."""

    def __init__(self, out: str) -> None:
        self.root = storage.join(out, RESUME_DIR)

    def marker(self, block_id: str) -> str:
        return storage.join(self.root, "completions", f"{block_id}.json")

    def data(self, block_id: str) -> str:
        return storage.join(self.root, "blocks", f"{block_id}.parquet")

    def save(self, block: Block, table: pa.Table, counts: dict[str, Any]) -> None:
        """The block's rows, then its marker: a marker always names a whole file."""
        fs, path = storage.filesystem(self.data(block.id))
        fs.create_dir(path.rpartition("/")[0], recursive=True)
        pq.write_table(table, path, filesystem=fs)
        record = {"block": block.id, "fingerprint": block.fingerprint, "counts": counts}
        record["rows"] = table.num_rows
        storage.write_text(self.marker(block.id), json.dumps(record))

    def load(self, block_id: str) -> pa.Table:
        fs, path = storage.filesystem(self.data(block_id))
        return pq.read_table(path, filesystem=fs).cast(PROCESSED_SCHEMA)

    def completed(self, blocks: list[Block]) -> tuple[dict[str, dict], list[str]]:
        """(block id -> marker of each reusable block, ids whose marker is stale)."""
        names = set(storage.listdir(storage.join(self.root, "completions")))
        done: dict[str, dict] = {}
        stale: list[str] = []
        for block in blocks:
            if f"{block.id}.json" not in names:
                continue
            record = json.loads(storage.read_text(self.marker(block.id)))
            if record.get("fingerprint") == block.fingerprint:
                done[block.id] = record
            else:
                stale.append(block.id)
        return done, stale

    def spread(self, compute: Any) -> int:
        """The read plan's spread, fixed by the first run: a cluster that grew or shrank
        since then would otherwise cut small files into other ranges, other blocks."""
        path = storage.join(self.root, "plan.json")
        if storage.exists(path):
            return int(json.loads(storage.read_text(path))["spread"])
        value = int(compute())
        storage.write_text(path, json.dumps({"spread": value}))
        return value

    def clear(self) -> None:
        storage.delete_dir(self.root)


def run_block(
    block: Block, cfg: DataJobConfig, kind: str, store: Store, pause: float
) -> tuple[pa.Table, dict[str, Any]]:
    """Read and process one block, save it with its marker (a Ray task's body)."""
    raw = read_spec(block.spec, cfg.text_column, cfg.text_unit)
    table, counts = process_block(raw, cfg, kind)
    store.save(block, table, counts)
    if pause:
        time.sleep(pause)
    return table, counts


def load_block(store: Store, block_id: str) -> pa.Table:
    """A completed block's processed rows (a Ray task's body)."""
    return store.load(block_id)


def pause_seconds() -> float:
    """The ``PAUSE_ENV`` hook's seconds (0 unless a test sets it)."""
    return float(os.environ.get(PAUSE_ENV) or 0)


def process(
    sources: list[Any], cfg: DataJobConfig, kind: str, out: str
) -> tuple[Any, dict[str, Any], dict[str, int]]:
    """Every block through the per-record steps, reusing the completed ones: the
    processed Dataset (blocks in input order), the steps' counts summed over blocks,
    and ``stats.json``'s ``resume`` (blocks, skipped, redone, stale).

    One plain Ray task per block: the blocks are already sized for one task each, and a
    Ray Data map would re-block them and add executor start-up.
    """
    import ray

    from raylm.data import readers
    from raylm.data.steps import sum_stats

    store = Store(out)
    spread = store.spread(readers.min_ranges)
    specs = readers.read_specs(sources, cfg.text_unit, cfg.read_block_mb, spread)
    blocks = plan_blocks(specs, config_fingerprint(cfg, kind))
    done, stale = store.completed(blocks)
    _log_resume(store, len(blocks), len(done), stale)
    work = ray.remote(run_block).options(num_returns=2, scheduling_strategy="SPREAD")
    load = ray.remote(load_block)
    pause = pause_seconds()
    refs, counts, pending = [], [], []
    for block in blocks:
        if block.id in done:
            refs.append(load.remote(store, block.id))
            counts.append(done[block.id]["counts"])
        else:
            table, stats = work.remote(block, cfg, kind, store, pause)
            refs.append(table)
            pending.append(stats)
    counts += ray.get(pending)
    if not refs:
        refs = [ray.put(PROCESSED_SCHEMA.empty_table())]
    info = {"blocks": len(blocks), "skipped": len(done), "redone": len(blocks) - len(done)}
    return ray.data.from_arrow_refs(refs), sum_stats(counts), info | {"stale": len(stale)}


def _log_resume(store: Store, total: int, done: int, stale: list[str]) -> None:
    if done:
        log.info(
            "data job: resuming: %d of %d block(s) already complete in %s", done, total, store.root
        )
    if stale:
        log.warning(
            "data job: %d completed block(s) in %s were made with another config or other "
            "input bytes (e.g. %s); redoing them",
            len(stale),
            store.root,
            stale[0],
        )
