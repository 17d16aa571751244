"""The one runner: every job leaves a manifest, 'failed' with its error when it dies."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from raylm import config
from raylm.job import Job, JobFailed, Result
from raylm.outputs import DatasetOutput, read_output
from raylm.runner import main, run_job


@dataclass
class ToyConfig:
    """A job config for the runner's own tests."""

    output_dir: str = "out"
    """Where the job writes."""

    fail: str = ""
    """'crash' raises RuntimeError, 'stated' raises JobFailed, '' succeeds."""


class ToyJob(Job[ToyConfig]):
    name = "toy"
    config = ToyConfig
    uses_ray = False

    def run(self, cfg: ToyConfig, out_dir: str) -> Result:
        out = Path(out_dir)
        seen = json.loads((out / "manifest.json").read_text())["status"]
        if cfg.fail == "crash":
            raise RuntimeError("disk on fire")
        if cfg.fail == "stated":
            raise JobFailed("stage data FAILED")
        output = DatasetOutput(str(out), "sft", False, None, None, None, 3)
        return Result({"x": str(out / "x")}, {"seen_while_running": seen}, output)


@pytest.fixture(autouse=True)
def toy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(config.JOBS, "toy", f"{__name__}:ToyJob")
    monkeypatch.chdir(tmp_path)


def _manifest(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "out" / "manifest.json").read_text())


def test_a_job_that_succeeds_records_its_typed_output(tmp_path: Path) -> None:
    assert run_job("toy", []) == 0
    manifest = _manifest(tmp_path)
    assert manifest["status"] == "succeeded" and manifest["error"] is None
    assert manifest["metrics"] == {"seen_while_running": "running"}
    assert read_output(DatasetOutput, tmp_path / "out").rows == 3
    assert (tmp_path / "out" / "config.resolved.yaml").exists()


def test_a_crashed_job_leaves_a_failed_manifest_with_its_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="disk on fire"):
        run_job("toy", ["fail=crash"])
    manifest = _manifest(tmp_path)
    assert manifest["status"] == "failed"
    assert manifest["error"] == "RuntimeError: disk on fire"
    assert manifest["finished_at"] >= manifest["started_at"]


def test_stated_failures_and_bad_configs_exit_with_one_line(tmp_path: Path, capsys) -> None:
    assert main("toy", ["fail=stated"]) == 1
    assert "raylm: toy job failed: stage data FAILED" in capsys.readouterr().err
    assert _manifest(tmp_path)["status"] == "failed"
    assert main("toy", ["fial=crash"]) == 2
    assert "did you mean 'fail'" in capsys.readouterr().err


def test_a_local_only_job_is_refused_a_bucket_before_anything_runs(s3_bucket: str) -> None:
    with pytest.raises(config.ConfigError, match=r"toy job writes s3://.* local file I/O"):
        run_job("toy", [f"output_dir={s3_bucket}/toy"])
