"""Standard benchmarks from local files: multiple choice by log-likelihood (MMLU, C-Eval,
CMMLU), generation with answer extraction (GSM8K) and code pass@k (HumanEval, MBPP).

Every benchmark produces per-example statistics in the same ``[score, 1]`` shape as the
mean metrics of ``raylm.eval.metrics``, under keys ``<name>/acc`` and so on, so the job's
bootstrap, paired comparison and gate treat them like any other metric.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from raylm.config import resolve_path
from raylm.eval.benchmarks.readers import EXTENSIONS
from raylm.eval.bootstrap import confidence_interval
from raylm.eval.config import BenchmarkConfig, EvalJobConfig
from raylm.eval.metrics import REGISTRY, Metric
from raylm.eval.records import EvalDataError

CHOICE_FORMATS = ("mmlu", "ceval", "cmmlu")
CODE_FORMATS = ("humaneval", "mbpp")
MEAN = REGISTRY["exact_match"].aggregate
"""Summed ``[score, 1]`` -> mean score: the aggregate every benchmark metric uses."""


def metric_of(name: str) -> Metric:
    """The Metric of a job metric or a benchmark key (``mmlu/acc``, ``code/pass@1``)."""
    if name in REGISTRY:
        return REGISTRY[name]
    return Metric(name, True, MEAN)


@dataclass
class BenchmarkData:
    """One benchmark's examples (and few-shot pool), read in the driver."""

    cfg: BenchmarkConfig
    items: list[Any]
    dev: list[Any] = field(default_factory=list)


def load_benchmarks(cfg: EvalJobConfig) -> dict[str, BenchmarkData]:
    """Read every configured benchmark (relative paths mean the workspace), failing fast."""
    from raylm.eval.benchmarks.readers import read_benchmark

    out = {}
    for b in cfg.benchmarks:
        b.path = resolve_path(b.path)
        items = read_benchmark(b.format, b.path, b.split)[: b.max_samples]
        if not items:
            raise EvalDataError(f"benchmark {b.name}: no examples in {b.path} ({b.split})")
        dev: list[Any] = []
        if b.shots and b.format in (*CHOICE_FORMATS, "gsm8k"):
            if not Path(b.path).is_dir():
                raise EvalDataError(
                    f"benchmark {b.name}: shots={b.shots} needs a directory path holding "
                    f"the {b.fewshot_split!r} split"
                )
            split = b.fewshot_split
            if b.format == "gsm8k" and split == "dev" and not _has_split(b.path, split):
                split = "train"  # GSM8K has no dev split: its examples come from train
            dev = read_benchmark(b.format, b.path, split)
        out[b.name] = BenchmarkData(b, items, dev)
    return out


def _has_split(path: str, split: str) -> bool:
    p = Path(path)
    return (p / split).is_dir() or any((p / f"{split}{ext}").is_file() for ext in EXTENSIONS)


def run_benchmarks(
    info: Any, model: Any, tokenizer: Any, cfg: EvalJobConfig, data: dict[str, BenchmarkData]
) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, float]]:
    """(statistics by metric key, per-benchmark details, seconds) for one model."""
    stats: dict[str, np.ndarray] = {}
    details: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    for name, d in data.items():
        t0 = time.perf_counter()
        b = d.cfg
        if b.format in CHOICE_FORMATS:
            s, det = _choice(model, tokenizer, cfg, d)
        elif b.format == "gsm8k":
            s, det = _math(info, model, tokenizer, cfg, d)
        else:
            s, det = _code(info, model, tokenizer, cfg, d)
        stats |= {f"{name}/{k}": v for k, v in s.items()}
        details[name] = det
        seconds[f"benchmark:{name}"] = round(time.perf_counter() - t0, 3)
    return stats, details, seconds


def _choice(model: Any, tokenizer: Any, cfg: EvalJobConfig, d: BenchmarkData) -> tuple:
    from raylm.eval.benchmarks.choice import choice_stats, score_choice

    b = d.cfg
    res = score_choice(
        model, tokenizer, b.format, d.items, d.dev, b.shots, cfg.generation.batch_size
    )
    rows = [
        {"id": it.id, "subject": it.subject, "gold": it.answer, "pred": p, "pred_norm": pn}
        for it, p, pn in zip(d.items, res.pred, res.pred_norm, strict=True)
    ]
    return choice_stats(d.items, res), {"subjects": [it.subject for it in d.items], "rows": rows}


def generate(
    info: Any, model: Any, tokenizer: Any, cfg: EvalJobConfig, prompts: list[str], max_new: int
) -> list[str]:
    """Greedy answers through the job's engine (``generation.engine``: hf or vllm)."""
    import tempfile

    from raylm.eval.model import generate_hf

    ids = [tokenizer(p)["input_ids"] for p in prompts]
    if cfg.generation.engine == "vllm":
        from raylm.eval.vllm_engine import generate_vllm, merged_dir

        with tempfile.TemporaryDirectory(prefix="raylm-bench-") as tmp:
            out = generate_vllm(
                merged_dir(info, model, tokenizer, Path(tmp)), ids, max_new, cfg.engine
            )
    else:
        out = generate_hf(model, tokenizer, ids, max_new, cfg.generation.batch_size)
    return _decode(tokenizer, out)


def _decode(tokenizer: Any, generated: list[list[int]]) -> list[str]:
    """Text up to the first special token, unstripped (code indentation matters)."""
    stops = set(tokenizer.all_special_ids)
    texts = []
    for ids in generated:
        end = next((i for i, t in enumerate(ids) if t in stops), len(ids))
        texts.append(tokenizer.decode(ids[:end], skip_special_tokens=True))
    return texts


def _math(info: Any, model: Any, tokenizer: Any, cfg: EvalJobConfig, d: BenchmarkData) -> tuple:
    from raylm.eval.benchmarks.answers import (
        cut_at_stop,
        extract_answer,
        math_prompt,
        numeric_equal,
    )

    b = d.cfg
    prompts = [math_prompt(it, d.dev[: b.shots]) for it in d.items]
    texts = generate(info, model, tokenizer, cfg, prompts, b.max_new_tokens)
    rows, scores = [], []
    for it, text in zip(d.items, texts, strict=True):
        pred = extract_answer(text)
        ok = numeric_equal(pred, it.answer)
        scores.append([float(ok), 1.0])
        rows.append(
            {
                "id": it.id,
                "gold": it.answer,
                "extracted": pred,
                "correct": ok,
                "generation": cut_at_stop(text).strip(),
            }
        )
    return {"exact_match": np.array(scores)}, {"rows": rows}


def sample_hf(
    model: Any, tokenizer: Any, prompts: list[str], n: int, temperature: float, max_new: int
) -> list[list[str]]:
    """``n`` sampled completions per prompt (seeded, so reruns agree), hf engine."""
    import torch

    torch.manual_seed(0)
    out = []
    for p in prompts:
        ids = torch.tensor([tokenizer(p)["input_ids"]])
        with torch.inference_mode():
            gen = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                temperature=temperature,
                top_p=0.95,
                max_new_tokens=max_new,
                num_return_sequences=n,
                pad_token_id=tokenizer.pad_token_id,
            )
        out.append(_decode(tokenizer, gen[:, ids.shape[1] :].tolist()))
    return out


def _code(info: Any, model: Any, tokenizer: Any, cfg: EvalJobConfig, d: BenchmarkData) -> tuple:
    from raylm.eval.benchmarks.code_exec import (
        network_namespace,
        pass_at_k,
        program_of,
        run_programs,
        truncate,
    )

    b = d.cfg
    prompts = [t.prompt for t in d.items]
    if b.n_samples == 1:
        samples = [[c] for c in generate(info, model, tokenizer, cfg, prompts, b.max_new_tokens)]
    else:
        samples = sample_hf(model, tokenizer, prompts, b.n_samples, b.temperature, b.max_new_tokens)
    programs = [
        program_of(b.format, t.prompt, truncate(b.format, c), t.test)
        for t, cs in zip(d.items, samples, strict=True)
        for c in cs
    ]
    results = run_programs(programs, b.timeout_s, b.memory_mb, workers=max(1, int(cfg.num_cpus)))
    stats: dict[str, list] = {f"pass@{k}": [] for k in b.k}
    rows = []
    for i, t in enumerate(d.items):
        res = results[i * b.n_samples : (i + 1) * b.n_samples]
        c = sum(ok for ok, _ in res)
        for k in b.k:
            stats[f"pass@{k}"].append([pass_at_k(b.n_samples, c, k), 1.0])
        rows.append({"id": t.id, "passed": c, "n": b.n_samples, "why": [w for _, w in res][:3]})
    sandbox = "network namespace + audit hook" if network_namespace() else "audit hook"
    return {k: np.array(v) for k, v in stats.items()}, {"rows": rows, "sandbox": sandbox}


def summarize_benchmarks(cfg: EvalJobConfig, outs: dict[str, dict]) -> dict[str, Any]:
    """Per benchmark: its setup, per-subject intervals (multiple choice) and each model's
    per-example rows; the overall keys are in ``metrics`` with the job's other metrics."""
    bs = cfg.bootstrap
    summary: dict[str, Any] = {}
    for b in cfg.benchmarks:
        entry: dict[str, Any] = {
            "format": b.format,
            "path": b.path,
            "split": b.split,
            "shots": b.shots,
            "metrics": b.metric_names(),
        }
        for role, out in outs.items():
            det = out.get("benchmarks", {}).get(b.name)
            if det is None:
                continue
            prefix = "" if role == "model" else "base_"
            if "subjects" in det:
                subjects = np.array(det["subjects"])
                per = {}
                for subject in sorted(set(det["subjects"])):
                    rows = subjects == subject
                    per[subject] = {
                        m: confidence_interval(
                            metric_of(m),
                            out["stats"][f"{b.name}/{m}"][rows],
                            bs.resamples,
                            bs.confidence,
                            bs.seed,
                        ).to_dict()
                        for m in ("acc", "acc_norm")
                    }
                entry[f"{prefix}subjects"] = per
            if "sandbox" in det:
                entry["sandbox"] = det["sandbox"]
            entry[f"{prefix}rows"] = det["rows"]
        summary[b.name] = entry
    return summary
