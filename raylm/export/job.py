"""The export job: adapters merged into their base, checked, and written as a model an
engine serves (``raylm export CONF``, or LLaMA-Factory's export YAML).

The work runs in one Ray task (in the dashboard, on a node with ``num_cpus`` free): the
merge reads and writes one shard at a time (``raylm.export.merge``), then the check
compares the result with base + adapters (``raylm.export.check``). A bucket model or
adapter is copied to the node first; a bucket ``output_dir`` gets the local result
uploaded. The output is a ``ModelOutput``, so eval and serve take it like a train run's.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raylm import storage
from raylm.config import ConfigError, local_model, resolve_model, resolve_path
from raylm.export.config import ExportJobConfig
from raylm.export.from_checkpoint import find_checkpoint, materialize, train_config
from raylm.job import Job, Result
from raylm.manifest import MANIFEST
from raylm.outputs import ModelOutput, read_output

CHECK_FILE = "export_check.json"
COPIED = ("config.json", "generation_config.json")


@dataclass
class Sources:
    """What the export reads, resolved: the base, the adapters, the tokenizer, and what
    the model's train run recorded (cutoff, stage) when it came from one."""

    base: str
    adapters: list[str]
    tokenizer: str
    trained: ModelOutput | None
    checkpoint: tuple[str, str] | None = None
    """(run dir, checkpoint) to consolidate first, when the input is a checkpoint: then
    ``base`` and ``adapters`` are completed in the task (``from_checkpoint``)."""


def resolve_sources(cfg: ExportJobConfig) -> Sources:
    """A train job's output dir becomes its base + adapter; paths resolve to the workspace."""
    model, adapters, trained = (
        resolve_model(cfg.model),
        [resolve_path(a) for a in cfg.adapters],
        None,
    )
    _check_adapters(adapters)
    found = find_checkpoint(model, cfg.checkpoint)
    if found is not None:
        return _checkpoint_sources(cfg, found, adapters)
    if storage.exists(storage.join(model, MANIFEST)):
        trained = read_output(ModelOutput, model)
        if trained.adapter:
            model, adapters = resolve_model(trained.base_model), [trained.path, *adapters]
        else:
            model = trained.path
    _check_adapters(adapters)
    with_tok = [a for a in adapters if storage.exists(storage.join(a, "tokenizer_config.json"))]
    tokenizer = cfg.tokenizer or (with_tok[0] if with_tok else model)
    return Sources(model, adapters, tokenizer, trained)


def _check_adapters(adapters: list[str]) -> None:
    for path in adapters:
        if not storage.exists(storage.join(path, "adapter_config.json")):
            raise ConfigError(f"adapter {path}: no adapter_config.json (not a PEFT adapter)")


def _checkpoint_sources(cfg: ExportJobConfig, found: tuple[str, str], adapters: list[str]):
    """A checkpoint's sources: what its run trained (read from the run's config); the
    consolidated weights themselves are made in the task, beside the merge."""
    tcfg = train_config(found[0])
    lora = tcfg.finetuning_type in ("lora", "qlora")
    trained = ModelOutput(
        path=found[1], adapter=lora, base_model=tcfg.model.name_or_path, tokenizer=found[1],
        cutoff_len=tcfg.data.cutoff_len, stage=tcfg.stage,
    )  # fmt: skip
    base = resolve_model(tcfg.model.name_or_path) if lora else found[1]
    return Sources(base, adapters, cfg.tokenizer or "", trained, checkpoint=found)


def _from_checkpoint(src: Sources, tmp: Path) -> Sources:
    """``src`` with its checkpoint consolidated at ``tmp``: the adapter first in line, or
    the full model as the base."""
    if src.checkpoint is None:
        return src
    final = tmp / "checkpoint_final"
    tcfg = materialize(*src.checkpoint, final)
    lora = tcfg.finetuning_type in ("lora", "qlora")
    base, adapters = (src.base, [str(final), *src.adapters]) if lora else (str(final), src.adapters)
    return Sources(base, adapters, src.tokenizer or str(final), src.trained)


def export_model(cfg: ExportJobConfig, src: Sources, out: str) -> dict[str, Any]:
    """The Ray task: merge, copy the configs and tokenizer, check; returns the figures."""
    from raylm.export.merge import is_dora, merge_in_memory, merge_shards

    with tempfile.TemporaryDirectory(prefix="raylm-export-") as tmp:
        src = _from_checkpoint(src, Path(tmp))
        local = Path(tmp) / "model" if storage.is_remote(out) else Path(out)
        base = Path(local_model(src.base))
        adapters = [Path(local_model(a)) for a in src.adapters]
        if any(is_dora(a) for a in adapters):
            merge_in_memory(str(base), adapters, local, cfg.trust_remote_code)
            figures: dict[str, Any] = {"method": "peft_in_memory (DoRA)"}
        else:
            figures = {"method": "shard_by_shard", **merge_shards(base, adapters, local)}
            for name in COPIED:
                if (base / name).is_file():
                    shutil.copy(base / name, local / name)
        tok = _write_tokenizer(cfg, src, local)
        if cfg.check.enabled and adapters:
            figures["check"] = _check(cfg, base, adapters, tok, local)
        if cfg.quantize.method != "none":
            from raylm.export.quantize import quantize

            figures["quantize"] = quantize(cfg, local, local / "quantized")
        (local / CHECK_FILE).write_text(json.dumps(figures, indent=2))
        if storage.is_remote(out):
            storage.copy_dir(str(local), out)
    return figures


def _write_tokenizer(cfg: ExportJobConfig, src: Sources, local: Path) -> Any:
    """The tokenizer (with ``template`` applied) and the template's stop tokens."""
    from transformers import GenerationConfig

    from raylm.tokenizer import load_tokenizer, stop_at_template

    tok = load_tokenizer(src.tokenizer, cfg.template, trust_remote_code=cfg.trust_remote_code)
    tok.save_pretrained(str(local))
    if cfg.template and (local / "generation_config.json").is_file():
        gen = GenerationConfig.from_pretrained(str(local))
        stop_at_template(cfg.template, tok, gen)
        gen.save_pretrained(str(local))
    return tok


def _check(cfg: ExportJobConfig, base: Path, adapters: list[Path], tok: Any, local: Path):
    from raylm.export.check import check_merge, reference_logits

    prompts, trust = cfg.check.prompts, cfg.trust_remote_code
    reference = reference_logits(str(base), adapters, tok, prompts, trust)
    return check_merge(local, reference, tok, prompts, cfg.check.tolerance, trust)


class ExportJob(Job[ExportJobConfig]):
    name = "export"
    config = ExportJobConfig
    remote_outputs = True

    def setup(self, cfg: ExportJobConfig) -> ExportJobConfig:
        self.sources = resolve_sources(cfg)  # a missing model or adapter fails here
        return cfg

    def output_dir(self, cfg: ExportJobConfig) -> str:
        return resolve_path(cfg.output_dir)

    def inputs(self, cfg: ExportJobConfig) -> list[str]:
        src = self.sources
        ckpt = [src.checkpoint[1]] if src.checkpoint else []
        return list(dict.fromkeys(p for p in (src.base, *ckpt, *src.adapters) if storage.exists(p)))

    def run(self, cfg: ExportJobConfig, out: str) -> Result:
        import ray

        task = ray.remote(num_cpus=cfg.num_cpus)(export_model)
        figures = ray.get(task.options(name="raylm-export").remote(cfg, self.sources, out))
        checked = figures.get("check", {}).get("prompts", [])
        worst = max((r["merged_vs_reference"] for r in checked), default=None)
        passed = f"; check passed (worst relative logit diff {worst:.2g})" if checked else ""
        print(
            f"export: {len(self.sources.adapters)} adapter(s) into {self.sources.base} -> {out}{passed}"
        )
        metrics = {"merged_weights": figures.get("merged_weights", 0)}
        if worst is not None:
            metrics["check_worst_relative_diff"] = worst
        outputs = {"model": out, "check": storage.join(out, CHECK_FILE)}
        quantized = figures.get("quantize") or {}
        if quantized:
            outputs["quantized"] = storage.join(out, "quantized")
            metrics |= {
                f"quantized_{k}": v for k, v in quantized.items() if k.endswith("perplexity")
            }
        return Result(outputs, metrics, self._output(out, quantized))

    def _output(self, out: str, quantized: dict[str, Any]) -> ModelOutput:
        """What the next stage takes: the quantized copy when engines load it as a model
        directory (``hf_model_dir``: llmcompressor's formats), compared by the pipeline's
        export_eval with the merged model (``source``); else the merged model."""
        trained = self.sources.trained
        servable = bool(quantized.get("hf_model_dir"))
        path = storage.join(out, "quantized") if servable else out
        return ModelOutput(
            path=path,
            adapter=False,
            base_model=self.sources.base,
            tokenizer=path,
            cutoff_len=trained.cutoff_len if trained else 0,
            stage=trained.stage if trained else "pretrained",
            source=out if servable else None,
        )
