"""Resuming a killed data job: a completion marker per finished block, as datatrove
writes one per finished rank into its ``completions/`` folder.

The per-record stage (read, parse, normalise, filter, scrub, sign) is where a data job
spends its time, and it works on independent blocks: one per read task (a file, or a
byte range of a line-oriented one, ``raylm.data.readers``). Each block's task writes its
processed rows to ``_resume/blocks/<id>.parquet`` and then, once that file is whole, its
marker ``_resume/completions/<id>.json`` (one atomic write: a local rename, or a single
object PUT). A rerun of the job into the same ``output_dir`` loads the blocks whose
marker exists and whose fingerprint matches, and reads and processes only the others.
Dedup then needs every block, so it is one block of its own: its removal records are
saved to ``_resume/dedup/`` with the marker ``completions/dedup.json``, and a job killed
later, while tokenizing or writing, skips dedup's shuffles on the rerun. Line dedup,
tokenization and writing rerun whole. ``_resume/`` is deleted once the job has written
``stats.json``, so a finished job's directory holds only its outputs; ``events.jsonl``
(appended, like the train job's) says what each rerun reused.

A marker is reused only for the same work: its fingerprint hashes the job's config
(less ``output_dir`` and ``ray``), the job's kind, raylm's version and this module's
``FORMAT``, the block's file and byte range, and the size and modification time of its
file and of the filter blocklists (what a bucket's listing shows, and what
``raylm.manifest`` hashes there), and those of the perplexity filter's model directory
(its scores are saved with the block). A marker with another fingerprint is never mixed in:
its block is redone, and the job logs and counts it (``stats.json``'s
``resume.stale``). The dedup marker's fingerprint is that of every block together.
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
from raylm.data.perplexity import gpus_per_block, model_identity
from raylm.data.readers import ReadSpec, read_spec
from raylm.data.steps import PROCESSED_SCHEMA, process_block

log = logging.getLogger(__name__)

RESUME_DIR = "_resume"
EVENTS = "events.jsonl"
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
    """Names the block's files: a hash of its read spec (file, format, columns, range;
    one file registered twice with other columns is two blocks)."""

    fingerprint: str
    """Hash of config, kind, file identity and range (see the module docstring)."""


def file_identity(path: str) -> str:
    """``size:mtime_ns`` of a file (local or in a bucket), ``missing`` if absent: what
    changes when its bytes are rewritten, without reading them."""
    import pyarrow.fs as pafs

    try:
        fs, inner = storage.filesystem(path)
        info = fs.get_file_info(inner)
    except OSError as err:  # its read task quarantines it as unreadable, as without resume
        return f"unreadable: {err}"
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
    ppl = model_identity(cfg.filters.perplexity.model) if cfg.filters.perplexity_on else ""
    return _sha([FORMAT, _version(), kind, settings, blocklists, ppl, str(PROCESSED_SCHEMA)])


def _version() -> str:
    """raylm's version: a marker left by another release is not reused."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("raylm")
    except PackageNotFoundError:
        return "unknown"


def plan_blocks(specs: list[ReadSpec], config_fp: str) -> list[Block]:
    """Each read task as a block with its id and fingerprint (one stat per file)."""
    identity = {p: file_identity(p) for p in {s.src["path"] for s in specs}}
    blocks = []
    for spec in specs:
        what = dataclasses.asdict(spec)  # the file as its source reads it, and the range
        fp = _sha([config_fp, what, identity[spec.src["path"]]])
        blocks.append(Block(spec, _sha(what)[:24], fp))
    return blocks


class Store:
    """Where one job's markers and processed blocks live: ``<output_dir>/_resume``."""

    def __init__(self, out: str) -> None:
        self.out, self.root = out, storage.join(out, RESUME_DIR)

    def marker(self, block_id: str) -> str:
        return storage.join(self.root, "completions", f"{block_id}.json")

    def data(self, block_id: str) -> str:
        return storage.join(self.root, "blocks", f"{block_id}.parquet")

    def save(self, block: Block, table: pa.Table, counts: dict[str, Any]) -> None:
        """The block's rows, then its marker: a marker always names a whole file."""
        _write_table(table, self.data(block.id))
        record = {"block": block.id, "fingerprint": block.fingerprint, "counts": counts}
        record["rows"] = table.num_rows
        storage.write_text(self.marker(block.id), json.dumps(record))

    def load(self, block_id: str) -> pa.Table:
        return _read_table(self.data(block_id)).cast(PROCESSED_SCHEMA)

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


@dataclasses.dataclass
class Resumed:
    """What the per-record stage reused, for the stages after it and ``stats.json``."""

    store: Store
    fingerprint: str
    """Hash of every block's fingerprint: what the dedup stage's result depends on."""

    stats: dict[str, Any]
    """``stats.json``'s ``resume``: blocks, skipped, redone, stale, and dedup (ran or
    reused)."""

    def event(self, **record: Any) -> None:
        """One line of ``events.jsonl`` (appended: it survives a kill, like the train
        job's), so what each run of a killed job reused can be told afterwards."""
        line = json.dumps({"event": "resume", **record, "time": time.time()})
        storage.append_text(storage.join(self.store.out, EVENTS), line + "\n")

    def dedup(self) -> DedupCache:
        return DedupCache(self)


class DedupCache:
    """Dedup's removal records, saved with a marker once found: a job killed while
    tokenizing or writing does not run dedup's shuffles again. They depend on every
    block, so the marker's fingerprint is ``Resumed.fingerprint``."""

    def __init__(self, resumed: Resumed) -> None:
        self.resumed = resumed
        self.root = storage.join(resumed.store.root, "dedup")
        self.marker = resumed.store.marker("dedup")

    def load(self) -> tuple[list, dict[str, Any]] | None:
        """The saved removal blocks (refs) and dedup info, or None to run dedup."""
        import ray

        if not storage.exists(self.marker):
            return None
        record = json.loads(storage.read_text(self.marker))
        if record["fingerprint"] != self.resumed.fingerprint:
            log.warning("data job: %s is from other blocks; running dedup again", self.marker)
            return None
        read = ray.remote(_read_table)
        parts = [read.remote(storage.join(self.root, name)) for name in record["parts"]]
        self.resumed.stats["dedup"] = "reused"
        self.resumed.event(stage="dedup")
        return parts, record["info"]

    def save(self, removals: list, info: dict[str, Any]) -> None:
        """Every removal block, then the marker naming them."""
        import ray

        names = [f"part-{i:05d}.parquet" for i in range(len(removals))]
        write = ray.remote(_write_table)
        ray.get(
            [
                write.remote(r, storage.join(self.root, n))
                for r, n in zip(removals, names, strict=True)
            ]
        )
        record = {"fingerprint": self.resumed.fingerprint, "parts": names, "info": info}
        storage.write_text(self.marker, json.dumps(record))
        if pause_seconds():  # tests: a moment to kill the job with dedup complete
            time.sleep(pause_seconds())


def _write_table(table: pa.Table, uri: str) -> None:
    """All or nothing (``storage.write_bytes``): a reader never sees half a block."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_bytes(uri, sink.getvalue().to_pybytes())


def _read_table(uri: str) -> pa.Table:
    fs, path = storage.filesystem(uri)
    return pq.read_table(path, filesystem=fs)


def process(
    sources: list[Any], cfg: DataJobConfig, kind: str, out: str
) -> tuple[Any, dict[str, Any], Resumed]:
    """Every block through the per-record steps, reusing the completed ones: the
    processed Dataset (blocks in input order), the steps' counts summed over blocks,
    and what was reused.

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
    resumed = _resumed(store, blocks, len(done), stale)
    gpus = gpus_per_block(cfg.filters.perplexity, cfg.filters.perplexity_on)
    work = ray.remote(run_block).options(num_returns=2, scheduling_strategy="SPREAD", num_gpus=gpus)
    load = ray.remote(load_block)
    refs, counts, pending = [], [], []
    for block in blocks:
        if block.id in done:
            refs.append(load.remote(store, block.id))
            counts.append(done[block.id]["counts"])
        else:
            table, stats = work.remote(block, cfg, kind, store, pause_seconds())
            refs.append(table)
            pending.append(stats)
    counts += ray.get(pending)
    if not refs:
        refs = [ray.put(PROCESSED_SCHEMA.empty_table())]
    return ray.data.from_arrow_refs(refs), sum_stats(counts), resumed


def _resumed(store: Store, blocks: list[Block], done: int, stale: list[str]) -> Resumed:
    """The record of what is reused, logged (and an event) when anything was found."""
    stats = {"blocks": len(blocks), "skipped": done, "redone": len(blocks) - done}
    stats |= {"stale": len(stale), "dedup": "ran"}
    resumed = Resumed(store, _sha([b.fingerprint for b in blocks]), stats)
    if done:
        log.info("data job: resuming: %d of %d block(s) already complete", done, len(blocks))
    if stale:
        log.warning(
            "data job: %d completed block(s) in %s were made with another config or other "
            "input bytes (e.g. %s); redoing them",
            len(stale),
            store.root,
            stale[0],
        )
    if done or stale:
        resumed.event(stage="blocks", **{k: v for k, v in stats.items() if k != "dedup"})
    return resumed
