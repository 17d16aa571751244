"""lm-evaluation-harness on raylm's multiple-choice benchmarks, from the same local files.

Each benchmark subject becomes an lm-eval task written into a temporary directory: a YAML
with ``dataset_path: json`` and ``data_files`` pointing at jsonl copies of the subject's
test and dev items, lm-eval's MMLU prompt (``doc_to_text``, the description, `` A``..
continuations, ``first_n`` few-shot sampling from dev) — the same prompt raylm's own
scoring builds (``raylm.eval.benchmarks.choice``), so the two must pick the same options.
Nothing is downloaded: ``HF_DATASETS_OFFLINE`` is set and only the built-in ``json`` builder
is used.

The model is lm-eval's ``hf`` (the evaluated model directory) or, with ``lm_eval.base_url``,
``local-completions`` against an OpenAI-compatible server (vLLM's gives prompt logprobs with
``echo``; chat-completions endpoints cannot score log-likelihoods, lm-eval refuses them).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from raylm.eval.benchmarks.choice import ANSWER_CUE, DESCRIPTIONS, subject_name
from raylm.eval.benchmarks.readers import LETTERS, ChoiceItem
from raylm.eval.config import EvalJobConfig, LmEvalConfig

TEMPLATE = (
    "{{question.strip()}}{% for c in choices %}\n{{'ABCDEFGHIJ'[loop.index0]}}. {{c}}{% endfor %}\n"
)


def task_name(bench: str, subject: str) -> str:
    return f"raylm_{bench}_{subject}".replace(" ", "_").replace("/", "_")


def write_tasks(
    bench: str, fmt: str, items: list[ChoiceItem], dev: list[ChoiceItem], shots: int, root: Path
) -> dict[str, list[int]]:
    """One lm-eval task per subject under ``root``; {task: indices of its items in ``items``}."""
    tasks: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        tasks.setdefault(task_name(bench, it.subject), []).append(i)
    for task, idx in tasks.items():
        subject = items[idx[0]].subject
        test = root / f"{task}.test.jsonl"
        test.write_text(
            "".join(json.dumps(asdict(items[i]), ensure_ascii=False) + "\n" for i in idx)
        )
        data_files = {"test": str(test)}
        n = max(len(items[i].choices) for i in idx)
        config: dict[str, Any] = {
            "task": task,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": data_files},
            "test_split": "test",
            "output_type": "multiple_choice",
            "description": DESCRIPTIONS[fmt].format(subject=subject_name(subject)),
            "doc_to_text": TEMPLATE + ANSWER_CUE[fmt],
            "doc_to_choice": list(LETTERS[:n]),
            "doc_to_target": "answer",
            "metric_list": [
                {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
            ],
            "metadata": {"version": 1.0},
        }
        shots_docs = [d for d in dev if d.subject == subject]
        if shots:
            fs = root / f"{task}.dev.jsonl"
            fs.write_text(
                "".join(json.dumps(asdict(d), ensure_ascii=False) + "\n" for d in shots_docs)
            )
            data_files["dev"] = str(fs)
            config |= {"fewshot_split": "dev", "fewshot_config": {"sampler": "first_n"}}
        (root / f"{task}.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))
    return tasks


def make_lm(model_dir: str, lc: LmEvalConfig, adapter_base: str | None = None) -> Any:
    """lm-eval's model object: ``hf`` on the directory, or ``local-completions``."""
    from lm_eval.api.registry import get_model

    if lc.base_url:
        args = {
            "base_url": lc.base_url,
            "model": lc.served_model or model_dir,
            "tokenizer": model_dir,
            "tokenizer_backend": "huggingface",
            "tokenized_requests": False,
            "num_concurrent": 1,
            "max_retries": 1,
        }
        return get_model("local-completions")(**args)
    args = {
        "pretrained": model_dir,
        "dtype": "float32",
        "device": "cpu",
        "batch_size": lc.batch_size,
    }
    if adapter_base:  # a PEFT adapter directory on its base
        args = args | {"pretrained": adapter_base, "peft": model_dir}
    try:
        import torch

        if torch.cuda.is_available():
            args["device"] = "cuda"
    except ImportError:
        pass
    return get_model("hf")(**args)


def run_lm_eval_benchmark(
    lm: Any, bench: str, fmt: str, items: list[ChoiceItem], dev: list[ChoiceItem], shots: int
) -> dict[str, Any]:
    """lm-eval's accuracy (overall = mean over examples, and per subject) and its per-example
    predictions, in ``items`` order."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="raylm-lmeval-") as tmp:
        tasks = write_tasks(bench, fmt, items, dev, shots, Path(tmp))
        tm = TaskManager(include_path=tmp, include_defaults=False)
        res = lm_eval.simple_evaluate(
            model=lm,
            tasks=sorted(tasks),
            num_fewshot=shots,
            task_manager=tm,
            log_samples=True,
            bootstrap_iters=0,
        )
    preds: list[dict[str, Any] | None] = [None] * len(items)
    subjects = {}
    for task, idx in tasks.items():
        r = res["results"][task]
        subjects[items[idx[0]].subject] = {"acc": r["acc,none"], "acc_norm": r["acc_norm,none"]}
        for s in res["samples"][task]:
            lls = [float(x[0]) for x in s["filtered_resps"]]
            i = idx[s["doc_id"]]
            preds[i] = {
                "id": items[i].id,
                "pred": max(range(len(lls)), key=lambda j: (lls[j], -j)),
                "acc": float(s["acc"]),
                "acc_norm": float(s["acc_norm"]),
                "loglikelihoods": lls,
                "context": s["arguments"][0][0],
            }
    rows = [p for p in preds if p is not None]
    n = len(rows)
    return {
        "acc": sum(p["acc"] for p in rows) / n,
        "acc_norm": sum(p["acc_norm"] for p in rows) / n,
        "n": n,
        "shots": shots,
        "subjects": subjects,
        "rows": rows,
        "version": lm_eval.__version__ if hasattr(lm_eval, "__version__") else None,
    }


def run_lm_eval(info: Any, cfg: EvalJobConfig, data: dict[str, Any]) -> dict[str, Any]:
    """lm-eval on every multiple-choice benchmark that ``cfg.lm_eval`` names (a Ray task);
    ``info`` is the evaluated model's ``ModelInfo`` (an adapter runs on its base)."""
    from raylm import storage

    lc = cfg.lm_eval
    assert lc is not None
    local = storage.local_dir(info.path, key="model")
    base = storage.local_dir(info.base, key="adapter_base") if info.kind == "adapter" else None
    lm = make_lm(local, lc, base)
    names = lc.benchmarks or [n for n, d in data.items() if d.cfg.format in ANSWER_CUE]
    out: dict[str, Any] = {"model": "local-completions" if lc.base_url else "hf", "benchmarks": {}}
    if lc.base_url:
        out["base_url"] = lc.base_url
    for name in names:
        d = data[name]
        out["benchmarks"][name] = run_lm_eval_benchmark(
            lm, name, d.cfg.format, d.items, d.dev, d.cfg.shots
        )
    return out


def with_agreement(lm: dict[str, Any], benchmarks: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's results plus, per benchmark, how often its pick equals raylm's own, example
    by example (1.0 when the two implementations agree)."""
    for name, res in lm["benchmarks"].items():
        ours = benchmarks[name]["rows"]
        same = [a["pred"] == b["pred"] for a, b in zip(ours, res["rows"], strict=True)]
        res["same_prediction_as_raylm"] = sum(same) / max(1, len(same))
        res["differs_from_raylm"] = [a["id"] for a, s in zip(ours, same, strict=True) if not s]
    return lm
