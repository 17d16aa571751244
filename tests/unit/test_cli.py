"""The CLI rejects bad configs before anything is started or submitted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from raylm import cli


def test_bad_config_exits_2_with_the_message(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["config", "show", "check", "num_taks=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'num_taks'" in err and "did you mean 'num_tasks'" in err


@pytest.mark.parametrize("size", ["0", "-1", "lots"])
def test_cluster_up_refuses_a_bad_object_store_size(
    size: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["cluster", "up", "--object-store-gb", size])
    assert exit_info.value.code == 2
    assert f"expected a size in GB above 0, got '{size}'" in capsys.readouterr().err


def test_config_show_prints_the_resolved_yaml(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["config", "show", "check", "num_tasks=7"]) == 0
    assert "num_tasks: 7" in capsys.readouterr().out


def test_config_keys_lists_docs(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["config", "keys", "train"]) == 0
    out = capsys.readouterr().out
    assert "deepspeed.stage: int = 3" in out and "ZeRO stage" in out


def test_submit_validates_before_contacting_any_cluster(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("RAYLM_HOME", str(tmp_path))  # no local cluster recorded
    code = cli.main(["submit", "check", "num_tasks=0", "--address", "http://127.0.0.1:9"])
    assert code == 2
    assert "num_tasks=0 must be > 0" in capsys.readouterr().err


def test_submit_without_cluster_says_how_to_get_one(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("RAYLM_HOME", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cli.main(["submit", "check"]) == 2
    assert "raylm cluster up" in capsys.readouterr().err


def test_console_script_help_lists_every_job() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "raylm.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for word in ("submit", "jobs", "cluster", "check", "train"):
        assert word in out


def test_metric_sink_settings_travel_with_a_submitted_job(monkeypatch) -> None:
    """A submitted job's driver runs elsewhere; report_to's settings must reach it."""
    from raylm.submit import tracking_env

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("UNRELATED_SECRET", "x")
    monkeypatch.setenv("WANDB_SERVICE", "3-123-unix-/tmp/wandb.sock")  # this process's own
    env = tracking_env()
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000" and env["WANDB_MODE"] == "offline"
    assert "UNRELATED_SECRET" not in env and "WANDB_SERVICE" not in env
