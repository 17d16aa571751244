"""The pipeline wires each stage from the typed output the stage before it recorded."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from raylm import config
from raylm.config import ConfigError
from raylm.manifest import Manifest
from raylm.outputs import DatasetOutput, ModelOutput, read_output
from raylm.pipeline.config import PipelineConfig
from raylm.pipeline.runner import stage_for

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def demo(monkeypatch: pytest.MonkeyPatch) -> PipelineConfig:
    monkeypatch.chdir(ROOT)
    return config.load("pipeline", ["conf/pipeline/demo.yaml"])


def _produced(tmp_path: Path, adapter: bool = True) -> dict:
    """What the data and train stages' manifests would record."""
    data = DatasetOutput(str(tmp_path / "d"), "sft", True, "/tok", "sha256:x", 128, 10)
    final = str(tmp_path / "t" / "final")
    model = ModelOutput(final, adapter, "/base", final, 128, "sft")
    return {"data": data, "train": model}


def test_stages_are_wired_from_typed_outputs(demo: PipelineConfig, tmp_path: Path) -> None:
    produced = _produced(tmp_path)
    stages = {n: stage_for(n, demo, tmp_path, produced) for n in ("data", "train", "eval", "serve")}
    data, train, ev, serve = (stages[n].load() for n in ("data", "train", "eval", "serve"))
    assert data.output_dir == str(tmp_path / "data")
    # train reads what the data stage recorded, wherever that is.
    assert train.data.path == str(tmp_path / "d") and stages["train"].inputs == [train.data.path]
    assert (train.storage_path, train.run_name) == (str(tmp_path), "train")
    assert train.model.template is None  # the data stage used the tokenizer's own template
    final = produced["train"].path
    # LoRA: eval scores the adapter on its recorded base and compares with the base itself.
    assert (ev.model, ev.adapter_base, ev.base_model) == (final, "/base", "/base")
    assert serve.model.path == "/base"
    assert serve.lora.adapters == {demo.name: final}
    assert stages["eval"].inputs == [final] == stages["serve"].inputs


def test_a_full_model_is_served_as_itself(demo: PipelineConfig, tmp_path: Path) -> None:
    produced = _produced(tmp_path, adapter=False)
    ev = stage_for("eval", demo, tmp_path, produced).load()
    serve = stage_for("serve", demo, tmp_path, produced).load()
    assert (ev.model, ev.adapter_base, ev.base_model) == (produced["train"].path, None, "/base")
    assert serve.model.path == produced["train"].path and not serve.lora.adapters


def test_stage_overrides_win_over_wiring(demo: PipelineConfig, tmp_path: Path) -> None:
    demo.eval.overrides = ["gate.max_perplexity=1.5"]
    ev = stage_for("eval", demo, tmp_path, _produced(tmp_path)).load()
    assert ev.gate.max_perplexity == 1.5


def test_fingerprint_follows_config_and_inputs(demo: PipelineConfig, tmp_path: Path) -> None:
    train = stage_for("train", demo, tmp_path, _produced(tmp_path))
    before = train.fingerprint()
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "part.parquet").write_bytes(b"shard")
    with_data = train.fingerprint()
    assert with_data != before
    train.argv.append("train.lr=1e-3")
    assert train.fingerprint() != with_data


def test_a_stage_reads_only_a_succeeded_manifest_of_the_right_kind(tmp_path: Path) -> None:
    out = _produced(tmp_path)["train"]
    manifest = Manifest(job="train", config={})
    manifest.write(tmp_path)
    with pytest.raises(ConfigError, match="status 'running', expected 'succeeded'"):
        read_output(ModelOutput, tmp_path)
    manifest.finish({}, {}, out.to_record()).write(tmp_path)
    assert read_output(ModelOutput, tmp_path) == out
    with pytest.raises(ConfigError, match="expected a dataset output, its manifest records model"):
        read_output(DatasetOutput, tmp_path)
    with pytest.raises(ConfigError, match="no manifest"):
        read_output(ModelOutput, tmp_path / "nowhere")


def test_pipeline_config_rejects_incoherent_stages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError, match="at least one stage"):
        config.load("pipeline", [], [])
    with pytest.raises(ConfigError, match="gate=true needs an eval stage"):
        config.load("pipeline", [], ["serve.config=conf/serve/tiny.yaml"])


def test_a_workspace_in_a_bucket_keeps_its_uris(demo: PipelineConfig, s3_bucket: str) -> None:
    """Stage dirs, stage records and lineage live in the bucket, URIs intact."""
    from raylm.pipeline import lineage
    from raylm.pipeline.runner import _already_done, _record

    run_dir = f"{s3_bucket}/pipelines/demo"
    stage = stage_for("data", demo, run_dir, {})
    assert stage.out_dir == f"{run_dir}/data" and stage.load().output_dir == stage.out_dir
    fingerprint = stage.fingerprint()
    _record(stage, run_dir, fingerprint, "raysubmit_1")
    assert not _already_done(stage, run_dir, fingerprint, "http://unused")  # no manifest yet
    Manifest(job="data", config={}).finish({}, {}).write(stage.out_dir)
    assert _already_done(stage, run_dir, fingerprint, "http://unused")
    assert not _already_done(stage, run_dir, "another", "http://unused")
    path = lineage.write(run_dir, {"stages": {"data": "ran"}})
    assert path == f"{run_dir}/lineage.json" and "curated" in lineage.describe(run_dir)


def test_train_renders_with_the_template_the_data_stage_used(
    demo: PipelineConfig, tmp_path: Path
) -> None:
    produced = _produced(tmp_path)
    produced["data"] = dataclasses.replace(produced["data"], template="chatml")
    assert stage_for("train", demo, tmp_path, produced).load().model.template == "chatml"


def test_export_stages_are_wired_and_serve_deploys_the_export(
    demo: PipelineConfig, tmp_path: Path
) -> None:
    demo.export.config = "conf/export/tiny.yaml"
    demo.export_eval.config = "conf/eval/default.yaml"
    produced = _produced(tmp_path)
    export = stage_for("export", demo, tmp_path, produced)
    assert export.load().model == str(tmp_path / "train")  # the train run's manifest dir
    assert (export.job, export.inputs) == ("export", [produced["train"].path])
    merged = str(tmp_path / "export")
    produced["export"] = ModelOutput(merged, False, "/base", merged, 128, "sft")
    with pytest.raises(ConfigError, match="is not quantized"):
        stage_for("export_eval", demo, tmp_path, produced)
    quantized = ModelOutput(
        f"{merged}/quantized", False, "/base", merged, 128, "sft", source=merged
    )
    produced["export"] = quantized
    ev = stage_for("export_eval", demo, tmp_path, produced)
    assert ev.job == "eval" and ev.out_dir == str(tmp_path / "export_eval")
    assert (ev.load().model, ev.load().base_model) == (quantized.path, merged)
    serve = stage_for("serve", demo, tmp_path, produced).load()
    assert serve.model.path == quantized.path and not serve.lora.adapters


def test_export_eval_needs_an_export_stage(tmp_path: Path) -> None:
    conf = tmp_path / "p.yaml"
    conf.write_text("train: {config: conf/train/sft_lora.yaml}\nexport_eval: {config: e.yaml}\n")
    with pytest.raises(ConfigError, match="add an export stage"):
        config.load("pipeline", [conf])
