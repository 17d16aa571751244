"""Fixtures of the unit tier."""

from __future__ import annotations

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
