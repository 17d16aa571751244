"""`raylm submit` really goes through Ray's job API: status and logs via JobSubmissionClient."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ray.job_submission import JobStatus, JobSubmissionClient

from raylm import cli
from raylm.cluster import ClusterInfo

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(240)
def test_submitted_job_runs_and_is_listed(
    ray_cluster: ClusterInfo,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(ROOT)
    out = tmp_path / "check"
    sid = "raylm-test-check-ok"
    code = cli.main(
        ["submit", "check", "conf/check/default.yaml", "num_tasks=3", f"output_dir={out}",
         "--address", ray_cluster.dashboard_url, "--submission-id", sid]
    )  # fmt: skip
    assert code == 0
    client = JobSubmissionClient(ray_cluster.dashboard_url)
    assert client.get_job_status(sid) == JobStatus.SUCCEEDED
    assert "check: 3 tasks ran on 1 node(s)" in client.get_job_logs(sid)
    report = json.loads((out / "check.json").read_text())
    assert report["tasks"] == 3 and report["cluster_resources"]["CPU"] == 2.0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "succeeded"
    assert manifest["environment"]["submission_id"] == sid
    assert "num_tasks: 3" in (out / "config.resolved.yaml").read_text()
    capsys.readouterr()
    assert cli.main(["jobs", "list", "--address", ray_cluster.dashboard_url]) == 0
    listed = capsys.readouterr().out
    assert sid in listed and "SUCCEEDED" in listed and "check" in listed


@pytest.mark.timeout(240)
def test_failing_job_reports_failed(
    ray_cluster: ClusterInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    sid = "raylm-test-check-fail"
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # the job cannot create its output dir below a file
    code = cli.main(
        ["submit", "check", f"output_dir={blocker}/out",
         "--address", ray_cluster.dashboard_url, "--submission-id", sid]
    )  # fmt: skip
    assert code == 1
    client = JobSubmissionClient(ray_cluster.dashboard_url)
    assert client.get_job_status(sid) == JobStatus.FAILED
    assert "NotADirectoryError" in client.get_job_logs(sid)


@pytest.mark.timeout(120)
def test_local_run_joins_the_current_cluster(ray_cluster: ClusterInfo, tmp_path: Path) -> None:
    code = cli.main(["check", "num_tasks=2", f"output_dir={tmp_path}"])
    assert code == 0
    report = json.loads((tmp_path / "check.json").read_text())
    assert report["ray"]["address"] == ray_cluster.gcs_address
