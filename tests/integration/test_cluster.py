"""LocalCluster owns exactly its own processes: `down` must not touch another cluster."""

from __future__ import annotations

from pathlib import Path

import pytest

from raylm.cluster import ClusterInfo, LocalCluster, _alive, _group_members


@pytest.mark.timeout(240)
def test_second_cluster_starts_and_stops_without_touching_the_first(
    ray_cluster: ClusterInfo, tmp_path: Path
) -> None:
    import ray

    other = LocalCluster(tmp_path / "other")
    info = other.up(num_cpus=1)
    try:
        assert info.gcs_address != ray_cluster.gcs_address
        assert other.up() == info  # idempotent: the running cluster is returned
        status = other.status()
        assert status is not None and status["cluster"]["pid"] == info.pid
        node = other.add_node(num_cpus=1)  # a worker node: its own ray start process group
        ray.shutdown()  # an earlier test's library call may have left this process connected
        ray.init(address=info.gcs_address)
        assert ray.cluster_resources()["CPU"] == 2.0
    finally:
        ray.shutdown()
        assert other.down() is True
    assert _group_members(info.pid) == [] and _group_members(node.pid) == []
    assert not Path(info.temp_dir).exists()
    assert other.info() is None and other.down() is False
    assert _alive(ray_cluster.pid)  # the session's cluster is untouched
    ray.init(address=ray_cluster.gcs_address)
    try:
        assert ray.cluster_resources()["CPU"] == 2.0
    finally:
        ray.shutdown()
