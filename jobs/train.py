"""Train job: Ray Train workers running DeepSpeed (pt / sft / dpo; full, lora, freeze, qlora).

Submitting it again with the same run_name and storage_path resumes the run from its
newest complete checkpoint.
"""

from __future__ import annotations

from raylm.cluster import init_ray
from raylm.config import resolve_path, save_resolved, to_dict
from raylm.manifest import Manifest
from raylm.runner import entrypoint, load_from_argv
from raylm.train.config import TrainJobConfig
from raylm.train.data import data_inputs
from raylm.train.trainer import run_dir_of, run_training


def main(argv: list[str] | None = None) -> int:
    cfg: TrainJobConfig = load_from_argv("train", argv)
    run_dir = run_dir_of(cfg)
    # The file or shard dir actually read (a LLaMA-Factory dataset name resolves to its file).
    inputs = [data_inputs(cfg)["path"], resolve_path(cfg.model.name_or_path)]
    manifest = Manifest.start("train", to_dict(cfg), inputs=[p for p in inputs if _exists(p)])
    save_resolved(cfg, run_dir)
    init_ray(cfg.ray.address, cfg.ray.namespace)
    result = run_training(cfg)
    outputs = result["outputs"] | _data_manifest(result["source"])
    manifest.finish(outputs, result["metrics"])
    manifest.write(run_dir)
    m = result["metrics"]
    print(
        f"train: {m['steps']} steps, loss {m['first_loss']:.4f} -> {m['final_loss']:.4f}, "
        f"{m['resumes']} resume(s): {run_dir}"
    )
    return 0


def _exists(path: str) -> bool:
    from pathlib import Path

    return Path(path).exists()


def _data_manifest(source: dict) -> dict[str, str]:
    """Link to the data job's manifest (lineage: raw files -> shards -> this run)."""
    from pathlib import Path

    if source["kind"] != "shards":
        return {}
    data_manifest = Manifest.read(source["path"])
    if data_manifest is None:
        return {}
    return {
        "data_manifest": str(Path(source["path"]) / "manifest.json"),
        "data_fingerprint": data_manifest.fingerprint(),
    }


if __name__ == "__main__":
    entrypoint(main)
