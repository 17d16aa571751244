"""metrics.jsonl reading and the loss-curve PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from raylm import storage


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """metrics.jsonl of a run, local or in a bucket; [] before the first logged step."""
    if not storage.exists(str(path)):
        return []
    return [json.loads(ln) for ln in storage.read_text(str(path)).splitlines() if ln.strip()]


def plot_loss(
    metrics: list[dict[str, Any]], out: Path, title: str, evals: list[dict[str, Any]] | None = None
) -> Path:
    """The training loss per logged step, and the held-out loss where it was scored."""
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([m["step"] for m in metrics], [m["loss"] for m in metrics], marker=".", label="train")
    if evals:
        steps, losses = [e["step"] for e in evals], [e["eval_loss"] for e in evals]
        ax.plot(steps, losses, marker="o", label="held out")
        ax.legend()
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
