"""Training rows for the workers: a data job's shards, or a raw file tokenized on the fly.

Exact resume needs every run with the same seed to see the same rows in the same
order on the same rank. Ray Train's default ``streaming_split`` hands blocks to
whichever worker asks first, so ``deterministic_split`` replaces it with an ordered,
equal ``split``; each worker then reads its own shard through
``ray.train.get_dataset_shard`` and orders it by ``id`` and a per-epoch permutation
of the seed (``epoch_order``), so the position in the data is just the step counter.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from raylm.config import ConfigError, resolve_model, resolve_path
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
    """Describe ``data.path``: its kind, whether it is tokenized shards, and the file list."""
    path = Path(resolve_path(cfg.data.path))
    if path.is_dir() and (path / META).exists():
        meta = json.loads((path / META).read_text())
        _check_meta(meta, cfg, path)
        return {"kind": "shards", "path": str(path), "meta": meta}
    file, fmt, columns = _raw_file(path, cfg)
    return {"kind": "raw", "path": str(file), "format": fmt, "columns": columns}


def _check_meta(meta: dict[str, Any], cfg: TrainJobConfig, path: Path) -> None:
    if meta.get("kind") != cfg.stage:
        raise ConfigError(
            f"data.path={cfg.data.path!r} holds {meta.get('kind')!r} data but stage={cfg.stage!r}; "
            "run the data job with the matching kind or change stage"
        )
    if not meta.get("tokenized"):
        raise ConfigError(
            f"data.path={cfg.data.path!r} holds untokenized shards; set the data job's "
            "tokenize option (with this model's tokenizer) or point data.path at a raw file"
        )
    if not list((path / "shards").glob("part-*.parquet")):
        raise ConfigError(f"data.path={cfg.data.path!r}: no shards/part-*.parquet in {path}")


def _raw_file(path: Path, cfg: TrainJobConfig) -> tuple[Path, str, dict | None]:
    """A raw file, or a LLaMA-Factory dataset name resolved through ``dataset_info.json``."""
    if path.is_file():
        return path, _format(cfg, path), None
    info_file = path.parent / "dataset_info.json"
    if info_file.exists():
        info = json.loads(info_file.read_text())
        if path.name in info:
            entry = info[path.name]
            file = path.parent / entry.get("file_name", "")
            if not file.is_file():
                raise ConfigError(f"{info_file}: dataset {path.name!r} file {file} not found")
            fmt = "preference" if entry.get("ranking") else entry.get("formatting", "alpaca")
            return file, fmt if cfg.data.format == "auto" else cfg.data.format, entry.get("columns")
        raise ConfigError(
            f"data.path={cfg.data.path!r}: no dataset {path.name!r} in {info_file} "
            f"(has {sorted(info)})"
        )
    raise ConfigError(
        f"data.path={cfg.data.path!r}: expected a data job output dir (with {META}), a "
        f"jsonl/json/parquet file, or a dataset named in a dataset_info.json; found nothing at {path}"
    )


def _format(cfg: TrainJobConfig, path: Path) -> str:
    if cfg.data.format != "auto":
        return cfg.data.format
    if cfg.stage in ("pt", "dpo"):
        return {"pt": "text", "dpo": "preference"}[cfg.stage]
    first = next(iter(read_records(path, limit=1)), {})
    for key, fmt in (
        ("messages", "openai"),
        ("conversations", "sharegpt"),
        ("instruction", "alpaca"),
    ):
        if key in first:
            return fmt
    raise ConfigError(
        f"data.path={cfg.data.path!r}: cannot tell the sft format from keys {sorted(first)}; "
        "set data.format to alpaca, sharegpt or openai"
    )


def read_records(path: Path, limit: int | None = None) -> Iterator[dict[str, Any]]:
    """Records of a jsonl / json (list) / parquet file, failing with the line that is bad."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    elif suffix == ".json" and path.read_text().lstrip().startswith("["):
        rows = json.loads(path.read_text())
    elif suffix in (".jsonl", ".json"):
        rows = _jsonl(path)
    else:
        raise ConfigError(
            f"data.path: unsupported file type {suffix!r}; use jsonl, json or parquet"
        )
    for count, row in enumerate(rows):
        if limit is not None and count >= limit:
            return
        yield row


def _jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as err:
                    raise ConfigError(f"{path}:{n}: not valid JSON: {err}") from None


def tokenize_record(record: dict, stage: str, fmt: str, columns: dict | None, tok, cutoff: int):
    """One raw record -> the shard columns, through raylm.data (the one tokenizer path)."""
    from raylm.data.formats import to_messages, to_preference, to_text
    from raylm.data.tokenize import tokenize_preference, tokenize_pt, tokenize_sft

    if stage == "pt":
        return tokenize_pt(to_text(record, columns), tok, cutoff)
    if stage == "sft":
        return tokenize_sft(to_messages(record, fmt, columns), tok, cutoff)
    prompt, chosen, rejected = to_preference(record, columns)
    return tokenize_preference(prompt, chosen, rejected, tok, cutoff)


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
    """Tokenize a raw file in the driver; a bad record stops the job with its line number.

    Fine for the small sets one trains on directly; large corpora go through the data
    job, which quarantines bad records instead of stopping.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        resolve_model(cfg.model.name_or_path), trust_remote_code=cfg.model.trust_remote_code
    )
    rows = []
    records = read_records(Path(source["path"]), cfg.data.max_samples)
    for i, record in enumerate(records):
        try:
            row = tokenize_record(
                record, cfg.stage, source["format"], source["columns"], tok, cfg.data.cutoff_len
            )
        except ValueError as err:
            raise ConfigError(f"{source['path']}: record {i}: {err}") from None
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
