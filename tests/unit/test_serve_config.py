"""The serve/generate configs validate early and map onto ray.serve.llm's LLMConfig."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from raylm.config import ConfigError, load
from raylm.serve import app
from raylm.serve.config import ServeJobConfig

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """Only config.json matters for the mapping; the engine never starts in unit tests."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    return tmp_path / "m"


def _cfg(model_dir: Path, *overrides: str) -> ServeJobConfig:
    return load("serve", [], [f"model.path={model_dir}", "auth.api_keys=[sk-unit]", *overrides])


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("autoscaling.min_replicas=3", "min_replicas=3 > autoscaling.max_replicas=1"),
        ("engine.dtype=float8", "engine.dtype='float8' is not one of"),
        ("model.name=a:b", "model.name='a:b'"),
        ("engine.gpu_memory_utilization=1.5", "gpu_memory_utilization=1.5"),
        ("resources.accelerator_type=A10G", "needs resources.use_gpu=true"),
        ("route_prefix=v1", "route_prefix='v1' must start with '/'"),
        ("engine.max_modle_len=4", "did you mean 'max_model_len'"),
    ],
)
def test_bad_serve_config_names_the_key(model_dir: Path, override: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        _cfg(model_dir, override)
    assert needle in str(err.value)


def test_example_configs_load() -> None:
    for path in sorted((ROOT / "conf" / "serve").glob("*.yaml")):
        load("serve", [path])
    for path in sorted((ROOT / "conf" / "generate").glob("*.yaml")):
        load("generate", [path])


def test_no_key_is_refused_unless_auth_disabled(model_dir: Path, monkeypatch) -> None:
    monkeypatch.delenv("RAYLM_API_KEY", raising=False)
    cfg = load("serve", [], [f"model.path={model_dir}"])
    with pytest.raises(ConfigError, match="RAYLM_API_KEY"):
        app.api_key_hashes(cfg)
    open_cfg = load("serve", [], [f"model.path={model_dir}", "auth.required=false"])
    assert app.api_key_hashes(open_cfg) == []


def test_keys_from_env_are_only_stored_as_digests(model_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv("RAYLM_API_KEY", "sk-env-1, sk-env-2")
    cfg = _cfg(model_dir)
    hashes = app.api_key_hashes(cfg)
    assert len(hashes) == 3
    text = yaml.safe_dump(app.serve_config(cfg, hashes, port=8123))
    for secret in ("sk-env-1", "sk-env-2", "sk-unit"):
        assert secret not in text


def test_missing_model_dir_is_a_config_error(tmp_path: Path) -> None:
    cfg = load("serve", [], [f"model.path={tmp_path / 'nope'}", "auth.required=false"])
    with pytest.raises(ConfigError, match="not a Hugging Face model dir"):
        app.serve_config(cfg, [], port=1)


def test_named_adapter_without_adapter_config_is_rejected(model_dir: Path, tmp_path: Path) -> None:
    cfg = _cfg(model_dir, f"lora.adapters={{a1: {tmp_path}}}")
    with pytest.raises(ConfigError, match=r"adapter_config\.json"):
        app.serve_config(cfg, [], port=1)


def test_generate_config_validates() -> None:
    with pytest.raises(ConfigError, match=r"sampling\.top_p"):
        load("generate", [], ["model=m", "input.path=p", "sampling.top_p=0"])
    with pytest.raises(ConfigError, match="missing required value"):
        load("generate", [], ["input.path=p"])


@pytest.mark.parametrize(
    ("override", "expected"), [((), True), (("engine.single_process=false",), False)]
)
def test_single_process_choice_reaches_the_replicas(model_dir: Path, override, expected) -> None:
    settings = app.serving_args(_cfg(model_dir, *override), [])["raylm"]
    assert settings["single_process"] is expected


def test_cpu_replicas_run_the_amx_safe_worker(model_dir: Path) -> None:
    cpu = app.llm_config(_cfg(model_dir))["engine_kwargs"]
    assert cpu["worker_cls"] == "raylm.engine.RaylmCPUWorker" and cpu["dtype"] == "auto"
    gpu = app.llm_config(_cfg(model_dir, "resources.use_gpu=true"))["engine_kwargs"]
    assert "worker_cls" not in gpu  # GPU engines keep vLLM's own worker


def test_a_model_and_adapters_in_a_bucket(
    model_dir: Path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checked where they are; the replicas get the storage env (they copy from the
    bucket), the written serve_config.yaml gets no credential; a missing one is named."""
    from raylm import storage
    from raylm.serve.job import ServeJob

    base = storage.join(s3_bucket, "serve-config")
    storage.copy_dir(str(model_dir), storage.join(base, "model"))
    storage.write_text(storage.join(base, "adapters", "a1", "adapter_config.json"), "{}")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "tok-unit")
    cfg = ServeJob().setup(
        _cfg(
            storage.join(base, "model"),
            f"lora.adapters_dir={base}/adapters",
            f"lora.adapters={{sft: {base}/adapters/a1}}",
        )
    )
    config = app.serve_config(cfg, [], port=1)
    env = config["applications"][0]["args"]["llm_config"]["runtime_env"]["env_vars"]
    assert env["AWS_ENDPOINT_URL"] == storage.forwarded_env()["AWS_ENDPOINT_URL"]
    assert env["AWS_SECRET_ACCESS_KEY"] and env["AWS_SESSION_TOKEN"] == "tok-unit"
    written = app.without_credentials(config)
    kept = written["applications"][0]["args"]["llm_config"]["runtime_env"]["env_vars"]
    assert "AWS_ENDPOINT_URL" in kept and "VLLM_CPU_KVCACHE_SPACE" in kept
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"} & set(kept)
    assert "AWS_SESSION_TOKEN" in env  # the deployed config itself is left whole
    local = app.llm_config(_cfg(model_dir))["runtime_env"]["env_vars"]
    assert not any(k.startswith("AWS_") for k in local)  # no bucket: nothing forwarded

    missing = storage.join(base, "nope")
    with pytest.raises(ConfigError, match=f"model.path='{missing}' is not a Hugging Face"):
        ServeJob().setup(_cfg(missing))
    with pytest.raises(ConfigError, match=f"lora.adapters without adapter_config.json.*{missing}"):
        ServeJob().setup(_cfg(model_dir, f"lora.adapters={{x: {missing}}}"))


def test_generate_names_a_missing_bucket_path_at_setup(model_dir: Path, s3_bucket: str) -> None:
    from raylm import storage
    from raylm.serve.job import GenerateJob

    storage.write_text(storage.join(s3_bucket, "gen-setup", "p.jsonl"), '{"prompt": "x"}\n')
    prompts = storage.join(s3_bucket, "gen-setup", "p.jsonl")
    missing = storage.join(s3_bucket, "gen-setup", "nope")
    for override, needle in [
        (f"model={missing}", f"model='{missing}' is not a Hugging Face model dir"),
        (f"lora_path={missing}", f"lora_path='{missing}' is not a PEFT adapter dir"),
        (f"input.path={missing}.jsonl", f"input.path='{missing}.jsonl' does not exist"),
    ]:
        cfg = load("generate", [], [f"model={model_dir}", f"input.path={prompts}", override])
        with pytest.raises(ConfigError, match=needle):
            GenerateJob().setup(cfg)
