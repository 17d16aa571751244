"""The export job end to end on the session Ray cluster: a train run's output (its
manifest names the adapter and the base) merged, checked and written to a bucket, with
a manifest the next stage reads as a ``ModelOutput``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from lora_helpers import lora_adapter

from raylm import storage
from raylm.cluster import ClusterInfo
from raylm.manifest import Manifest
from raylm.outputs import ModelOutput, read_output

ROOT = Path(__file__).resolve().parents[2]


def _fake_train_run(tiny_model: Path, run: Path) -> Path:
    """A succeeded train job's dir: final/ holds a LoRA adapter on ``tiny_model``."""
    final = lora_adapter(tiny_model, run / "final", seed=11)
    out = ModelOutput(path=str(final), adapter=True, base_model=str(tiny_model),
                      tokenizer=str(final), cutoff_len=256, stage="sft")  # fmt: skip
    Manifest.start("train", {}, []).finish({}, {}, out.to_record()).write(run)
    return run


@pytest.mark.timeout(300)
def test_export_job_merges_a_train_run_into_a_bucket(
    ray_cluster: ClusterInfo, tiny_model: Path, tmp_path: Path, s3_bucket: str
) -> None:
    run = _fake_train_run(tiny_model, tmp_path / "run")
    out = f"{s3_bucket}/export/tiny-sft"
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.gcs_address)
    cmd = [sys.executable, str(ROOT / "jobs/export.py"), f"model={run}", f"output_dir={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "check passed" in proc.stdout
    output = read_output(ModelOutput, out)
    assert (output.path, output.adapter, output.base_model) == (out, False, str(tiny_model))
    assert (output.cutoff_len, output.stage) == (256, "sft")  # carried from the train run
    check = json.loads(storage.read_text(f"{out}/export_check.json"))
    assert check["method"] == "shard_by_shard" and check["merged_weights"] > 0
    assert storage.exists(f"{out}/model.safetensors") and storage.exists(f"{out}/tokenizer.json")
    manifest = Manifest.read(out)
    assert str(run / "final") in json.dumps(manifest.inputs)  # lineage names the adapter
