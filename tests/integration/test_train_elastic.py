"""A run checkpointed by two workers resumes on one (a spot node gone for good).

The first submission trains 4 steps on 2 DeepSpeed ZeRO-3 workers and checkpoints at
step 4. The same run resubmitted with ``scaling.num_workers=1`` finds a checkpoint
written by another world size, converts it to DeepSpeed's universal form (once, beside
the original) and continues from step 4 with the weights and Adam moments it left.

The data position carries over too. The run uses 20 examples, so an epoch is 5 steps on
two workers (2 x micro batch 2); 4 of them took 16 examples. The resubmission asks for
one epoch: the 4 examples no rank reached yet are re-split over the one worker, 2 steps,
and the run ends at step 6 (not at one-worker epoch length, 10). The sample audit shows
every one of the 20 examples exactly once across the resize.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raylm import storage
from raylm.train import checkpoint as ckpt
from raylm.train.report import read_metrics
from raylm.train.trainer import run_training

pytestmark = pytest.mark.timeout(600)

DATA = ("data.max_samples=20", "checkpoint.log_sample_ids=true")


@pytest.fixture
def connected(ray_cluster):
    import ray

    ray.init(address=ray_cluster.gcs_address, namespace="raylm-tests", ignore_reinit_error=True)
    yield ray_cluster
    ray.shutdown()


def test_two_worker_checkpoint_resumes_on_one_worker(
    connected, pt_train_config, tmp_path: Path
) -> None:
    run_dir = run_training(pt_train_config(tmp_path, "elastic", 4, *DATA))["run_dir"]
    step, path = ckpt.latest_complete(run_dir)
    assert step == 4 and ckpt.marker(path)["world_size"] == 2

    one_epoch = ("train.max_steps=null", "train.epochs=1", "scaling.num_workers=1")
    run_training(pt_train_config(tmp_path, "elastic", 4, *DATA, *one_epoch))
    events = [json.loads(x) for x in storage.read_text(f"{run_dir}/events.jsonl").splitlines()]
    resume = next(e for e in events if e["event"] == "resume")
    assert (resume["from_step"], resume["world_size_from"], resume["world_size"]) == (4, 2, 1)
    assert resume["total_steps"] == 6  # the rest of the epoch, not 10 one-worker steps
    assert storage.exists(storage.join(path, ckpt.UNIVERSAL_DONE))
    metrics = read_metrics(f"{run_dir}/metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 7))
    assert metrics[-1]["samples_seen"] == 20
    # The Adam moments came back: one step from the restored state moves the loss on
    # smoothly from where the two-worker run left it, not back to a fresh start's value.
    assert metrics[4]["loss"] < metrics[0]["loss"]
    final = ckpt.latest_complete(run_dir)
    assert final[0] == 6 and ckpt.marker(final[1])["world_size"] == 1
    assert ckpt.marker(final[1])["worlds"] == [[0, 2], [4, 1]]

    audit = [json.loads(x) for x in storage.read_text(f"{run_dir}/samples.jsonl").splitlines()]
    assert [(r["step"], r["epoch"], len(r["ids"])) for r in audit] == [
        (1, 0, 4), (2, 0, 4), (3, 0, 4), (4, 0, 4), (5, 0, 2), (6, 0, 2),
    ]  # fmt: skip
    seen = [i for r in audit for i in r["ids"]]
    assert sorted(seen, key=int) == [str(i) for i in range(20)]  # none twice, none skipped
