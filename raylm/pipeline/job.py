"""The pipeline job: data -> train -> eval -> gate -> serve, each stage its own Ray job.

Re-running the same pipeline skips stages whose inputs and config are unchanged and
resumes an interrupted training run from its checkpoint.
"""

from __future__ import annotations

from raylm import storage
from raylm.config import resolve_path
from raylm.job import Job, Result
from raylm.pipeline.config import PipelineConfig

GATE_BLOCKED = 3
"""Exit code when the eval gate kept the model from being deployed."""


class PipelineJob(Job[PipelineConfig]):
    name = "pipeline"
    config = PipelineConfig

    remote_outputs = True  # stage records and lineage go through raylm.storage

    def output_dir(self, cfg: PipelineConfig) -> str:
        return storage.join(resolve_path(cfg.workspace), cfg.name)

    def run(self, cfg: PipelineConfig, out_dir: str) -> Result:
        from raylm.pipeline import lineage
        from raylm.pipeline.runner import run

        dashboard = self.ray_info["dashboard_url"]
        dashboard = dashboard if dashboard.startswith("http") else f"http://{dashboard}"
        summary = run(cfg, out_dir, dashboard)
        path = lineage.write(out_dir, summary)
        print(f"pipeline: {summary['stages']}; lineage: {path}")
        blocked = summary["stages"].get("serve") == "blocked"
        return Result({"lineage": str(path)}, summary, exit_code=GATE_BLOCKED if blocked else 0)
