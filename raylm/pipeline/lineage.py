"""lineage.json: from the served model back to the raw files that trained it.

Built only from the manifests the stage jobs wrote, so it cannot claim more than the
jobs recorded: each link is a path plus the content hash or fingerprint seen then.
"""

from __future__ import annotations

import json
from typing import Any

from raylm import storage
from raylm.manifest import MANIFEST, Manifest

LINEAGE = "lineage.json"


def build(run_dir: str, summary: dict[str, Any]) -> dict[str, Any]:
    """The chain serve -> eval -> train checkpoint -> data manifest -> input file hashes."""
    dirs = {name: storage.join(run_dir, name) for name in ("data", "train", "eval", "serve")}
    stages = {name: Manifest.read(d) for name, d in dirs.items()}
    lineage: dict[str, Any] = {"run_dir": run_dir, "summary": summary}
    if stages["serve"]:
        lineage["served"] = _link(stages["serve"], dirs["serve"])
    if stages["eval"]:
        link = _link(stages["eval"], dirs["eval"])
        report = storage.join(dirs["eval"], "eval.json")
        link["gate"] = json.loads(storage.read_text(report)).get("gate")
        lineage["evaluation"] = link
    if stages["train"]:
        link = _link(stages["train"], dirs["train"])
        link["checkpoint"] = stages["train"].outputs.get("final")
        link["train_config"] = stages["train"].config
        lineage["training"] = link
    if stages["data"]:
        link = _link(stages["data"], dirs["data"])
        link["input_files"] = stages["data"].inputs
        lineage["data"] = link
    return lineage


def _link(manifest: Manifest, out_dir: str) -> dict[str, Any]:
    return {
        "manifest": storage.join(out_dir, MANIFEST),
        "fingerprint": manifest.fingerprint(),
        "status": manifest.status,
        "inputs": manifest.inputs,
        "outputs": manifest.outputs,
        "metrics": manifest.metrics,
        "submission_id": manifest.environment.get("submission_id"),
    }


def write(run_dir: str, summary: dict[str, Any]) -> str:
    path = storage.join(run_dir, LINEAGE)
    body = json.dumps(build(run_dir, summary), indent=2, sort_keys=True, default=str)
    storage.write_text(path, body)
    return path


def describe(run_dir: str) -> str:
    """``raylm lineage RUN``: the chain as indented text, newest artefact first."""
    record = json.loads(storage.read_text(storage.join(str(run_dir), LINEAGE)))
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
