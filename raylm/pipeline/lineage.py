"""lineage.json: from the served model back to the raw files that trained it.

Built only from the manifests the stage jobs wrote, so it cannot claim more than the
jobs recorded: each link is a path plus the content hash or fingerprint seen then.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from raylm.manifest import Manifest

LINEAGE = "lineage.json"


def build(run_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """The chain serve -> eval -> train checkpoint -> data manifest -> input file hashes."""
    stages = {name: Manifest.read(run_dir / name) for name in ("data", "train", "eval", "serve")}
    lineage: dict[str, Any] = {"run_dir": str(run_dir), "summary": summary}
    if stages["serve"]:
        lineage["served"] = _link(stages["serve"], run_dir / "serve")
    if stages["eval"]:
        link = _link(stages["eval"], run_dir / "eval")
        link["gate"] = json.loads((run_dir / "eval" / "eval.json").read_text()).get("gate")
        lineage["evaluation"] = link
    if stages["train"]:
        link = _link(stages["train"], run_dir / "train")
        link["checkpoint"] = stages["train"].outputs.get("final")
        link["train_config"] = stages["train"].config
        lineage["training"] = link
    if stages["data"]:
        link = _link(stages["data"], run_dir / "data")
        link["input_files"] = stages["data"].inputs
        lineage["data"] = link
    return lineage


def _link(manifest: Manifest, out_dir: Path) -> dict[str, Any]:
    return {
        "manifest": str(out_dir / "manifest.json"),
        "fingerprint": manifest.fingerprint(),
        "status": manifest.status,
        "inputs": manifest.inputs,
        "outputs": manifest.outputs,
        "metrics": manifest.metrics,
        "submission_id": manifest.environment.get("submission_id"),
    }


def write(run_dir: Path, summary: dict[str, Any]) -> Path:
    path = run_dir / LINEAGE
    path.write_text(json.dumps(build(run_dir, summary), indent=2, sort_keys=True, default=str))
    return path


def describe(run_dir: Path) -> str:
    """``raylm lineage RUN``: the chain as indented text, newest artefact first."""
    record = json.loads((Path(run_dir) / LINEAGE).read_text())
    lines = [f"run {record['run_dir']}"]
    for key, label in (("served", "served"), ("evaluation", "evaluated"),
                       ("training", "trained"), ("data", "curated")):  # fmt: skip
        link = record.get(key)
        if not link:
            continue
        lines.append(
            f"  {label}: {link['manifest']} ({link['status']}, job {link['submission_id']})"
        )
        for path, digest in sorted(link["inputs"].items()):
            lines.append(f"    <- {path} {digest[:19]}")
    gate = (record.get("evaluation") or {}).get("gate")
    if gate is not None:
        lines.append(
            f"  gate: {'passed' if gate['passed'] else 'failed'} {gate.get('reasons', [])}"
        )
    return "\n".join(lines)
