"""A data job SIGKILLed half way and rerun: only its unfinished blocks are redone, and
its outputs and stats equal an uninterrupted run's.

The job runs as ``jobs/data.py`` in its own session on the shared test cluster; the
kill takes its whole process group once some blocks' completion markers exist but not
all, and a second time once dedup's exists. ``resume.PAUSE_ENV`` makes each block's
task (and the driver after dedup) wait a moment after writing its marker, so those
points are reached deterministically on any machine.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raylm.data import resume

ROOT = Path(__file__).resolve().parents[2]
WORDS = ["river", "hill", "stone", "cloud", "engine", "garden", "window", "letter", "market"]


def _corpus(root: Path) -> Path:
    """Two JSONL files of varied documents, with exact and near duplicates and bad lines."""
    rng = random.Random(0)
    docs = [
        " ".join(rng.choice(WORDS) + str(rng.randrange(999)) for _ in range(40)) for _ in range(360)
    ]
    lines = [json.dumps({"text": d}) for d in docs]
    lines[50:60] = [json.dumps({"text": d.upper()}) for d in docs[:10]]  # exact dups
    lines[60:70] = [json.dumps({"text": d + " appendix"}) for d in docs[10:20]]  # near
    lines[70:73] = ["{not json", json.dumps({"txt": "no text"}), json.dumps({"text": 7})]
    root.mkdir()
    (root / "a.jsonl").write_text("\n".join(lines[:260]) + "\n")
    (root / "b.jsonl").write_text("\n".join(lines[260:] + lines[:5]) + "\n")  # 5 cross-file dups
    return root


def _cmd(corpus: Path, out: Path) -> list[str]:
    return [
        sys.executable, "jobs/data.py", "conf/data/sample_pt.yaml", f"inputs=[{corpus}]",
        "format=text", "read_block_mb=0.02", f"output_dir={out}",
    ]  # fmt: skip


def _env(ray_cluster, pause: float = 0) -> dict[str, str]:
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.gcs_address}
    env.pop(resume.PAUSE_ENV, None)
    return env | ({resume.PAUSE_ENV: str(pause)} if pause else {})


def _run(cmd: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]


def _markers(out: Path) -> int:
    """Completed read blocks (the dedup stage's marker not counted)."""
    found = (out / resume.RESUME_DIR / "completions").glob("*.json")
    return len([f for f in found if f.name != "dedup.json"])


def _kill_when(cmd: list[str], env: dict[str, str], out: Path, ready: Callable) -> int:
    """Start the job, SIGKILL its process group once ``ready()``; the number of complete
    blocks once the cluster has stopped the dead job's tasks."""
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    settled, last = time.monotonic(), _markers(out)
    while time.monotonic() - settled < 2:  # no marker may appear after this
        time.sleep(0.2)
        if _markers(out) != last:
            settled, last = time.monotonic(), _markers(out)
    return last


def _events(out: Path) -> list[dict]:
    lines = (out / resume.EVENTS).read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k != "time"} for x in lines]


def _rows(path: Path, pattern: str) -> list[dict]:
    files = sorted(path.glob(pattern))
    if pattern.endswith(".jsonl"):
        rows = [json.loads(x) for f in files for x in f.read_text().splitlines()]
    else:
        rows = pa.concat_tables(pq.read_table(f) for f in files).to_pylist() if files else []
    return sorted(rows, key=lambda r: r["id"])


def _outputs_of_run(out: Path) -> dict:
    """What a run wrote, less what may differ between equal runs (seconds, reuse)."""
    stats = json.loads((out / "stats.json").read_text())
    return {
        "stats": {k: v for k, v in stats.items() if k not in ("seconds", "resume")},
        "meta": json.loads((out / "dataset_meta.json").read_text()),
        "shards": _rows(out / "shards", "*.parquet"),
        "dedup": _rows(out / "dedup", "*.parquet"),
        "quarantine": _rows(out / "quarantine", "*.jsonl"),
    }


def _outputs(out: Path) -> dict:
    """A job's outputs and its manifest's record of them (less its own path)."""
    manifest = json.loads((out / "manifest.json").read_text())
    return _outputs_of_run(out) | {
        "metrics": manifest["metrics"],
        "output": {k: v for k, v in manifest["output"].items() if k != "path"},
        "inputs": manifest["inputs"],
    }


@pytest.mark.timeout(420)
def test_killed_data_job_reruns_only_unfinished_blocks(ray_cluster, tmp_path: Path) -> None:
    """Killed during the per-record stage, then during tokenize/write: each rerun redoes
    only what was unfinished, and the outputs equal an uninterrupted run's."""
    corpus = _corpus(tmp_path / "in")
    whole, out = tmp_path / "whole", tmp_path / "killed"
    _run(_cmd(corpus, whole), _env(ray_cluster))
    expected = _outputs(whole)
    blocks = json.loads((whole / "stats.json").read_text())["resume"]["blocks"]
    assert blocks >= 6 and not (whole / resume.RESUME_DIR).exists()

    paused = _env(ray_cluster, pause=1)
    done = _kill_when(_cmd(corpus, out), paused, out, lambda: _markers(out) > 0)
    assert 0 < done < blocks
    assert json.loads((out / "manifest.json").read_text())["status"] == "running"
    # Rerun, killed once dedup is complete: it redid only the blocks the first run had not.
    dedup_done = out / resume.RESUME_DIR / "completions" / "dedup.json"
    assert _kill_when(_cmd(corpus, out), paused, out, dedup_done.exists) == blocks
    assert _events(out) == [
        {"event": "resume", "stage": "blocks", "blocks": blocks, "skipped": done,
         "redone": blocks - done, "stale": 0},
    ]  # fmt: skip
    assert dedup_done.exists() and not (out / "stats.json").exists()

    _run(_cmd(corpus, out), _env(ray_cluster))
    stats = json.loads((out / "stats.json").read_text())
    assert stats["resume"] == {
        "blocks": blocks, "skipped": blocks, "redone": 0, "stale": 0, "dedup": "reused"
    }  # fmt: skip
    assert _events(out)[1:] == [
        {"event": "resume", "stage": "blocks", "blocks": blocks, "skipped": blocks,
         "redone": 0, "stale": 0},
        {"event": "resume", "stage": "dedup"},
    ]  # fmt: skip
    assert json.loads((out / "manifest.json").read_text())["status"] == "succeeded"
    got = _outputs(out)
    assert got == expected
    assert got["stats"]["accounting_ok"] and got["stats"]["exact_dups"] >= 15
    assert got["stats"]["quarantined"] == 3 and not (out / resume.RESUME_DIR).exists()


@pytest.mark.timeout(300)
def test_a_changed_config_or_input_redoes_the_stale_blocks(ray_connected, tmp_path: Path) -> None:
    """Markers of another config, or of an input rewritten since, are not reused: those
    blocks are redone and counted stale, and the outputs are those of a fresh run."""
    from raylm.data.config import DataJobConfig, FilterConfig
    from raylm.data.pipeline import run
    from raylm.data.sources import expand_inputs

    corpus, out = _corpus(tmp_path / "in"), tmp_path / "out"
    cfg = DataJobConfig(
        inputs=[str(corpus)], format="text", read_block_mb=0.02, output_dir=str(out)
    )
    found = expand_inputs(cfg.inputs, cfg.format, cfg.columns)
    resume.process(found, cfg, "pt", str(out))  # a job killed after its per-record stage
    blocks = _markers(out)
    stricter = dataclasses.replace(cfg, filters=FilterConfig(min_words=30))
    stats = run(stricter)
    assert stats["resume"] == {
        "blocks": blocks, "skipped": 0, "redone": blocks, "stale": blocks, "dedup": "ran"
    }  # fmt: skip
    fresh = run(dataclasses.replace(stricter, output_dir=str(tmp_path / "fresh")))
    assert _outputs_of_run(out) == _outputs_of_run(tmp_path / "fresh")
    assert fresh["removed_by_filter"] == stats["removed_by_filter"]

    resume.process(found, cfg, "pt", str(out))
    b = corpus / "b.jsonl"  # rewritten in place: same size, a newer mtime
    os.utime(b, ns=(b.stat().st_atime_ns, b.stat().st_mtime_ns + 10**9))
    stats = run(cfg)
    assert stats["resume"]["stale"] == blocks - stats["resume"]["skipped"] > 0
    assert stats["resume"]["skipped"] > 0 and stats["resume"]["redone"] == stats["resume"]["stale"]
