"""Every CPU engine raylm starts makes AMX safe before vLLM's bfloat16 kernels run."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from raylm import engine


def fake_cpu(has_amx: bool, granted: bool) -> SimpleNamespace:
    calls: list[str] = []

    def init() -> bool:
        calls.append("init")
        return granted

    return SimpleNamespace(_is_amx_tile_supported=lambda: has_amx, _init_amx=init, calls=calls)


def test_without_amx_nothing_is_asked_or_changed() -> None:
    cpu = fake_cpu(has_amx=False, granted=False)
    assert engine.prepare_amx(cpu) is False
    assert cpu.calls == [] and cpu._is_amx_tile_supported() is False


def test_amx_is_requested_from_linux_before_vllm_uses_it() -> None:
    cpu = fake_cpu(has_amx=True, granted=True)
    assert engine.prepare_amx(cpu) is True
    assert cpu.calls == ["init"] and cpu._is_amx_tile_supported() is True


def test_refused_amx_is_hidden_from_vllm(caplog: pytest.LogCaptureFixture) -> None:
    """vLLM then picks its AVX-512 kernels instead of dying on the first tile instruction."""
    cpu = fake_cpu(has_amx=True, granted=False)
    assert engine.prepare_amx(cpu) is False
    assert cpu._is_amx_tile_supported() is False
    assert "refused" in caplog.text


def test_the_worker_class_resolves_by_the_name_vllm_is_given() -> None:
    pytest.importorskip("vllm")
    from vllm.utils.import_utils import resolve_obj_by_qualname
    from vllm.v1.worker.cpu_worker import CPUWorker

    cls = resolve_obj_by_qualname(engine.CPU_WORKER)
    assert issubclass(cls, CPUWorker) and cls.__name__ == "RaylmCPUWorker"


def test_one_builder_unset_limits_are_vllms_and_extra_wins() -> None:
    e = engine.EngineConfig(max_num_seqs=None, extra={"seed": 3, "enforce_eager": False})
    kw = engine.engine_kwargs(e, "/m")
    assert kw["max_model_len"] == 512 and "max_num_seqs" not in kw
    assert kw["seed"] == 3 and kw["enforce_eager"] is False
    assert kw["worker_cls"] == engine.CPU_WORKER and "gpu_memory_utilization" not in kw
    gpu = engine.engine_kwargs(e, "/m", use_gpu=True, lora=engine.LoraSlots(64, 2))
    assert "worker_cls" not in gpu and gpu["gpu_memory_utilization"] == 0.9
    assert (gpu["enable_lora"], gpu["max_lora_rank"], gpu["max_loras"]) == (True, 64, 2)
    assert engine.engine_env(e) == {"VLLM_CPU_KVCACHE_SPACE": "1"}
    assert engine.engine_env(e, use_gpu=True) == {}


def test_serve_and_generate_build_their_engines_the_same_way(tmp_path) -> None:
    from raylm.config import load
    from raylm.serve import app
    from raylm.serve.batch import processor_config

    (tmp_path / "config.json").write_text("{}")
    model, sets = str(tmp_path), ["engine.tensor_parallel_size=2", "engine.dtype=bfloat16"]
    serve = load("serve", [], [f"model.path={model}", "auth.required=false", *sets])
    generate = load("generate", [], [f"model={model}", "input.path=p", *sets])
    served = app.llm_config(serve)["engine_kwargs"]
    batch = processor_config(generate)
    generated = {k: v for k, v in batch.engine_kwargs.items() if k != "task_type"}  # Ray's
    assert served == generated == engine.engine_kwargs(serve.engine, model)
    assert served["tensor_parallel_size"] == 2  # generate used to drop it
    assert len(batch.placement_group_config["bundles"]) == 2


def test_eval_keeps_float32_eager_and_vllms_own_limits() -> None:
    from raylm.config import load

    cfg = load("eval", [], ["model=m", "metrics=[perplexity]", "data.perplexity_path=p"])
    kw = engine.engine_kwargs(cfg.engine, "m")
    assert (kw["dtype"], kw["enforce_eager"], kw["seed"]) == ("float32", True, 0)
    assert "max_model_len" not in kw and "max_num_seqs" not in kw


def test_serve_needs_a_length_limit_for_its_checks(tmp_path) -> None:
    from raylm.config import ConfigError, load

    with pytest.raises(ConfigError, match=r"engine\.max_model_len must be set for serve"):
        load("serve", [], [f"model.path={tmp_path}", "engine.max_model_len=null"])


def test_a_bucket_models_arguments_are_pointed_at_its_local_copy() -> None:
    kwargs = engine.engine_kwargs(engine.EngineConfig(), "s3://b/m")
    local = engine.on_local_copy(kwargs, "s3://b/m", "/cache/m-1")
    assert local["tokenizer"] == "/cache/m-1" and local["dtype"] == kwargs["dtype"]
    own = engine.engine_kwargs(engine.EngineConfig(extra={"tokenizer": "org/tok"}), "s3://b/m")
    assert engine.on_local_copy(own, "s3://b/m", "/cache/m-1")["tokenizer"] == "org/tok"
