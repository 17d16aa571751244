"""raylm touches Ray's private LLM code from one module, and that module says when Ray moved it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from raylm.serve import ray_llm

RAYLM = Path(__file__).resolve().parents[2] / "raylm"


def test_every_private_name_raylm_uses_exists_in_this_ray() -> None:
    """Fails after a Ray upgrade that moved one: adapt raylm/serve/ray_llm.py first."""
    ray_llm.check()


def test_a_missing_private_name_fails_naming_it_and_the_ray_version(monkeypatch) -> None:
    monkeypatch.setitem(ray_llm.PRIVATE, "Gone", "ray.llm._internal.nowhere")
    with pytest.raises(ray_llm.RayPrivateApiChanged) as err:
        ray_llm.check()
    assert "written for Ray 2.60" in str(err.value)
    assert "ray.llm._internal.nowhere.Gone" in str(err.value)


def test_a_missing_private_method_fails_too(monkeypatch) -> None:
    monkeypatch.setitem(ray_llm.PRIVATE_METHODS, "VLLMEngine", ("_gone_in_a_later_ray",))
    with pytest.raises(ray_llm.RayPrivateApiChanged, match=r"VLLMEngine\._gone_in_a_later_ray"):
        ray_llm.check()


def test_no_other_raylm_module_imports_rays_private_llm_code() -> None:
    private = re.compile(r"^\s*(from|import)\s+ray\.llm\._internal", re.MULTILINE)
    users = [
        str(p.relative_to(RAYLM))
        for p in RAYLM.rglob("*.py")
        if private.search(p.read_text()) and p.name != "ray_llm.py"
    ]
    assert users == []


def test_the_builder_binds_raylms_settings_to_its_server(tmp_path: Path) -> None:
    from raylm.config import load
    from raylm.serve import app, builder

    (tmp_path / "config.json").write_text("{}")
    cfg = load("serve", [], [f"model.path={tmp_path}", "model.name=tiny", "auth.required=false"])
    args = app.serving_args(cfg, key_hashes=["h"])
    deployment = builder.build_app(args)._bound_deployment
    assert deployment.name == "RaylmLLMServer:tiny"
    assert deployment.init_kwargs["raylm"] == args["raylm"]
    assert args["raylm"]["checks"]["key_hashes"] == ["h"]
    assert "experimental_configs" not in args["llm_config"]
