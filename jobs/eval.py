"""Eval job: score a model (and its base) with confidence intervals, then apply the gate."""

from __future__ import annotations

import sys
from pathlib import Path

from raylm.cluster import init_ray
from raylm.config import resolve_path, save_resolved, to_dict
from raylm.eval.config import EvalJobConfig
from raylm.eval.records import EvalDataError
from raylm.eval.run import prepare, run_eval, write_outputs
from raylm.manifest import Manifest
from raylm.runner import entrypoint, load_from_argv

GATE_FAILED = 3
"""Exit code when ``fail_on_gate`` is set and the gate fails (2 is a config/data error)."""


def main(argv: list[str] | None = None) -> int:
    cfg: EvalJobConfig = load_from_argv("eval", argv)
    _resolve_paths(cfg)
    try:
        inputs = prepare(cfg)
    except EvalDataError as err:
        print(f"raylm: eval data error: {err}", file=sys.stderr)
        return 2
    out = Path(resolve_path(cfg.output_dir))
    paths_in = [cfg.model, cfg.base_model, cfg.data.eval_path, cfg.data.perplexity_path]
    manifest = Manifest.start("eval", to_dict(cfg), inputs=[p for p in paths_in if p])
    save_resolved(cfg, out)
    ray_info = init_ray(cfg.ray.address, cfg.ray.namespace)
    results, rows = run_eval(cfg, inputs)
    results["ray"] = ray_info
    paths = write_outputs(results, rows, out)
    passed = results["gate"]["passed"]
    print(Path(paths["report"]).read_text())
    print(f"eval: gate {'passed' if passed else 'FAILED'}; results in {out}")
    headline = {name: m["value"] for name, m in results["metrics"].items()}
    manifest.finish(paths, headline | {"gate_passed": passed})
    manifest.write(out)
    return GATE_FAILED if cfg.fail_on_gate and not passed else 0


def _resolve_paths(cfg: EvalJobConfig) -> None:
    """Relative paths mean the workspace the user submitted from (see resolve_path)."""
    for key in ("model", "base_model", "adapter_base"):
        if getattr(cfg, key):
            setattr(cfg, key, resolve_path(getattr(cfg, key)))
    for key in ("eval_path", "perplexity_path"):
        if getattr(cfg.data, key):
            setattr(cfg.data, key, resolve_path(getattr(cfg.data, key)))


if __name__ == "__main__":
    entrypoint(main)
