"""Driver side of the train job: build the TorchTrainer, run it, collect the outputs.

Running ``run_training`` again with the same ``storage_path`` / ``run_name`` resumes:
Ray Train V2 restores the run from ``RunConfig(name, storage_path)`` and the workers
load the newest complete checkpoint in that run dir (see ``raylm.train.checkpoint``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from raylm.config import ConfigError, resolve_model, resolve_path
from raylm.train.config import TrainJobConfig


def run_dir_of(cfg: TrainJobConfig) -> Path:
    storage = cfg.storage_path.removeprefix("file://")
    if "://" in storage:
        raise ConfigError(
            f"storage_path={cfg.storage_path!r}: this version writes metrics and final/ with "
            "plain file I/O; use a local or shared (NFS) filesystem path"
        )
    return Path(resolve_path(storage)) / cfg.run_name


def for_workers(cfg: TrainJobConfig) -> TrainJobConfig:
    """Workers run in Ray's own working directory: hand them absolute local paths."""
    model_path = resolve_model(cfg.model.name_or_path)
    model = cfg.model
    if Path(model_path).exists():
        model = dataclasses.replace(cfg.model, name_or_path=model_path)
    ds = cfg.deepspeed
    if ds.config_file:
        ds = dataclasses.replace(ds, config_file=resolve_path(ds.config_file))
    return dataclasses.replace(cfg, model=model, deepspeed=ds)


def build_trainer(cfg: TrainJobConfig, fault: dict[str, Any] | None = None):
    """The TorchTrainer for ``cfg`` (``fault``: a test hook that kills one worker once)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from raylm.train.data import build_dataset, data_inputs, deterministic_split
    from raylm.train.model import check_qlora_device
    from raylm.train.worker import train_loop

    check_qlora_device(cfg, cuda_available=cfg.scaling.use_gpu)
    if cfg.data.val_size:
        raise ConfigError(
            f"data.val_size={cfg.data.val_size}: the train job computes no held-out loss yet; "
            "set it to 0 and evaluate final/ with the eval job"
        )
    cfg = for_workers(cfg)
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    source = data_inputs(cfg)
    s = cfg.scaling
    resources = {"CPU": s.cpus_per_worker} | ({"GPU": 1} if s.use_gpu else {})
    return TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg, "run_dir": str(run_dir), "fault": fault},
        scaling_config=ray.train.ScalingConfig(
            num_workers=s.num_workers,
            use_gpu=s.use_gpu,
            resources_per_worker=resources,
            placement_strategy=s.placement_strategy,
        ),
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=cfg.run_name,
            storage_path=str(run_dir.parent),
            failure_config=ray.train.FailureConfig(max_failures=cfg.checkpoint.max_failures),
            # One more than `keep`: a newer checkpoint that never completes must not push
            # the last complete one out.
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep + 1),
        ),
        datasets={"train": build_dataset(cfg, source)},
        dataset_config=deterministic_split(),
    ), source


def run_training(cfg: TrainJobConfig, fault: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train (or resume) and return the outputs and headline metrics."""
    from raylm.train.report import plot_loss, read_metrics

    trainer, source = build_trainer(cfg, fault)
    trainer.fit()
    run_dir = run_dir_of(cfg)
    metrics = read_metrics(run_dir / "metrics.jsonl")
    if not metrics:
        raise RuntimeError(f"training finished but wrote no metrics in {run_dir}")
    plot_loss(
        metrics, run_dir / "loss.png", title=f"{cfg.run_name} ({cfg.stage}, {cfg.finetuning_type})"
    )
    _report_to(cfg, metrics, run_dir)
    from raylm.train.checkpoint import list_checkpoints

    return {
        "run_dir": str(run_dir),
        "source": source,
        "outputs": {
            "final": str(run_dir / "final"),
            "metrics": str(run_dir / "metrics.jsonl"),
            "loss_plot": str(run_dir / "loss.png"),
            "checkpoints": json.dumps([p.name for _, p, ok in list_checkpoints(run_dir) if ok]),
        },
        "metrics": {
            "steps": metrics[-1]["step"],
            "first_loss": metrics[0]["loss"],
            "final_loss": metrics[-1]["loss"],
            "mean_tokens_per_s": sum(m["tokens_per_s"] for m in metrics) / len(metrics),
            "resumes": _count_resumes(run_dir),
        },
    }


def _count_resumes(run_dir: Path) -> int:
    events = run_dir / "events.jsonl"
    if not events.exists():
        return 0
    return sum(json.loads(ln)["event"] == "resume" for ln in events.read_text().splitlines() if ln)


def _report_to(cfg: TrainJobConfig, metrics: list[dict[str, Any]], run_dir: Path) -> None:
    """Optional sinks beyond Ray metrics; a missing package is an error, not a silent skip."""
    for sink in cfg.report_to:
        if sink == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("report_to=tensorboard needs: pip install tensorboard") from None
            writer = SummaryWriter(str(run_dir / "tensorboard"))
            for m in metrics:
                for key in ("loss", "lr", "tokens_per_s"):
                    writer.add_scalar(f"train/{key}", m[key], m["step"])
            writer.close()
        else:
            try:
                module = __import__(sink)
            except ImportError:
                raise ConfigError(f"report_to={sink} needs: pip install {sink}") from None
            _log_remote(module, sink, cfg, metrics)


def _log_remote(module: Any, sink: str, cfg: TrainJobConfig, metrics: list[dict[str, Any]]) -> None:
    keys = ("loss", "lr", "tokens_per_s")
    if sink == "mlflow":
        with module.start_run(run_name=cfg.run_name):
            for m in metrics:
                module.log_metrics({k: m[k] for k in keys}, step=m["step"])
    else:
        run = module.init(project="raylm", name=cfg.run_name)
        for m in metrics:
            run.log({k: m[k] for k in keys}, step=m["step"])
        run.finish()
