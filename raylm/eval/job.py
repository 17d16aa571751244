"""The eval job: score a model (and its base) with confidence intervals, then apply the gate."""

from __future__ import annotations

from raylm.config import resolve_path
from raylm.eval.config import EvalJobConfig
from raylm.job import Job, Result
from raylm.outputs import EvalOutput

GATE_FAILED = 3
"""Exit code when ``fail_on_gate`` is set and the gate fails (2 is a config/data error)."""


class EvalJob(Job[EvalJobConfig]):
    name = "eval"
    config = EvalJobConfig
    remote_outputs = True  # eval.json, report.md, predictions.jsonl go through raylm.storage

    def setup(self, cfg: EvalJobConfig) -> EvalJobConfig:
        """Relative paths mean the workspace (URIs stay as given); the data is read and
        checked here, so a bad record or a missing path (local or in a bucket) fails in
        seconds, before any output is written or Ray starts."""
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
        """The models and every data file scored, benchmarks included, and the training
        files the contamination scan read (lineage hashes them)."""
        paths = [cfg.model, cfg.base_model, cfg.data.eval_path, cfg.data.perplexity_path]
        train = getattr(getattr(self, "prepared", None), "train_sources", None) or []
        paths += [*(b.path for b in cfg.benchmarks), *(s.path for s in train)]
        return [p for p in dict.fromkeys(paths) if p]

    def run(self, cfg: EvalJobConfig, out_dir: str) -> Result:
        from raylm.eval.run import report_markdown, run_eval, write_outputs

        results, rows = run_eval(cfg, self.prepared)
        results["ray"] = self.ray_info
        paths = write_outputs(results, rows, out_dir)
        passed = results["gate"]["passed"]
        print(report_markdown(results))
        print(f"eval: gate {'passed' if passed else 'FAILED'}; results in {out_dir}")
        headline = {name: m["value"] for name, m in results["metrics"].items()}
        return Result(
            paths,
            headline | {"gate_passed": passed},
            EvalOutput(report=paths["eval"], gate_passed=passed, model=cfg.model),
            exit_code=GATE_FAILED if cfg.fail_on_gate and not passed else 0,
        )
