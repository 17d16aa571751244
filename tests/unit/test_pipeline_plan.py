"""The pipeline wires each stage's output into the next stage's config."""

from __future__ import annotations

from pathlib import Path

import pytest

from raylm import config
from raylm.config import ConfigError
from raylm.pipeline.config import PipelineConfig
from raylm.pipeline.runner import plan

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def demo(monkeypatch: pytest.MonkeyPatch) -> PipelineConfig:
    monkeypatch.chdir(ROOT)
    return config.load("pipeline", ["conf/pipeline/demo.yaml"])


def test_demo_plan_wires_outputs_to_inputs(demo: PipelineConfig, tmp_path: Path) -> None:
    stages = {s.name: s for s in plan(demo, tmp_path)}
    assert list(stages) == ["data", "train", "eval", "serve"]
    data, train, ev, serve = (stages[n].load() for n in ("data", "train", "eval", "serve"))
    assert data.output_dir == str(tmp_path / "data")
    assert train.data.path == str(tmp_path / "data")
    assert (train.storage_path, train.run_name) == (str(tmp_path), "train")
    final = str(tmp_path / "train" / "final")
    # LoRA: eval scores the adapter on its base and compares with the base itself.
    base = train.model.name_or_path
    assert (ev.model, ev.adapter_base, ev.base_model) == (final, base, base)
    assert serve.model.path == train.model.name_or_path
    assert list(serve.lora.adapters.values()) == [final]
    assert stages["eval"].inputs == [final] == stages["serve"].inputs


def test_stage_overrides_win_over_wiring(demo: PipelineConfig, tmp_path: Path) -> None:
    demo.eval.overrides = ["gate.max_perplexity=1.5"]
    ev = next(s for s in plan(demo, tmp_path) if s.name == "eval").load()
    assert ev.gate.max_perplexity == 1.5


def test_fingerprint_follows_config_and_inputs(demo: PipelineConfig, tmp_path: Path) -> None:
    train = next(s for s in plan(demo, tmp_path) if s.name == "train")
    before = train.fingerprint()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "part.parquet").write_bytes(b"shard")
    with_data = train.fingerprint()
    assert with_data != before
    train.argv.append("train.lr=1e-3")
    assert train.fingerprint() != with_data


def test_pipeline_config_rejects_incoherent_stages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError, match="at least one stage"):
        config.load("pipeline", [], [])
    with pytest.raises(ConfigError, match="gate=true needs an eval stage"):
        config.load("pipeline", [], ["serve.config=conf/serve/tiny.yaml"])
