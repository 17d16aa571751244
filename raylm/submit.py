"""The one way raylm submits a job to Ray's job API and waits for it.

``raylm submit`` and the pipeline (which runs each stage as its own Ray job) both come
here, so a job submitted either way has the same entrypoint, working dir, excludes,
environment and metadata, and shows up in the dashboard the same way.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raylm import storage
from raylm.config import WORKSPACE_ENV, ConfigError

UPLOAD_EXCLUDES = [
    ".venv/", ".git/", "outputs/", "**/__pycache__/", ".ruff_cache/", ".pytest_cache/",
    "*.egg-info/", "**/.ipynb_checkpoints/", "*.safetensors", "*.bin",
]  # fmt: skip
"""Never uploaded with a job: environments, caches, run outputs, weights."""

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
SUBMIT_ATTEMPTS = 4


def project_root() -> Path:
    """The checkout holding ``jobs/``: beside the package (editable install) or the cwd."""
    beside = Path(__file__).resolve().parent.parent
    return beside if (beside / "jobs").is_dir() else Path.cwd()


def inside_project(path: str, root: Path | None = None) -> str:
    """Config files travel in the uploaded working dir, so they must live in the project."""
    root = root or project_root()
    full = Path(path).resolve()
    if not full.is_relative_to(root):
        raise ConfigError(
            f"{path} is outside the project {root}; only files inside it are uploaded"
        )
    return str(full.relative_to(root))


TRACKING_ENV_PREFIXES = ("MLFLOW_", "WANDB_")
"""The settings of the train job's live metric sinks (``report_to``): a tracking server's
URI, W&B's mode and project; read by the job's driver, so they travel with it."""


PROCESS_LOCAL_ENV = ("WANDB_SERVICE",)
"""Set by wandb in a process that started its service: a handle to that process's
service, not a setting. Forwarded, it makes every later run attach to the submitter's
service, where a killed attempt's run still counts as open ("run ID ... is in use")."""


def tracking_env() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if k.startswith(TRACKING_ENV_PREFIXES) and k not in PROCESS_LOCAL_ENV
    }


def submit(
    client: Any,
    job: str,
    argv: list[str],
    *,
    python: str,
    local: bool,
    metadata: dict[str, str] | None = None,
    submission_id: str | None = None,
) -> str:
    """Submit ``python jobs/JOB.py ARGV`` with the project as working dir; returns its id.

    On a local cluster the job's relative paths resolve against the submitter's cwd
    (``RAYLM_WORKSPACE``), since Ray runs it in a temporary copy of the project. Storage
    credentials and endpoints set here (``AWS_*``, ...) and the metric sinks' settings
    (``MLFLOW_*``, ``WANDB_*``) travel with the job.
    """
    env = storage.forwarded_env() | tracking_env()
    if local:
        env[WORKSPACE_ENV] = os.environ.get(WORKSPACE_ENV, str(Path.cwd()))
    request = {
        "entrypoint": shlex.join([python, f"jobs/{job}.py", *argv]),
        "runtime_env": {
            "working_dir": str(project_root()),
            "excludes": UPLOAD_EXCLUDES,
            "env_vars": env,
        },
        "submission_id": submission_id,
        "metadata": {"raylm_job": job, **(metadata or {})},
        "entrypoint_num_cpus": 0,
    }
    for attempt in range(SUBMIT_ATTEMPTS):
        try:
            return client.submit_job(**request)
        except RuntimeError as err:
            # A busy head answers "No available agent to submit job, please try again later".
            if "try again" not in str(err) or attempt == SUBMIT_ATTEMPTS - 1:
                raise
            time.sleep(5.0 * (attempt + 1))
    raise AssertionError("unreachable")


def wait(
    client: Any,
    sid: str,
    timeout: float | None = None,
    show: Callable[[str], None] | None = None,
    poll_s: float = 1.0,
) -> str:
    """Poll a job to its terminal status, handing each new piece of its log to ``show``.

    Returns the status, or stops the job and raises TimeoutError past ``timeout``.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    shown = 0
    while True:
        status = str(client.get_job_status(sid).value)
        if show is not None:
            logs = client.get_job_logs(sid)
            show(logs[shown:])
            shown = len(logs)
        if status in TERMINAL:
            return status
        if deadline is not None and time.monotonic() > deadline:
            client.stop_job(sid)
            raise TimeoutError(f"job {sid} still {status} after {timeout:.0f}s; stopped it")
        time.sleep(poll_s)


def default_python(local: bool) -> str:
    """This interpreter on a local cluster; the cluster's ``python`` on a remote one."""
    return sys.executable if local else "python"
