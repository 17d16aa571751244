"""Generate job: offline batch inference over a dataset with ray.data.llm + vLLM.

Writes ``predictions/`` (Parquet: row_id, prompt, completion, prompt_tokens,
completion_tokens), ``quarantine/`` for rows the engine failed on, and the manifest.
"""

from __future__ import annotations

from pathlib import Path

from raylm.cluster import init_ray
from raylm.config import resolve_path, save_resolved, to_dict
from raylm.manifest import Manifest
from raylm.runner import entrypoint, load_from_argv
from raylm.serve.batch import run_generate
from raylm.serve.config import GenerateJobConfig


def main(argv: list[str] | None = None) -> int:
    cfg: GenerateJobConfig = load_from_argv("generate", argv)
    out = Path(resolve_path(cfg.output_dir))
    inputs = [resolve_path(cfg.model), resolve_path(cfg.input.path)]
    if cfg.lora_path:
        inputs.append(resolve_path(cfg.lora_path))
    manifest = Manifest.start("generate", to_dict(cfg), inputs=inputs)
    save_resolved(cfg, out)
    init_ray(cfg.ray.address, cfg.ray.namespace)
    stats = run_generate(cfg, out)
    print(
        f"generate: {stats['rows_out']}/{stats['rows_in']} rows completed "
        f"({stats['rows_failed']} failed -> quarantine/), "
        f"{stats['completion_tokens']} tokens generated: {out / 'predictions'}"
    )
    outputs = {"predictions": str(out / "predictions")}
    if stats["rows_failed"]:
        outputs["quarantine"] = str(out / "quarantine")
    manifest.finish(outputs, stats)
    manifest.write(out)
    return 0 if stats["rows_failed"] == 0 else 1


if __name__ == "__main__":
    entrypoint(main)
