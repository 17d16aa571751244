"""Every LLaMA-Factory example YAML that loads as a raylm train config (issue 14's
acceptance set) loads to the config it trains with, and one example per code path trains
(TRAINED_HERE): the YAML as copied under tests/assets/llamafactory/examples with only
the model (a tiny one) and output_dir replaced (``llamafactory_helpers.example``; an
example naming the user's own dataset gets a demo one, its USER_DATA), on
LLaMA-Factory's own demo data (dataset_dir ``data``, deepspeed ``examples/deepspeed/...``,
resolved against the assets dir as in a LLaMA-Factory checkout).

Which examples load is read from PARTITION (tests/unit/llamafactory_helpers.py) at
collection, so an example that newly loads is trained here too. The QLoRA ones are
refused at run start naming CUDA (bitsandbytes' 4-bit kernels; this tier is CPU-only).

What the run does differently from the recipe, all by raylm overrides (the YAML is
unchanged): two optimizer steps (the examples say 3 epochs over up to 1000 samples per
dataset at cutoff 2048: hours on 2 CPU cores), on one worker of one CPU. A run's time is
mostly fixed cost (Ray Train's controller and worker processes, imports, DeepSpeed, the
checkpoint and export), so the runs go two at a time, one per CPU of the session
cluster; each test waits for its own. Examples that are the same YAML but for the model
(the pre-quantized gptq / awq / aqlm checkpoints, all swapped for the tiny model) are the
same run: one run stands for the group and the others must load to the identical config.

The model: the tiny one (ChatML tokens, standing in for Qwen). The llama3 template ends
turns with ``<|eot_id|>``, which raylm never adds to a vocabulary (that would need the
embeddings resized), so the Llama 3 examples get the tiny model with Llama 3's special
tokens added and its embeddings resized, standing in for Meta-Llama-3-8B-Instruct,
whose vocabulary has them. The llama_pro example trains 8 inserted blocks of an
expanded model: it gets the tiny Llama 3 grown to 16 layers by ``raylm llama-pro``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from raylm import config
from raylm.config import ConfigError
from raylm.train.report import read_metrics
from raylm.train.trainer import run_training

UNIT = Path(__file__).resolve().parents[1] / "unit"


def _helpers():
    """tests/unit/llamafactory_helpers.py (pytest puts tests/unit on sys.path only when
    it collects a unit test in the same session)."""
    name = "llamafactory_helpers"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, UNIT / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


H = _helpers()
SHORT = ["scaling.num_workers=1", "scaling.cpus_per_worker=1", "train.max_steps=2"]
AT_ONCE = 2  # runs in flight: the session cluster has 2 CPUs
LLAMA3_TOKENS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                 "<|eot_id|>", "<|eom_id|>"]  # fmt: skip


def _written(rel: str, tmp_path: Path, model: Path | str) -> tuple[Path, dict[str, Any]]:
    path = H.example(rel, tmp_path, model)
    return path, yaml.safe_load(path.read_text())


def _recipe(rel: str) -> dict[str, Any]:
    """The example as the test writes it, less what the test replaces and the keys set
    to null (LLaMA-Factory's default either way: ``resume_from_checkpoint: null``)."""
    with tempfile.TemporaryDirectory() as tmp:
        _, data = _written(rel, Path(tmp), "MODEL")
    replaced = ("model_name_or_path", "output_dir")
    return {k: v for k, v in data.items() if k not in replaced and v is not None}


def _groups() -> list[tuple[str, ...]]:
    """The loadable non-QLoRA examples, those with the same recipe grouped together."""
    groups: list[list[str]] = []
    for rel in sorted(r for r, fate in H.PARTITION.items() if fate is None):
        if rel in H.QLORA:
            continue
        same = [g for g in groups if _recipe(g[0]) == _recipe(rel)]
        if same:
            same[0].append(rel)
        else:
            groups.append([rel])
    return [tuple(g) for g in groups]


# Trained here: one example per path from a LLaMA-Factory YAML to a run that no other
# test takes (Ray's REMOTE demo data with LoRA, a saved tokenized_path, LLaMA Pro's
# expanded llama3 model under freeze, full fine-tuning with DFT's loss). The other
# examples' objectives, optimizers and adapters train in their own tests
# (test_train_objectives, test_train_rm_kto_runs, test_train_optimizers_lf,
# test_train_oft_llama_pro_runs, test_train_muon, test_train_pissa_convert); here they
# must load, as their group's first, to the config they would train with
# (test_example_loads_to_its_config). Training all 24 groups took 870 s of the suite.
TRAINED_HERE = (
    "train_lora/qwen3_lora_sft_ray.yaml",
    "train_lora/qwen3_preprocess.yaml",
    "extras/llama_pro/llama3_freeze_sft.yaml",
    "extras/dft/qwen2_full_sft.yaml",
)
GROUPS = _groups()
TRAINED = [g for g in GROUPS if g[0] in TRAINED_HERE]
LOADED = [g for g in GROUPS if g[0] not in TRAINED_HERE]
assert len(TRAINED) == len(TRAINED_HERE), f"renamed? {TRAINED_HERE} vs {GROUPS}"
NEEDS_CUDA = sorted(r for r, fate in H.PARTITION.items() if fate is None and r in H.QLORA)


@pytest.fixture(scope="module")
def workspace() -> Iterator[Path]:
    """As in tests/unit/conftest.py: the examples' relative paths resolve in the assets
    (module-wide: the runs load in worker threads)."""
    old = os.environ.get(config.WORKSPACE_ENV)
    os.environ[config.WORKSPACE_ENV] = str(H.LF)
    yield H.LF
    if old is None:
        os.environ.pop(config.WORKSPACE_ENV, None)
    else:
        os.environ[config.WORKSPACE_ENV] = old


@pytest.fixture(scope="module")
def tiny_llama3(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with Llama 3's special tokens (embeddings resized)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("models") / "tiny-llama3-tokens"
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.add_special_tokens({"additional_special_tokens": LLAMA3_TOKENS})
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_llama3_pro(tiny_llama3: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The llama_pro example's ``models/llama3-8b-pro`` (32 + 8 layers): the 4-layer tiny
    model grown by ``raylm llama-pro`` to 8 layers, then by 8 more, so that its
    ``freeze_trainable_layers: 8`` names the second expansion's blocks (every other)."""
    from raylm.train.llama_pro import expand

    root = tmp_path_factory.mktemp("models")
    return expand(expand(tiny_llama3, root / "tiny-llama3-8", 4), root / "tiny-llama3-pro", 8)


@pytest.fixture(scope="module")
def models(tiny_model: Path, tiny_llama3: Path, tiny_llama3_pro: Path) -> dict[str, Path]:
    return {"llama3": tiny_llama3, "llama_pro": tiny_llama3_pro, "": tiny_model}


def _model(rel: str, models: dict[str, Path]) -> Path:
    if _recipe(rel).get("use_llama_pro"):
        return models["llama_pro"]
    return models["llama3" if _recipe(rel).get("template") == "llama3" else ""]


def _train(group: tuple[str, ...], tmp_path: Path, model: Path) -> dict[str, Any]:
    rel, *same = group
    path, written = _written(rel, tmp_path, model)
    cfg = config.load("train", [path], SHORT)
    for other in same:
        assert config.load("train", [_written(other, tmp_path, model)[0]], SHORT) == cfg, (
            f"{other} loads unlike {rel}"
        )
    start = time.monotonic()
    out = run_training(cfg)
    return {"cfg": cfg, "written": written, "out": out, "s": time.monotonic() - start}


@pytest.fixture(scope="module")
def demo_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """``dataset_dir: REMOTE:llamafactory/demo_data`` (the Ray example) offline: the demo
    data served as that Hub dataset repo by a local mirror, HF_ENDPOINT on it (as a
    user's mirror), into an empty cache (llamafactory_helpers.demo_hub)."""
    with pytest.MonkeyPatch.context() as mp, H.demo_hub(mp, tmp_path_factory.mktemp("hf")) as hub:
        yield hub


@pytest.fixture(scope="module")
def runs(
    request: pytest.FixtureRequest,
    ray_connected_module,
    workspace,
    models,
    demo_hub,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[tuple[str, ...], Future]]:
    """The selected groups' runs, queued at once and AT_ONCE at a time, in test order."""
    selected = [
        item.callspec.params["group"]
        for item in request.session.items
        if item.path == request.path and item.originalname == "test_example_trains_on_its_demo_data"
    ]
    with ThreadPoolExecutor(AT_ONCE, thread_name_prefix="lf-run") as pool:
        yield {
            g: pool.submit(_train, g, tmp_path_factory.mktemp("lf"), _model(g[0], models))
            for g in selected
        }


# Waits for its own run (the first test also for the session cluster and models): up to
# 300 s seen on a 2-core machine shared with other test runs.
@pytest.mark.timeout(600)
@pytest.mark.parametrize("group", TRAINED, ids=[g[0] for g in TRAINED])
def test_example_trains_on_its_demo_data(group: tuple[str, ...], runs) -> None:
    done = runs[group].result()
    cfg, out = done["cfg"], done["out"]
    print(f"{group[0]}: run_training {done['s']:.1f} s")
    run = Path(out["run_dir"])
    assert out["metrics"]["steps"] == 2
    final = Path(out["outputs"]["final"])
    assert (final / "raylm_train.json").exists(), sorted(p.name for p in final.iterdir())
    losses = [m["loss"] for m in read_metrics(run / "metrics.jsonl")]
    assert losses and all(math.isfinite(x) for x in losses), losses
    stats = json.loads((run / "data_stats.json").read_text())
    counted = {c["dataset"]: c for c in stats["datasets"] if c["role"] == "train"}
    named = [d.strip() for d in str(done["written"]["dataset"]).split(",")]
    assert sorted(counted) == sorted(cfg.data.datasets) == sorted(named)
    assert all(c["in"] > 0 and c["train_rows"] > 0 for c in counted.values()), counted
    assert stats["accounting_ok"], stats
    saved = done["written"].get("tokenized_path")
    if saved:  # made by this first run, then trained on (as LLaMA-Factory does now)
        assert json.loads((Path(saved) / "manifest.json").read_text())["status"] == "succeeded"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("group", LOADED, ids=[g[0] for g in LOADED])
def test_example_loads_to_its_config(group: tuple[str, ...], workspace, tmp_path: Path) -> None:
    rel, *same = group
    cfg = config.load("train", [_written(rel, tmp_path, "MODEL")[0]], SHORT)
    assert cfg.train.max_steps == 2 and cfg.data.datasets
    for other in same:
        assert config.load("train", [_written(other, tmp_path, "MODEL")[0]], SHORT) == cfg


@pytest.mark.timeout(180)  # run alone, the session cluster starts in it
@pytest.mark.parametrize("rel", NEEDS_CUDA)
def test_qlora_example_is_refused_at_start_naming_cuda(
    rel: str, ray_connected_module, workspace: Path, models: dict[str, Path], tmp_path: Path
) -> None:
    path, _ = _written(rel, tmp_path, _model(rel, models))
    cfg = config.load("train", [path], SHORT)
    assert cfg.finetuning_type == "qlora"
    with pytest.raises(ConfigError, match="needs CUDA GPUs"):
        run_training(cfg)
    assert not (tmp_path / "saves" / "run").exists()
