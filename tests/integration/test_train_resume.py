"""Fault tolerance of the train job on a real 2-worker Ray Train + DeepSpeed ZeRO-3 run.

The session's uninterrupted run (conftest's ``pt_reference``) is the reference; a run
with the same seed has one worker SIGKILLed right after it uploaded its files of the
step-4 checkpoint but before that checkpoint was marked COMPLETE. Ray Train's
FailureConfig restarts the workers; they must ignore the incomplete step-4 checkpoint,
resume from step 2, and reproduce the reference losses step for step (fp32 on CPU:
within 1e-6), seeing every example once.

The faulted run also reports to TensorBoard, MLflow and W&B (``report_to``): while it
trains, a thread reads each sink's store and must see step 2 or later before the run is
done (they are live, not written afterwards), and its sinks must continue across its
resume (one MLflow run, one W&B id, TensorBoard's replayed steps purged).
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from raylm.train.checkpoint import list_checkpoints
from raylm.train.report import read_metrics
from raylm.train.sink_readers import logged
from raylm.train.sinks import SINKS
from raylm.train.trainer import run_training

ROOT = Path(__file__).resolve().parents[2]
STEPS = 6

pytestmark = pytest.mark.timeout(420)


EXTRA = (
    "checkpoint.keep=2", "checkpoint.max_failures=2", "checkpoint.log_sample_ids=true",
    f"report_to=[{','.join(SINKS)}]",
)  # fmt: skip


class Watch:
    """Reads every sink's store from a thread while a run trains, as a person with
    TensorBoard, ``mlflow ui`` or ``wandb beta leet`` open would; ``seen`` holds, per
    sink, the newest step read and how many steps metrics.jsonl had then."""

    def __init__(self) -> None:
        self.seen: dict[str, tuple[int, int]] = {}
        self.done = threading.Event()

    def watch(self, run_dir: Path) -> None:
        while not self.done.is_set() and len(self.seen) < len(SINKS):
            for name in set(SINKS) - set(self.seen):
                try:
                    newest = max(logged(name, str(run_dir)), default=0)
                except Exception:  # a store still being created
                    continue
                logged_steps = len(read_metrics(run_dir / "metrics.jsonl"))
                if newest >= 2 and not (run_dir / "final").exists():
                    self.seen[name] = (newest, logged_steps)
            time.sleep(0.2)


@pytest.fixture(scope="module")
def connected(ray_cluster):
    import ray

    ray.init(address=ray_cluster.gcs_address, namespace="raylm-tests", ignore_reinit_error=True)
    yield ray_cluster
    ray.shutdown()


@pytest.fixture(scope="module")
def sink_env() -> Iterator[None]:
    """W&B flushes its offline file every 0.5 s instead of 15 (so the watch sees it);
    the driver hands WANDB_* to rank 0 (raylm.train.sinks.prepare)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB__TRANSACTION_LOG_FLUSH_INTERVAL", "0.5")
        mp.setenv("WANDB__DISABLE_STATS", "true")
        for name in ("MLFLOW_TRACKING_URI", "WANDB_MODE", "WANDB_API_KEY"):
            mp.delenv(name, raising=False)
        yield


@pytest.fixture(scope="module")
def live() -> Watch:
    return Watch()


@pytest.fixture(scope="module")
def reference(pt_reference: Path) -> Path:
    return pt_reference


@pytest.fixture(scope="module")
def faulted(connected, sink_env, live, pt_train_config, tmp_path_factory) -> Path:
    storage = tmp_path_factory.mktemp("train_fault")
    for name in SINKS:  # import the readers before the run starts, not during it
        logged(name, str(storage))
    watcher = threading.Thread(target=live.watch, args=(storage / "faulted",), daemon=True)
    watcher.start()
    fault = {"where": "after_upload", "rank": 1, "step": 4, "marker": str(storage / "fault")}
    try:
        result = run_training(pt_train_config(storage, "faulted", STEPS, *EXTRA), fault=fault)
    finally:
        live.done.set()
        watcher.join()
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
    assert re.fullmatch(r"checkpoint_00000002_[0-9a-f]{8}", resumes[0]["checkpoint"])
    ref = read_metrics(reference / "metrics.jsonl")
    got = read_metrics(faulted / "metrics.jsonl")
    assert [m["step"] for m in got] == [m["step"] for m in ref]
    for a, b in zip(ref, got, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-6, (a["step"], a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-5


def test_sinks_show_each_step_while_the_run_trains(faulted: Path, live: Watch) -> None:
    """Read live; that what they hold equals metrics.jsonl is the next test's."""
    assert set(live.seen) == set(SINKS), f"read live only: {live.seen}"
    for name, (newest, logged_steps) in live.seen.items():
        assert newest >= 2 and logged_steps < STEPS, (name, newest, logged_steps)


def test_params_are_logged_once(reference: Path) -> None:
    params = [e for e in events(reference) if e["event"] == "params"]
    assert len(params) == 1 and params[0]["n_params"] == params[0]["n_trainable"] > 0


def test_resumed_run_continues_the_same_sink_runs(faulted: Path) -> None:
    from mlflow.tracking import MlflowClient

    want = {m["step"]: m["loss"] for m in read_metrics(faulted / "metrics.jsonl")}
    for name in SINKS:  # TensorBoard: the replayed steps' first events are purged
        assert logged(name, str(faulted)) == pytest.approx(want, rel=1e-6), name
    ids = json.loads((faulted / "sinks.json").read_text())
    client = MlflowClient(f"file://{faulted}/mlruns")
    runs = client.search_runs([client.get_experiment_by_name("raylm").experiment_id])
    assert [(r.info.run_id, r.info.status) for r in runs] == [(ids["mlflow_run_id"], "FINISHED")]
    attempts = list((faulted / "wandb").glob(f"offline-run-*-{ids['wandb_run_id']}*"))
    assert len(attempts) == 2  # one W&B run id, resumed: `wandb sync` joins them


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
    The base model, the training data, checkpoints, markers, metrics, final/ and the
    manifest all live in a bucket on a real S3-compatible server, and the resume reads
    them back from there.
    (Resuming from a local directory is what the worker-kill test above does.)"""
    import signal
    import subprocess
    import sys
    import time

    from raylm import storage

    root = s3_bucket + "/runs"
    model = storage.join(s3_bucket, "models", "tiny")  # the workers load it from the bucket
    storage.copy_dir(str(tiny_model), model)
    data = storage.join(s3_bucket, "data", "pt_demo.jsonl")  # the reference's rows
    storage.write_bytes(data, (ROOT / "conf/train/data/pt_demo.jsonl").read_bytes())
    argv = [
        sys.executable, str(ROOT / "jobs/train.py"), str(ROOT / "conf/train/pt_full.yaml"),
        f"model.name_or_path={model}", f"data.path={data}",
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
    # the run's inputs name the bucket objects themselves (not ``s3:/...``, not dropped)
    assert set(manifest["inputs"]) == {data, model} and manifest["inputs"][data].startswith(
        "listing:"
    )
