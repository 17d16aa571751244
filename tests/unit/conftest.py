"""Fixtures of the unit tier."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from llamafactory_helpers import LF

from raylm import config


@pytest.fixture
def workspace(monkeypatch: pytest.MonkeyPatch) -> Path:
    """The assets dir as the workspace, so the YAMLs' relative paths resolve as they do
    in a LLaMA-Factory checkout (dataset_dir: data, deepspeed: examples/deepspeed/...)."""
    monkeypatch.setenv(config.WORKSPACE_ENV, str(LF))
    return LF


@pytest.fixture(scope="session")
def dist() -> Iterator[None]:
    """One gloo rank for DeepSpeed's engine, for the whole session: deepspeed.comm keeps
    its first process group, so a second init after a teardown fails. Without
    DeepSpeed's shared-memory all-reduce op: one rank never uses it, and its JIT build
    (minutes on a loaded machine) would come first."""
    import importlib

    import deepspeed
    import torch.distributed as d

    ds_torch = importlib.import_module("deepspeed.comm.torch")  # deepspeed.comm's "torch" is torch

    if d.is_initialized():
        yield
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_RANK": "0"}  # fmt: skip
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    build, ds_torch.build_shm_op = ds_torch.build_shm_op, lambda: None
    try:
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
        yield
    finally:
        ds_torch.build_shm_op = build
        d.destroy_process_group()
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
