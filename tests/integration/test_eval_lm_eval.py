"""raylm's multiple-choice scoring against lm-evaluation-harness on the same model and data.

Both read the shipped MMLU / C-Eval / CMMLU samples (lm-eval through a generated task YAML
with ``dataset_path: json`` on local files, nothing downloaded) with lm-eval's MMLU prompt
format; they must build the same prompt, the same option log-likelihoods and pick the same
option for every question, zero- and few-shot. lm-eval runs its ``hf`` model on the local
tiny model directory (the served-endpoint mode, ``local-completions``, is not tested here).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from raylm.eval.benchmarks.choice import choice_stats, score_choice
from raylm.eval.benchmarks.lm_eval_run import make_lm, run_lm_eval_benchmark
from raylm.eval.benchmarks.readers import read_choice
from raylm.eval.config import LmEvalConfig

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "benchmarks"


@pytest.mark.timeout(300)
def test_raylm_multiple_choice_equals_lm_eval(tiny_model: Path) -> None:
    pytest.importorskip("lm_eval")
    import torch

    from raylm.eval.model import load_model

    os.environ["HF_DATASETS_OFFLINE"] = "1"
    torch.set_num_threads(1)  # small batches are slower with threads contending
    model, tokenizer, _ = load_model(tiny_model)
    lm = make_lm(str(tiny_model), LmEvalConfig(batch_size=8))
    for fmt, split, shots in [("mmlu", "test", 0), ("mmlu", "test", 2), ("ceval", "val", 1)]:
        items = read_choice(fmt, ASSETS / fmt, split)
        dev = read_choice(fmt, ASSETS / fmt, "dev")
        ours = score_choice(model, tokenizer, fmt, items, dev, shots)
        theirs = run_lm_eval_benchmark(lm, fmt, fmt, items, dev, shots)
        assert [r["id"] for r in theirs["rows"]] == [it.id for it in items]
        # the same prompt, the same numbers, the same pick: example by example
        assert ours.contexts == [r["context"] for r in theirs["rows"]], (fmt, shots)
        for a, r in zip(ours.loglikelihoods, theirs["rows"], strict=True):
            assert a == pytest.approx(r["loglikelihoods"], abs=1e-4)
        assert ours.pred == [r["pred"] for r in theirs["rows"]], (fmt, shots)
        stats = choice_stats(items, ours)
        assert list(stats["acc"][:, 0]) == [r["acc"] for r in theirs["rows"]]
        assert list(stats["acc_norm"][:, 0]) == [r["acc_norm"] for r in theirs["rows"]]
        assert stats["acc"][:, 0].mean() == pytest.approx(theirs["acc"])
