"""Held-out loss while a run trains: the examples ``data.val_size`` or
``data.eval_datasets`` keep out of training, scored every ``eval.steps`` (or each epoch).

The driver tokenizes the held-out examples with the training rows and ships them in the
plan item every worker gets (``raylm.train.data.build_dataset``); they are a small set,
so every rank holds them all and scores its slice ``rows[rank::world]``.

Under ZeRO-3 every forward is a collective (each layer's weights are gathered from all
ranks), so every rank runs the same number of forwards: a rank whose slice runs out
scores a copy of the first row with weight 0. Each batch's loss (the stage's own
objective, under ``no_grad`` and in eval mode: no dropout) is weighted by its real
examples, summed over ranks and divided by the held-out count, as transformers' Trainer
averages ``eval_loss``; the stage's other metrics (rm's pair accuracy, DPO's reward
margins) are averaged the same way and logged as ``eval_<name>``.

Records go to ``<run_dir>/eval.jsonl`` (one line per evaluation; a resume truncates the
lines after its checkpoint as it does ``metrics.jsonl``) and to the ``report_to`` sinks
under ``eval/``.
"""

from __future__ import annotations

import json
import math
import pickle
import time
from typing import Any

from raylm import storage
from raylm.train.stream import segment_of

EVAL_FILE = "eval.jsonl"


def held_out_rows(shard: Any) -> list[dict[str, Any]]:
    """The held-out rows from the plan item a worker got (none for a data job's shards,
    or a plan item without them)."""
    for row in shard.iter_rows():
        blob = row.get("held_out")
        return pickle.loads(blob) if blob else []
    return []


class HeldOut:
    """One worker's side of held-out evaluation (built in ``_Loop.setup``)."""

    def __init__(self, loop: Any, rows: list[dict[str, Any]]) -> None:
        cfg = loop.cfg
        self.loop, self.rows = loop, rows
        self.strategy = cfg.eval.strategy if rows else "no"
        self.every = cfg.eval.steps or cfg.train.logging_steps
        self.batch = cfg.eval.batch_size or cfg.train.micro_batch_size
        self.file = storage.join(loop.run_dir, EVAL_FILE)

    def due(self, step: int, total: int) -> bool:
        """After optimizer step ``step`` (1-based): evaluate now? Always after the last."""
        if self.strategy == "no":
            return False
        if step == total:
            return True
        if self.strategy == "steps":
            return step % self.every == 0
        stream = self.loop.stream
        worlds, rows, per_step = stream.worlds, stream.plan.rows, self.loop.per_step
        return (
            segment_of(step, worlds, rows, per_step).epoch
            > segment_of(step - 1, worlds, rows, per_step).epoch
        )

    def run(self, step: int, epoch: int) -> dict[str, Any] | None:
        """Every rank: score the held-out set; rank 0 records it (returned there)."""
        import torch
        import torch.distributed as dist

        loop = self.loop
        mine = self.rows[loop.rank :: loop.world]
        n_batches = math.ceil(math.ceil(len(self.rows) / loop.world) / self.batch)
        loop.engine.eval()
        sums: dict[str, float] = {}
        try:
            with torch.no_grad():
                for b in range(n_batches):
                    rows = mine[b * self.batch : (b + 1) * self.batch]
                    weight = len(rows)
                    loop.step_metrics = []
                    loss, _ = loop._loss(rows or self.rows[:1])
                    for key, value in [("loss", float(loss)), *_metrics(loop.step_metrics)]:
                        sums[key] = sums.get(key, 0.0) + value * weight
        finally:
            loop.engine.train()
            loop.step_metrics = []
        names = sorted(sums)
        totals = torch.tensor([sums[k] for k in names], dtype=torch.float64)
        dist.all_reduce(totals)
        if loop.rank != 0:
            return None
        n = len(self.rows)
        record = {"step": step, "epoch": epoch, "examples": n, "time": time.time()}
        record |= {f"eval_{k}": v / n for k, v in zip(names, totals.tolist(), strict=True)}
        storage.append_text(self.file, json.dumps(record) + "\n")
        print(f"step {step} eval_loss {record['eval_loss']:.4f} ({n} held out)", flush=True)
        return record


def _metrics(per_micro: list[dict[str, float]]) -> list[tuple[str, float]]:
    """The stage's metrics of one batch (``_loss`` appends one dict per call)."""
    if not per_micro:
        return []
    return [(k, float(v)) for k, v in per_micro[-1].items()]
