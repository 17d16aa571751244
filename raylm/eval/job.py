"""The eval job: score a model (and its base) with confidence intervals, then apply the gate."""

from __future__ import annotations

from pathlib import Path

from raylm.config import resolve_path
from raylm.eval.config import EvalJobConfig
from raylm.job import Job, Result
from raylm.outputs import EvalOutput

GATE_FAILED = 3
"""Exit code when ``fail_on_gate`` is set and the gate fails (2 is a config/data error)."""


class EvalJob(Job[EvalJobConfig]):
    name = "eval"
    config = EvalJobConfig

    def setup(self, cfg: EvalJobConfig) -> EvalJobConfig:
        """Relative paths mean the workspace; the data is read and checked here, so a bad
        record fails in seconds, before any output is written or Ray starts."""
        from raylm.eval.run import prepare

        for key in ("model", "base_model", "adapter_base"):
            if getattr(cfg, key):
                setattr(cfg, key, resolve_path(getattr(cfg, key)))
        for key in ("eval_path", "perplexity_path"):
            if getattr(cfg.data, key):
                setattr(cfg.data, key, resolve_path(getattr(cfg.data, key)))
        self.prepared = prepare(cfg)
        return cfg

    def inputs(self, cfg: EvalJobConfig) -> list[str]:
        paths = [cfg.model, cfg.base_model, cfg.data.eval_path, cfg.data.perplexity_path]
        return [p for p in paths if p]

    def run(self, cfg: EvalJobConfig, out_dir: str) -> Result:
        from raylm.eval.run import run_eval, write_outputs

        out = Path(out_dir)
        results, rows = run_eval(cfg, self.prepared)
        results["ray"] = self.ray_info
        paths = write_outputs(results, rows, out)
        passed = results["gate"]["passed"]
        print(Path(paths["report"]).read_text())
        print(f"eval: gate {'passed' if passed else 'FAILED'}; results in {out}")
        headline = {name: m["value"] for name, m in results["metrics"].items()}
        return Result(
            paths,
            headline | {"gate_passed": passed},
            EvalOutput(report=paths["eval"], gate_passed=passed, model=cfg.model),
            exit_code=GATE_FAILED if cfg.fail_on_gate and not passed else 0,
        )
