"""Run data -> train -> eval -> gate -> serve as Ray jobs, skipping work already done.

Stages hand each other typed outputs (``raylm.outputs``) through their manifests: the
data stage's ``DatasetOutput`` becomes train's ``data.path``, train's ``ModelOutput``
(an adapter on its base, or a full model) is what eval scores and serve deploys, and
eval's ``EvalOutput`` carries the gate. Each stage is wired only once the stage before
it has finished, from what that stage recorded, never from where it usually writes.

A stage is skipped when the record the pipeline left after its last success has the same
fingerprint (resolved config + content hash of its inputs) and the stage's own manifest
says it succeeded. An interrupted train stage left no record, so it is submitted again
with the same run name, and the train job resumes from its newest complete checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from typing import Any

from raylm import config, storage
from raylm.config import ConfigError
from raylm.job import JobFailed
from raylm.manifest import Manifest
from raylm.outputs import DatasetOutput, EvalOutput, ModelOutput, StageOutput, read_output
from raylm.pipeline.config import STAGES, PipelineConfig
from raylm.runner import split_argv
from raylm.submit import submit, wait

STAGE_RECORDS = "stages"
OUTPUT_TYPES: dict[str, type[StageOutput]] = {
    "data": DatasetOutput,
    "train": ModelOutput,
    "eval": EvalOutput,
    "export": ModelOutput,
    "export_eval": EvalOutput,
}
GATES = {"export": ("eval",), "serve": ("eval", "export_eval")}
"""The eval stages whose gate a stage waits for (those the pipeline has)."""


class StageFailed(JobFailed):
    """A stage job did not succeed; the message names it and points at its logs."""


@dataclasses.dataclass
class Stage:
    """One stage ready to run: the job's argv and what decides whether it can be skipped."""

    name: str
    argv: list[str]
    out_dir: str
    inputs: list[str]
    job: str = ""
    """The job that runs it (export_eval is an eval job); default: ``name``."""

    def __post_init__(self) -> None:
        self.job = self.job or self.name

    def load(self) -> Any:
        return config.load(self.job, *split_argv(self.argv))

    def fingerprint(self) -> str:
        cfg = config.to_dict(self.load())
        present = [p for p in self.inputs if storage.exists(p)]
        return Manifest.start(self.job, cfg, present).fingerprint()


def stage_for(
    name: str, cfg: PipelineConfig, run_dir: str, produced: dict[str, StageOutput]
) -> Stage:
    """Stage ``name`` wired to what the earlier stages produced; its own overrides win."""
    sc = getattr(cfg, name)
    out = storage.join(run_dir, name)
    wiring, inputs = [f"output_dir={out}"], []
    if name == "train":
        wiring = [f"storage_path={run_dir}", f"run_name={name}"]
        data = produced.get("data")
        if isinstance(data, DatasetOutput):
            wiring.append(f"data.path={data.path}")
            if data.template:  # rendered with a named template: train renders the same
                wiring.append(f"model.template={data.template}")
            inputs.append(data.path)
    model = (
        produced.get("export")
        if name == "serve" and "export" in produced
        else produced.get("train")
    )
    if name in ("eval", "serve") and isinstance(model, ModelOutput):
        wiring += _model_wiring(name, model, adapter_name=cfg.name)
        inputs.append(model.path)
    if name == "export" and isinstance(model, ModelOutput):
        train_dir = storage.join(run_dir, "train")  # its manifest names adapter and base
        wiring.append(f"model={train_dir}")
        inputs.append(model.path)
    exported = produced.get("export")
    if name == "export_eval" and isinstance(exported, ModelOutput):
        wiring += _export_eval_wiring(exported)
        inputs.append(exported.path)
    job = "eval" if name == "export_eval" else name
    return Stage(name, [sc.config, *wiring, *sc.overrides], out, inputs, job)


def _export_eval_wiring(exported: ModelOutput) -> list[str]:
    """The quantized export scored against the merged model it was made from."""
    if not exported.source:
        raise ConfigError(
            f"export_eval compares a quantized export with the merged model it came from, "
            f"but the export at {exported.path} is not quantized: set the export stage's "
            "quantize.method, or drop export_eval (the export's merge check already "
            "compared the merge with base + adapters)"
        )
    return [f"model={exported.path}", f"base_model={exported.source}"]


def _model_wiring(name: str, model: ModelOutput, adapter_name: str) -> list[str]:
    """Eval scores an adapter on its base and compares with the base; serve mounts it
    under the pipeline's name (``BASE:NAME`` in ``/v1/models``)."""
    if name == "eval":
        base = [f"adapter_base={model.base_model}"] if model.adapter else []
        return [f"model={model.path}", *base, f"base_model={model.base_model}"]
    if model.adapter:
        return [f"model.path={model.base_model}", f"lora.adapters.{adapter_name}={model.path}"]
    return [f"model.path={model.path}"]


def run(cfg: PipelineConfig, run_dir: str, dashboard: str) -> dict[str, Any]:
    """Run or skip each stage; returns a summary: what ran, what was skipped, the gate."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(dashboard)
    summary: dict[str, Any] = {"stages": {}, "gates": {}, "deployed": False}
    produced: dict[str, StageOutput] = {}
    for name in (n for n in STAGES if getattr(cfg, n).config):
        gates = [g for g in GATES.get(name, ()) if g in produced and g not in summary["gates"]]
        if not all(_gate_allows(cfg, g, produced, summary, blocked=name) for g in gates):
            break
        stage = stage_for(name, cfg, run_dir, produced)
        fingerprint = stage.fingerprint()
        if _already_done(stage, run_dir, fingerprint, dashboard):
            print(f"pipeline: {name}: up to date, skipped", flush=True)
            summary["stages"][name] = "skipped"
        else:
            sid = _run_stage(client, stage, cfg)
            _record(stage, run_dir, fingerprint, sid)
            summary["stages"][name] = "ran"
        if name in OUTPUT_TYPES:
            produced[name] = read_output(OUTPUT_TYPES[name], stage.out_dir)
    summary["deployed"] = summary["stages"].get("serve") in ("ran", "skipped")
    return summary


def _run_stage(client: Any, stage: Stage, cfg: PipelineConfig) -> str:
    sid = submit(
        client,
        stage.job,
        stage.argv,
        python=sys.executable,
        local=True,
        metadata={"raylm_pipeline": cfg.name},
    )
    print(f"pipeline: {stage.name}: submitted {sid}", flush=True)
    try:
        status = wait(client, sid, cfg.stage_timeout_s, _show, poll_s=2.0)
    except TimeoutError:
        raise StageFailed(
            f"{stage.name} ({sid}) exceeded stage_timeout_s={cfg.stage_timeout_s}"
        ) from None
    if status != "SUCCEEDED":
        raise StageFailed(f"{stage.name} stage {status} (job {sid}); `raylm jobs logs {sid}`")
    return sid


def _show(text: str) -> None:
    print(text, end="", flush=True)


def _already_done(stage: Stage, run_dir: str, fingerprint: str, dashboard: str) -> bool:
    record = storage.join(run_dir, STAGE_RECORDS, f"{stage.name}.json")
    if not storage.exists(record):
        return False
    if json.loads(storage.read_text(record))["fingerprint"] != fingerprint:
        return False
    manifest = Manifest.read(stage.out_dir)
    if manifest is None or manifest.status != "succeeded":
        return False
    return stage.name != "serve" or _app_running(stage, dashboard)


def _app_running(stage: Stage, dashboard: str) -> bool:
    """A deployment lives in the cluster, not on disk: a new or restarted cluster lost it."""
    from raylm.serve import deploy

    app = deploy.status(dashboard)["applications"].get(stage.load().app_name)
    return app is not None and app["status"] == "RUNNING"


def _record(stage: Stage, run_dir: str, fingerprint: str, sid: str) -> None:
    path = storage.join(run_dir, STAGE_RECORDS, f"{stage.name}.json")
    body = {"fingerprint": fingerprint, "submission_id": sid, "argv": stage.argv}
    body["finished_at"] = time.time()
    storage.write_text(path, json.dumps(body, indent=2))


def _gate_allows(
    cfg: PipelineConfig, stage: str, produced: dict[str, StageOutput], summary: dict[str, Any],
    blocked: str,
) -> bool:  # fmt: skip
    """The gate of eval stage ``stage``; a failed one stops the pipeline before ``blocked``."""
    if not cfg.gate:
        print(f"pipeline: gate disabled: {blocked} runs without {stage}'s verdict", flush=True)
        summary["gates"][stage] = None
        return True
    verdict_of = produced[stage]
    assert isinstance(verdict_of, EvalOutput)
    verdict = json.loads(storage.read_text(verdict_of.report))["gate"]
    summary["gates"][stage] = verdict
    if stage == "eval":
        summary["gate"] = verdict
    if verdict_of.gate_passed:
        print(f"pipeline: {stage} gate passed", flush=True)
        return True
    reasons = "; ".join(verdict.get("reasons", [])) or "no reason given"
    print(f"pipeline: {stage} gate FAILED, not running {blocked}: {reasons}", flush=True)
    summary["stages"][blocked] = "blocked"
    return False
