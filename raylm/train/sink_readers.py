"""Reading back what the live metric sinks (``raylm.train.sinks``) recorded, each with
its own reader: what the tests check, and a quick look at a run without a UI."""

from __future__ import annotations

import json
import os
from pathlib import Path

from raylm import storage
from raylm.train.sinks import STATE_FILE, wandb_records


def logged(name: str, run_dir: str, key: str = "loss") -> dict[int, float]:
    """Step -> value of ``train/<key>`` (or of ``key`` itself when it names its section,
    such as ``eval/loss``) as sink ``name`` recorded it for a local run dir,
    read with that sink's own reader (what the tests check, and a quick look at a run
    without a UI). MLflow is read from the default file store, W&B from its offline files.
    """
    tag = key if key.startswith(("train/", "eval/")) else f"train/{key}"
    if name == "tensorboard":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        if not Path(run_dir, "tensorboard").is_dir():
            return {}
        acc = EventAccumulator(storage.join(run_dir, "tensorboard"), size_guidance={"scalars": 0})
        acc.Reload()
        return {e.step: e.value for e in acc.Scalars(tag)} if tag in acc.Tags()["scalars"] else {}
    state_file = storage.join(run_dir, STATE_FILE)
    state = json.loads(storage.read_text(state_file)) if storage.exists(state_file) else {}
    if name == "mlflow":
        from mlflow.tracking import MlflowClient

        if "mlflow_run_id" not in state:
            return {}
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        client = MlflowClient("file://" + os.path.abspath(storage.join(run_dir, "mlruns")))
        return {m.step: m.value for m in client.get_metric_history(state["mlflow_run_id"], tag)}
    out: dict[int, float] = {}
    run_id = state.get("wandb_run_id")
    if run_id is None:
        return out
    for path in sorted(Path(run_dir, "wandb").glob(f"*run-*-{run_id}*/run-{run_id}.wandb")):
        for record in wandb_records(path.read_bytes()):
            if record.WhichOneof("record_type") == "history":
                row = {i.key or "/".join(i.nested_key): i.value_json for i in record.history.item}
                if tag in row:
                    out[record.history.step.num] = json.loads(row[tag])
    return out
