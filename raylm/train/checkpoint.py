"""Checkpoints that are used only when complete on every rank.

Layout: ``RUN_DIR/checkpoint_<step>_<token>/`` holds DeepSpeed's files of every rank
(Ray Train merges each rank's upload into one directory), ``trainer_state_rank<r>.pt``
(RNG states per rank) and, last, ``COMPLETE`` (step, world size and the data stream's
history of world sizes, which an elastic resume needs). Rank 0 writes ``COMPLETE``
only after ``ray.train.report`` returned on every rank (a barrier), so its presence
proves that every rank's files are in storage. Resume scans the run dir for the newest complete
checkpoint instead of trusting ``ray.train.get_checkpoint()``: a checkpoint Ray had not
registered yet when the job died (its ~2 s registration lag) is still found, and a
half-written one is never loaded. The only work that can be lost is a checkpoint whose
job died between its upload and its ``COMPLETE`` marker (milliseconds), and then the run
resumes from the previous one: at most one ``save_steps`` interval.

The run dir may be a local or NFS path or an object-store URI (``raylm.storage``). On an
object store there is no atomic rename, and none is needed: the marker is one small
object written by one PUT, after every rank's upload has returned, so it exists whole
or not at all, and its presence means the same thing as on a disk.

The token makes every save a new directory, so Ray's own retention never deletes a
directory that a later save with the same step reuses.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any

from raylm import storage

COMPLETE = "COMPLETE"
DS_TAG = "ds"
UNIVERSAL_TAG = "ds_universal"
"""DeepSpeed's world-size-independent form of a checkpoint, written beside it on demand."""
UNIVERSAL_DONE = "UNIVERSAL"
_NAME = re.compile(r"^checkpoint_(\d{8})_[0-9a-f]{8}$")


def checkpoint_name(step: int) -> str:
    return f"checkpoint_{step:08d}_{uuid.uuid4().hex[:8]}"


def list_checkpoints(run_dir: str) -> list[tuple[int, str, bool]]:
    """(step, path, complete) for every checkpoint dir in the run, oldest first.

    Two checkpoints of one step (saved again after a resume) are ordered by the time in
    their markers: object stores have no directory times.
    """
    found = []
    for name in storage.listdir(str(run_dir)):
        m = _NAME.match(name)
        if m:
            path = storage.join(str(run_dir), name)
            marker = _marker(path)
            found.append((int(m.group(1)), path, marker is not None, (marker or {}).get("time", 0)))
    found.sort(key=lambda t: (t[0], t[3]))
    return [(step, path, ok) for step, path, ok, _ in found]


def marker(path: str) -> dict[str, Any] | None:
    """A checkpoint's COMPLETE record (step, world_size, time), or None if incomplete."""
    return _marker(path)


def _marker(path: str) -> dict[str, Any] | None:
    try:
        return json.loads(storage.read_text(storage.join(path, COMPLETE)))
    except FileNotFoundError:
        return None


def latest_complete(run_dir: str) -> tuple[int, str] | None:
    complete = [(step, path) for step, path, ok in list_checkpoints(run_dir) if ok]
    return complete[-1] if complete else None


def mark_complete(path: str, step: int, world_size: int, worlds: Any = None) -> None:
    """Written whole or not at all (a local rename, or one object PUT).

    ``worlds`` is the data stream's history of world sizes (``raylm.train.stream.Worlds``)
    up to this checkpoint. It lives here, not in the per-rank trainer state, because a
    resuming worker needs it before its engine exists (the LR schedule's length depends
    on it) and the marker is one small file every rank can read."""
    record = {"step": step, "world_size": world_size, "time": time.time()}
    if worlds is not None:
        record["worlds"] = [list(w) for w in worlds]
    storage.write_text(storage.join(str(path), COMPLETE), json.dumps(record))


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


def ensure_universal(path: str, local: Any) -> None:
    """Give the checkpoint at ``path`` (a local copy at ``local``) a universal form.

    A ZeRO checkpoint is partitioned for the world size that wrote it; DeepSpeed's
    ``ds_to_universal`` rewrites it per parameter, so any world size can load it (the
    optimizer's moments included). Done once, by one rank, and kept beside the original
    with its own marker, so a second resize, or a restart during this one, reuses it.
    """
    if storage.exists(storage.join(path, UNIVERSAL_DONE)):
        return
    from argparse import Namespace

    from deepspeed.checkpoint.ds_to_universal import main as to_universal

    target = local / UNIVERSAL_TAG
    to_universal(Namespace(
        input_folder=str(local / DS_TAG), output_folder=str(target), num_extract_workers=1,
        num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=False,
    ))  # fmt: skip
    if storage.is_remote(path):
        storage.copy_dir(str(target), storage.join(path, UNIVERSAL_TAG))
    storage.write_text(storage.join(path, UNIVERSAL_DONE), json.dumps({"time": time.time()}))
