"""Train-job pieces that need no Ray cluster: DeepSpeed config, data, checkpoints, QLoRA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raylm.config import ConfigError, load
from raylm.train import checkpoint as ckpt
from raylm.train.data import data_inputs
from raylm.train.ds_config import deepspeed_config
from raylm.train.model import check_qlora_device
from raylm.train.objectives import collate

ROOT = Path(__file__).resolve().parents[2]


def cfg(*overrides: str, files=("conf/train/sft_lora.yaml",)):
    return load("train", [ROOT / f for f in files], list(overrides))


def test_deepspeed_config_is_generated_from_the_typed_config() -> None:
    c = cfg("train.micro_batch_size=2", "train.grad_accum=3", "deepspeed.stage=2",
            "deepspeed.offload_optimizer=true", "train.max_grad_norm=0.5")  # fmt: skip
    ds = deepspeed_config(c, world_size=2)
    assert ds["train_batch_size"] == 2 * 3 * 2
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert not ds["bf16"]["enabled"]
    z3 = deepspeed_config(cfg("deepspeed.stage=3", "train.precision=bf16"), world_size=4)
    assert z3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
    assert z3["bf16"]["enabled"]


def test_user_deepspeed_json_is_merged(tmp_path: Path) -> None:
    user = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": 1000, "overlap_comm": "auto"},
        "communication_data_type": "fp32",
    }  # fmt: skip
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    ds = deepspeed_config(cfg("deepspeed.stage=2", f"deepspeed.config_file={path}"), 2)
    assert ds["zero_optimization"]["stage"] == 3  # the user's JSON wins
    assert ds["zero_optimization"]["stage3_prefetch_bucket_size"] == 1000
    assert ds["zero_optimization"]["overlap_comm"] is False  # "auto" keeps ours
    assert ds["train_micro_batch_size_per_gpu"] == 4  # "auto" filled from the config
    assert ds["communication_data_type"] == "fp32"


@pytest.mark.parametrize(
    ("user", "message"),
    [
        ({"gradient_accumulation_steps": 8}, "disagrees with the train config"),
        ({"optimizer": {"type": "AdamW"}}, "remove the 'optimizer' section"),
    ],
)
def test_user_deepspeed_json_conflicts_are_named(tmp_path: Path, user: dict, message: str) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    with pytest.raises(ConfigError, match=message):
        deepspeed_config(cfg(f"deepspeed.config_file={path}"), 2)


def test_qlora_on_cpu_is_a_clear_error() -> None:
    c = cfg("finetuning_type=qlora")
    with pytest.raises(ConfigError, match="qlora needs CUDA GPUs"):
        check_qlora_device(c, cuda_available=False)
    check_qlora_device(cfg("finetuning_type=lora"), cuda_available=False)  # LoRA is fine


def test_qlora_load_model_refuses_on_cpu(tiny_model: Path) -> None:
    """The same path the workers run: load_model checks the device before loading 4-bit."""
    from raylm.train.model import load_model

    with pytest.raises(ConfigError, match="bitsandbytes 4-bit"):
        load_model(cfg("finetuning_type=qlora", f"model.name_or_path={tiny_model}"))


def test_collate_masks_padding_and_packed_sample_starts() -> None:
    rows = [
        {"input_ids": [5, 6, 7, 8], "loss_mask": [1, 1, 1, 1], "position_ids": [0, 1, 0, 1]},
        {"input_ids": [9, 10], "loss_mask": [1, 1], "position_ids": [0, 1]},
    ]
    b = collate(rows, "", pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    # position 0 of each packed sample is not a target; padding is never a target
    assert b["loss_mask"].tolist() == [[0, 1, 0, 1], [0, 1, 0, 0]]


def test_data_path_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="found nothing at"):
        data_inputs(cfg(f"data.path={tmp_path / 'missing.jsonl'}"))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"other": {"file_name": "o.json"}}))
    with pytest.raises(ConfigError, match=r"has no dataset\(s\) \['missing'\]; it has \['other'\]"):
        data_inputs(cfg(f"data.path={tmp_path / 'missing'}"))
    shards = tmp_path / "shards_dir"
    (shards / "shards").mkdir(parents=True)
    (shards / "dataset_meta.json").write_text(json.dumps({"kind": "pt", "tokenized": True}))
    with pytest.raises(ConfigError, match=r"looks like a data job's output but .* no manifest"):
        data_inputs(cfg(f"data.path={shards}"))


def test_llamafactory_dataset_name_resolves_through_dataset_info() -> None:
    c = load("train", [ROOT / "conf/train/llamafactory_lora_sft.yaml"])
    src = data_inputs(c)
    [source] = src["sources"]
    assert src["kind"] == "raw" and source.fmt == "alpaca"
    assert src["path"] == source.path and source.path.endswith("conf/train/data/alpaca_demo.json")
    assert c.finetuning_type == "lora" and c.lora.target == ["all"]
    assert c.train.grad_accum == 2 and c.checkpoint.save_steps == 4


def _raw_rows(tiny_model: Path, path: Path, *overrides: str) -> list[dict]:
    from raylm.train.data import _tokenize_raw

    c = cfg(f"model.name_or_path={tiny_model}", f"data.path={path}", *overrides)
    return _tokenize_raw(c, data_inputs(c))


def test_raw_files_read_as_the_data_job_reads_them(tiny_model: Path, tmp_path: Path) -> None:
    """One reader for both jobs: JSON Lines in a .json file, plain text for pt, records
    of several formats in one file, a registry's tags and pretraining columns."""
    mixed = tmp_path / "mixed.json"
    alpaca = {"instruction": "Say hi", "output": "Hi"}
    share = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    mixed.write_text(json.dumps(alpaca) + "\n" + json.dumps(share) + "\n")
    assert [r["id"] for r in _raw_rows(tiny_model, mixed)] == ["0", "1"]
    text = tmp_path / "docs.txt"
    text.write_text("one plain document\n\nanother one\n")
    assert len(_raw_rows(tiny_model, text, "stage=pt")) == 2
    tagged = [{"c": [{"who": "customer", "says": "q"}, {"who": "agent", "says": "a"}]}]
    (tmp_path / "tagged.json").write_text(json.dumps(tagged))
    (tmp_path / "pt.jsonl").write_text(json.dumps({"content": "a document"}) + "\n")
    registry = {
        "tagged": {"file_name": "tagged.json", "formatting": "sharegpt",
                   "columns": {"messages": "c"},
                   "tags": {"role_tag": "who", "content_tag": "says",
                            "user_tag": "customer", "assistant_tag": "agent"}},
        "pt": {"file_name": "pt.jsonl", "columns": {"prompt": "content"}},
    }  # fmt: skip
    (tmp_path / "dataset_info.json").write_text(json.dumps(registry))
    assert len(_raw_rows(tiny_model, tmp_path / "tagged")) == 1
    assert len(_raw_rows(tiny_model, tmp_path / "pt", "stage=pt")) == 1


def test_a_bad_raw_record_stops_the_job_naming_file_and_line(
    tiny_model: Path, tmp_path: Path
) -> None:
    path = tmp_path / "d.jsonl"
    good = json.dumps({"instruction": "Say hi", "output": "Hi"})
    path.write_text(good + "\n\n" + json.dumps({"text": "plain"}) + "\n")
    with pytest.raises(ConfigError, match=f"{path}:3: record is pt data but stage='sft'"):
        _raw_rows(tiny_model, path)
    path.write_text(good + "\n" + '{"instruction": \n')
    with pytest.raises(ConfigError, match=f"{path}:2: bad JSON"):
        _raw_rows(tiny_model, path)
    assert len(_raw_rows(tiny_model, path, "data.max_samples=1")) == 1  # never reads line 2
    path.write_text(json.dumps({"instruction": "x"}) + "\n")
    with pytest.raises(ConfigError, match=f"{path}:1: missing field 'output'"):
        _raw_rows(tiny_model, path)


def test_only_complete_checkpoints_count(tmp_path: Path) -> None:
    done2 = tmp_path / ckpt.checkpoint_name(2)
    done2.mkdir()
    ckpt.mark_complete(done2, 2, world_size=2)
    partial4 = tmp_path / ckpt.checkpoint_name(4)
    partial4.mkdir()
    (partial4 / "trainer_state_rank0.pt").write_bytes(b"half")
    assert ckpt.latest_complete(str(tmp_path)) == (2, str(done2))
    assert [(s, ok) for s, _, ok in ckpt.list_checkpoints(tmp_path)] == [(2, True), (4, False)]
    assert ckpt.latest_complete(tmp_path / "nothing") is None


def test_a_missing_data_path_in_a_bucket_exits_2_naming_it(
    s3_bucket: str, tiny_model: Path, tmp_path: Path, capsys
) -> None:
    """Refused while the manifest's inputs are read, before Ray is reached. That a present
    one is recorded as the bucket object itself is tests/integration/test_train_resume.py's
    killed-job test (which trains on it)."""
    from raylm import runner

    missing = f"{s3_bucket}/units/missing.jsonl"
    argv = [str(ROOT / "conf/train/pt_full.yaml"), f"model.name_or_path={tiny_model}",
            f"storage_path={tmp_path}", "run_name=bucket-data", f"data.path={missing}",
            "ray.address=127.0.0.1:1"]  # fmt: skip
    assert runner.main("train", argv) == 2
    assert f"data.path={missing!r}" in capsys.readouterr().err


def test_the_data_jobs_manifest_in_a_bucket_is_linked_whole(s3_bucket: str) -> None:
    from raylm.manifest import MANIFEST, Manifest
    from raylm.train.job import _data_link

    out = f"{s3_bucket}/units/data-out"
    Manifest.start("data", {"kind": "pt"}, inputs=[]).write(out)
    link = _data_link({"kind": "shards", "path": out})
    assert link["data_manifest"] == f"{out}/{MANIFEST}"
    assert link["data_fingerprint"] == Manifest.read(out).fingerprint()


def test_min_workers_turns_on_ray_trains_elastic_scaling() -> None:
    """Ray 2.60's ScalingConfig takes ``num_workers=(min, max)`` for its elastic policy."""
    from ray.train import ScalingConfig

    elastic = ScalingConfig(num_workers=cfg("scaling.min_workers=1").scaling.ray_num_workers)
    assert elastic.elasticity_enabled and (elastic.min_workers, elastic.max_workers) == (1, 2)
    for fixed in ((), ("scaling.min_workers=2",)):
        scaling = cfg("scaling.num_workers=2", *fixed).scaling
        assert scaling.ray_num_workers == 2
        assert not ScalingConfig(num_workers=scaling.ray_num_workers).elasticity_enabled
    with pytest.raises(ConfigError, match=r"scaling\.min_workers=3 must be between 1 and"):
        cfg("scaling.min_workers=3")


def test_several_registered_datasets_are_mixed_and_counted(
    tiny_model: Path, tmp_path: Path
) -> None:
    """data.datasets resolve through the registry at data.path; max_samples applies to each
    dataset; interleave_under stops at the shortest; eval datasets are held out whole."""
    from raylm.train.data import _tokenize_raw

    def write(name: str, n: int) -> None:
        recs = [{"instruction": f"{name} {i}", "output": f"answer {i}"} for i in range(n)]
        (tmp_path / f"{name}.json").write_text(json.dumps(recs))

    for name, n in (("a", 9), ("b", 4), ("c", 3)):
        write(name, n)
    registry = {n: {"file_name": f"{n}.json"} for n in "abc"}
    registry["p"] = {"file_name": "a.json", "ranking": True}
    (tmp_path / "dataset_info.json").write_text(json.dumps(registry))
    c = cfg(f"model.name_or_path={tiny_model}", f"data.path={tmp_path}",
            "data.datasets=[a,b]", "data.eval_datasets=[c]", "data.max_samples=6",
            "data.mix_strategy=interleave_under")  # fmt: skip
    source = data_inputs(c)
    rows = _tokenize_raw(c, source)
    stats = source["stats"]
    counts = {(d["role"], d["dataset"]): d for d in stats["datasets"]}
    a, b, ev = counts["train", "a"], counts["train", "b"], counts["eval", "c"]
    assert (a["in"], a["removed"], a["train_rows"]) == (9, {"max_samples": 3, "not_drawn": 2}, 4)
    assert (b["in"], b["removed"], b["train_rows"]) == (4, {"max_samples": 0, "not_drawn": 0}, 4)
    assert (ev["held_out_rows"], ev["train_rows"]) == (3, 0)
    assert len(rows) == stats["train_rows"] == 8 and stats["accounting_ok"]
    with pytest.raises(
        ConfigError, match=r"dataset 'p' is dpo data \(preference\) but stage='sft'"
    ):
        data_inputs(cfg(f"model.name_or_path={tiny_model}", f"data.path={tmp_path}",
                        "data.datasets=[a,p]"))  # fmt: skip
