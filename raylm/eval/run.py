"""The eval job's body: one Ray task per model, then intervals, the paired test and the gate.

Each model is scored in its own Ray task (visible in the dashboard, ``num_cpus`` from the
config), so tuned and base run side by side. Tasks return per-example statistics only;
bootstrap and gate run in the driver, where both models' examples can be paired.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raylm import storage
from raylm.eval.bootstrap import confidence_interval, paired_bootstrap
from raylm.eval.config import GENERATION_METRICS, EvalJobConfig
from raylm.eval.gate import gate
from raylm.eval.metrics import example_scores, generation_stats
from raylm.eval.model import ModelInfo, describe_model
from raylm.eval.records import EvalDataError, EvalRecord, load_eval_records, load_texts


def evaluate_model(
    path: str,
    cfg: EvalJobConfig,
    records: list[EvalRecord],
    docs: list[Any],
    adapter_base: str | None,
    benchmarks: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Score one model (a Ray task): per-example statistics of every metric, its answers."""
    import torch

    from raylm.eval.model import load_model, perplexity_stats

    torch.set_num_threads(max(1, int(cfg.num_cpus)))
    t0 = time.perf_counter()
    model, tokenizer, info = load_model(path, adapter_base)
    out: dict[str, Any] = {"model": asdict(info), "stats": {}, "predictions": [], "seconds": {}}
    if "perplexity" in cfg.metrics:
        d = cfg.data
        out["stats"]["perplexity"] = perplexity_stats(
            model, tokenizer, docs, d.perplexity_max_length, d.perplexity_batch_size
        )
        out["seconds"]["perplexity"] = round(time.perf_counter() - t0, 3)
    if any(m in GENERATION_METRICS for m in cfg.metrics):
        t1 = time.perf_counter()
        out |= _score_generation(info, model, tokenizer, records, cfg, out["stats"])
        out["seconds"]["generation"] = round(time.perf_counter() - t1, 3)
    if benchmarks:  # standard benchmarks from local files (raylm.eval.benchmarks)
        from raylm.eval.benchmarks import run_benchmarks

        stats, out["benchmarks"], secs = run_benchmarks(info, model, tokenizer, cfg, benchmarks)
        out["stats"] |= stats
        out["seconds"] |= secs
    out["seconds"]["total"] = round(time.perf_counter() - t0, 3)
    return out


def _score_generation(
    info: ModelInfo,
    model: Any,
    tokenizer: Any,
    records: list[EvalRecord],
    cfg: EvalJobConfig,
    stats: dict[str, np.ndarray],
) -> dict[str, Any]:
    """Generate every answer, add the generation metrics' statistics to ``stats``."""
    from raylm.eval.model import decode_answers, generate_hf, render_prompt

    g = cfg.generation
    prompts = [render_prompt(tokenizer, r, g.prompt_format) for r in records]
    if g.engine == "vllm":
        generated = _generate_vllm(info, model, tokenizer, prompts, cfg)
    else:
        generated = generate_hf(model, tokenizer, prompts, g.max_new_tokens, g.batch_size)
    answers, lengths = decode_answers(tokenizer, generated)
    budgets = [_budget(r, n, cfg) for r, n in zip(records, lengths, strict=True)]
    wanted = [m for m in cfg.metrics if m in GENERATION_METRICS]
    refs = [r.references for r in records]
    stats |= generation_stats(wanted, answers, refs, budgets, cfg.normalize, cfg.bleu_tokenize)
    return {"predictions": answers, "answer_tokens": lengths}


def _generate_vllm(
    info: ModelInfo, model: Any, tokenizer: Any, prompts: list, cfg: EvalJobConfig
) -> list[list[int]]:
    import tempfile

    from raylm.eval.vllm_engine import generate_vllm, merged_dir

    g = cfg.generation
    with tempfile.TemporaryDirectory(prefix="raylm-eval-") as tmp:
        model_dir = merged_dir(info, model, tokenizer, Path(tmp))
        return generate_vllm(model_dir, prompts, g.max_new_tokens, cfg.engine)


def _budget(record: EvalRecord, n_tokens: int, cfg: EvalJobConfig) -> tuple:
    max_tokens = record.max_tokens or cfg.length_budget.max_tokens
    max_chars = record.max_chars or cfg.length_budget.max_chars
    return n_tokens, max_tokens, max_chars


@dataclass(frozen=True)
class EvalInputs:
    """Everything read and validated before Ray starts, so bad input fails in seconds."""

    records: list[EvalRecord]
    docs: list[Any]
    models: dict[str, ModelInfo]
    """"model" and, when comparing, "base_model"."""
    benchmarks: dict[str, Any] | None = None
    """Each configured benchmark's examples, by name (``raylm.eval.benchmarks``)."""
    train_sources: list[Any] | None = None
    """The training files ``contamination`` scans (``raylm.eval.contamination``)."""


def prepare(cfg: EvalJobConfig) -> EvalInputs:
    records: list[EvalRecord] = []
    docs: list[Any] = []
    if any(m in GENERATION_METRICS for m in cfg.metrics):
        records = load_eval_records(cfg.data.eval_path, cfg.data.max_samples)  # type: ignore[arg-type]
    if "perplexity" in cfg.metrics:
        docs = load_texts(cfg.data.perplexity_path, cfg.data.max_samples)  # type: ignore[arg-type]
    if cfg.judge.base_url:  # an unreachable judge fails now, not after both models ran
        from raylm.eval.judge import check_judge

        check_judge(cfg.judge)
    models = {"model": describe_model(cfg.model, cfg.adapter_base)}
    if cfg.base_model:
        models["base_model"] = describe_model(cfg.base_model, key="base_model")
    from raylm.eval.benchmarks import load_benchmarks

    train = None
    if cfg.contamination.enabled:  # found now: no training data fails before Ray starts
        from raylm.eval.train_text import find_sources

        train = find_sources(cfg.model, cfg.contamination.train_data)
        if not train:
            raise EvalDataError(
                f"contamination.enabled, but no training data is named: no succeeded train "
                f"run's manifest records model={cfg.model} as its output; set "
                "contamination.train_data"
            )
    benchmarks = load_benchmarks(cfg) if cfg.benchmarks else None
    return EvalInputs(records, docs, models, benchmarks, train)


def run_eval(cfg: EvalJobConfig, inputs: EvalInputs) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(results for eval.json, one prediction row per eval record). Ray must be initialised."""
    import ray

    task = ray.remote(num_cpus=cfg.num_cpus, max_retries=0)(evaluate_model)
    refs = {
        role: task.options(name=f"raylm-eval:{role}").remote(
            info.path,
            cfg,
            inputs.records,
            inputs.docs,
            cfg.adapter_base if role == "model" else None,
            inputs.benchmarks,
        )
        for role, info in inputs.models.items()
    }
    lm_eval_ref = None
    if cfg.lm_eval is not None:  # lm-evaluation-harness beside raylm's own scoring
        from raylm.eval.benchmarks.lm_eval_run import run_lm_eval

        lm_eval_task = ray.remote(num_cpus=cfg.num_cpus, max_retries=0)(run_lm_eval)
        lm_eval_ref = lm_eval_task.options(name="raylm-eval:lm_eval").remote(
            inputs.models["model"], cfg, inputs.benchmarks
        )
    contamination = None
    if inputs.train_sources:  # in the driver, while the models are scored
        from raylm.eval.contamination import eval_sets, scan

        c = cfg.contamination
        sets = eval_sets(inputs.records, inputs.docs, inputs.benchmarks)
        contamination = scan(sets, inputs.train_sources, c.ngram, c.min_overlap, c.min_tokens)
    outs = dict(zip(refs, ray.get(list(refs.values())), strict=True))
    judged = None
    if cfg.judge.base_url:  # in the driver, once both models' answers exist
        from raylm.eval.judge import judge_answers

        judged = judge_answers(cfg, inputs.records, outs)
    results = summarize(cfg, outs, inputs.records, inputs.docs, judged, contamination)
    if lm_eval_ref is not None:
        from raylm.eval.benchmarks.lm_eval_run import with_agreement

        results["lm_eval"] = with_agreement(ray.get(lm_eval_ref), results["benchmarks"])
    return results, prediction_rows(cfg, outs, inputs.records)


def summarize(
    cfg: EvalJobConfig,
    outs: dict[str, dict],
    records: list[EvalRecord],
    docs: list[Any],
    judge: dict[str, Any] | None = None,
    contamination: dict[str, Any] | None = None,
) -> dict[str, Any]:
    from raylm.eval.benchmarks import metric_of, summarize_benchmarks

    b = cfg.bootstrap
    names = [*cfg.metrics, *(m for bench in cfg.benchmarks for m in bench.metric_names())]
    per_model = {
        role: {
            name: confidence_interval(
                metric_of(name), out["stats"][name], b.resamples, b.confidence, b.seed
            ).to_dict()
            for name in names
        }
        for role, out in outs.items()
    }
    comparison = None
    if "base_model" in outs:
        tuned, base = outs["model"]["stats"], outs["base_model"]["stats"]
        comparison = {
            name: paired_bootstrap(
                metric_of(name), tuned[name], base[name], b.resamples, b.confidence, b.seed
            ).to_dict()
            for name in names
        }
    results: dict[str, Any] = {
        "model": outs["model"]["model"],
        "base_model": outs["base_model"]["model"] if "base_model" in outs else None,
        "n_examples": len(records),
        "n_perplexity_docs": len(docs),
        "metrics": per_model["model"],
        "base_metrics": per_model.get("base_model"),
        "comparison": comparison,
        "bootstrap": asdict(cfg.bootstrap),
        "generation": asdict(cfg.generation),
        "seconds": {role: out["seconds"] for role, out in outs.items()},
        "benchmarks": summarize_benchmarks(cfg, outs) if cfg.benchmarks else None,
        "judge": judge,
        "contamination": contamination,
    }
    results["gate"] = gate(results, cfg.gate).to_dict()
    return results


def prediction_rows(
    cfg: EvalJobConfig, outs: dict[str, dict], records: list[EvalRecord]
) -> list[dict[str, Any]]:
    """One row per record with each model's answer and its per-example scores."""
    rows = []
    scores = {
        role: {
            m: example_scores(m, out["stats"][m]) for m in cfg.metrics if m in GENERATION_METRICS
        }
        for role, out in outs.items()
    }
    for i, rec in enumerate(records):
        row: dict[str, Any] = {"id": rec.id, "reference": list(rec.references)}
        row["prompt"] = rec.prompt if rec.prompt is not None else list(rec.messages or [])
        for role, out in outs.items():
            prefix = "" if role == "model" else "base_"
            row[f"{prefix}prediction"] = out["predictions"][i]
            row[f"{prefix}answer_tokens"] = out["answer_tokens"][i]
            row[f"{prefix}scores"] = {m: s[i] for m, s in scores[role].items()}
        rows.append(row)
    return rows


def write_outputs(results: dict[str, Any], rows: list[dict[str, Any]], out_dir: str | Path) -> dict:
    """eval.json, report.md and predictions.jsonl (locally or in a bucket, through
    ``raylm.storage``); returns their paths by name."""
    out_dir = str(out_dir)
    paths = {
        "eval": storage.join(out_dir, "eval.json"),
        "report": storage.join(out_dir, "report.md"),
        "predictions": storage.join(out_dir, "predictions.jsonl"),
    }
    storage.write_text(
        paths["eval"], json.dumps(results, indent=2, default=_json_default, allow_nan=False)
    )
    storage.write_text(paths["report"], report_markdown(results))
    storage.write_text(paths["predictions"], "".join(json.dumps(r) + "\n" for r in rows))
    return paths


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _f(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}g}"


def report_markdown(results: dict[str, Any]) -> str:
    conf = round(float(results["bootstrap"]["confidence"]) * 100)
    base = results.get("base_metrics")
    lines = [f"# Evaluation of `{results['model']['path']}`", ""]
    if results.get("base_model"):
        lines += [f"Compared with base `{results['base_model']['path']}` (paired bootstrap).", ""]
    head = f"| metric | value | {conf}% CI | n |"
    sep = "| --- | --- | --- | --- |"
    if base:
        head += f" base | diff | diff {conf}% CI | p (tuned better) |"
        sep += " --- | --- | --- | --- |"
    lines += [head, sep]
    for name, m in results["metrics"].items():
        row = f"| {name} | {_f(m['value'])} | [{_f(m['ci_low'])}, {_f(m['ci_high'])}] | {m['n']} |"
        if base:
            c = results["comparison"][name]
            row += (
                f" {_f(c['base'])} | {_f(c['diff'])} | [{_f(c['ci_low'])}, {_f(c['ci_high'])}]"
                f" | {_f(c['p_value'], 3)} |"
            )
        lines.append(row)
    verdict = results["gate"]
    lines += ["", f"**Gate: {'PASSED' if verdict['passed'] else 'FAILED'}**", ""]
    lines += [f"- {reason}" for reason in verdict["reasons"]]
    return "\n".join(lines) + "\n"
