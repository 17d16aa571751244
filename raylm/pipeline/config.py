"""The pipeline job's config: which stage configs to run, and where the run lives."""

from __future__ import annotations

from dataclasses import dataclass, field

from raylm.config import ConfigError, RayConfig, positive

STAGES = ("data", "train", "eval", "export", "export_eval", "serve")


@dataclass
class StageConfig:
    """One stage: a job config file plus overrides; the pipeline adds the wiring."""

    config: str | None = None
    """The stage job's YAML (inside the project); None leaves the stage out."""

    overrides: list[str] = field(default_factory=list)
    """``key=value`` overrides for that job, applied after the pipeline's own wiring."""


@dataclass
class PipelineConfig:
    """data -> train -> eval -> gate -> [export -> export_eval -> gate] -> serve, each a
    Ray job reading the previous stage's output."""

    name: str = "pipeline"
    """Run name: the run directory is ``workspace/name``; re-running it resumes."""

    workspace: str = "outputs/pipelines"
    """Where pipeline runs live (shared storage on a multi-node cluster)."""

    data: StageConfig = field(default_factory=StageConfig)
    """Curation stage (its output feeds train's data.path)."""

    train: StageConfig = field(default_factory=StageConfig)
    """Training stage (its final/ feeds eval and serve)."""

    eval: StageConfig = field(default_factory=StageConfig)
    """Evaluation stage; its gate verdict decides whether serve runs."""

    export: StageConfig = field(default_factory=StageConfig)
    """Export stage, after eval's gate: the trained model merged (and quantized, with
    the export config's ``quantize``); when present, serve deploys its model."""

    export_eval: StageConfig = field(default_factory=StageConfig)
    """Evaluation of a quantized export against the merged model it came from (an eval
    config whose gate is typically ``non_inferior_to_base``); its gate decides serve."""

    serve: StageConfig = field(default_factory=StageConfig)
    """Deployment stage."""

    gate: bool = True
    """Deploy only if the eval stage's gate passed (false: deploy regardless, and say so)."""

    stage_timeout_s: float = 3600.0
    """Longest a single stage job may run before the pipeline stops it."""

    ray: RayConfig = field(default_factory=RayConfig)
    """Cluster connection (stages are submitted to the same cluster)."""

    def __post_init__(self) -> None:
        positive("stage_timeout_s", self.stage_timeout_s)
        if not any(getattr(self, s).config for s in STAGES):
            raise ConfigError(f"a pipeline needs at least one stage config among {list(STAGES)}")
        if self.serve.config and self.gate and not self.eval.config:
            raise ConfigError("gate=true needs an eval stage (or set gate=false to deploy ungated)")
        if self.export_eval.config and not self.export.config:
            raise ConfigError("export_eval scores the export stage's model: add an export stage")
