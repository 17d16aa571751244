"""The environment a LocalCluster's head starts with: HAProxy private to that cluster."""

from __future__ import annotations

from pathlib import Path

import pytest

from raylm import cluster


def test_each_cluster_gets_its_own_haproxy_files_and_ports(tmp_path: Path) -> None:
    if not cluster.haproxy_available():
        pytest.skip("no HAProxy binary (ray[serve] ships one on Linux)")
    a = cluster.serve_ingress_env(tmp_path / "a")
    b = cluster.serve_ingress_env(tmp_path / "b")
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
    monkeypatch.setattr(cluster, "haproxy_available", lambda: False)
    assert cluster.serve_ingress_env(tmp_path) == {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}
    monkeypatch.undo()
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "0")
    assert cluster.serve_ingress_env(tmp_path) == {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}
    env = cluster._child_env(str(tmp_path), "127.0.0.1:1")
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "0"  # the user's choice is kept


def test_user_settings_win_over_the_cluster_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAY_SERVE_HAPROXY_STATS_PORT", "18404")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    env = cluster._child_env(str(tmp_path), "127.0.0.1:1")
    assert env["RAY_SERVE_HAPROXY_STATS_PORT"] == "18404"
    assert env["RAY_ADDRESS"] == "127.0.0.1:1"  # its own cluster, never the caller's
    assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
