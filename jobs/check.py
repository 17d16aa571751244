"""Smoke job: a few Ray tasks report where they ran and what stack they see."""

from __future__ import annotations

import json
from pathlib import Path

from raylm.check import run_check
from raylm.cluster import init_ray
from raylm.config import CheckConfig, resolve_path, save_resolved, to_dict
from raylm.manifest import Manifest
from raylm.runner import entrypoint, load_from_argv


def main(argv: list[str] | None = None) -> int:
    cfg: CheckConfig = load_from_argv("check", argv)
    out = Path(resolve_path(cfg.output_dir))
    manifest = Manifest.start("check", to_dict(cfg), inputs=[])
    save_resolved(cfg, out)
    ray_info = init_ray(cfg.ray.address, cfg.ray.namespace)
    report = run_check(cfg.num_tasks) | {"ray": ray_info}
    (out / "check.json").write_text(json.dumps(report, indent=2))
    print(f"check: {report['tasks']} tasks ran on {len(report['nodes'])} node(s): {out}")
    manifest.finish({"report": str(out / "check.json")}, {"nodes": len(report["nodes"])})
    manifest.write(out)
    return 0


if __name__ == "__main__":
    entrypoint(main)
