"""A train job checks a data job's shards against itself: same tokenizer, same cutoff.

Shards are faked (a manifest recording a ``DatasetOutput`` and one empty part file); the
tokenizers are the session's tiny one, a copy of it, and a different one, so the check
runs in milliseconds.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from raylm.config import ConfigError, load
from raylm.manifest import Manifest
from raylm.outputs import TOKENIZER_FILES, DatasetOutput, tokenizer_hash
from raylm.train.data import data_inputs

ROOT = Path(__file__).resolve().parents[2]


def _cfg(model: str | Path, data: Path, cutoff: int = 128, stage: str = "sft"):
    overrides = [f"model.name_or_path={model}", f"data.path={data}",
                 f"data.cutoff_len={cutoff}", f"stage={stage}"]  # fmt: skip
    return load("train", [ROOT / "conf/train/sft_lora.yaml"], overrides)


def _shards(tmp_path: Path, tokenizer: str | Path, cutoff: int, task: str = "sft") -> Path:
    out = tmp_path / "data"
    (out / "shards").mkdir(parents=True)
    (out / "shards" / "part-00000-x.parquet").touch()
    output = DatasetOutput(
        path=str(out), task=task, tokenized=True, tokenizer=str(tokenizer),
        tokenizer_hash=tokenizer_hash(str(tokenizer)), cutoff_len=cutoff, rows=1,
    )  # fmt: skip
    Manifest.start("data", {}, []).finish({}, {}, output.to_record()).write(out)
    return out


def _tokenizer_copy(model: Path, dest: Path, change: bool = False) -> Path:
    dest.mkdir()
    for name in TOKENIZER_FILES:
        if (model / name).is_file():
            shutil.copy(model / name, dest / name)
    if change:
        config = json.loads((dest / "tokenizer_config.json").read_text())
        (dest / "tokenizer_config.json").write_text(json.dumps({**config, "x": 1}))
    return dest


def test_matching_shards_pass_even_through_another_path(tiny_model: Path, tmp_path: Path) -> None:
    copy = _tokenizer_copy(tiny_model, tmp_path / "tok")
    data = _shards(tmp_path, copy, 128)
    source = data_inputs(_cfg(tiny_model, data, 128))
    assert source["kind"] == "shards" and source["output"].tokenizer == str(copy)


def test_cutoff_mismatch_names_both_sides(tiny_model: Path, tmp_path: Path) -> None:
    data = _shards(tmp_path, tiny_model, 512)
    expected = (
        f"data.path='{data}' was tokenized with {tiny_model} (cutoff_len 512) but this run "
        f"trains {tiny_model} with data.cutoff_len=128; re-run the data job with "
        "tokenize.cutoff_len=128, or set data.cutoff_len=512"
    )
    with pytest.raises(ConfigError, match=re.escape(expected)):
        data_inputs(_cfg(tiny_model, data, 128))


def test_tokenizer_mismatch_names_both_sides(tiny_model: Path, tmp_path: Path) -> None:
    other = _tokenizer_copy(tiny_model, tmp_path / "other", change=True)
    data = _shards(tmp_path, other, 256)
    expected = (
        f"was tokenized with {other} (cutoff_len 256) but this run trains {tiny_model} with "
        f"data.cutoff_len=128; re-run the data job with tokenize.tokenizer={tiny_model} "
        "tokenize.cutoff_len=128, or train a model that uses that tokenizer with "
        "data.cutoff_len=256"
    )
    with pytest.raises(ConfigError, match=re.escape(expected)):
        data_inputs(_cfg(tiny_model, data, 128))


def test_a_tokenizer_changed_in_place_is_named_as_such(tiny_model: Path, tmp_path: Path) -> None:
    tok = _tokenizer_copy(tiny_model, tmp_path / "tok")
    data = _shards(tmp_path, tok, 128)
    (tok / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="its tokenizer files changed since"):
        data_inputs(_cfg(tok, data, 128))


def test_hub_ids_not_on_disk_compare_by_name(tmp_path: Path) -> None:
    data = _shards(tmp_path, "org/some-model", 128)
    assert data_inputs(_cfg("org/some-model", data))["kind"] == "shards"
    with pytest.raises(ConfigError, match=r"tokenized with org/some-model .* trains org/other"):
        data_inputs(_cfg("org/other", data))


def test_stage_and_untokenized_shards_are_refused(tiny_model: Path, tmp_path: Path) -> None:
    data = _shards(tmp_path, tiny_model, 128, task="pt")
    with pytest.raises(ConfigError, match="holds 'pt' data but stage='sft'"):
        data_inputs(_cfg(tiny_model, data))
    output = DatasetOutput.from_record(Manifest.read(data).output, "m")  # type: ignore[union-attr]
    untokenized = dataclasses.replace(output, task="sft", tokenized=False)
    Manifest.start("data", {}, []).finish({}, {}, untokenized.to_record()).write(data)
    with pytest.raises(ConfigError, match="holds untokenized shards"):
        data_inputs(_cfg(tiny_model, data))


def test_shards_need_a_finished_data_job(tiny_model: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "shards").mkdir(parents=True)
    (data / "dataset_meta.json").write_text(json.dumps({"kind": "sft", "tokenized": True}))
    with pytest.raises(ConfigError, match=r"looks like a data job's output but .* no manifest"):
        data_inputs(_cfg(tiny_model, data))
    Manifest.start("data", {}, []).write(data)
    with pytest.raises(ConfigError, match="status 'running', expected 'succeeded'"):
        data_inputs(_cfg(tiny_model, data))


def test_data_job_records_its_tokenizer_as_an_absolute_path(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from raylm.data.job import DataJob

    monkeypatch.chdir(tiny_model.parent)
    cfg = load("data", [ROOT / "conf/data/sample_sft.yaml"],
               ["tokenize.enabled=true", f"tokenize.tokenizer={tiny_model.name}"])  # fmt: skip
    assert DataJob().setup(cfg).tokenize.tokenizer == str(tiny_model)
    hub = load("data", [ROOT / "conf/data/sample_sft.yaml"], ["tokenize.tokenizer=org/model"])
    assert DataJob().setup(hub).tokenize.tokenizer == "org/model"


def test_the_demo_pipeline_trains_at_the_cutoff_it_tokenizes_at() -> None:
    demo = yaml.safe_load((ROOT / "conf/pipeline/demo.yaml").read_text())
    data = load("data", [ROOT / demo["data"]["config"]], demo["data"].get("overrides", []))
    train = load("train", [ROOT / demo["train"]["config"]], demo["train"].get("overrides", []))
    assert data.tokenize.cutoff_len == train.data.cutoff_len
    assert data.tokenize.tokenizer == train.model.name_or_path


def _templated_shards(tmp_path: Path, tokenizer: Path, template: str | None) -> Path:
    out = _shards(tmp_path, tokenizer, 128)
    output = DatasetOutput.from_record(Manifest.read(out).output, "m")  # type: ignore[union-attr]
    named = dataclasses.replace(
        output, template=template, tokenizer_hash=tokenizer_hash(str(tokenizer), template)
    )
    Manifest.start("data", {}, []).finish({}, {}, named.to_record()).write(out)
    return out


def test_shards_rendered_with_another_template_are_refused(
    tiny_model: Path, tmp_path: Path
) -> None:
    data = _templated_shards(tmp_path, tiny_model, "chatml")
    expected = (
        f"was tokenized with {tiny_model} (template chatml) (cutoff_len 128) but this run "
        f"trains {tiny_model} (its own chat template) with data.cutoff_len=128; re-run the "
        "data job with tokenize.template=null, or set model.template=chatml"
    )
    with pytest.raises(ConfigError, match=re.escape(expected)):
        data_inputs(_cfg(tiny_model, data))
    with pytest.raises(
        ConfigError, match=r"tokenize\.template=qwen, or set model\.template=chatml"
    ):
        data_inputs(load("train", [ROOT / "conf/train/sft_lora.yaml"],
                         [f"model.name_or_path={tiny_model}", f"data.path={data}",
                          "data.cutoff_len=128", "model.template=qwen"]))  # fmt: skip


def test_shards_with_the_same_template_pass(tiny_model: Path, tmp_path: Path) -> None:
    data = _templated_shards(tmp_path, tiny_model, "qwen3_nothink")
    cfg = load("train", [ROOT / "conf/train/sft_lora.yaml"],
               [f"model.name_or_path={tiny_model}", f"data.path={data}", "data.cutoff_len=128",
                "model.template=qwen3_nothink"])  # fmt: skip
    assert data_inputs(cfg)["output"].template == "qwen3_nothink"


def test_the_data_job_output_records_its_template(tiny_model: Path, tmp_path: Path) -> None:
    from raylm.data.job import dataset_output

    meta = {"task": "sft", "tokenized": True, "tokenizer": str(tiny_model), "cutoff_len": 128,
            "num_rows": 1, "template": "chatml"}  # fmt: skip
    (tmp_path / "dataset_meta.json").write_text(json.dumps(meta))
    output = dataset_output(str(tmp_path))
    assert output.template == "chatml"
    assert output.tokenizer_hash == tokenizer_hash(str(tiny_model), "chatml")
