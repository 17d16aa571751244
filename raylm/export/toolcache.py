"""Where the export job keeps tools it builds once per node (the llmcompressor venv, the
llama.cpp binaries), and the lock that makes two tasks on one node build them once.

Both live under ``$RAYLM_ENVS_DIR`` (default ``~/.cache/raylm/envs``), outside any Ray
session's temp dir, so a fresh local cluster (each test session, each CI run) finds them.
A build counts as done only once its marker file is written last; a directory without
one is a build that died half way and is redone.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ENVS_DIR_ENV = "RAYLM_ENVS_DIR"


def cache_root() -> Path:
    return Path(os.environ.get(ENVS_DIR_ENV) or Path.home() / ".cache" / "raylm" / "envs")


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if missing) for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def run(cmd: list[str], tool: str, what: str, **kw: Any) -> str:
    """``cmd``'s stdout; a failure raises naming the tool, the step and stderr's tail."""
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout)[-3000:]
        raise RuntimeError(f"{tool}: could not {what} ({' '.join(cmd[:3])} ...):\n{tail}")
    return proc.stdout
