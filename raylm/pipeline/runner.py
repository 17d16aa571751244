"""Run data -> train -> eval -> gate -> serve as Ray jobs, skipping work already done.

Each stage is submitted through the job API with the pipeline's wiring added to its
own config (the data stage's output is train's ``data.path``, train's ``final/`` is
what eval scores and serve deploys). A stage is skipped when the record the pipeline
left after its last success has the same fingerprint (resolved config + content hash
of its inputs) and the stage's own manifest says it succeeded. An interrupted train
stage left no record, so it is submitted again with the same run name, and the train
job resumes from its newest complete checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import time
from pathlib import Path
from typing import Any

from raylm import config
from raylm.config import WORKSPACE_ENV
from raylm.manifest import Manifest
from raylm.pipeline.config import PipelineConfig

STAGE_RECORDS = "stages"
SUBMIT_ATTEMPTS = 4


class StageFailed(RuntimeError):
    """A stage job did not succeed; the message names it and points at its logs."""


@dataclasses.dataclass
class Stage:
    """One planned stage: the job to submit and what decides whether it can be skipped."""

    name: str
    argv: list[str]
    out_dir: Path
    inputs: list[str]

    def load(self) -> Any:
        files = [a for a in self.argv if "=" not in a]
        return config.load(self.name, files, [a for a in self.argv if "=" in a])

    def fingerprint(self) -> str:
        cfg = config.to_dict(self.load())
        return Manifest.start(
            self.name, cfg, [p for p in self.inputs if Path(p).exists()]
        ).fingerprint()


def plan(cfg: PipelineConfig, run_dir: Path) -> list[Stage]:
    """The stages in order, each with the overrides that connect it to the previous one."""
    stages: list[Stage] = []
    data_dir, train_dir = run_dir / "data", run_dir / "train"
    if cfg.data.config:
        stages.append(_stage("data", cfg.data, [f"output_dir={data_dir}"], data_dir, []))
    if cfg.train.config:
        wiring = [f"storage_path={run_dir}", "run_name=train"]
        inputs = []
        if cfg.data.config:
            wiring.append(f"data.path={data_dir}")
            inputs.append(str(data_dir))
        stages.append(_stage("train", cfg.train, wiring, train_dir, inputs))
    model = _model_under_test(cfg, train_dir)
    if cfg.eval.config:
        wiring = [f"output_dir={run_dir / 'eval'}", *model.eval_overrides]
        stages.append(_stage("eval", cfg.eval, wiring, run_dir / "eval", model.inputs))
    if cfg.serve.config:
        wiring = [f"output_dir={run_dir / 'serve'}", *model.serve_overrides]
        stages.append(_stage("serve", cfg.serve, wiring, run_dir / "serve", model.inputs))
    return stages


def _stage(name: str, sc: Any, wiring: list[str], out: Path, inputs: list[str]) -> Stage:
    return Stage(name, [sc.config, *wiring, *sc.overrides], out, inputs)


@dataclasses.dataclass
class _Model:
    eval_overrides: list[str]
    serve_overrides: list[str]
    inputs: list[str]


def _model_under_test(cfg: PipelineConfig, train_dir: Path) -> _Model:
    """What eval scores and serve deploys: train's final/ (an adapter on its base for LoRA)."""
    if not cfg.train.config:
        return _Model([], [], [])
    train = config.load("train", [cfg.train.config], cfg.train.overrides)
    final = train_dir / "final"
    base = train.model.name_or_path
    if train.finetuning_type in ("lora", "qlora"):
        return _Model(
            [f"model={final}", f"adapter_base={base}", f"base_model={base}"],
            [f"model.path={base}", f"lora.adapters.{train.run_name.replace('/', '_')}={final}"],
            [str(final)],
        )
    return _Model([f"model={final}", f"base_model={base}"], [f"model.path={final}"], [str(final)])


def run(cfg: PipelineConfig, run_dir: Path, dashboard: str, project: Path) -> dict[str, Any]:
    """Run or skip each stage; returns a summary: what ran, what was skipped, the gate."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(dashboard)
    summary: dict[str, Any] = {"stages": {}, "deployed": False}
    for stage in plan(cfg, run_dir):
        if stage.name == "serve" and not _gate_allows(cfg, run_dir, summary):
            break
        fingerprint = stage.fingerprint()
        if _already_done(stage, run_dir, fingerprint, dashboard):
            print(f"pipeline: {stage.name}: up to date, skipped", flush=True)
            summary["stages"][stage.name] = "skipped"
            continue
        sid = _submit(client, stage, project, cfg)
        _wait(client, sid, stage, cfg.stage_timeout_s)
        _record(stage, run_dir, fingerprint, sid)
        summary["stages"][stage.name] = "ran"
    summary["deployed"] = summary["stages"].get("serve") in ("ran", "skipped")
    return summary


def _already_done(stage: Stage, run_dir: Path, fingerprint: str, dashboard: str) -> bool:
    record = run_dir / STAGE_RECORDS / f"{stage.name}.json"
    if not record.exists() or json.loads(record.read_text())["fingerprint"] != fingerprint:
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


def _record(stage: Stage, run_dir: Path, fingerprint: str, sid: str) -> None:
    path = run_dir / STAGE_RECORDS / f"{stage.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"fingerprint": fingerprint, "submission_id": sid, "argv": stage.argv}
    path.write_text(json.dumps(body | {"finished_at": time.time()}, indent=2))


def _submit(client: Any, stage: Stage, project: Path, cfg: PipelineConfig) -> str:
    import sys

    env = {WORKSPACE_ENV: os.environ.get(WORKSPACE_ENV, str(Path.cwd()))}
    for attempt in range(SUBMIT_ATTEMPTS):
        try:
            sid = client.submit_job(
                entrypoint=shlex.join([sys.executable, f"jobs/{stage.name}.py", *stage.argv]),
                runtime_env={"working_dir": str(project), "excludes": _excludes(), "env_vars": env},
                metadata={"raylm_job": stage.name, "raylm_pipeline": cfg.name},
                entrypoint_num_cpus=0,
            )
            break
        except RuntimeError as err:
            # A busy head answers "No available agent to submit job, please try again later".
            if "try again" not in str(err) or attempt == SUBMIT_ATTEMPTS - 1:
                raise
            time.sleep(5.0 * (attempt + 1))
    print(f"pipeline: {stage.name}: submitted {sid}", flush=True)
    return sid


def _excludes() -> list[str]:
    from raylm.cli import UPLOAD_EXCLUDES

    return UPLOAD_EXCLUDES


def _wait(client: Any, sid: str, stage: Stage, timeout: float) -> None:
    """Poll to a terminal state, streaming new log lines so the pipeline log tells the story."""
    deadline, shown = time.monotonic() + timeout, 0
    while True:
        status = str(client.get_job_status(sid).value)
        logs = client.get_job_logs(sid)
        print(logs[shown:], end="", flush=True)
        shown = len(logs)
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        if time.monotonic() > deadline:
            client.stop_job(sid)
            raise StageFailed(f"{stage.name} ({sid}) exceeded stage_timeout_s={timeout}")
        time.sleep(2.0)
    if status != "SUCCEEDED":
        raise StageFailed(f"{stage.name} stage {status} (job {sid}); `raylm jobs logs {sid}`")


def _gate_allows(cfg: PipelineConfig, run_dir: Path, summary: dict[str, Any]) -> bool:
    if not cfg.gate:
        print("pipeline: gate disabled: deploying without an eval verdict", flush=True)
        return True
    verdict = json.loads((run_dir / "eval" / "eval.json").read_text())["gate"]
    summary["gate"] = verdict
    if verdict["passed"]:
        print("pipeline: gate passed", flush=True)
        return True
    reasons = "; ".join(verdict.get("reasons", [])) or "no reason given"
    print(f"pipeline: gate FAILED, not deploying: {reasons}", flush=True)
    summary["stages"]["serve"] = "blocked"
    return False
