"""cluster.yaml and the KubeRay manifests validate with Ray's own schemas and loaders."""

from __future__ import annotations

import copy
import shlex
from pathlib import Path

import pytest
import yaml

from raylm import config

ROOT = Path(__file__).resolve().parents[2]


def test_cluster_yaml_passes_the_autoscaler_schema() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(raw)))
    types = raw["available_node_types"]
    assert types["gpu_spot"]["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert types["gpu_spot"]["resources"]["GPU"] >= 1 and types["gpu_spot"]["min_workers"] == 0
    assert any("raylm[gpu]" in cmd for cmd in raw["setup_commands"])
    # A misspelt key must fail the same validation (the test can fail).
    broken = copy.deepcopy(raw)
    broken["available_node_types"]["gpu_spot"]["min_worker"] = 1
    with pytest.raises(Exception, match="min_worker"):
        validate_config(prepare_config(broken))


def test_rayservice_serve_config_validates_with_serve_and_serve_llm() -> None:
    from ray.serve.llm import LLMConfig
    from ray.serve.schema import ServeDeploySchema

    from raylm.serve.server import ServerSettings

    manifest = yaml.safe_load((ROOT / "deploy" / "rayservice.yaml").read_text())
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayService")
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    schema = ServeDeploySchema.model_validate(serve_config)
    app = schema.applications[0]
    assert app.import_path == "raylm.serve.builder:build_app"
    assert LLMConfig.model_validate(app.args["llm_config"]).accelerator_type == "A10G"
    assert ServerSettings(**app.args["raylm"]).checks["models"]["sft"]["max_model_len"] == 4096
    assert ServerSettings(**app.args["raylm"]).sessions["store"].startswith("redis://")
    module, _, name = app.import_path.partition(":")
    assert hasattr(__import__(module, fromlist=[name]), name)


def test_rayjob_entrypoint_runs_a_valid_pipeline(monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = yaml.safe_load((ROOT / "deploy" / "rayjob-pipeline.yaml").read_text())
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayJob")
    python, script, *argv = shlex.split(manifest["spec"]["entrypoint"])
    assert python == "python" and (ROOT / script).is_file()
    monkeypatch.chdir(ROOT)
    files = [a for a in argv if "=" not in a]
    cfg = config.load("pipeline", files, [a for a in argv if "=" in a])
    assert cfg.workspace == "/mnt/shared/pipelines"
    assert "scaling.use_gpu=true" in cfg.train.overrides
    groups = manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpu = next(g for g in groups if g["groupName"] == "gpu-spot")
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1


@pytest.mark.parametrize(
    "path", ["cluster.yaml", "deploy/rayjob-pipeline.yaml", "deploy/rayservice.yaml"]
)
def test_manifests_have_no_duplicate_keys_and_turn_token_auth_on(path: str) -> None:
    """YAML keeps the last of two equal keys silently: a second ``env:`` would drop the
    first one's variables (token auth among them) without an error anywhere."""

    class Strict(yaml.SafeLoader):
        pass

    def mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict:
        keys = [loader.construct_object(k) for k, _ in node.value]
        dupes = {k for k in keys if keys.count(k) > 1}
        assert not dupes, f"{path}: duplicate keys {dupes} at line {node.start_mark.line + 1}"
        return loader.construct_mapping(node)

    Strict.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    text = (ROOT / path).read_text()
    yaml.load(text, Loader=Strict)
    assert "RAY_AUTH_MODE" in text
