"""The data job: raw corpora -> cleaned, deduplicated (tokenized) Parquet shards on Ray Data."""

from __future__ import annotations

import dataclasses
import json

from raylm import storage
from raylm.config import resolve_model
from raylm.data.config import DataJobConfig
from raylm.job import Job, Result
from raylm.outputs import DatasetOutput, tokenizer_hash

OUTPUT_NAMES = ("shards", "stats.json", "dataset_meta.json", "quarantine", "dedup")
HEADLINE = ("documents_in", "documents_out", "quarantined", "rows_out", "tokens_out")


class DataJob(Job[DataJobConfig]):
    name = "data"
    config = DataJobConfig
    remote_outputs = True  # shards, stats and records go through raylm.storage

    def setup(self, cfg: DataJobConfig) -> DataJobConfig:
        """The tokenizer as an absolute path: the manifest records it, and the train job
        compares it with its own model's wherever that job runs."""
        if not cfg.tokenize.tokenizer:
            return cfg
        tokenizer = resolve_model(cfg.tokenize.tokenizer)
        return dataclasses.replace(
            cfg, tokenize=dataclasses.replace(cfg.tokenize, tokenizer=tokenizer)
        )

    def inputs(self, cfg: DataJobConfig) -> list[str]:
        from raylm.data.sources import expand_inputs

        if cfg.mix.enabled:
            from raylm.data.mix import mix_sources

            return [s.path for s in mix_sources(cfg.mix, cfg.format, cfg.columns)[0]]
        return [s.path for s in expand_inputs(cfg.inputs, cfg.format, cfg.columns)]

    def run(self, cfg: DataJobConfig, out_dir: str) -> Result:
        from raylm.data.pipeline import run

        stats = run(cfg)
        outputs = {
            name: storage.join(out_dir, name)
            for name in OUTPUT_NAMES
            if storage.exists(storage.join(out_dir, name))
        }
        metrics = {k: stats[k] for k in HEADLINE}
        print(f"data job done: {metrics} -> {out_dir}")
        if "mix" in stats:  # the recipe and its realised shares, in the manifest
            metrics["mix"] = stats["mix"]["recipe"]
        return Result(outputs, metrics, dataset_output(out_dir))


def dataset_output(out: str) -> DatasetOutput:
    """The typed output, from the ``dataset_meta.json`` the shards were written with
    (``out``: a local path or a bucket URI, recorded as given)."""
    meta = json.loads(storage.read_text(storage.join(out, "dataset_meta.json")))
    tokenizer = meta.get("tokenizer")
    return DatasetOutput(
        path=str(out),
        task=meta["task"],
        tokenized=bool(meta["tokenized"]),
        tokenizer=tokenizer,
        tokenizer_hash=tokenizer_hash(tokenizer, meta.get("template")) if tokenizer else None,
        cutoff_len=meta["cutoff_len"] if meta["tokenized"] else None,
        rows=int(meta["num_rows"]),
        template=meta.get("template"),
    )
