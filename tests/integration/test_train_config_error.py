"""A setting only a worker can find wrong fails the job once, as the ConfigError it is:
not four times over Ray Train's retries, and not as Ray's wrapped TrainingFailedError."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from raylm.config import ConfigError
from raylm.train.sinks import STOP_FILE
from raylm.train.trainer import run_training


@pytest.mark.timeout(300)
def test_a_worker_config_error_ends_the_run_without_retries(
    ray_connected, pt_train_config, tmp_path: Path
) -> None:
    # pt_demo.jsonl has fewer rows than one step of 512 examples needs: the workers say so.
    cfg = pt_train_config(tmp_path, "too-big", 2, "train.micro_batch_size=512",
                          "checkpoint.max_failures=3")  # fmt: skip
    start = time.monotonic()
    with pytest.raises(ConfigError, match="fewer than one step"):
        run_training(cfg)
    marker = json.loads((tmp_path / "too-big" / STOP_FILE).read_text())
    assert marker["kind"] == "config"
    print(f"failed in {time.monotonic() - start:.0f} s")
