"""Contamination in the gate, end to end on the session Ray cluster: a train run's manifest
names its raw training jsonl; an eval set copied from it is caught through that lineage
and the gate (judge win rate required too) blocks the model, naming the overlap; the same
job on a clean eval set passes. The judge is the in-test OpenAI-compatible server of
test_eval_judge (it sees two untrained models' answers: every pair a tie, win rate 0.5)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from lora_helpers import lora_adapter
from test_eval_judge import JudgeServer

from raylm.cluster import ClusterInfo
from raylm.manifest import Manifest
from raylm.outputs import ModelOutput

ROOT = Path(__file__).resolve().parents[2]

TRAIN = [
    ("Summarise the main duties of a lighthouse keeper on a remote northern island in winter",
     "Keep the lamp lit every night, log the weather, and signal passing ships in a storm"),
    ("Describe how a baker prepares sourdough bread from a starter over two full days",
     "Feed the starter, mix and rest the dough, fold it, shape it, and bake it very hot"),
    ("Explain why bees perform a waggle dance when they come back to the hive in spring",
     "The dance tells the other bees the direction and distance of the flowers they found"),
    ("请简要说明灯塔看守人在冬季偏远北方小岛上的主要职责是什么",
     "每晚保持灯火通明，记录天气，并在风暴中向过往船只发出信号。"),
    ("List the steps a gardener follows to plant tomato seedlings in raised beds in May",
     "Harden them off, dig deep holes, bury the stems, water well and add stakes for support"),
    ("Tell me what a cartographer checks before printing a new map of a mountain valley",
     "Contour lines, river names, the scale bar, the legend and the trail markings"),
]  # fmt: skip
CLEAN = [
    "What colour do you get when you mix blue and yellow paint together on a palette",
    "How many legs does a spider have, and how does that differ from an insect",
    "Why do cats purr when they are content and resting in a warm sunny spot",
    "长城是中国古代修建的军事防御工程，它大约有多长？",
    "Which instrument has eighty eight keys and is played with both hands at once",
    "What does a seismograph measure during an earthquake and how is it recorded",
]


def _fake_train_run(tiny_model: Path, run: Path, train: Path) -> Path:
    """A succeeded train job's dir: final/ holds a LoRA adapter, the manifest names the
    raw jsonl it trained on and the base model, as the train job writes them."""
    final = lora_adapter(tiny_model, run / "final", seed=5)
    out = ModelOutput(path=str(final), adapter=True, base_model=str(tiny_model),
                      tokenizer=str(final), cutoff_len=128, stage="sft")  # fmt: skip
    config = {"data": {"path": str(train), "format": "alpaca"},
              "model": {"name_or_path": str(tiny_model)}}  # fmt: skip
    inputs = [str(train), str(tiny_model)]
    Manifest.start("train", config, inputs).finish({}, {}, out.to_record()).write(run)
    return final


def _run(conf: Path, cluster: ClusterInfo) -> subprocess.CompletedProcess:
    env = dict(os.environ, RAY_ADDRESS=cluster.gcs_address)
    cmd = [sys.executable, str(ROOT / "jobs/eval.py"), str(conf)]
    try:
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    except subprocess.TimeoutExpired as err:
        pytest.fail(
            f"eval job still running after 400 s; its log ends with:\n{(err.stderr or b'')[-3000:]!r}"
        )


def _conf(tmp: Path, name: str, model: Path, base: Path, eval_path: Path, url: str) -> Path:
    conf = tmp / f"{name}.yaml"
    conf.write_text(
        f"model: {model}\nbase_model: {base}\nmetrics: [exact_match]\n"
        f"data: {{eval_path: {eval_path}}}\n"
        "generation: {engine: hf, max_new_tokens: 4}\nbootstrap: {resamples: 100}\n"
        f"judge: {{base_url: '{url}', model: keyword, max_concurrency: 4}}\n"
        "contamination: {enabled: true}\n"
        "gate: {min_judge_win_rate: 0.5, max_contamination_rate: 0}\n"
        f"fail_on_gate: true\noutput_dir: {tmp / name}\n"
    )
    return conf


@pytest.mark.timeout(600)
def test_gate_blocks_an_eval_set_copied_from_the_training_data(
    ray_cluster: ClusterInfo, tiny_model: Path, tmp_path: Path
) -> None:
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"instruction": q, "output": a}, ensure_ascii=False) + "\n"
                             for q, a in TRAIN))  # fmt: skip
    final = _fake_train_run(tiny_model, tmp_path / "run", train)
    copied = tmp_path / "copied.jsonl"  # three training examples, two fresh ones
    rows = [{"id": f"copy-{i}", "prompt": q, "reference": a} for i, (q, a) in enumerate(TRAIN[1:4])]
    rows += [{"id": f"clean-{i}", "prompt": q, "reference": "x"} for i, q in enumerate(CLEAN[:2])]
    copied.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    clean = tmp_path / "clean.jsonl"
    clean.write_text("".join(json.dumps({"id": f"c{i}", "prompt": q, "reference": "x"},
                                        ensure_ascii=False) + "\n" for i, q in enumerate(CLEAN)))  # fmt: skip
    server = JudgeServer()
    try:
        proc = _run(_conf(tmp_path, "copied", final, tiny_model, copied, server.url), ray_cluster)
        assert proc.returncode == 3, proc.stderr[-3000:]
        res = json.loads((tmp_path / "copied/eval.json").read_text())
        cont = res["contamination"]
        assert cont["train_sources"] == [str(train)]
        found = cont["sets"]["eval"]
        assert (found["n"], found["n_contaminated"], found["rate"]) == (5, 3, 0.6)
        assert {b["id"] for b in found["contaminated"]} == {"copy-0", "copy-1", "copy-2"}
        assert {b["source"] for b in found["contaminated"]} == {f"{train}:{n}" for n in (2, 3, 4)}
        gate = res["gate"]
        assert not gate["passed"]
        reason = gate["reasons"][0]
        assert reason.startswith(
            "FAILED max_contamination_rate: eval set 'eval' has 3/5 examples overlapping the "
            "training data (rate 0.6 > max 0)"
        )
        assert f"copy-0 (100% of its n-grams, from {train}:2): 'Describe how a baker" in reason
        assert "请简要说明灯塔看守人" in reason  # the Chinese copy, matched by characters
        assert any(
            r.startswith("ok min_judge_win_rate: judge win rate = 0.5") for r in gate["reasons"]
        )
        manifest = Manifest.read(tmp_path / "copied")
        assert str(train) in manifest.inputs  # lineage: the eval names what it scanned

        proc = _run(_conf(tmp_path, "clean", final, tiny_model, clean, server.url), ray_cluster)
        assert proc.returncode == 0, proc.stderr[-3000:]
        res = json.loads((tmp_path / "clean/eval.json").read_text())
        assert res["contamination"]["sets"]["eval"]["n_contaminated"] == 0
        assert res["gate"]["passed"], res["gate"]["reasons"]
    finally:
        server.close()
