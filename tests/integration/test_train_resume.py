"""Fault tolerance of the train job on a real 2-worker Ray Train + DeepSpeed ZeRO-3 run.

One uninterrupted run is the reference; a second run with the same seed has one worker
SIGKILLed right after it uploaded its files of the step-4 checkpoint but before that
checkpoint was marked COMPLETE. Ray Train's FailureConfig restarts the workers; they must
ignore the incomplete step-4 checkpoint, resume from step 2, and reproduce the
reference losses step for step (fp32 on CPU: within 1e-6), seeing every example once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from raylm.train.checkpoint import list_checkpoints
from raylm.train.report import read_metrics
from raylm.train.trainer import run_training

ROOT = Path(__file__).resolve().parents[2]
STEPS = 6

pytestmark = pytest.mark.timeout(420)


EXTRA = ("checkpoint.keep=2", "checkpoint.max_failures=2", "checkpoint.log_sample_ids=true")


@pytest.fixture(scope="module")
def connected(ray_cluster):
    import ray

    ray.init(address=ray_cluster.gcs_address, namespace="raylm-tests", ignore_reinit_error=True)
    yield ray_cluster
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(connected, pt_train_config, tmp_path_factory) -> Path:
    storage = tmp_path_factory.mktemp("train_ref")
    result = run_training(pt_train_config(storage, "ref", STEPS, *EXTRA))
    return Path(result["run_dir"])


@pytest.fixture(scope="module")
def faulted(connected, pt_train_config, tmp_path_factory) -> Path:
    storage = tmp_path_factory.mktemp("train_fault")
    fault = {"where": "after_upload", "rank": 1, "step": 4, "marker": str(storage / "fault")}
    result = run_training(pt_train_config(storage, "faulted", STEPS, *EXTRA), fault=fault)
    assert (storage / "fault").exists(), "the injected worker kill never happened"
    return Path(result["run_dir"])


def events(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines() if x]


def test_reference_run_trains_and_partitions(reference: Path) -> None:
    metrics = read_metrics(reference / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.1
    complete = [step for step, _, ok in list_checkpoints(reference) if ok]
    assert complete[-2:] == [4, 6]  # keep=2 of the complete ones survive retention


def test_zero3_partitions_parameters_across_two_workers(reference: Path) -> None:
    """Each rank's ZeRO-3 shard file holds about half of the model's parameters."""
    import torch
    from safetensors.torch import load_file

    full = sum(t.numel() for t in load_file(reference / "final/model.safetensors").values())
    _, path, _ = list_checkpoints(reference)[-1]
    sizes = []
    for rank in (0, 1):
        optim = torch.load(
            Path(path) / "ds" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt",
            weights_only=False,
        )
        flat = optim["optimizer_state_dict"]["fp32_flat_groups"]
        sizes.append(sum(t.numel() for t in flat))
    assert sizes[0] == pytest.approx(sizes[1], rel=0.01)
    assert sum(sizes) == pytest.approx(full, rel=0.01)  # together: the whole model, once


def test_worker_kill_during_checkpoint_resumes_exactly(reference: Path, faulted: Path) -> None:
    ev = events(faulted)
    resumes = [e for e in ev if e["event"] == "resume"]
    assert len(resumes) == 1
    # The step-4 checkpoint was uploaded by both ranks but never marked COMPLETE:
    # the restarted workers must fall back to the previous complete one.
    assert resumes[0]["from_step"] == 2
    ref = read_metrics(reference / "metrics.jsonl")
    got = read_metrics(faulted / "metrics.jsonl")
    assert [m["step"] for m in got] == [m["step"] for m in ref]
    for a, b in zip(ref, got, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-6, (a["step"], a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-5


def test_resumed_run_sees_each_example_once_per_epoch(faulted: Path) -> None:
    rows = [json.loads(x) for x in (faulted / "samples.jsonl").read_text().splitlines() if x]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    seen = [i for r in rows for i in r["ids"]]
    assert len(seen) == len(set(seen)) == STEPS * 2 * 2  # steps x micro batch x workers


@pytest.mark.timeout(420)
def test_killed_job_resubmitted_with_same_run_name_continues_exactly(
    reference: Path, tiny_model: Path, tmp_path: Path, s3_bucket: str
) -> None:
    """SIGKILL the whole job (driver, controller, workers) after its first checkpoint,
    then run the same command again: it continues from that checkpoint and matches.
    The base model, checkpoints, markers, metrics, final/ and the manifest all live in a
    bucket on a real S3-compatible server, and the resume reads them back from there.
    (Resuming from a local directory is what the worker-kill test above does.)"""
    import signal
    import subprocess
    import sys
    import time

    from raylm import storage

    root = s3_bucket + "/runs"
    model = storage.join(s3_bucket, "models", "tiny")  # the workers load it from the bucket
    storage.copy_dir(str(tiny_model), model)
    argv = [
        sys.executable, str(ROOT / "jobs/train.py"), str(ROOT / "conf/train/pt_full.yaml"),
        f"model.name_or_path={model}", f"data.path={ROOT / 'conf/train/data/pt_demo.jsonl'}",
        f"storage_path={root}", "run_name=preempted", f"train.max_steps={STEPS}",
        "train.micro_batch_size=2", "checkpoint.save_steps=2", "checkpoint.keep=2",
        "checkpoint.max_failures=2", "checkpoint.log_sample_ids=true",
    ]  # fmt: skip
    run_dir = storage.join(root, "preempted")
    log = (tmp_path / "first.log").open("wb")
    first = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and first.poll() is None:
        if any(ok for _, _, ok in list_checkpoints(run_dir)):
            break
        time.sleep(0.1)
    assert first.poll() is None, "the job ended before it could be killed"
    os.killpg(first.pid, signal.SIGKILL)  # the whole job: our own process group only
    first.wait()
    killed_at = len(read_metrics(storage.join(run_dir, "metrics.jsonl")))
    assert killed_at < STEPS

    second = subprocess.run(argv, capture_output=True, text=True, timeout=360)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    lines = storage.read_text(storage.join(run_dir, "events.jsonl")).splitlines()
    resumes = [e for e in map(json.loads, lines) if e["event"] == "resume"]
    assert len(resumes) == 1 and resumes[0]["from_step"] >= 2
    ref = read_metrics(reference / "metrics.jsonl")
    got = read_metrics(storage.join(run_dir, "metrics.jsonl"))
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    for a, b in zip(ref, got, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-6, (a["step"], a["loss"], b["loss"])
    manifest = json.loads(storage.read_text(storage.join(run_dir, "manifest.json")))
    assert manifest["status"] == "succeeded" and manifest["metrics"]["resumes"] == 1
    assert manifest["output"]["path"] == storage.join(run_dir, "final")
    assert "model.safetensors" in storage.listdir(storage.join(run_dir, "final"))
