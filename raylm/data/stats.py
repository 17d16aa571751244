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


def examples(processed: Any, status: str, k: int) -> list[dict[str, str]]:
    """A few rows with ``status``, truncated: what a filter removed, to judge it by."""
    from ray.data.expressions import col

    rows = processed.filter(expr=col("status") == status).select_columns(["id", "raw"]).take(k)
    return [{"id": r["id"], "text": r["raw"][:300]} for r in rows]


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
