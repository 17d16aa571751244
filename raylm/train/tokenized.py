"""A train run's saved tokenized set: ``data.tokenized_path`` (LLaMA-Factory's
``tokenized_path``).

LLaMA-Factory tokenizes on the first run, saves the set there (``save_to_disk``) and
trains on; a later run finding the directory non-empty loads it and ignores every other
data setting, whatever tokenizer, template or cutoff made it. (Releases before March
2025 exited after saving; current ones train on.) raylm does the same, save then train,
read back later, with three differences:

- the set is a data job output (``shards/part-00000.parquet``, ``dataset_meta.json``,
  ``manifest.json``), so ``data.path: <tokenized_path>`` trains on it too and lineage
  and contamination tools read it like any shards;
- ``manifest.json`` is written last: a directory without it is an unfinished set (a run
  that died saving) and is made again, never read;
- it records the tokenizer (by content hash), template, cutoff, stage and data settings
  it was made with: a run that differs in any is refused, naming each difference.

The held-out rows (``val_size``, ``eval_dataset``) and ``data_stats.json`` are saved
with it, so a run on the saved set evaluates and counts what the first run did; the
shards are one row group, the order the first run's in-memory rows had, so the same seed
trains in the same order.
"""

from __future__ import annotations

import io
import json
import logging
from typing import Any

from raylm import storage
from raylm.config import ConfigError, resolve_model, resolve_path
from raylm.data.hub import is_hub
from raylm.manifest import MANIFEST, Manifest
from raylm.outputs import DatasetOutput, read_output, tokenizer_hash
from raylm.train.config import STAGE_DATA, TrainJobConfig

log = logging.getLogger(__name__)

SHARD = "shards/part-00000.parquet"
HELD_OUT = "held_out.parquet"
STATS = "data_stats.json"
META = "dataset_meta.json"
OURS = {"shards", META, STATS, HELD_OUT, MANIFEST}
SETTINGS = ("path", "datasets", "eval_datasets", "mix_strategy", "interleave_probs",
            "replacements", "format", "max_samples", "val_size")  # fmt: skip
"""The data settings that decide which rows a set holds (with train.seed)."""


def settings(cfg: TrainJobConfig) -> dict[str, Any]:
    """What made the rows: the data settings, the seed (mixing, held-out split), stage,
    the sft masks and default system prompt."""
    d, made = cfg.data, cfg.loss.masks | {"default_system": cfg.model.default_system}
    return (
        {k: getattr(d, k) for k in SETTINGS} | {"seed": cfg.train.seed, "stage": cfg.stage} | made
    )


def reuse(cfg: TrainJobConfig) -> dict[str, Any] | None:
    """The saved set as a shards source when ``tokenized_path`` holds a finished one made
    as this run would make it; None when there is none yet (this run makes it)."""
    path = resolve_path(str(cfg.data.tokenized_path))
    where = f"data.tokenized_path={cfg.data.tokenized_path!r}"
    try:
        found = storage.listdir(path) if storage.is_dir(path) else []
    except OSError as err:
        raise ConfigError(f"{where} cannot be read: {err}") from None
    if MANIFEST not in found:
        _check_fresh(cfg, path, found, where)
        return None
    output = read_output(DatasetOutput, path)
    manifest = Manifest.read(path)
    made = ((manifest.config if manifest else None) or {}).get("settings") or {}
    _check_same(cfg, output, made, where)
    log.warning(
        "%s: training on the tokenized set saved there; data.path is not read", where
    )  # LLaMA-Factory: "Loading dataset from disk will ignore other data arguments"
    held = storage.join(path, HELD_OUT)
    source: dict[str, Any] = {"kind": "shards", "path": path, "output": output, "limit": None}
    if storage.exists(held):
        import pyarrow.parquet as pq

        source["held_out"] = pq.read_table(io.BytesIO(storage.read_bytes(held))).to_pylist()
    if storage.exists(storage.join(path, STATS)):
        source["stats"] = json.loads(storage.read_text(storage.join(path, STATS)))
    return source


def _check_fresh(cfg: TrainJobConfig, path: str, found: list[str], where: str) -> None:
    """Nothing finished there: an empty or absent dir, or a set that died half-written;
    anything else there is the user's and is never written over. Shards are tokenized
    already: there is nothing to save."""
    data = resolve_path(cfg.data.path)
    if not is_hub(data) and storage.exists(storage.join(data, MANIFEST)):
        raise ConfigError(
            f"{where}: data.path={cfg.data.path!r} is a data job's tokenized shards "
            "already; drop tokenized_path"
        )
    other = sorted(set(found) - OURS)
    if other:
        raise ConfigError(
            f"{where} is neither empty nor a tokenized set (no {MANIFEST}; it holds "
            f"{other[:5]}); point it at a new or empty directory"
        )
    if found:
        log.warning("%s: an unfinished set (no %s): tokenizing again", where, MANIFEST)


def _check_same(
    cfg: TrainJobConfig, output: DatasetOutput, made: dict[str, Any], where: str
) -> None:
    """The set's tokenizer, template, cutoff, stage and data settings are this run's."""
    model = resolve_model(cfg.model.name_or_path)
    want = settings(cfg)
    diffs = [f"{k}: saved {made.get(k)!r}, this run {v!r}" for k, v in want.items()
             if k in made and made[k] != v]  # fmt: skip
    if output.task != STAGE_DATA.get(cfg.stage, cfg.stage):
        diffs.append(f"stage data: saved {output.task!r}, this run {cfg.stage!r}")
    if output.template != cfg.model.template:
        diffs.append(f"template: saved {output.template!r}, this run {cfg.model.template!r}")
    elif output.tokenizer_hash != tokenizer_hash(model, cfg.model.template):
        diffs.append(f"tokenizer: saved {output.tokenizer} (files hashed), this run {model}")
    if output.cutoff_len != cfg.data.cutoff_len:
        diffs.append(f"cutoff_len: saved {output.cutoff_len}, this run {cfg.data.cutoff_len}")
    if diffs:
        raise ConfigError(
            f"{where} was tokenized for another run: " + "; ".join(diffs) + ". Delete the "
            "directory (it is made again), point tokenized_path at a new one, or restore "
            "those settings"
        )


def save(cfg: TrainJobConfig, source: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """Write the rows a raw-data run tokenized (and its held-out rows and counts) as a
    finished set at ``tokenized_path``: the manifest last. Returns the path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = resolve_path(str(cfg.data.tokenized_path))
    storage.makedirs(storage.join(path, "shards"))
    storage.write_bytes(storage.join(path, SHARD), _parquet(pa.Table.from_pylist(rows), pq))
    if source.get("held_out"):
        held = pa.Table.from_pylist(source["held_out"])
        storage.write_bytes(storage.join(path, HELD_OUT), _parquet(held, pq))
    storage.write_text(storage.join(path, STATS), json.dumps(source.get("stats") or {}, indent=2))
    model = resolve_model(cfg.model.name_or_path)
    meta = {"task": STAGE_DATA.get(cfg.stage, cfg.stage), "tokenized": True, "tokenizer": model,
            "template": cfg.model.template, "cutoff_len": cfg.data.cutoff_len,
            "num_rows": len(rows)}  # fmt: skip
    storage.write_text(storage.join(path, META), json.dumps(meta, indent=2))
    output = DatasetOutput(path=path, task=meta["task"], tokenized=True, tokenizer=model,
                           tokenizer_hash=tokenizer_hash(model, cfg.model.template),
                           cutoff_len=cfg.data.cutoff_len, rows=len(rows),
                           template=cfg.model.template)  # fmt: skip
    inputs = [s.path for s in [*source["sources"], *(source.get("eval_sources") or [])]]
    config = {"tokenized_by": "train", "inputs": list(dict.fromkeys(inputs)), "format": "auto",
              "settings": settings(cfg)}  # fmt: skip
    manifest = Manifest.start("data", config, list(dict.fromkeys(inputs)))
    outputs = {"shards": storage.join(path, "shards"), "stats.json": storage.join(path, STATS)}
    manifest.finish(outputs, {"rows_out": len(rows)}, output.to_record()).write(path)
    log.info("data.tokenized_path: saved %d tokenized rows at %s", len(rows), path)
    return path


def _parquet(table: Any, pq: Any) -> bytes:
    """One row group, as the run's in-memory plan has it (the same order on reuse)."""
    sink = io.BytesIO()
    pq.write_table(table, sink, row_group_size=max(1, table.num_rows))
    return sink.getvalue()
