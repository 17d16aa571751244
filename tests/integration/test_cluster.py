"""LocalCluster owns exactly its own processes: `down` must not touch another cluster."""

from __future__ import annotations

from pathlib import Path

import pytest

from raylm.cluster import ClusterInfo, LocalCluster
from raylm.process_groups import alive, group_members


@pytest.mark.timeout(240)
def test_second_cluster_starts_and_stops_without_touching_the_first(
    ray_cluster: ClusterInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray

    from raylm import cluster

    other = LocalCluster(tmp_path / "other")
    info = other.up(num_cpus=1)
    try:
        assert info.gcs_address != ray_cluster.gcs_address
        assert other.up() == info  # idempotent: the running cluster is returned
        status = other.status()
        assert status is not None and status["cluster"]["pid"] == info.pid
        # A worker node (its own ray start process group) whose first start fails, as a
        # raylet that misses Ray's 30 s registration window on a busy machine does.
        failed_once = tmp_path / "failed-once"
        flaky = tmp_path / "flaky-ray"
        flaky.write_text(
            f"#!/bin/sh\nif [ ! -e {failed_once} ]; then touch {failed_once}; "
            f'echo simulated start-up failure; exit 1; fi\nexec {cluster._ray_cli()} "$@"\n'
        )
        flaky.chmod(0o755)
        monkeypatch.setattr(cluster, "_ray_cli", lambda: str(flaky))
        node = other.add_node(num_cpus=1)
        assert failed_once.exists()  # the first start failed; the second joined
        assert [n.pid for n in other.info().nodes] == [node.pid]
        logs = [p.read_text() for p in (tmp_path / "other").glob("node*.log")]
        assert sum("simulated start-up failure" in x for x in logs) == 1, logs
        ray.shutdown()  # an earlier test's library call may have left this process connected
        ray.init(address=info.gcs_address)
        assert ray.cluster_resources()["CPU"] == 2.0
    finally:
        ray.shutdown()
        assert other.down() is True
    assert group_members(info.pid) == [] and group_members(node.pid) == []
    assert not Path(info.temp_dir).exists()
    assert other.info() is None and other.down() is False
    assert alive(ray_cluster.pid)  # the session's cluster is untouched
    ray.init(address=ray_cluster.gcs_address)
    try:
        assert ray.cluster_resources()["CPU"] == 2.0
    finally:
        ray.shutdown()
