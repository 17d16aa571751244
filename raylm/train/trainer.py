"""Driver side of the train job: build the TorchTrainer, run it, collect the outputs.

Running ``run_training`` again with the same ``storage_path`` / ``run_name`` resumes:
Ray Train V2 restores the run from ``RunConfig(name, storage_path)`` and the workers
load the newest complete checkpoint in that run dir (see ``raylm.train.checkpoint``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from raylm import storage
from raylm.config import resolve_model, resolve_path
from raylm.train.config import TrainJobConfig, run_dir_of


def for_workers(cfg: TrainJobConfig) -> TrainJobConfig:
    """Workers run in Ray's own working directory: hand them absolute local paths."""
    model_path = resolve_model(cfg.model.name_or_path)
    model = cfg.model
    if Path(model_path).exists():
        model = dataclasses.replace(cfg.model, name_or_path=model_path)
    ds = cfg.deepspeed
    if ds.config_file:
        ds = dataclasses.replace(ds, config_file=resolve_path(ds.config_file))
    ppo = cfg.ppo
    if cfg.stage == "ppo" and ppo.reward_model:  # an rm run -> its model, checked here
        from raylm.train.reward_model import reward_model_path

        ppo = dataclasses.replace(ppo, reward_model=reward_model_path(ppo.reward_model))
    return dataclasses.replace(cfg, model=model, deepspeed=ds, ppo=ppo)


def build_trainer(cfg: TrainJobConfig, fault: dict[str, Any] | None = None):
    """The TorchTrainer for ``cfg`` (``fault``: a test hook that kills one worker once)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from raylm.train.data import build_dataset, data_inputs, deterministic_split
    from raylm.train.model import check_knobs, check_qlora_device
    from raylm.train.sinks import prepare
    from raylm.train.worker import train_loop

    check_qlora_device(cfg, cuda_available=cfg.scaling.use_gpu)
    check_knobs(cfg)  # here too, so a bad combination fails before any worker starts
    cfg = for_workers(cfg)
    run_dir = run_dir_of(cfg)
    storage.makedirs(run_dir)
    parent = run_dir.rpartition("/")[0]
    fs, fs_path = storage.filesystem(parent) if storage.is_remote(parent) else (None, parent)
    source = data_inputs(cfg)
    s = cfg.scaling
    resources = {"CPU": s.cpus_per_worker} | ({"GPU": 1} if s.use_gpu else {})
    return TorchTrainer(
        train_loop,
        train_loop_config={
            "cfg": cfg,
            "run_dir": run_dir,
            "fault": fault,
            "sinks": prepare(cfg.report_to, run_dir),  # fails here, before any worker
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=s.ray_num_workers,
            use_gpu=s.use_gpu,
            resources_per_worker=resources,
            placement_strategy=s.placement_strategy,
        ),
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=cfg.run_name,
            storage_path=fs_path,
            storage_filesystem=fs,
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
    from raylm.train.evaluate import EVAL_FILE
    from raylm.train.report import plot_loss, read_metrics
    from raylm.train.sinks import stop_on_nonfinite

    trainer, source = build_trainer(cfg, fault)
    run_dir = run_dir_of(cfg)
    with stop_on_nonfinite(run_dir):  # a NaN/inf step ends the job, not Ray's retries
        trainer.fit()
    metrics = read_metrics(storage.join(run_dir, "metrics.jsonl"))
    if not metrics:
        raise RuntimeError(f"training finished but wrote no metrics in {run_dir}")
    evals = read_metrics(storage.join(run_dir, EVAL_FILE))
    title = f"{cfg.run_name} ({cfg.stage}, {cfg.finetuning_type})"
    with local_then_upload(run_dir) as local:
        plot_loss(metrics, local / "loss.png", title=title, evals=evals)
    from raylm.train.checkpoint import list_checkpoints

    done = [p.rpartition("/")[2] for _, p, ok in list_checkpoints(run_dir) if ok]
    return {
        "run_dir": run_dir,
        "source": source,
        "outputs": {
            "final": storage.join(run_dir, "final"),
            "metrics": storage.join(run_dir, "metrics.jsonl"),
            "loss_plot": storage.join(run_dir, "loss.png"),
            "checkpoints": json.dumps(done),
        }
        | ({"eval_metrics": storage.join(run_dir, EVAL_FILE)} if evals else {}),
        "metrics": {
            "steps": metrics[-1]["step"],
            "first_loss": metrics[0]["loss"],
            "final_loss": metrics[-1]["loss"],
            "mean_tokens_per_s": sum(m["tokens_per_s"] for m in metrics) / len(metrics),
            "resumes": _count_resumes(run_dir),
        }
        | ({"final_eval_loss": evals[-1]["eval_loss"]} if evals else {}),
    }


@contextlib.contextmanager
def local_then_upload(run_dir: str) -> Iterator[Path]:
    """A local directory for files written by libraries that only write locally
    (matplotlib); its contents land in ``run_dir`` afterwards."""
    if not storage.is_remote(run_dir):
        yield Path(run_dir)
        return
    with tempfile.TemporaryDirectory(prefix="raylm-report-") as tmp:
        yield Path(tmp)
        storage.copy_dir(tmp, run_dir)


def _count_resumes(run_dir: str) -> int:
    events = storage.join(run_dir, "events.jsonl")
    if not storage.exists(events):
        return 0
    lines = storage.read_text(events).splitlines()
    return sum(json.loads(ln)["event"] == "resume" for ln in lines if ln)
