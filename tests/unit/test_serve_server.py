"""raylm's model server runs a one-device CPU engine in one process, and only that one."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from raylm.serve.server import single_process_executor


@pytest.mark.parametrize(
    ("world_size", "backend", "expected"),
    [(1, "mp", "uni"), (2, "mp", "mp"), (1, "ray", "ray"), (4, "ray", "ray")],
)
def test_only_a_one_worker_multiprocess_engine_runs_in_process(world_size, backend, expected):
    cfg = SimpleNamespace(world_size=world_size, distributed_executor_backend=backend)
    assert single_process_executor(cfg) == (expected != backend)
    assert cfg.distributed_executor_backend == expected


@pytest.mark.parametrize(
    ("world_size", "backend", "enabled", "after"),
    [
        (1, "mp", True, "uni"),  # vLLM's CPU default for one device: switched
        (1, "mp", False, "mp"),  # engine.single_process=false keeps vLLM's choice
        (2, "mp", True, "mp"),  # tensor parallel needs its worker processes
        (1, "ray", True, "ray"),  # GPU engines under Ray's executor are left alone
    ],
)
def test_single_process_executor_only_for_one_cpu_worker(
    world_size: int, backend: str, enabled: bool, after: str
) -> None:
    pc = SimpleNamespace(world_size=world_size, distributed_executor_backend=backend)
    assert single_process_executor(pc, enabled) == (after != backend)
    assert pc.distributed_executor_backend == after


def test_a_replica_serves_its_nodes_copy_of_a_bucket_model(
    tmp_path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The LLMConfig a replica gets names the bucket; the engine is given the copy, and
    the request checks count tokens with the copy's tokenizer."""
    from ray.serve.llm import LLMConfig

    from raylm import storage
    from raylm.config import load
    from raylm.serve import app
    from raylm.serve.server import ServerSettings, on_local_model

    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "home"))
    uri = storage.join(s3_bucket, "replica", "model")
    storage.write_text(storage.join(uri, "config.json"), "{}")
    cfg = load("serve", [], [f"model.path={uri}", "model.name=tiny", "auth.required=false"])
    args = app.serving_args(cfg, key_hashes=[])
    assert args["llm_config"]["engine_kwargs"]["tokenizer"] == uri
    assert args["raylm"]["checks"]["models"]["tiny"]["tokenizer_path"] is None
    settings = ServerSettings(**args["raylm"])
    llm = on_local_model(LLMConfig.model_validate(args["llm_config"]), settings)
    local = storage.local_dir(uri)
    assert local.startswith(storage.cache_root())
    assert llm.model_loading_config.model_source == local and llm.model_id == "tiny"
    assert llm.engine_kwargs["tokenizer"] == local
    assert llm.get_engine_config().actual_hf_model_id == local  # no mirror left to download
    assert settings.checks["models"]["tiny"]["tokenizer_path"] == local
    plain = LLMConfig.model_validate(
        args["llm_config"] | {"model_loading_config": {"model_id": "tiny", "model_source": local}}
    )
    assert on_local_model(plain, settings) is plain  # a local model is left as it is
