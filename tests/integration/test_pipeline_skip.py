"""When may the pipeline skip a stage? Files on disk are enough, except for a deployment."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raylm.cluster import ClusterInfo
from raylm.manifest import Manifest
from raylm.pipeline.runner import STAGE_RECORDS, Stage, _already_done

ROOT = Path(__file__).resolve().parents[2]


def _done(tmp_path: Path, name: str, argv: list[str]) -> tuple[Stage, str]:
    stage = Stage(name, argv, tmp_path / name, [])
    fingerprint = stage.fingerprint()
    (tmp_path / STAGE_RECORDS).mkdir(exist_ok=True)
    (tmp_path / STAGE_RECORDS / f"{name}.json").write_text(json.dumps({"fingerprint": fingerprint}))
    Manifest(job=name, config={}).finish({}, {}).write(stage.out_dir)
    return stage, fingerprint


@pytest.mark.timeout(120)
def test_recorded_stage_is_skipped_but_a_lost_deployment_is_not(
    ray_cluster: ClusterInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    url = ray_cluster.dashboard_url
    data, fp = _done(tmp_path, "data", ["conf/data/sample_sft.yaml"])
    assert _already_done(data, tmp_path, fp, url)
    assert not _already_done(data, tmp_path, "other-fingerprint", url)
    # A stage stopped part-way (preempted) wrote no record: it runs again.
    train = Stage("train", ["conf/train/sft_lora.yaml"], tmp_path / "train", [])
    assert not _already_done(train, tmp_path, train.fingerprint(), url)
    serve, fp = _done(
        tmp_path, "serve", ["conf/serve/tiny.yaml", "model.path=/m", "app_name=never-deployed"]
    )
    # Everything on disk says "done", but no such app runs on this cluster.
    assert not _already_done(serve, tmp_path, fp, url)
