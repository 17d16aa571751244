"""Data job: raw corpora -> cleaned, deduplicated (tokenized) Parquet shards on Ray Data."""

from __future__ import annotations

from pathlib import Path

from raylm.cluster import init_ray
from raylm.config import resolve_path, save_resolved, to_dict
from raylm.data.config import DataJobConfig
from raylm.data.pipeline import run
from raylm.data.readers import expand_inputs
from raylm.manifest import Manifest
from raylm.runner import entrypoint, load_from_argv


def main(argv: list[str] | None = None) -> int:
    cfg: DataJobConfig = load_from_argv("data", argv)
    out = Path(resolve_path(cfg.output_dir))
    files = [s.path for s in expand_inputs(cfg.inputs, cfg.format, cfg.columns)]
    manifest = Manifest.start("data", to_dict(cfg), inputs=files)
    init_ray(cfg.ray.address, cfg.ray.namespace)
    stats = run(cfg)
    save_resolved(cfg, out)
    outputs = {
        name: str(out / name)
        for name in ("shards", "stats.json", "dataset_meta.json", "quarantine", "dedup")
        if (out / name).exists()
    }
    metrics = {
        k: stats[k]
        for k in ("documents_in", "documents_out", "quarantined", "rows_out", "tokens_out")
    }
    manifest.finish(outputs, metrics).write(out)
    print(f"data job done: {metrics} -> {out}")
    return 0


if __name__ == "__main__":
    entrypoint(main)
