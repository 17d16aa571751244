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


@pytest.mark.timeout(300)
def test_rays_own_job_submit_works_as_the_readme_shows(
    ray_cluster: ClusterInfo, tmp_path: Path
) -> None:
    """`ray job submit --working-dir . -- python jobs/JOB.py ...` with only what
    `raylm cluster up` prints exported; a relative output dir is refused by name, since
    it would land in Ray's temporary copy of the working dir and vanish with the job."""
    import os
    import subprocess
    import sys

    from raylm.cluster import client_env

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= client_env(ray_cluster)
    ray_cli = str(Path(sys.executable).parent / "ray")

    def submit(*args: str) -> subprocess.CompletedProcess:
        cmd = [ray_cli, "job", "submit", "--working-dir", ".", "--", "python", "jobs/check.py"]
        return subprocess.run(
            [*cmd, "conf/check/default.yaml", *args],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
        )  # fmt: skip

    out = tmp_path / "check"
    ok = submit("num_tasks=2", f"output_dir={out}")
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-2000:]
    assert json.loads((out / "manifest.json").read_text())["status"] == "succeeded"
    lost = submit("output_dir=outputs/check-vanishes")
    assert lost.returncode != 0
    assert "inside Ray's temporary copy of --working-dir" in lost.stdout + lost.stderr
