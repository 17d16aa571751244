"""Checkpoints that are used only when complete on every rank.

Layout: ``RUN_DIR/checkpoint_<step>_<token>/`` holds DeepSpeed's files of every rank
(Ray Train merges each rank's upload into one directory), ``trainer_state_rank<r>.pt``
(RNG states per rank) and, last, ``COMPLETE``. Rank 0 writes ``COMPLETE`` only after
``ray.train.report`` returned on every rank (a barrier), so its presence proves that
every rank's files are in storage. Resume scans the run dir for the newest complete
checkpoint instead of trusting ``ray.train.get_checkpoint()``: a checkpoint Ray had not
registered yet when the job died (its ~2 s registration lag) is still found, and a
half-written one is never loaded. The only work that can be lost is a checkpoint whose
job died between its upload and its ``COMPLETE`` marker (milliseconds), and then the run
resumes from the previous one: at most one ``save_steps`` interval.

The token makes every save a new directory, so Ray's own retention never deletes a
directory that a later save with the same step reuses.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path
from typing import Any

COMPLETE = "COMPLETE"
DS_TAG = "ds"
_NAME = re.compile(r"^checkpoint_(\d{8})_[0-9a-f]{8}$")


def checkpoint_name(step: int) -> str:
    return f"checkpoint_{step:08d}_{uuid.uuid4().hex[:8]}"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path, bool]]:
    """(step, path, complete) for every checkpoint dir in the run, oldest first."""
    root = Path(run_dir)
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = _NAME.match(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), p, (p / COMPLETE).exists()))
    return sorted(found, key=lambda t: (t[0], _mtime(t[1])))


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0


def latest_complete(run_dir: str | Path) -> tuple[int, Path] | None:
    complete = [(step, path) for step, path, ok in list_checkpoints(run_dir) if ok]
    return complete[-1] if complete else None


def mark_complete(path: Path, step: int, world_size: int) -> None:
    """Written atomically (rename), so a reader never sees half a marker."""
    record = {"step": step, "world_size": world_size, "time": time.time()}
    tmp = path / f".{COMPLETE}.tmp"
    tmp.write_text(json.dumps(record))
    tmp.rename(path / COMPLETE)


def rng_state() -> dict[str, Any]:
    import random

    import numpy as np
    import torch

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
