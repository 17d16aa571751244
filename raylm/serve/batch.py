"""Offline batch inference: Ray Data reads prompts, ``ray.data.llm`` runs vLLM, Parquet out.

Ray Data's LLM processor chains CPU stages (chat template, tokenize, detokenize) around
one vLLM engine actor per worker. With default resources every stage asks for a whole
CPU and the engine for a bundle, which on a 2-CPU node leaves nothing for the stages
feeding it: the pipeline deadlocks. raylm gives each stage a fractional ``num_cpus``
from the config and the engine a CPU-only placement bundle of its own size. The engine's
arguments come from ``raylm.engine``, as for serve and eval.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from raylm import storage
from raylm.config import ConfigError, resolve_model, resolve_path
from raylm.engine import LoraSlots, engine_env, engine_kwargs
from raylm.serve.config_generate import GenerateJobConfig

ERROR_COLUMN = "__inference_error__"
OUTPUT_COLUMNS = ["row_id", "prompt", "completion", "prompt_tokens", "completion_tokens"]


def check_inputs(cfg: GenerateJobConfig) -> None:
    """Every path exists (locally or in a bucket), or a ConfigError naming its key; a
    local ``model`` may also be a hub id (ORG/NAME), as everywhere in raylm."""
    checks = [("lora_path", cfg.lora_path, "adapter_config.json", "a PEFT adapter dir")]
    if storage.is_remote(cfg.model):
        checks.append(("model", cfg.model, "config.json", "a Hugging Face model dir"))
    else:
        resolve_model(cfg.model)
    for key, path, marker, what in checks:
        if path and not _readable(key, storage.join(path, marker)):
            raise ConfigError(f"{key}={path!r} is not {what} (no {marker})")
    from raylm.models.mod_marker import refuse_mod_model

    refuse_mod_model(resolve_model(cfg.model), "model", "generate")  # vLLM: no MoD routers
    if not _readable("input.path", cfg.input.path, exists=True):
        raise ConfigError(f"input.path={cfg.input.path!r} does not exist")


def _readable(key: str, uri: str, exists: bool = False) -> bool:
    try:
        return storage.exists(uri) if exists else storage.is_file(uri)
    except OSError as err:  # unreachable store, no credentials: named, not a traceback
        raise ConfigError(f"{key}: cannot read {uri!r} ({err})") from None


def read_prompts(cfg: GenerateJobConfig) -> Any:
    """The prompts, read by Ray Data straight from the disk or the bucket."""
    import ray.data

    path = resolve_path(cfg.input.path)
    if not storage.exists(path):
        raise ConfigError(f"input.path={path!r} does not exist")
    # A read task asks for a whole CPU by default: on 2 CPUs with an engine running it
    # would wait forever, so it gets the same fraction as the other CPU stages.
    remote = {"num_cpus": cfg.tokenize_stage.num_cpus}
    if path.endswith(".parquet") or storage.is_dir(path):
        ds = ray.data.read_parquet(path, ray_remote_args=remote)
    elif path.endswith((".jsonl", ".json")):
        ds = ray.data.read_json(path, ray_remote_args=remote)
    else:
        raise ConfigError(f"input.path={path!r}: expected .jsonl, .json, .parquet or a directory")
    if cfg.input.prompt_column not in ds.schema().names:
        raise ConfigError(
            f"input.prompt_column={cfg.input.prompt_column!r} is not a column of {path}; "
            f"columns: {ds.schema().names}"
        )
    if cfg.input.limit:
        ds = ds.limit(cfg.input.limit)
    return ds


def processor_config(cfg: GenerateJobConfig) -> Any:
    """ray.data.llm's config; ``cfg.model`` must be a local directory by now (``local_paths``)."""
    from ray.data.llm import vLLMEngineProcessorConfig

    model = resolve_path(cfg.model)
    # ray.data.llm loads a local adapter path as-is; one adapter, of any rank up to 64
    lora = LoraSlots(max_rank=64, max_loras=1) if cfg.lora_path else None
    cpu = {"num_cpus": cfg.tokenize_stage.num_cpus, "concurrency": cfg.tokenize_stage.concurrency}
    bundles = [{"CPU": cfg.engine_stage.num_cpus}] * cfg.engine.tensor_parallel_size
    return vLLMEngineProcessorConfig(
        model_source=model,
        engine_kwargs=engine_kwargs(cfg.engine, model, lora=lora),
        runtime_env={"env_vars": engine_env(cfg.engine)},
        batch_size=cfg.batch_size,
        concurrency=cfg.engine_stage.concurrency,
        placement_group_config={"bundles": bundles},
        chat_template_stage={"enabled": cfg.input.chat, **cpu},
        tokenize_stage={"enabled": True, **cpu},
        detokenize_stage={"enabled": True, **cpu},
        should_continue_on_error=True,
        max_concurrent_batches=2,
    )


def _preprocess(cfg: GenerateJobConfig) -> Any:
    column, chat, lora_path = cfg.input.prompt_column, cfg.input.chat, cfg.lora_path
    sampling = {
        "max_tokens": cfg.sampling.max_tokens,
        "temperature": cfg.sampling.temperature,
        "top_p": cfg.sampling.top_p,
    }
    for key in ("seed", "top_k", "repetition_penalty"):
        if getattr(cfg.sampling, key) is not None:
            sampling[key] = getattr(cfg.sampling, key)
    if cfg.sampling.stop_token_ids:
        sampling["stop_token_ids"] = list(cfg.sampling.stop_token_ids)
    lora = resolve_path(lora_path) if lora_path else None

    def pre(row: dict[str, Any]) -> dict[str, Any]:
        text = row[column]
        out: dict[str, Any] = {
            "row_id": row["row_id"],
            "source_prompt": str(text),
            "sampling_params": sampling,
        }
        if chat:
            msgs = text if isinstance(text, list) else [{"role": "user", "content": str(text)}]
            out["messages"] = msgs
        else:
            out["prompt"] = str(text)
        if lora:
            out["model"] = lora  # a local path is loaded as-is by ray.data.llm
        return out

    return pre


def _postprocess(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "row_id": row["row_id"],
        "prompt": row["source_prompt"],
        "completion": row.get("generated_text", ""),
        "prompt_tokens": int(row.get("num_input_tokens", 0)),
        "completion_tokens": int(row.get("num_generated_tokens", 0)),
    }


class _RowIds:
    """One actor numbers every row, so each output (or failure) traces back to its input."""

    def __init__(self) -> None:
        self.next = 0

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        n = len(next(iter(batch.values())))
        batch["row_id"] = np.arange(self.next, self.next + n)
        self.next += n
        return batch


def _with_row_ids(ds: Any) -> Any:
    """Blocks reach the numbering actor in input order only if Ray Data preserves order.

    It must be set on the dataset's own context: a read copies the global DataContext
    when it is created, so setting the global one afterwards changes nothing and rows
    were numbered in completion order (completions paired with the wrong prompts).
    Order in is not enough: Ray Data lets an actor pool's actors run queued tasks out of
    order (``allow_out_of_order_execution``, on by default for actor pools), which once
    numbered a later block first in CI. So the counting actor is sent one block at a
    time: with nothing queued behind it, there is nothing to reorder.
    """
    from ray.data import ActorPoolStrategy

    ds.context.execution_options.preserve_order = True
    # one counter, so ids are consecutive; one block in flight, so they follow the input
    one_actor = ActorPoolStrategy(size=1, max_tasks_in_flight_per_actor=1)
    return ds.map_batches(_RowIds, batch_format="numpy", num_cpus=0.1, compute=one_actor)


def local_paths(cfg: GenerateJobConfig) -> GenerateJobConfig:
    """``cfg`` with a model and adapter in a bucket replaced by copies on this node.

    vLLM loads local directories only. The copy is made where the job runs, and the
    engine actors get its path: on one node (or with ``RAYLM_HOME`` on shared storage)
    they see it; on a multi-node cluster without that, keep the model on shared storage.
    """
    model = storage.local_dir(resolve_path(cfg.model), key="model")
    lora = (
        storage.local_dir(resolve_path(cfg.lora_path), key="lora_path") if cfg.lora_path else None
    )
    return dataclasses.replace(cfg, model=model, lora_path=lora)


def run_generate(cfg: GenerateJobConfig, out_dir: str) -> dict[str, Any]:
    """Generate for every prompt; write predictions/ and quarantine/ (failed rows), on
    disk or in a bucket."""
    import pyarrow.compute as pc
    from ray.data.llm import build_processor

    ds = _with_row_ids(read_prompts(cfg))
    cfg = local_paths(cfg)
    small = {"num_cpus": cfg.tokenize_stage.num_cpus}
    processor = build_processor(
        processor_config(cfg),
        preprocess=_preprocess(cfg),
        postprocess=_keep_errors,
        preprocess_map_kwargs=small,
        postprocess_map_kwargs=small,
    )
    table = processor(ds).to_arrow_refs()
    import ray

    full = _concat([ray.get(t) for t in table])
    failed_mask = pc.invert(pc.equal(pc.fill_null(full[ERROR_COLUMN], ""), ""))
    good = full.filter(pc.invert(failed_mask)).sort_by("row_id")
    bad = full.filter(failed_mask).sort_by("row_id")
    _write_parquet(good.select(OUTPUT_COLUMNS), out_dir, "predictions", "part-00000.parquet")
    if bad.num_rows:
        # Failed rows skip postprocess, so their prompt is still in source_prompt.
        keep = [
            c for c in ("row_id", "source_prompt", "prompt", ERROR_COLUMN) if c in bad.column_names
        ]
        _write_parquet(bad.select(keep), out_dir, "quarantine", "failed.parquet")
    return {
        "rows_in": full.num_rows,
        "rows_out": good.num_rows,
        "rows_failed": bad.num_rows,
        "prompt_tokens": int(pc.sum(good["prompt_tokens"]).as_py() or 0),
        "completion_tokens": int(pc.sum(good["completion_tokens"]).as_py() or 0),
    }


def _write_parquet(table: Any, out_dir: str, folder: str, name: str) -> None:
    """One Parquet file under ``out_dir/folder`` through ``raylm.storage`` (disk or bucket)."""
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(storage.join(out_dir, folder, name))
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(table, path, filesystem=fs)


def _keep_errors(row: dict[str, Any]) -> dict[str, Any]:
    return _postprocess(row) | {ERROR_COLUMN: str(row.get(ERROR_COLUMN) or "")}


def _concat(tables: list[Any]) -> Any:
    import pyarrow as pa

    return pa.concat_tables([t for t in tables if t.num_rows], promote_options="default")
