"""Every YAML shipped in conf/ must load: examples that rot are worse than none."""

from __future__ import annotations

from pathlib import Path

import pytest

from raylm import config

CONF = Path(__file__).resolve().parents[2] / "conf"
FILES = sorted(CONF.glob("*/*.yaml"))


def test_conf_folders_are_jobs() -> None:
    folders = {p.name for p in CONF.iterdir() if p.is_dir()}
    assert folders <= set(config.job_names()), folders - set(config.job_names())
    assert FILES, "conf/ has no example configs"


@pytest.mark.parametrize("path", FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_conf_file_validates(path: Path) -> None:
    cfg = config.load(path.parent.name, [path])
    assert isinstance(cfg, config.config_class(path.parent.name))
