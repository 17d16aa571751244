"""The job contract: what every raylm job declares, so one runner can run them all.

A job is a small class in its stage's package (``raylm/data/job.py``, ...), in the
shape of a torchtune recipe: ``setup`` resolves paths and checks inputs before anything
is written or any Ray worker starts, ``run`` does the work and returns a ``Result``.
The runner (``raylm.runner``) does everything around it the same way for every job:
load the config, write the resolved config and a ``running`` manifest, connect to Ray,
run, and record ``succeeded`` with the typed output or ``failed`` with the error.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
from typing import Any, ClassVar, Generic, TypeVar

from raylm import config
from raylm.outputs import StageOutput

C = TypeVar("C")


class JobFailed(RuntimeError):
    """The job ran and failed for a reason it can state in one line (a stage that failed,
    a broken accounting identity); the runner prints it without a traceback, exits 1."""


@dataclasses.dataclass
class Result:
    """What a job produced: paths by name, headline metrics, the typed stage output."""

    outputs: dict[str, str] = dataclasses.field(default_factory=dict)
    """Output name -> path, for people and ``raylm lineage``."""

    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Headline numbers (counts, losses, scores)."""

    output: StageOutput | None = None
    """What the next stage reads (``raylm.outputs``); None for jobs nothing consumes."""

    exit_code: int = 0
    """Process exit code: non-zero for a finished job whose verdict is "no" (a gate)."""


class Job(abc.ABC, Generic[C]):
    """One raylm job. Subclasses set ``name`` and ``config`` and implement ``run``."""

    name: ClassVar[str]
    """The job's name: ``raylm NAME``, ``jobs/NAME.py``, ``conf/NAME/``."""

    config: ClassVar[type]
    """The job's root config dataclass."""

    uses_ray: ClassVar[bool] = True
    """Whether ``run`` needs this process joined to a Ray cluster."""

    remote_outputs: ClassVar[bool] = False
    """Whether the job can write its output dir on object storage (``s3://``, ``gs://``);
    a job that writes with local file I/O is refused a URI up front, by name."""

    ray_info: dict[str, Any]
    """Set by the runner once connected: the cluster ``address`` and ``dashboard_url``."""

    def setup(self, cfg: C) -> C:
        """Resolve relative paths once and check inputs, before anything is written."""
        return cfg

    def output_dir(self, cfg: C) -> str:
        """Where the manifest and resolved config go (the job's own outputs too): a local
        or NFS path, or a URI for a job with ``remote_outputs``."""
        return config.resolve_path(cfg.output_dir)  # type: ignore[attr-defined]

    def inputs(self, cfg: C) -> list[str]:
        """Files and directories the job reads, content-hashed into the manifest."""
        return []

    def recorded(self, cfg: C) -> C:
        """The config as written to disk: override to redact secrets."""
        return cfg

    @abc.abstractmethod
    def run(self, cfg: C, out: str) -> Result:
        """Do the work; raise on failure (the runner records it)."""


def get(name: str) -> Job[Any]:
    """A fresh instance of the job registered as ``name`` (see ``config.JOBS``)."""
    module, _, cls = config.job_path(name).partition(":")
    return getattr(importlib.import_module(module), cls)()
