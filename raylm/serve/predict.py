"""LLaMA-Factory's do_predict on the generate job: registry records in, its files out.

With ``input.datasets`` the generate job reads those datasets of ``input.path``'s
``dataset_info.json`` (through raylm's data readers, as the train job does), splits each
conversation before its last assistant turn (the prompt; that turn is the label), renders
the prompt with ``input.template`` on the driver and writes ``prompts.jsonl``, which the
ordinary batch pipeline completes. Afterwards ``generated_predictions.jsonl`` (prompt,
predict, label per line) and ``predict_results.json`` (``predict_bleu-4``,
``predict_rouge-1/2/l``, runtime) are written as LLaMA-Factory writes them.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

from raylm import storage
from raylm.config import ConfigError, resolve_path
from raylm.serve.config_generate import GenerateJobConfig

PROMPTS = "prompts.jsonl"
PREDICTIONS = "generated_predictions.jsonl"
RESULTS = "predict_results.json"


def registry(cfg: GenerateJobConfig) -> str:
    return storage.join(resolve_path(cfg.input.path), "dataset_info.json")


def examples(cfg: GenerateJobConfig) -> list[tuple[list[dict], str]]:
    """(prompt messages, label) of each dataset's first ``input.limit`` records."""
    from raylm.data.formats import to_messages
    from raylm.data.rows import dataset_records
    from raylm.data.sources import registry_sources

    sources = registry_sources(registry(cfg), list(cfg.input.datasets))
    found = dataset_records(sources, {}, cfg.input.limit)
    out = []
    for name, rows in found.records.items():
        for ident, record, src in rows:
            if src.fmt not in ("alpaca", "sharegpt", "openai"):
                raise ConfigError(f"input.datasets: {name!r} is {src.fmt} data, not conversations")
            messages = to_messages(record, src.fmt, src.columns)
            if messages[-1]["role"] != "assistant":
                raise ConfigError(f"{ident}: the conversation does not end with an answer")
            out.append((messages[:-1], str(messages[-1]["content"])))
    return out


def render(tok: Any, messages: list[dict]) -> str:
    """The prompt text the engine completes; a BOS the tokenizer adds itself is dropped,
    so the engine's tokenization does not double it."""
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    bos = tok.bos_token
    if bos and text.startswith(bos) and tok("a")["input_ids"][:1] == [tok.bos_token_id]:
        text = text[len(bos) :]
    return text


def prepare(cfg: GenerateJobConfig, out_dir: str) -> tuple[GenerateJobConfig, list[str]]:
    """Write ``prompts.jsonl``; the config that completes it, and the labels in order."""
    from raylm.tokenizer import load_tokenizer, stop_token_ids

    trust = bool(cfg.engine.extra.get("trust_remote_code"))
    tok = load_tokenizer(cfg.model, cfg.input.template, trust_remote_code=trust)
    if not getattr(tok, "chat_template", None):
        raise ConfigError(
            f"model {cfg.model!r} has no chat template: name one with input.template "
            "(LLaMA-Factory's template:)"
        )
    pairs = examples(cfg)
    lines = [json.dumps({"prompt": render(tok, m), "label": lab}, ensure_ascii=False)
             for m, lab in pairs]  # fmt: skip
    path = storage.join(out_dir, PROMPTS)
    storage.write_text(path, "\n".join(lines) + "\n")
    stops = [*cfg.sampling.stop_token_ids]
    stops += [i for i in stop_token_ids(tok, cfg.input.template) if i not in stops]
    inp = dataclasses.replace(cfg.input, path=path, chat=False, limit=None, datasets=[])
    sampling = dataclasses.replace(cfg.sampling, stop_token_ids=stops)
    return dataclasses.replace(cfg, input=inp, sampling=sampling), [lab for _, lab in pairs]


def write_results(out_dir: str, labels: list[str], started: float) -> dict[str, Any]:
    """LLaMA-Factory's two files from ``predictions/``; returns the metrics."""
    import pyarrow.parquet as pq

    from raylm.eval.lf_metrics import predict_metrics

    fs, path = storage.filesystem(storage.join(out_dir, "predictions", "part-00000.parquet"))
    rows = pq.read_table(path, filesystem=fs).to_pylist()
    done = [(r["prompt"], r["completion"], labels[r["row_id"]]) for r in rows]
    lines = [json.dumps({"prompt": p, "predict": c, "label": lab}, ensure_ascii=False)
             for p, c, lab in done]  # fmt: skip
    storage.write_text(storage.join(out_dir, PREDICTIONS), "\n".join(lines) + "\n")
    scores = predict_metrics([c for _, c, _ in done], [lab for _, _, lab in done])
    runtime = time.time() - started
    results = {f"predict_{k}": v for k, v in scores.items()}
    results |= {
        "predict_runtime": round(runtime, 4),
        "predict_samples": len(done),
        "predict_samples_per_second": round(len(done) / runtime, 3) if runtime else 0.0,
    }
    storage.write_text(storage.join(out_dir, RESULTS), json.dumps(results, indent=4) + "\n")
    return results
