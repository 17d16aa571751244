"""Which checkpoint an export takes, and the refusals that keep a half-saved or foreign
one out (the consolidation itself runs on a real 2-worker ZeRO-3 run in
tests/e2e/test_train_job.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from raylm.config import ConfigError
from raylm.export.from_checkpoint import RESOLVED, find_checkpoint, load_trained


def _run(tmp_path: Path, *steps: tuple[int, bool]) -> Path:
    """A run dir with a resolved config and one checkpoint per (step, complete)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / RESOLVED).write_text("stage: sft\n")
    for i, (step, complete) in enumerate(steps):
        ckpt = run / f"checkpoint_{step:08d}_{i:08x}"
        ckpt.mkdir()
        if complete:
            record = {"step": step, "world_size": 2, "time": 1000.0 + step}
            (ckpt / "COMPLETE").write_text(json.dumps(record))
    return run


def test_latest_is_the_newest_complete_checkpoint(tmp_path: Path) -> None:
    run = _run(tmp_path, (2, True), (4, True), (6, False))
    assert find_checkpoint(str(run), "latest") == (
        str(run),
        str(run / "checkpoint_00000004_00000001"),
    )


def test_a_checkpoint_dir_as_the_model_is_taken_by_its_name(tmp_path: Path) -> None:
    run = _run(tmp_path, (2, True), (4, True))
    ckpt = run / "checkpoint_00000002_00000000"
    assert find_checkpoint(str(ckpt) + "/", None) == (str(run), str(ckpt))
    assert find_checkpoint(str(run), None) is None  # a run dir alone: its final/


def test_an_incomplete_or_unknown_checkpoint_is_refused_with_the_complete_ones(
    tmp_path: Path,
) -> None:
    run = _run(tmp_path, (2, True), (4, False))
    with pytest.raises(ConfigError, match=r"no COMPLETE marker.*checkpoint_00000002_00000000"):
        find_checkpoint(str(run), "checkpoint_00000004_00000001")
    with pytest.raises(ConfigError, match="does not exist"):
        find_checkpoint(str(run), "checkpoint_00000009_deadbeef")
    (run / "checkpoint_00000002_00000000" / "COMPLETE").unlink()
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        find_checkpoint(str(run), "latest")


def test_a_dir_that_is_no_train_run_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a raylm train run"):
        find_checkpoint(str(tmp_path), "latest")


def test_weights_of_another_model_are_refused_by_name() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    model[0].weight.requires_grad_(False)
    state = {k: torch.ones_like(v) for k, v in model.state_dict().items()}
    load_trained(model, state, "ckpt")
    assert torch.equal(model[1].weight, torch.ones(1, 2))
    with pytest.raises(ConfigError, match=r"1 trainable parameter\(s\) missing.*1\.bias"):
        load_trained(model, {k: v for k, v in state.items() if k != "1.bias"}, "ckpt")
    with pytest.raises(ConfigError, match=r"1 unknown.*lm_head"):
        load_trained(model, {**state, "lm_head.weight": torch.ones(1)}, "ckpt")
