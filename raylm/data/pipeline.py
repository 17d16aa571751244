"""The data job: read -> per-record steps -> [perplexity cut] -> quarantine -> dedup ->
tokenize/pack -> write.

With ``mix`` (a pretraining recipe), the deduplicated documents are then sampled per
source to a budget and written by ``raylm.data.mix`` instead (``docs/data.md``).

Each stage is its own module; this one only runs them in order. The per-record steps
(``raylm.data.steps``) and dedup (``raylm.data.dedup``) run as plain Ray tasks over the
read blocks, tokenization and writing as Ray Data operators (``raylm.data.shards``). The
driver only ever sees per-block counts and a few examples, and checks at the end that
every input document is accounted for (``raylm.data.stats``). Each read block's
per-record work is saved with a completion marker as it finishes, so a killed job rerun
into the same output dir redoes only the blocks that had not (``raylm.data.resume``).

Inputs and the output directory may be local or in a bucket (``s3://``, ``gs://``):
everything written goes through ``raylm.storage`` and pyarrow filesystems, never
``pathlib``, which would collapse a URI's ``//``.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from raylm import storage
from raylm.config import ConfigError, resolve_model, resolve_path
from raylm.data import formats, line_dedup, mix, perplexity_cut, resume, rows, shards, steps
from raylm.data.config import DataJobConfig
from raylm.data.dedup_apply import apply_dedup
from raylm.data.sources import Source, expand_inputs
from raylm.data.stats import Stopwatch, examples, job_stats, mix_stats, mix_table, removed_counts

log = logging.getLogger(__name__)

OUTPUT_DIRS = ("shards", steps.QUARANTINE, "dedup", perplexity_cut.RECORDS)


def run(cfg: DataJobConfig) -> dict[str, Any]:
    """Run the whole pipeline; returns stats (also written to ``stats.json``)."""
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = True
    out = _fresh_output_dir(cfg)
    owner: dict[str, str] = {}
    if cfg.mix.enabled:  # one list of files; owner: file -> its mix source
        sources, owner = mix.mix_sources(cfg.mix, cfg.format, cfg.columns)
    else:
        sources = expand_inputs(cfg.inputs, cfg.format, cfg.columns)
    kind = decide_kind(cfg, sources)
    shards.check_tokenizer(cfg, kind)  # before hours of cleaning and dedup, not after
    if cfg.line_dedup.enabled and kind != "pt":
        raise ConfigError(f"line_dedup cuts lines of pt text; this job is {kind}")
    if cfg.filters.perplexity_on:  # a missing model fails now, not in every block's task
        resolve_model(str(cfg.filters.perplexity.model))
    log.info("data job: %d file(s), kind=%s", len(sources), kind)
    clock = Stopwatch()
    processed, counts, resumed = resume.process(sources, cfg, kind, out)
    clock.lap("read_clean_sign")
    if cfg.line_dedup.enabled:
        processed = line_dedup.apply(processed, cfg, counts)
        clock.lap("line_dedup")
    ppl_info = None
    if cfg.filters.perplexity_on:
        processed, ppl_info = perplexity_cut.apply(processed, cfg, counts)
        if ppl_info["removed"]:
            perplexity_cut.write_records(processed, out)
        clock.lap("perplexity_cut")
    if counts["parse"]["quarantined"]:
        shards.write_quarantine(processed, out)
    clock.lap("quarantine_write")
    docs, removed, dedup_info = apply_dedup(processed, cfg, resumed.dedup())
    clock.lap("dedup_plan")
    dup_counts = shards.write_removed(removed, out) if removed is not None else {}
    docs = docs.materialize()
    clock.lap("dedup_apply")
    if cfg.mix.enabled:
        written, mixed = _mix(docs, processed, cfg, kind, out, owner, dup_counts)
    else:
        written, mixed = shards.write_shards(docs, cfg, kind, out), None
    clock.lap("tokenize_write")

    removed_all = removed_counts(counts, dup_counts, written.pop("dropped_no_loss", 0))
    filter_examples = {
        name: examples(processed, f"{steps.FILTER}:{name}", cfg.filters.examples)
        for name in counts["filter"]
    }
    extra = {"dedup": dedup_info, "filter_examples": filter_examples, "seconds": clock.laps}
    stats = job_stats(kind, counts, removed_all, written, extra) | {"resume": resumed.stats}
    if ppl_info is not None:
        stats["perplexity"] = ppl_info
    if mixed is not None:
        stats["mix"] = mixed
        stats["accounting_ok"] = stats["accounting_ok"] and mixed["accounting_ok"]
    stats_file = storage.join(out, "stats.json")
    storage.write_text(stats_file, json.dumps(stats, indent=2, ensure_ascii=False))
    if not stats["accounting_ok"]:
        raise RuntimeError(f"accounting identity broken (see {stats_file})")
    resume.Store(out).clear()  # done: a rerun starts afresh, as before resuming existed
    return stats


def _mix(
    docs: Any,
    processed: Any,
    cfg: DataJobConfig,
    kind: str,
    out: str,
    owner: dict[str, str],
    dup_counts: dict[str, int],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Sample the curated documents to the recipe and write them (``raylm.data.mix``):
    the written counts (``documents_out``: curated documents, before sampling, so the
    curation identity holds) and stats.json's ``mix``."""
    sampled = mix.sample(docs, processed, cfg, owner)
    mixed = mix_stats(cfg.mix, sampled, sum(dup_counts.values()))
    written = mix.write_mixed(sampled.rows, cfg, kind, out, mixed["recipe"])
    print(mix_table(mixed))
    curated = sampled.curated.values()
    return {
        "dropped_no_loss": sum(c.get("no_trainable_tokens", 0) for c in curated),
        "documents_out": sum(c.get("documents", 0) for c in curated),
        "documents_mixed": sum(s["documents_out"] for s in mixed["sources"].values()),
        **written,
    }, mixed


def _fresh_output_dir(cfg: DataJobConfig) -> str:
    """The output dir (path or URI) without a previous run's shards, quarantine or
    removal records (its completed blocks, ``_resume/``, stay for ``raylm.data.resume``
    to judge); a bucket that cannot be reached fails here, naming it."""
    out = resolve_path(cfg.output_dir)
    try:
        for sub in OUTPUT_DIRS:
            storage.delete_dir(storage.join(out, sub))
        storage.makedirs(out)
    except OSError as err:
        raise ConfigError(f"output_dir={out!r} cannot be written: {err}") from None
    return out


def decide_kind(cfg: DataJobConfig, sources: list[Source]) -> str:
    """pt, sft, dpo or kto: from the sources' formats (a registry entry with a ``kto_tag``
    is kto), or from the first well-formed record."""
    fmts = {s.fmt for s in sources}
    explicit = {formats.kind_of(s.fmt, s.columns) for s in sources if s.fmt != "auto"}
    if "auto" in fmts:
        auto = [s for s in sources if s.fmt == "auto"]
        first = rows.peek_first_record(auto, cfg.text_column)
        if first is None:
            raise ConfigError(
                "format=auto but no well-formed record was found to detect it; set format"
            )
        payload = formats.to_payload(first, "auto", cfg.columns, cfg.text_column)
        explicit.add(formats.payload_kind(payload))
    if len(explicit) != 1:
        raise ConfigError(
            f"inputs mix task kinds {sorted(explicit)} (pt text, sft conversations, dpo "
            "pairs, kto labelled answers); "
            "run one data job per kind"
        )
    return explicit.pop()
