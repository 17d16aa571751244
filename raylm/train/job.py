"""The train job: Ray Train workers running DeepSpeed (pt / sft / dpo; full, lora, freeze,
qlora, oft).

Submitting it again with the same run_name and storage_path resumes the run from its
newest complete checkpoint.
"""

from __future__ import annotations

from raylm import storage
from raylm.config import ConfigError
from raylm.job import Job, Result
from raylm.manifest import MANIFEST, Manifest
from raylm.outputs import ModelOutput
from raylm.train.config import TrainJobConfig


class TrainJob(Job[TrainJobConfig]):
    name = "train"
    config = TrainJobConfig

    def setup(self, cfg: TrainJobConfig) -> TrainJobConfig:
        from raylm.train.trainer import for_workers

        return for_workers(cfg)

    def output_dir(self, cfg: TrainJobConfig) -> str:
        from raylm.train.config import run_dir_of

        return run_dir_of(cfg)

    def inputs(self, cfg: TrainJobConfig) -> list[str]:
        """The file or shard dir actually read (a LLaMA-Factory dataset name resolves to
        its file), local or in a bucket (``raylm.storage``: a ``Path`` would make
        ``s3://b/k`` into ``s3:/b/k``, which never exists, and drop the input unrecorded),
        and the base model when it is on disk (a hub id is not hashed).

        The data is always recorded: ``data_inputs`` names ``data.path`` when there is
        nothing there, and a run whose manifest lacks its data would claim less than it
        read."""
        from raylm.train.data import data_inputs

        data = data_inputs(cfg)["path"]
        if not storage.exists(data):
            raise ConfigError(f"data.path={cfg.data.path!r}: nothing at {data}")
        model = cfg.model.name_or_path
        rm = [cfg.ppo.reward_model] if cfg.stage == "ppo" and cfg.ppo.reward_model else []
        return ([data, model] if storage.exists(model) else [data]) + rm

    remote_outputs = True

    def run(self, cfg: TrainJobConfig, out: str) -> Result:
        from raylm.train.trainer import run_training

        result = run_training(cfg)
        m = result["metrics"]
        print(
            f"train: {m['steps']} steps, loss {m['first_loss']:.4f} -> {m['final_loss']:.4f}, "
            f"{m['resumes']} resume(s): {out}"
        )
        outputs = result["outputs"] | _data_link(result["source"])
        return Result(outputs, m, model_output(cfg, result["outputs"]["final"]))


def model_output(cfg: TrainJobConfig, final: str) -> ModelOutput:
    """LoRA's final/ is an adapter (maybe with final/merged); OFT's is the merged model,
    its adapter kept in final/oft_adapter (``raylm.train.oft``); the rest full models."""
    from raylm.train.oft import ADAPTER_DIR

    adapter = cfg.finetuning_type in ("lora", "qlora")
    merged = storage.join(final, "merged")
    oft = cfg.finetuning_type == "oft"
    return ModelOutput(
        path=final,
        adapter=adapter,
        base_model=cfg.model.name_or_path,
        tokenizer=final,
        cutoff_len=cfg.data.cutoff_len,
        stage=cfg.stage,
        merged=merged if adapter and storage.is_dir(merged) else None,
        trained_adapter=storage.join(final, ADAPTER_DIR) if oft else None,
    )


def _data_link(source: dict) -> dict[str, str]:
    """Link to the data job's manifest (lineage: raw files -> shards -> this run)."""
    if source["kind"] != "shards":
        return {}
    data_manifest = Manifest.read(source["path"])
    if data_manifest is None:
        return {}
    return {
        "data_manifest": storage.join(source["path"], MANIFEST),
        "data_fingerprint": data_manifest.fingerprint(),
    }
