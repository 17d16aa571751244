"""Held-out evaluation's schedule and its config, LLaMA-Factory keys included (the
scoring itself runs in tests/integration/test_train_rm_kto_runs.py)."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
from llamafactory_helpers import lf

from raylm import config
from raylm.config import ConfigError
from raylm.train.evaluate import HeldOut

ROOT = Path(__file__).resolve().parents[2]


def _loop(*overrides: str, rows: int = 10, per_step: int = 2, worlds=((0, 1),)):
    cfg = config.load("train", [ROOT / "conf/train/sft_lora.yaml"], list(overrides))
    stream = SimpleNamespace(worlds=worlds, plan=SimpleNamespace(rows=rows))
    return SimpleNamespace(cfg=cfg, run_dir="/tmp/x", stream=stream, per_step=per_step)


def _due(held: HeldOut, total: int) -> list[int]:
    return [s for s in range(1, total + 1) if held.due(s, total)]


def test_steps_strategy_scores_every_n_steps_and_after_the_last() -> None:
    assert _due(HeldOut(_loop("eval.steps=3"), [{}]), 10) == [3, 6, 9, 10]
    # unset: train.logging_steps, as transformers defaults eval_steps
    assert _due(HeldOut(_loop("train.logging_steps=4"), [{}]), 10) == [4, 8, 10]


def test_epoch_strategy_follows_the_streams_epochs_across_a_resize() -> None:
    # 10 rows, 2 per step: 5 steps an epoch on one worker
    assert _due(HeldOut(_loop("eval.strategy=epoch"), [{}]), 12) == [5, 10, 12]
    # 2 workers from step 2 on: the rest of epoch 0 (6 rows) takes 1 step more (the
    # 3 rows each rank has left hold one whole step), epochs after that 2 steps each
    resized = _loop("eval.strategy=epoch", worlds=((0, 1), (2, 2)))
    assert _due(HeldOut(resized, [{}]), 8) == [3, 5, 7, 8]


def test_nothing_is_scored_without_held_out_rows_or_with_strategy_no() -> None:
    assert _due(HeldOut(_loop("eval.steps=1"), []), 5) == []
    assert _due(HeldOut(_loop("eval.strategy=no"), [{}]), 5) == []


def test_bad_eval_settings_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"eval\.strategy"):
        _loop("eval.strategy=sometimes")
    with pytest.raises(ConfigError, match=r"eval\.steps"):
        _loop("eval.steps=0")


def test_llamafactory_eval_keys_map(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = config.load("train", [lf(tmp_path, val_size=0.1, eval_strategy="steps",
                                    eval_steps=50, per_device_eval_batch_size=2, do_eval=True)])  # fmt: skip
    assert (cfg.eval.strategy, cfg.eval.steps, cfg.eval.batch_size) == ("steps", 50, 2)
    with caplog.at_level(logging.WARNING):
        quiet = config.load("train", [lf(tmp_path, val_size=0.1)])
    assert quiet.eval.strategy == "no"  # transformers' default: held out, not scored
    assert "without eval_strategy" in caplog.text
    off = config.load("train", [lf(tmp_path, val_size=0.1, eval_strategy=False)])  # `no`
    assert off.eval.strategy == "no"
    with pytest.raises(ConfigError, match=r"eval_steps=0\.1: a share"):
        config.load("train", [lf(tmp_path, eval_strategy="steps", eval_steps=0.1)])


def test_held_out_examples_need_raw_data(tiny_model: Path, tmp_path: Path) -> None:
    from test_train_data_check import _cfg, _shards

    from raylm.train.data import data_inputs

    data = _shards(tmp_path, tiny_model, 128)
    cfg = _cfg(tiny_model, data)
    with pytest.raises(ConfigError, match="data job's shards, all trained on"):
        data_inputs(config.load("train", [ROOT / "conf/train/sft_lora.yaml"],
                                [f"model.name_or_path={tiny_model}", f"data.path={data}",
                                 "data.val_size=0.1"]))  # fmt: skip
    assert data_inputs(cfg)["kind"] == "shards"
