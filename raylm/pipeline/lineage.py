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
    """The chain serve -> [export eval -> export ->] eval -> train checkpoint -> data
    manifest -> input file hashes."""
    names = ("data", "train", "eval", "export", "export_eval", "serve")
    dirs = {name: storage.join(run_dir, name) for name in names}
    stages = {name: Manifest.read(d) for name, d in dirs.items()}
    lineage: dict[str, Any] = {"run_dir": run_dir, "summary": summary}
    if stages["serve"]:
        lineage["served"] = _link(stages["serve"], dirs["serve"])
    for name, key in (("export_eval", "export_evaluation"), ("eval", "evaluation")):
        if stages[name]:
            link = _link(stages[name], dirs[name])
            report = storage.join(dirs[name], "eval.json")
            link["gate"] = json.loads(storage.read_text(report)).get("gate")
            lineage[key] = link
    if stages["export"]:
        link = _link(stages["export"], dirs["export"])
        link["check"] = stages["export"].outputs.get("check")
        lineage["export"] = link
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
    for key, label in (("served", "served"), ("export_evaluation", "export evaluated"),
                       ("export", "exported"), ("evaluation", "evaluated"),
                       ("training", "trained"), ("data", "curated")):  # fmt: skip
        link = record.get(key)
        if not link:
            continue
        lines.append(
            f"  {label}: {link['manifest']} ({link['status']}, job {link['submission_id']})"
        )
        for path, digest in sorted(link["inputs"].items()):
            lines.append(f"    <- {path} {digest[:19]}")
    for key, label in (("evaluation", "gate"), ("export_evaluation", "export gate")):
        gate = (record.get(key) or {}).get("gate")
        if gate is not None:
            verdict = "passed" if gate["passed"] else "failed"
            lines.append(f"  {label}: {verdict} {gate.get('reasons', [])}")
    return "\n".join(lines)
