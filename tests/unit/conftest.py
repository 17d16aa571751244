"""Fixtures of the unit tier."""

from __future__ import annotations

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
def gloo_rank() -> Iterator[dict[str, str]]:
    """One gloo rank for DeepSpeed's engine, for the whole session: deepspeed.comm keeps
    its first process group, so a second init after a teardown fails. Without
    DeepSpeed's shared-memory all-reduce op: one rank never uses it, and its JIT build
    (minutes on a loaded machine) would come first. The rank's environment is set only
    while it starts (and by ``dist`` per test): a Ray cluster this session starts later
    would hand MASTER_PORT to its workers, and a library there (accelerate) would try
    to listen on the port this process holds."""
    import importlib

    import deepspeed
    import torch.distributed as d

    ds_torch = importlib.import_module("deepspeed.comm.torch")  # deepspeed.comm's "torch" is torch
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_RANK": "0"}  # fmt: skip
    if d.is_initialized():
        yield env
        return
    build, ds_torch.build_shm_op = ds_torch.build_shm_op, lambda: None
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    try:
        yield env
    finally:
        ds_torch.build_shm_op = build
        d.destroy_process_group()


@pytest.fixture
def dist(gloo_rank: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The session's gloo rank, with its environment for this test (DeepSpeed's engine
    reads LOCAL_RANK and WORLD_SIZE from it)."""
    for k, v in gloo_rank.items():
        monkeypatch.setenv(k, v)
