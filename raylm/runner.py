"""The one runner of every job: what ``jobs/*.py`` and ``raylm JOB`` both execute.

Every job runs the same steps in the same order, so every output directory looks the
same: the resolved config, then a ``running`` manifest, then the work, then the
manifest's final state, ``succeeded`` with the typed output or ``failed`` with the error.
A job that dies leaves a manifest saying so, and the pipeline never mistakes a crashed
stage for one still running or done.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from raylm import storage
from raylm.cluster import init_ray
from raylm.config import WORKSPACE_ENV, ConfigError, load, save_resolved, to_dict
from raylm.job import Job, JobFailed, get
from raylm.manifest import Manifest, submission_id


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``a.yaml b.yaml train.lr=1e-4`` -> (config files, dotlist overrides)."""
    files = [a for a in argv if "=" not in a]
    overrides = [a for a in argv if "=" in a]
    return files, overrides


def run_job(name: str, argv: Sequence[str]) -> int:
    """Load, set up, record, connect, run, record: the life of every raylm job."""
    job: Job = get(name)
    files, overrides = split_argv(argv)
    cfg = job.setup(load(name, files, overrides))
    out = job.output_dir(cfg)
    _check_outlives_job(name, out)
    if storage.is_remote(out) and not job.remote_outputs:
        raise ConfigError(
            f"the {name} job writes {out} with local file I/O and cannot write to object "
            "storage yet; give it a local or shared (NFS) path"
        )
    recorded = job.recorded(cfg)
    manifest = Manifest.start(name, to_dict(recorded), inputs=job.inputs(cfg))
    save_resolved(recorded, out)
    manifest.write(out)
    try:
        if job.uses_ray:
            job.ray_info = init_ray(cfg.ray.address, cfg.ray.namespace)
        result = job.run(cfg, out)
    except BaseException as err:
        manifest.fail(err).write(out)
        raise
    record = result.output.to_record() if result.output else None
    manifest.finish(result.outputs, result.metrics, record).write(out)
    return result.exit_code


def _check_outlives_job(name: str, out: str) -> None:
    """A job started by ``ray job submit --working-dir`` runs in Ray's temporary copy of
    that directory; a relative output dir would land there and vanish with the job."""
    if not submission_id() or WORKSPACE_ENV in os.environ or storage.is_remote(out):
        return
    cwd = os.getcwd()
    if os.path.abspath(out).startswith(cwd + os.sep):
        raise ConfigError(
            f"the {name} job's output dir {out} is inside Ray's temporary copy of "
            f"--working-dir ({cwd}), deleted when the job ends: give an absolute path that "
            f"outlives it (shared storage on a multi-node cluster) or an s3:// URI, or submit "
            f"with {WORKSPACE_ENV}=<dir> in the job's env_vars (`raylm submit` does this)"
        )


def main(name: str, argv: Sequence[str] | None = None) -> int:
    """Run a job; a bad config or input exits 2 with one line, not a traceback."""
    try:
        return run_job(name, sys.argv[1:] if argv is None else argv)
    except ConfigError as err:
        print(f"raylm: {name} job: {err}", file=sys.stderr)
        return 2
    except JobFailed as err:
        print(f"raylm: {name} job failed: {err}", file=sys.stderr)
        return 1


def entrypoint(name: str) -> None:
    """``jobs/NAME.py``'s body: what ``ray job submit ... -- python jobs/NAME.py`` runs."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    sys.exit(main(name))
