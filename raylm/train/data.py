"""Training rows for the workers: a data job's shards, or a raw file tokenized on the fly.

Exact resume needs every run with the same seed to see the same rows in the same
order on the same rank. Ray Train's default ``streaming_split`` hands blocks to
whichever worker asks first, so ``deterministic_split`` replaces it with an ordered,
equal ``split``; each worker then reads its own shard through
``ray.train.get_dataset_shard`` and orders it by ``id`` and a per-epoch permutation
of the seed (``epoch_order``), so the position in the data is just the step counter.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from raylm.config import ConfigError, resolve_model, resolve_path
from raylm.data.sources import DATASET_INFO, Source, registry_sources
from raylm.manifest import MANIFEST
from raylm.outputs import DatasetOutput, read_output, tokenizer_hash
from raylm.train.config import TrainJobConfig

log = logging.getLogger(__name__)

META = "dataset_meta.json"
COLUMNS = {
    "pt": ("input_ids", "loss_mask"),
    "sft": ("input_ids", "loss_mask"),
    "dpo": ("chosen_input_ids", "chosen_loss_mask", "rejected_input_ids", "rejected_loss_mask"),
}
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
"""Optional precomputed reference log-probs; when present DPO needs no reference model."""


def deterministic_split() -> Any:
    """A DataConfig that splits each dataset into equal, ordered shards: the same rows per
    rank on every run.

    ``equal=True`` drops at most ``world_size - 1`` rows so ranks take the same number
    of steps (unequal shards would hang the collectives at the end of an epoch). Built in
    a function so importing this module does not import Ray (and freeze its auth mode).
    """
    from ray.train import DataConfig

    class DeterministicSplit(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):  # type: ignore[override]
            output: list[dict[str, Any]] = [{} for _ in range(world_size)]
            for name, ds in datasets.items():
                ds = ds.copy(ds)
                ds.context.execution_options.preserve_order = True
                for rank, shard in enumerate(ds.split(world_size, equal=True)):
                    output[rank][name] = shard.iterator()
            return output

    return DeterministicSplit()


def data_inputs(cfg: TrainJobConfig) -> dict[str, Any]:
    """Describe ``data.path``: a data job's shards (checked against this run) or raw files."""
    path = Path(resolve_path(cfg.data.path))
    if path.is_dir() and ((path / MANIFEST).exists() or (path / META).exists()):
        output = dataset_output(path, cfg)
        check_dataset(output, cfg, path)
        return {"kind": "shards", "path": str(path), "output": output}
    sources = raw_sources(path, cfg)
    common = os.path.commonpath([s.path for s in sources])
    return {"kind": "raw", "path": common, "sources": sources}


def dataset_output(path: Path, cfg: TrainJobConfig) -> DatasetOutput:
    """What the data job recorded in its manifest about the shards in ``path``."""
    try:
        return read_output(DatasetOutput, path)
    except ConfigError as err:
        raise ConfigError(
            f"data.path={cfg.data.path!r} looks like a data job's output but {err}; "
            "(re-)run the data job that writes it"
        ) from None


def check_dataset(output: DatasetOutput, cfg: TrainJobConfig, path: Path) -> None:
    """Shards fit this run: its stage, tokenized with its model's tokenizer at its cutoff."""
    where = f"data.path={cfg.data.path!r}"
    if output.task != cfg.stage:
        raise ConfigError(
            f"{where} holds {output.task!r} data but stage={cfg.stage!r}; "
            "run the data job with the matching kind or change stage"
        )
    if not output.tokenized:
        raise ConfigError(
            f"{where} holds untokenized shards; set the data job's "
            "tokenize option (with this model's tokenizer) or point data.path at a raw file"
        )
    check_tokenization(output, cfg)
    if not list((path / "shards").glob("part-*.parquet")):
        raise ConfigError(f"{where}: no shards/part-*.parquet in {path}")


def check_tokenization(output: DatasetOutput, cfg: TrainJobConfig) -> None:
    """Token ids mean nothing to a model with another vocabulary, and rows longer or
    shorter than ``data.cutoff_len`` are not what this run's config says it trains on.

    Tokenizers are compared by the hash of their files (two paths to one tokenizer
    agree); a hub id that is not on disk compares by name.
    """
    model = resolve_model(cfg.model.name_or_path)
    same_tokenizer = tokenizer_hash(model) == output.tokenizer_hash
    same_cutoff = output.cutoff_len == cfg.data.cutoff_len
    if not (same_tokenizer and same_cutoff):
        raise ConfigError(_mismatch(output, cfg, model, same_tokenizer, same_cutoff))


def _mismatch(
    output: DatasetOutput, cfg: TrainJobConfig, model: str, same_tokenizer: bool, same_cutoff: bool
) -> str:
    """Both sides, and the two ways out: re-tokenize for this run, or run to fit the data."""
    edited = not same_tokenizer and output.tokenizer == model
    fixes = [] if same_tokenizer else [f"tokenize.tokenizer={model}"]
    fixes += [] if same_cutoff else [f"tokenize.cutoff_len={cfg.data.cutoff_len}"]
    if same_tokenizer:
        instead = f"set data.cutoff_len={output.cutoff_len}"
    else:
        instead = "train a model that uses that tokenizer"
        instead += "" if same_cutoff else f" with data.cutoff_len={output.cutoff_len}"
    return (
        f"data.path={cfg.data.path!r} was tokenized with {output.tokenizer}"
        f"{' (its tokenizer files changed since)' if edited else ''} "
        f"(cutoff_len {output.cutoff_len}) but this run trains {model} with "
        f"data.cutoff_len={cfg.data.cutoff_len}; re-run the data job with "
        f"{' '.join(fixes)}, or {instead}"
    )


def raw_sources(path: Path, cfg: TrainJobConfig) -> list[Source]:
    """A raw file, or a LLaMA-Factory dataset name resolved through the
    ``dataset_info.json`` beside it (the data job's own resolution: ``raylm.data.sources``).

    Sources are named by their full path, so an error names the file and line.
    """
    if path.is_file():
        return [Source(str(path), str(path), cfg.data.format)]
    registry = path.parent / DATASET_INFO
    if registry.is_file():
        found = registry_sources(str(registry), [path.name], cfg.data.format)
        return [dataclasses.replace(s, name=s.path) for s in found]
    raise ConfigError(
        f"data.path={cfg.data.path!r}: expected a data job output dir (with {MANIFEST}), a "
        "jsonl/json/parquet/text file, or a dataset named in a dataset_info.json; "
        f"found nothing at {path}"
    )


def raw_records(sources: list[Source], limit: int | None) -> Iterator[tuple[str, Any, Source]]:
    """``(id, record, source)`` of the first ``limit`` records; a row that holds no record
    (bad JSON, undecodable bytes) stops the job naming its file and line."""
    from raylm.data.rows import BadRow, records

    every = ((ident, record, src) for src in sources for ident, record in records(src))
    try:
        yield from itertools.islice(every, limit)
    except BadRow as err:
        raise ConfigError(str(err)) from None


def tokenize_record(record: Any, src: Source, stage: str, tok: Any, cutoff: int) -> dict:
    """One raw record -> the shard columns, through raylm.data (the one record and
    tokenizer path). As in LLaMA-Factory, the stage decides how a record reads: pt takes
    its text (or the ``prompt`` column a registry names), whatever its formatting."""
    from raylm.data.formats import payload_kind, to_payload
    from raylm.data.tokenize import tokenize_payload

    fmt = "text" if stage == "pt" else src.fmt
    payload = to_payload(record, fmt, src.columns, "text", kind=stage)
    found = payload_kind(payload)
    if found != stage:
        raise ValueError(f"record is {found} data but stage={stage!r}")
    return tokenize_payload(payload, tok, cutoff)


def build_dataset(cfg: TrainJobConfig, source: dict[str, Any]):
    """The Ray Dataset every worker's shard comes from."""
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    if source["kind"] == "shards":
        return ray.data.from_items(_read_shards(Path(source["path"]), cfg.data.max_samples))
    return ray.data.from_items(_tokenize_raw(cfg, source))


def _read_shards(path: Path, limit: int | None) -> list[dict[str, Any]]:
    """Read the data job's shards in the driver, not with Ray Data read tasks.

    The training workers hold every CPU of a small node for the whole run, so read or
    split tasks that need a CPU never get one and the run hangs ("Cluster resources are
    not enough to run any task"). Each rank keeps its rows in memory anyway.
    """
    import pyarrow.parquet as pq

    table = pq.read_table(str(path / "shards"))
    if limit:
        table = table.slice(0, limit)
    return table.to_pylist()


def _tokenize_raw(cfg: TrainJobConfig, source: dict[str, Any]) -> list[dict[str, Any]]:
    """Tokenize raw files in the driver; a bad record stops the job naming it.

    Fine for the small sets one trains on directly; large corpora go through the data
    job, which quarantines bad records instead of stopping. Rows are numbered in reading
    order: their ids decide the (seeded) order of training.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        resolve_model(cfg.model.name_or_path), trust_remote_code=cfg.model.trust_remote_code
    )
    rows = []
    for i, (ident, record, src) in enumerate(raw_records(source["sources"], cfg.data.max_samples)):
        try:
            row = tokenize_record(record, src, cfg.stage, tok, cfg.data.cutoff_len)
        except ValueError as err:
            raise ConfigError(f"{ident}: {err}") from None
        rows.append({"id": str(i), **row})
    if not rows:
        raise ConfigError(f"data.path={cfg.data.path!r}: no records")
    return rows


def load_shard_rows(shard: Any, stage: str) -> list[dict[str, Any]]:
    """This rank's rows in a stable order (by id) with the columns the objective needs."""
    wanted = (*COLUMNS[stage], "position_ids", *REF_COLUMNS, "id")
    rows = []
    for row in shard.iter_rows():
        rows.append({k: _plain(row[k]) for k in wanted if k in row and row[k] is not None})
    missing = [c for c in COLUMNS[stage] if rows and c not in rows[0]]
    if missing:
        raise ConfigError(f"training data lacks columns {missing} needed by stage={stage}")
    rows.sort(key=lambda r: str(r.get("id", "")))
    return rows


def _plain(value: Any) -> Any:
    return value.tolist() if hasattr(value, "tolist") else value


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The row order of one epoch: a function of (seed, epoch) only, so resume replays it."""
    import numpy as np

    return np.random.default_rng([seed, epoch]).permutation(n).tolist()
