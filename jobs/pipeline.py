"""Pipeline job: data -> train -> eval -> gate -> serve, each stage its own Ray job.

Re-running the same pipeline skips stages whose inputs and config are unchanged and
resumes an interrupted training run from its checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from raylm.cli import project_root
from raylm.cluster import init_ray
from raylm.config import resolve_path, save_resolved, to_dict
from raylm.manifest import Manifest
from raylm.pipeline import lineage
from raylm.pipeline.config import PipelineConfig
from raylm.pipeline.runner import StageFailed, run
from raylm.runner import entrypoint, load_from_argv

GATE_BLOCKED = 3
"""Exit code when the eval gate kept the model from being deployed."""


def main(argv: list[str] | None = None) -> int:
    cfg: PipelineConfig = load_from_argv("pipeline", argv)
    run_dir = Path(resolve_path(cfg.workspace)) / cfg.name
    manifest = Manifest.start("pipeline", to_dict(cfg), inputs=[])
    save_resolved(cfg, run_dir)
    ray_info = init_ray(cfg.ray.address, cfg.ray.namespace)
    dashboard = ray_info["dashboard_url"]
    dashboard = dashboard if dashboard.startswith("http") else f"http://{dashboard}"
    try:
        summary = run(cfg, run_dir, dashboard, project=project_root())
    except StageFailed as err:
        print(f"pipeline: {err}")
        return 1
    path = lineage.write(run_dir, summary)
    manifest.finish({"lineage": str(path)}, summary).write(run_dir)
    print(f"pipeline: {summary['stages']}; lineage: {path}")
    if summary["stages"].get("serve") == "blocked":
        return GATE_BLOCKED
    return 0


if __name__ == "__main__":
    entrypoint(main)
