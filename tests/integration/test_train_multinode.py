"""Losing a whole node mid-training, on a head plus three worker nodes.

Two DeepSpeed ZeRO-3 workers spread over the worker nodes, checkpointing to a real
S3-compatible bucket. Once a complete checkpoint exists, the node hosting one of the
workers is killed (its raylet, workers and everything in its process group, SIGKILL).
Ray Train restarts the worker group on the remaining capacity, the workers resume from
the newest complete checkpoint in the bucket, and the run ends with the same loss at
every step and the same final weights as the session's uninterrupted run (trained once,
on the single-node cluster, for every fault-tolerance test).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from raylm import storage
from raylm.cluster import NODE_LABEL, LocalCluster, alive_nodes, state_rows
from raylm.train.checkpoint import list_checkpoints
from raylm.train.report import read_metrics
from raylm.train.trainer import run_training

ROOT = Path(__file__).resolve().parents[2]
STEPS = 6

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def connected(multinode_cluster: LocalCluster, s3_bucket: str):
    import ray

    from raylm.cluster import init_ray

    info = multinode_cluster.info()
    assert info is not None
    ray.shutdown()
    init_ray(info.gcs_address, namespace="raylm-tests")  # forwards the bucket's settings
    yield multinode_cluster
    ray.shutdown()


def _worker_nodes(cluster: LocalCluster) -> dict[str, Any]:
    """Our NodeInfo of every node that hosts a live train worker, by node id."""
    info = cluster.info()
    by_label = {n.name: n for n in info.nodes}
    ids = {
        n["node_id"]: by_label[n["labels"][NODE_LABEL]]
        for n in alive_nodes(info)
        if n["labels"].get(NODE_LABEL) in by_label
    }
    actors = state_rows(info, "actors")
    return {
        a["node_id"]: ids[a["node_id"]]
        for a in actors
        if a["state"] == "ALIVE" and "TrainWorker" in a["class_name"] and a["node_id"] in ids
    }


def _weights(final: str) -> dict[str, Any]:
    import tempfile

    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        storage.copy_dir(final, tmp)
        return load_file(str(Path(tmp) / "model.safetensors"))


def test_losing_a_node_mid_run_matches_the_uninterrupted_run(
    connected: LocalCluster, pt_train_config, pt_reference: Path, s3_bucket: str
) -> None:
    """Against the session's uninterrupted run (conftest's ``pt_reference``, trained on
    the single-node cluster: the numbers do not depend on where the workers ran)."""
    root = storage.join(s3_bucket, "multinode")
    spread = ("checkpoint.max_failures=3", "scaling.placement_strategy=SPREAD")
    reference = str(pt_reference)

    result: dict[str, Any] = {}
    cfg = pt_train_config(root, "node-lost", STEPS, *spread)
    job = threading.Thread(target=lambda: result.update(run=run_training(cfg)), daemon=True)
    job.start()
    run_dir = storage.join(root, "node-lost")
    deadline = time.monotonic() + 300
    while not any(ok for _, _, ok in list_checkpoints(run_dir)):
        assert job.is_alive() and time.monotonic() < deadline, "no checkpoint before the kill"
        time.sleep(0.2)
    hosts = _worker_nodes(connected)
    assert len(hosts) == 2, f"the two workers should be on two worker nodes, got {hosts}"
    victim = next(iter(hosts.values()))
    logged_before = read_metrics(storage.join(run_dir, "metrics.jsonl"))[-1]["step"]
    killed_at = time.time()
    connected.remove_node(victim)
    job.join(timeout=420)
    assert not job.is_alive() and "run" in result, "the run did not finish after the node loss"

    events = [
        json.loads(x) for x in storage.read_text(storage.join(run_dir, "events.jsonl")).splitlines()
    ]
    resumes = [e for e in events if e["event"] == "resume"]
    assert len(resumes) == 1 and resumes[0]["from_step"] >= 2
    ref = read_metrics(storage.join(reference, "metrics.jsonl"))
    got = read_metrics(storage.join(run_dir, "metrics.jsonl"))
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    for a, b in zip(ref, got, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-6, (a["step"], a["loss"], b["loss"])
    first_after = next(m for m in got if m["step"] == resumes[0]["from_step"] + 1)
    print(
        f"node loss: {first_after['time'] - killed_at:.1f}s from kill to the first resumed step; "
        f"resumed from step {resumes[0]['from_step']}, "
        f"{max(0, logged_before - resumes[0]['from_step'])} logged step(s) redone"
    )
    want, have = (
        _weights(storage.join(reference, "final")),
        _weights(storage.join(run_dir, "final")),
    )
    assert want.keys() == have.keys()
    for name in want:
        assert (want[name] - have[name]).abs().max().item() < 1e-6, name
