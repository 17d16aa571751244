"""raylm's model server runs a one-device CPU engine in one process, and only that one."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from raylm.serve.server import single_process_executor


@pytest.mark.parametrize(
    ("world_size", "backend", "expected"),
    [(1, "mp", "uni"), (2, "mp", "mp"), (1, "ray", "ray"), (4, "ray", "ray")],
)
def test_only_a_one_worker_multiprocess_engine_runs_in_process(world_size, backend, expected):
    cfg = SimpleNamespace(world_size=world_size, distributed_executor_backend=backend)
    assert single_process_executor(cfg) == (expected != backend)
    assert cfg.distributed_executor_backend == expected


@pytest.mark.parametrize(
    ("world_size", "backend", "enabled", "after"),
    [
        (1, "mp", True, "uni"),  # vLLM's CPU default for one device: switched
        (1, "mp", False, "mp"),  # engine.single_process=false keeps vLLM's choice
        (2, "mp", True, "mp"),  # tensor parallel needs its worker processes
        (1, "ray", True, "ray"),  # GPU engines under Ray's executor are left alone
    ],
)
def test_single_process_executor_only_for_one_cpu_worker(
    world_size: int, backend: str, enabled: bool, after: str
) -> None:
    pc = SimpleNamespace(world_size=world_size, distributed_executor_backend=backend)
    assert single_process_executor(pc, enabled) == (after != backend)
    assert pc.distributed_executor_backend == after
