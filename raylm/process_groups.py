"""Processes by PID and process group, read from /proc: how raylm stops exactly the
processes it started (a local cluster's ``ray start`` groups) and nothing else, never
``ray stop`` or ``pkill``."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited child we have not reaped) counts as dead.
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
            return False
    return True


def group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) == pgid and fields[0] != "Z":
                    members.append(int(entry.name))
    return members


def kill_group(pgid: int, timeout: float) -> bool:
    """Stop the cluster's process group, escalating until nothing of it is left.

    First SIGTERM to ``ray start --block`` alone (it stops its services in order); if it
    died before installing its handler, its children are orphaned in the group, so the
    group then gets SIGTERM and finally SIGKILL.
    """
    if not group_members(pgid):
        return False
    steps = (
        (lambda: os.kill(pgid, signal.SIGTERM), timeout * 0.6),
        (lambda: os.killpg(pgid, signal.SIGTERM), timeout * 0.3),
        (lambda: os.killpg(pgid, signal.SIGKILL), timeout * 0.1),
    )
    for send, wait in steps:
        with contextlib.suppress(ProcessLookupError):
            send()
        deadline = time.monotonic() + wait
        while group_members(pgid) and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(-pgid, os.WNOHANG)
            time.sleep(0.2)
        if not group_members(pgid):
            break
    return True
