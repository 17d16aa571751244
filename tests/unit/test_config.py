"""Config loading: typed merge, and errors a user can act on."""

from __future__ import annotations

from pathlib import Path

import pytest

from raylm import config
from raylm.config import ConfigError
from raylm.train.config import TrainJobConfig

REQUIRED = ["model.name_or_path=/models/tiny", "data.path=/data/out"]


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_yaml_then_overrides_merge_with_types(tmp_path: Path) -> None:
    path = write(tmp_path, "train:\n  lr: 3.0e-4\n  epochs: 2\nlora:\n  target: [q_proj]\n")
    cfg = config.load("train", [path], [*REQUIRED, "train.epochs=5", "scaling.num_workers=4"])
    assert isinstance(cfg, TrainJobConfig)
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.train.epochs == 5.0 and isinstance(cfg.train.epochs, float)
    assert cfg.scaling.num_workers == 4
    assert cfg.lora.target == ["q_proj"]


def test_later_files_override_earlier(tmp_path: Path) -> None:
    base = write(tmp_path, "train: {lr: 1.0e-3, seed: 7}\n", "base.yaml")
    top = write(tmp_path, "train: {lr: 2.0e-3}\n", "top.yaml")
    cfg = config.load("train", [base, top], REQUIRED)
    assert (cfg.train.lr, cfg.train.seed) == (2e-3, 7)


def test_unknown_nested_key_names_valid_keys_and_suggests(tmp_path: Path) -> None:
    path = write(tmp_path, "train:\n  lrr: 1.0\n")
    with pytest.raises(ConfigError) as err:
        config.load("train", [path], REQUIRED)
    msg = str(err.value)
    assert "unknown key 'train.lrr'" in msg
    assert "did you mean 'lr'" in msg
    assert "micro_batch_size" in msg  # the valid keys are listed
    assert str(path) in msg


def test_unknown_top_level_override_suggests() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'trian'.*did you mean 'train'"):
        config.load("train", [], [*REQUIRED, "trian.lr=1"])


def test_wrong_type_names_key_value_and_type() -> None:
    with pytest.raises(ConfigError) as err:
        config.load("train", [], [*REQUIRED, "train.micro_batch_size=big"])
    msg = str(err.value)
    assert "train.micro_batch_size" in msg and "'big'" in msg and "int" in msg


def test_missing_required_value_is_named_with_its_doc() -> None:
    with pytest.raises(ConfigError) as err:
        config.load("train", [], ["model.name_or_path=/m"])
    assert "data.path" in str(err.value)
    assert "Parquet shards" in str(err.value)  # the field's docstring explains it


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("stage=sfft", "did you mean 'sft'"),
        ("train.lr=-1", "train.lr=-1.0 must be > 0"),
        ("train.precision=fp16", "needs scaling.use_gpu=true"),
        ("deepspeed.offload_params=true", "needs deepspeed.stage=3"),
    ],
)
def test_validation_rejects_values(override: str, fragment: str) -> None:
    extra = ["deepspeed.stage=2"] if "offload" in override else []
    with pytest.raises(ConfigError, match=fragment):
        config.load("train", [], [*REQUIRED, *extra, override])


def test_malformed_override_and_yaml_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="key=value"):
        config.load("train", [], ["train.lr"])
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load("train", [write(tmp_path, "train: [unclosed\n")])
    with pytest.raises(ConfigError, match="mapping"):
        config.load("train", [write(tmp_path, "- a\n- b\n", "list.yaml")])
    with pytest.raises(ConfigError, match="not found"):
        config.load("train", [tmp_path / "nope.yaml"])


def test_unknown_job_suggests() -> None:
    with pytest.raises(ConfigError, match="did you mean 'train'"):
        config.config_class("trian")


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = config.load("train", [], [*REQUIRED, "train.lr=5e-5", "lora.rank=4"])
    saved = config.save_resolved(cfg, tmp_path / "run")
    again = config.load("train", [saved])
    assert again == cfg


def test_every_config_field_is_documented() -> None:
    """litgpt's rule: a key without a description is a key nobody can use."""
    for job in config.job_names():
        undocumented = [key for key, _, doc in config.describe(config.config_class(job)) if not doc]
        assert undocumented == [], f"{job}: fields without a docstring: {undocumented}"


def test_resolve_path_uses_workspace(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(config.WORKSPACE_ENV, str(tmp_path))
    assert config.resolve_path("outputs/x") == str(tmp_path / "outputs/x")
    assert config.resolve_path("/abs/x") == "/abs/x"
    assert config.resolve_path("s3://bucket/x") == "s3://bucket/x"


def test_a_missing_model_dir_is_named_not_sent_to_the_hub(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(config.WORKSPACE_ENV, raising=False)
    assert config.resolve_model("meta-llama/Llama-3.1-8B") == "meta-llama/Llama-3.1-8B"
    (tmp_path / "m").mkdir()
    assert config.resolve_model("m") == str(tmp_path / "m")
    with pytest.raises(ConfigError, match=r"'outputs/models/tiny': no such directory at .*hub id"):
        config.resolve_model("outputs/models/tiny")
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    with pytest.raises(ConfigError, match="Ray's copy of --working-dir"):
        config.resolve_model("outputs/models/tiny")


def test_listed_defaults_are_the_jobs_own() -> None:
    """A group a job builds with its own values shows those, not the class's: the eval
    job's engine runs float32 where serve's picks its dtype."""
    rows = {job: dict((k, d) for k, d, _ in config.describe(config.config_class(job)))
            for job in ("eval", "serve")}  # fmt: skip
    assert rows["eval"]["engine.dtype"].endswith("'float32'")
    assert rows["serve"]["engine.dtype"].endswith("'auto'")
