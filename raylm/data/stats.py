"""``stats.json``: where every input document went, and the identity that proves it.

documents in = documents out + removed (by filter, as a duplicate, for having no
trainable token) + quarantined. Each step counts what it did (``raylm.data.steps``);
this module only adds the counts up, so a broken identity points at a step that lost
or invented a row.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

from raylm.data.steps import FILTER, PII_KINDS

log = logging.getLogger(__name__)


class Stopwatch:
    """Wall seconds per stage, for stats.json: where a slow run spends its time."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self._last, 3)
        self._last = now
        log.info("data job: %s took %.2f s", name, self.laps[name])


def examples(processed: Any, status: str, k: int) -> list[dict[str, Any]]:
    """A few rows with ``status``, truncated: what a filter removed, to judge it by."""
    from ray.data.expressions import col

    chosen = processed.filter(expr=col("status") == status)
    rows = chosen.select_columns(["id", "raw", "doc", "perplexity"]).take(k)
    return [_example(r) for r in rows]


def _example(row: dict[str, Any]) -> dict[str, Any]:
    """id and truncated text, and the perplexity where it was scored (what the
    perplexity filter judged it by). A row removed after the per-record steps (line
    dedup, the perplexity cut) kept only its canonical ``doc``, not its raw line."""
    shown = {"id": row["id"], "text": (row["raw"] or row["doc"])[:300]}
    return shown if row["perplexity"] is None else shown | {"perplexity": row["perplexity"]}


def removed_counts(
    steps: dict[str, Counter[str]], dup_counts: dict[str, int], no_loss: int
) -> dict[str, int]:
    """Removals by reason: each filter, each dedup method, no trainable tokens."""
    return {
        **{f"{FILTER}:{name}": n for name, n in steps["filter"].items()},
        "exact_dup": dup_counts.get("exact", 0),
        "fuzzy_dup": dup_counts.get("fuzzy", 0),
        "no_trainable_tokens": no_loss,
    }


def job_stats(
    kind: str,
    steps: dict[str, Counter[str]],
    removed: dict[str, int],
    shards: dict[str, Any],
    extra: dict[str, Any],
) -> dict[str, Any]:
    """The stats.json document; ``extra`` carries dedup info, filter examples, seconds."""
    parse = steps["parse"]
    documents_out = shards["documents_out"]
    identity = parse["documents"] == documents_out + sum(removed.values()) + parse["quarantined"]
    return {
        "kind": kind,
        "documents_in": parse["documents"],
        "bytes_in": parse["bytes"],
        "removed": removed,
        "removed_by_filter": dict(steps["filter"]),
        "filter_examples": extra["filter_examples"],
        "pii_replacements": {k: steps["pii"][k] for k in PII_KINDS},
        "exact_dups": removed["exact_dup"],
        "fuzzy_dups": removed["fuzzy_dup"],
        "dedup": extra["dedup"],
        "quarantined": parse["quarantined"],
        "documents_out": documents_out,
        **shards,
        "accounting_ok": identity,
        "steps": {name: dict(counts) for name, counts in steps.items()},
        "seconds": extra["seconds"],
    }


def mix_stats(mix: Any, sampled: Any, duplicates: int) -> dict[str, Any]:
    """stats.json's ``mix``: per source, documents in -> curated -> out and units
    (tokens or bytes) curated -> out, and the recipe the manifest records.

    Per source, documents_in = quarantined + filtered + duplicates + no_trainable_tokens
    + documents_curated (duplicates: what passed the filters less what dedup kept; their
    sum over sources must equal dedup's removals), and each whole pass takes every
    curated document: documents_out = passes * documents_curated + partial documents,
    {unit}_out = passes * {unit}_curated + partial {unit}.
    """
    unit = mix.unit
    out_total = sum(p.get("units", 0) for taken in sampled.passes for p in taken.values())
    sources: dict[str, dict[str, Any]] = {}
    ok = True
    for name, plan in sampled.plans.items():
        cur, kept = sampled.curation.get(name, {}), sampled.curated.get(name, {})
        taken = [p.get(name, {}) for p in sampled.passes]
        whole = taken[: plan.passes]
        ok &= all(t.get("documents", 0) == plan.documents for t in whole)
        ok &= all(t.get("units", 0) == plan.units for t in whole)
        ok &= not any(taken[plan.passes + 1 :])
        units_out = sum(t.get("units", 0) for t in taken)
        sources[name] = {
            "documents_in": cur.get("documents_in", 0),
            "bytes_in": cur.get("bytes_in", 0),
            "quarantined": cur.get("quarantine", 0),
            "filtered": cur.get("filter", 0),
            "duplicates": cur.get("passed", 0)
            - plan.documents
            - kept.get("no_trainable_tokens", 0),
            "no_trainable_tokens": kept.get("no_trainable_tokens", 0),
            "documents_curated": plan.documents,
            f"{unit}_curated": plan.units,
            "weight": mix.weights[name],
            "share": plan.share,
            f"{unit}_target": plan.target,
            "capped": plan.capped,
            "passes": plan.passes,
            "documents_out": sum(t.get("documents", 0) for t in taken),
            f"{unit}_out": units_out,
            "repeats": units_out / plan.units if plan.units else 0.0,
            "share_out": units_out / out_total if out_total else 0.0,
        }
    ok &= sum(s["duplicates"] for s in sources.values()) == duplicates
    recipe = {
        "unit": unit,
        "target": mix.target,
        "seed": mix.seed,
        "max_repeats": mix.max_repeats,
        f"{unit}_out": out_total,
        "sources": {
            name: {"inputs": list(mix.sources[name])}
            | {
                k: s[k]
                for k in ("weight", "share", "share_out", "repeats", "capped", f"{unit}_out")
            }
            for name, s in sources.items()
        },
    }
    return {"unit": unit, "sources": sources, "recipe": recipe, "accounting_ok": bool(ok)}


def mix_table(mixed: dict[str, Any]) -> str:
    """The per-source lines the job prints: share asked and realised, units, repeats."""
    unit = mixed["unit"]
    lines = [f"mix ({unit}): source  share -> out  curated -> out  repeats"]
    for name, s in mixed["sources"].items():
        flag = "  CAPPED at max_repeats" if s["capped"] else ""
        flag = flag if s[f"{unit}_curated"] else "  NOTHING LEFT after curation"
        lines.append(
            f"  {name}: {s['share']:.3f} -> {s['share_out']:.3f}  "
            f"{s[f'{unit}_curated']} -> {s[f'{unit}_out']}  x{s['repeats']:.2f}{flag}"
        )
    return "\n".join(lines)
