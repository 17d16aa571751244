"""DPO with freeze tuning (frozen reference model) on 2 workers, and its export."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from raylm.config import load
from raylm.train.report import read_metrics
from raylm.train.trainer import run_training

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dpo_run(ray_cluster, tiny_model: Path, tmp_path_factory) -> Path:
    import ray

    os.environ.setdefault(
        "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/raylm/torch_extensions")
    )
    ray.init(address=ray_cluster.gcs_address, namespace="raylm-tests", ignore_reinit_error=True)
    storage = tmp_path_factory.mktemp("train_dpo")
    cfg = load(
        "train",
        [ROOT / "conf/train/dpo_lora.yaml"],
        [
            f"model.name_or_path={tiny_model}",
            f"data.path={ROOT / 'conf/train/data/dpo_demo.jsonl'}",
            f"storage_path={storage}",
            "run_name=dpo",
            "finetuning_type=freeze",
            "freeze.trainable_layers=2",
            "train.lr=1e-3",
            "train.max_steps=6",
            "checkpoint.save_steps=3",
        ],
    )
    try:
        yield Path(run_training(cfg)["run_dir"])
    finally:
        ray.shutdown()


@pytest.mark.timeout(300)
def test_dpo_loss_goes_down_from_log2(dpo_run: Path) -> None:
    import math

    metrics = read_metrics(dpo_run / "metrics.jsonl")
    losses = [m["loss"] for m in metrics]
    # Policy == reference at step 1, so the sigmoid loss starts at exactly log 2.
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5)
    assert losses[-1] < losses[0] - 0.01
    # The preference metrics ride along: no margin at step 1, a positive one once trained.
    assert metrics[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert metrics[-1]["rewards/margins"] > 0 and 0 <= metrics[-1]["rewards/accuracies"] <= 1


def test_freeze_changes_only_the_last_layers_and_final_loads(
    dpo_run: Path, tiny_model: Path
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    tuned = AutoModelForCausalLM.from_pretrained(dpo_run / "final").state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert changed, "training changed nothing"
    assert all(k.startswith(("model.layers.2.", "model.layers.3.")) for k in changed), changed
    assert (dpo_run / "final/generation_config.json").exists()
    assert (dpo_run / "final/tokenizer.json").exists()
    assert (dpo_run / "loss.png").stat().st_size > 1000
