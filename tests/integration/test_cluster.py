"""LocalCluster owns exactly its own processes: `down` must not touch another cluster.

Nothing here is mocked: both clusters are real `ray start` process groups. The one
substitute is a wrapper script in front of the real `ray` command that makes its first
head start and first worker start exit 1 before exec'ing the real one: a raylet that
misses Ray's 30 s registration window on a busy machine cannot be produced on demand,
and the retry it exercises is what keeps CI's cluster starts from flaking."""

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

    # The head's and a worker node's first `ray start` fail, as a raylet that misses
    # Ray's 30 s registration window on a busy machine makes it exit: both start again.
    flaky = tmp_path / "flaky-ray"
    flaky.write_text(
        f'#!/bin/sh\ncase "$*" in *start*--head*) m={tmp_path}/head-failed;; '
        f"*start*) m={tmp_path}/node-failed;; *) m=/dev/null;; esac\n"
        'if [ ! -e "$m" ]; then touch "$m"; echo simulated start-up failure; exit 1; fi\n'
        f'exec {cluster._ray_cli()} "$@"\n'
    )
    flaky.chmod(0o755)
    monkeypatch.setattr(cluster, "_ray_cli", lambda: str(flaky))
    other = LocalCluster(tmp_path / "other")
    info = other.up(num_cpus=1, object_store_gb=0.25)
    try:
        assert (tmp_path / "head-failed").exists()  # the first head start failed
        start_log = (tmp_path / "other" / "ray-start.log").read_text()
        assert start_log.count("simulated start-up failure") == 1, start_log
        assert info.gcs_address != ray_cluster.gcs_address
        assert other.up() == info  # idempotent: the running cluster is returned
        status = other.status()
        assert status is not None and status["cluster"]["pid"] == info.pid
        node = other.add_node(num_cpus=1)
        assert (tmp_path / "node-failed").exists()  # the first start failed; the second joined
        assert [n.pid for n in other.info().nodes] == [node.pid]
        logs = [p.read_text() for p in (tmp_path / "other").glob("node*.log")]
        assert sum("simulated start-up failure" in x for x in logs) == 1, logs
        ray.shutdown()  # an earlier test's library call may have left this process connected
        ray.init(address=info.gcs_address)
        assert ray.cluster_resources()["CPU"] == 2.0
        # the cap reached the head through its second start too
        head = next(n for n in ray.nodes() if "node:__internal_head__" in n["Resources"])
        assert head["Resources"]["object_store_memory"] == pytest.approx(0.25 * 2**30, rel=0.01)
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
