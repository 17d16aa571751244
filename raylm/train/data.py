"""Training data for the workers: a data job's shards, or a raw file tokenized on the fly.

The driver only plans (``make_plan``): it lists the shard files and reads their Parquet
footers, and hands every rank the same ``raylm.train.stream.Plan`` through a one-row Ray
Dataset (``plan_for_every_rank``). Each worker then streams its own slice of the rows
with ``raylm.train.stream.RankStream``: its memory stays flat as the corpus grows, and
its position in the data is a pure function of the step, so exact resume holds. The
order (per-epoch row-group permutation, within-window shuffle, equal contiguous rank
slices) is documented in ``raylm.train.stream``.

Raw files (jsonl/json/parquet/text, or LLaMA-Factory dataset names) are tokenized in
the driver and travel to the workers as one in-memory Parquet file inside the plan:
that is for the small sets one trains on directly. Several registered datasets are
mixed as LLaMA-Factory mixes them (``max_samples`` each, ``mix_strategy``, ``val_size``:
``raylm.data.rows.mix_datasets``), and where every record went is written to the run's
``data_stats.json``. Large corpora go through the data job, whose shards stream.
``data.path`` may be local or in a bucket (``s3://``, ``gs://``) for both.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import pickle
from typing import Any

from raylm import storage
from raylm.config import ConfigError, resolve_model, resolve_path
from raylm.data import hub
from raylm.data.formats import kind_of
from raylm.data.sources import DATASET_INFO, Source, common_root, registry_sources
from raylm.manifest import MANIFEST
from raylm.outputs import DatasetOutput, read_output, tokenizer_hash
from raylm.tokenizer import require_chat_template
from raylm.train.config import STAGE_DATA, TrainJobConfig
from raylm.train.config_rl import RL_STAGES
from raylm.train.grpo import prompt_row

log = logging.getLogger(__name__)

META = "dataset_meta.json"
COLUMNS = {
    "pt": ("input_ids", "loss_mask"),
    "sft": ("input_ids", "loss_mask"),
    "dpo": ("chosen_input_ids", "chosen_loss_mask", "rejected_input_ids", "rejected_loss_mask"),
    "kto": ("input_ids", "loss_mask", "kto_label"),  # + KL_COLUMNS where the data has them
}
COLUMNS["rm"] = COLUMNS["dpo"]  # a reward model trains on preference pairs
STATS = "data_stats.json"
"""Where a raw-data run records each dataset's counts (in its run dir)."""
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
"""Optional precomputed reference log-probs; when present DPO needs no reference model."""
KL_COLUMNS = ("kl_input_ids", "kl_loss_mask")
"""KTO's mismatched pairs (``raylm.data.tokenize.with_kl_rows``): raw rows and the data
job's kto shards have them; kto rows without them pair within the micro batch."""


def deterministic_split() -> Any:
    """A DataConfig that gives every rank the whole (one-row) plan dataset unsplit: each
    worker takes its own slice of the rows itself (``raylm.train.stream``), so no Ray
    Data split or read task ever needs a CPU the training workers hold.

    Built in a function so importing this module does not import Ray (and freeze its
    auth mode).
    """
    from ray.train import DataConfig

    return DataConfig(datasets_to_split=[])


def data_inputs(cfg: TrainJobConfig) -> dict[str, Any]:
    """Describe ``data.path`` (local or a URI): a data job's shards (checked against this
    run) or raw files; ``data.tokenized_path``'s saved set when it holds one."""
    from raylm.train.tokenized import reuse

    if cfg.data.tokenized_path and (saved := reuse(cfg)) is not None:
        return saved
    path = resolve_path(cfg.data.path)
    try:
        is_output = not hub.is_hub(path) and storage.is_dir(path)
        is_output = is_output and any(
            storage.exists(storage.join(path, n)) for n in (MANIFEST, META)
        )
    except OSError as err:  # a bucket without credentials, an unreachable endpoint
        raise ConfigError(f"data.path={cfg.data.path!r} cannot be read: {err}") from None
    if is_output:
        if cfg.data.val_size or cfg.data.eval_datasets:
            raise ConfigError(
                f"data.val_size / data.eval_datasets hold examples out of raw datasets, but "
                f"data.path={cfg.data.path!r} is a data job's shards, all trained on; unset "
                "them (and score final/ with the eval job), or train from the raw files"
            )
        output = dataset_output(path, cfg)
        check_dataset(output, cfg, path)
        return {"kind": "shards", "path": path, "output": output}
    sources = raw_sources(path, cfg, list(dict.fromkeys(cfg.data.datasets)))
    evals = raw_sources(path, cfg, cfg.data.eval_datasets) if cfg.data.eval_datasets else []
    paths = [s.path for s in sources]
    common = paths[0] if len(paths) == 1 else common_root(paths).rstrip("/")
    return {"kind": "raw", "path": common, "sources": sources, "eval_sources": evals}


def dataset_output(path: str, cfg: TrainJobConfig) -> DatasetOutput:
    """What the data job recorded in its manifest about the shards in ``path``."""
    try:
        return read_output(DatasetOutput, path)
    except ConfigError as err:
        raise ConfigError(
            f"data.path={cfg.data.path!r} looks like a data job's output but {err}; "
            "(re-)run the data job that writes it"
        ) from None


def check_dataset(output: DatasetOutput, cfg: TrainJobConfig, path: str) -> None:
    """Shards fit this run: its stage, tokenized with its model's tokenizer at its cutoff."""
    cfg.loss.raw_only(cfg.model.default_system, where := f"data.path={cfg.data.path!r}")
    if output.task != STAGE_DATA.get(cfg.stage, cfg.stage):
        raise ConfigError(
            f"{where} holds {output.task!r} data but stage={cfg.stage!r}; "
            "run the data job with the matching kind or change stage"
        )
    if not output.tokenized:
        raise ConfigError(
            f"{where} holds untokenized shards; set the data job's "
            "tokenize option (with this model's tokenizer) or point data.path at a raw file"
        )
    check_tokenization(output, cfg)
    if not shard_files(path):
        raise ConfigError(f"{where}: no shards/part-*.parquet in {path}")


def shard_files(path: str) -> list[str]:
    """Names of the data job's shard files under ``path/shards``, sorted."""
    names = storage.listdir(storage.join(path, "shards"))
    return [n for n in names if n.startswith("part-") and n.endswith(".parquet")]


def check_tokenization(output: DatasetOutput, cfg: TrainJobConfig) -> None:
    """Token ids mean nothing to a model with another vocabulary, and rows longer or
    shorter than ``data.cutoff_len`` are not what this run's config says it trains on.

    Tokenizers are compared by the hash of their files and named chat template (two paths
    to one tokenizer agree; shards rendered with another template do not); a hub id that
    is not on disk compares by name.
    """
    model = resolve_model(cfg.model.name_or_path)
    same_tokenizer = tokenizer_hash(model, cfg.model.template) == output.tokenizer_hash
    same_cutoff = output.cutoff_len == cfg.data.cutoff_len
    if not (same_tokenizer and same_cutoff):
        raise ConfigError(_mismatch(output, cfg, model, same_tokenizer, same_cutoff))


def _mismatch(
    output: DatasetOutput, cfg: TrainJobConfig, model: str, same_tokenizer: bool, same_cutoff: bool
) -> str:
    """Both sides, and the two ways out: re-tokenize for this run, or run to fit the data."""
    want = cfg.model.template
    same_template = output.template == want
    same_files = same_tokenizer or (
        not same_template and _files_hash(model, output.template) == output.tokenizer_hash
    )
    edited = not same_files and output.tokenizer == model
    fixes = [] if same_files else [f"tokenize.tokenizer={model}"]
    fixes += [] if same_template else [f"tokenize.template={want or 'null'}"]
    fixes += [] if same_cutoff else [f"tokenize.cutoff_len={cfg.data.cutoff_len}"]
    fit = [] if same_template else [f"model.template={output.template or 'null'}"]
    fit += [] if same_cutoff else [f"data.cutoff_len={output.cutoff_len}"]
    if same_files:
        instead = "set " + " ".join(fit)
    else:
        instead = "train a model that uses that tokenizer" + (
            f" with {' '.join(fit)}" if fit else ""
        )
    return (
        f"data.path={cfg.data.path!r} was tokenized with {output.tokenizer}"
        f"{_template(output.template, same_template)}"
        f"{' (its tokenizer files changed since)' if edited else ''} "
        f"(cutoff_len {output.cutoff_len}) but this run trains {model}"
        f"{_template(want, same_template)} with "
        f"data.cutoff_len={cfg.data.cutoff_len}; re-run the data job with "
        f"{' '.join(fixes)}, or {instead}"
    )


def _files_hash(model: str, template: str | None) -> str | None:
    """This model's hash with the data's template: equal when only the template differs."""
    try:
        return tokenizer_hash(model, template)
    except ConfigError:  # a template name this raylm does not know
        return None


def _template(name: str | None, same: bool) -> str:
    if same:
        return ""
    return f" (template {name})" if name else " (its own chat template)"


def raw_sources(path: str, cfg: TrainJobConfig, names: list[str]) -> list[Source]:
    """The files of ``names`` in the ``dataset_info.json`` at ``path`` (a dir or the file),
    else a raw file, or a dataset name resolved through the ``dataset_info.json`` beside
    it: the data job's own resolution (``raylm.data.sources.registry_sources``).

    Sources are named by their full path, so an error names the file and line.
    """
    if hub.is_hub(path):  # a Hub dataset repo: its registry, the named datasets fetched
        info, registry = hub.resolve(path, names)
        found = registry_sources(info, names, cfg.data.format, registry)
    elif names:
        is_file = path.endswith(".json") and not storage.is_dir(path)
        found = registry_sources(path if is_file else storage.join(path, DATASET_INFO), names,
                                 cfg.data.format)  # fmt: skip
    elif storage.exists(path) and not storage.is_dir(path):
        found = [Source(path, path, cfg.data.format)]
    elif storage.exists(
        registry := storage.join(path.rstrip("/").rpartition("/")[0], DATASET_INFO)
    ):
        found = registry_sources(registry, [path.rstrip("/").rpartition("/")[2]], cfg.data.format)
    else:
        raise ConfigError(
            f"data.path={cfg.data.path!r}: expected a data job output dir (with {MANIFEST}), a "
            "jsonl/json/parquet/text file, or a dataset named in a dataset_info.json; "
            f"found nothing at {path}"
        )
    for src in found:
        _check_kind(src, cfg.stage)
    return [dataclasses.replace(s, name=s.path) for s in found]


def _check_kind(src: Source, stage: str) -> None:
    """A registered dataset made for another stage fails before any record is read (as
    LLaMA-Factory refuses a ``ranking`` dataset outside rm/dpo); pt reads any text."""
    what = f"dataset {src.dataset or src.path!r}"
    if "kto_tag" in src.columns and stage != "kto":
        raise ConfigError(
            f"{what} is KTO feedback data (kto_tag {src.columns['kto_tag']!r}: one answer "
            f"and a good/bad label per row) but stage={stage!r}; train it with stage kto"
        )
    kind = STAGE_DATA.get(stage, stage)
    found = "kto" if "kto_tag" in src.columns else kind_of(src.fmt) if src.fmt != "auto" else kind
    if stage not in ("pt", *RL_STAGES) and found != kind:  # RL reads prompts of any shape
        raise ConfigError(f"{what} is {found} data ({src.fmt}) but stage={stage!r}")


def tokenize_record(
    record: Any, src: Source, stage: str, tok: Any, cutoff: int, template: str = "of the tokenizer",
    **sft: bool,
) -> dict:  # fmt: skip
    """One raw record -> the shard columns, through raylm.data (the one record and
    tokenizer path). As in LLaMA-Factory, the stage decides how a record reads: pt takes
    its text (or the ``prompt`` column a registry names), whatever its formatting. A KTO
    example keeps its label (``kto_label``); ``template`` names the chat template in errors;
    ``sft``: the sft masks' ``train_on_prompt`` / ``mask_history`` (``loss.*``)."""
    from raylm.data.formats import payload_kind, to_payload
    from raylm.data.tokenize import check_tools_rendered, tokenize_payload
    from raylm.train.kto import tokenize_kto

    fmt, kind = "text" if stage == "pt" else src.fmt, STAGE_DATA.get(stage, stage)
    payload = to_payload(record, fmt, src.columns, "text", kind=kind)
    found = payload_kind(payload)
    if found != kind:
        raise ValueError(f"record is {found} data but stage={stage!r}")
    if "messages" in payload:
        try:
            check_tools_rendered(payload["messages"], tok, payload.get("tools"))
        except ValueError as err:
            raise ConfigError(
                f"dataset {src.dataset or src.path!r} has tool calls, but the chat template "
                f"{template} {err}; use a template that renders tools and tool_calls (e.g. "
                "the model's own Qwen2.5/Qwen3 or Llama 3.1 template via model.template=null)"
            ) from None
    if found == "kto":  # the label judges the last answer: only it is a target
        return tokenize_kto(payload, tok, cutoff)
    return tokenize_payload(payload, tok, cutoff, **sft)


def build_dataset(cfg: TrainJobConfig, source: dict[str, Any]):
    """The one-row Ray Dataset every worker gets whole: the pickled ``Plan`` and the tokenized
    held-out rows; a raw-data run's counts go to ``data_stats.json`` in the run dir."""
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    plan = make_plan(cfg, source)
    if "stats" in source:
        write_stats(cfg, source["stats"])
    held_out = pickle.dumps(source.get("held_out") or [])  # raylm.train.evaluate
    return ray.data.from_items([{"plan": pickle.dumps(plan), "held_out": held_out}])


def write_stats(cfg: TrainJobConfig, stats: dict[str, Any]) -> str:
    """``data_stats.json`` in the run dir (local or a bucket); returns its path."""
    from raylm.train.config import run_dir_of

    path = storage.join(run_dir_of(cfg), STATS)
    storage.write_text(path, json.dumps(stats, indent=2, ensure_ascii=False))
    return path


def make_plan(cfg: TrainJobConfig, source: dict[str, Any]):
    """Where every rank's rows come from: the shards' row groups, or the tokenized raw
    rows as one in-memory Parquet file."""
    import pyarrow as pa

    from raylm.train.stream import plan_of_table

    window = cfg.data.shuffle_row_groups
    if source["kind"] == "shards":  # a saved tokenized set has max_samples applied
        return plan_shards(source["path"], cfg.stage, source.get("limit", cfg.data.max_samples),
                           window)  # fmt: skip
    rows = _tokenize_raw(cfg, source)
    if cfg.data.tokenized_path:  # the first run of a tokenized_path: save, then train
        from raylm.train.tokenized import save

        save(cfg, source, rows)
    return plan_of_table(pa.Table.from_pylist(rows), window)


def plan_shards(path: str, stage: str, limit: int | None, window: int):
    """Row groups of the data job's shards, from their Parquet footers only (a few KiB
    per file, local or in a bucket); columns the stage needs must all be there."""
    import pyarrow.parquet as pq

    from raylm.train.stream import Plan, pieces_of

    base = storage.join(path, "shards")
    names = shard_files(path)
    fs, root = storage.filesystem(base)
    groups, schema = [], None
    for name in names:
        meta = pq.ParquetFile(f"{root}/{name}", filesystem=fs).metadata
        groups.append([meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
        schema = schema or meta.schema.to_arrow_schema()
    have = set(schema.names) if schema is not None else set()
    missing = [c for c in COLUMNS[stage] if c not in have]
    if missing:
        raise ConfigError(
            f"{base}/{names[0]} lacks columns {missing} that stage={stage} needs; "
            f"it has {sorted(have)}"
        )
    optional = ("position_ids", *REF_COLUMNS, *KL_COLUMNS, "id")
    columns = tuple(c for c in (*COLUMNS[stage], *optional) if c in have)
    return Plan(base, tuple(names), pieces_of(groups, limit), columns, window)


def _tokenize_raw(cfg: TrainJobConfig, source: dict[str, Any]) -> list[dict[str, Any]]:
    """Read, mix and tokenize raw datasets in the driver; a bad record stops the job
    naming it. The counts go to ``source["stats"]`` (``data_stats.json``).

    Fine for the small sets one trains on directly; large corpora go through the data
    job, which quarantines bad records instead of stopping. Rows are numbered in mixed
    order (their ids in the sample audit); that order is the canonical one the stream
    shuffles per epoch.
    """
    from raylm.data.rows import BadRow
    from raylm.train.model import load_tokenizer

    tok = load_tokenizer(cfg)
    require_chat_template(tok, STAGE_DATA.get(cfg.stage, cfg.stage), "model.template")
    try:
        train = _mixed(source["sources"], cfg, cfg.data.val_size, cfg.data.mix_strategy)
        evals = _mixed(source.get("eval_sources") or [], cfg, 0, "concat")
    except BadRow as err:
        raise ConfigError(str(err)) from None
    rows = _tokenized(train.train, cfg, tok, "")
    if not rows:
        raise ConfigError(f"data.path={cfg.data.path!r}: no records")
    source["held_out"] = _tokenized([*train.held_out, *evals.train], cfg, tok, "eval-")
    source["stats"] = data_stats(cfg, train, evals)
    return rows


def _tokenized(records: list[Any], cfg: TrainJobConfig, tok: Any, prefix: str) -> list[dict]:
    """Rows numbered ``prefix`` + position; KTO rows also get another row's answer for
    each prompt (KTO's KL estimate, ``with_kl_rows``)."""
    template = repr(cfg.model.template) if cfg.model.template else f"of {cfg.model.name_or_path}"
    rows, sft = [], cfg.loss.masks
    read = prompt_row if cfg.stage in RL_STAGES else tokenize_record  # RL: prompts, columns
    for i, (ident, record, src) in enumerate(records):
        try:
            row = read(record, src, cfg.stage, tok, cfg.data.cutoff_len, template, **sft)
        except ValueError as err:
            raise ConfigError(f"{ident}: {err}") from None
        rows.append({"id": f"{prefix}{i}", **row})
    if cfg.stage == "kto" and rows:
        from raylm.train.kto import with_kl_rows

        rows = with_kl_rows(rows, cfg.data.cutoff_len)
    return rows


def _mixed(sources: list[Source], cfg: TrainJobConfig, val_size: float, strategy: str):
    """``raylm.data.rows.Mixed`` of the sources' datasets; a dataset still holding
    ``{{placeholders}}`` after ``data.replacements`` is named in a warning."""
    from raylm.data.rows import dataset_records, mix_datasets

    data = dataset_records(sources, cfg.data.replacements, cfg.data.max_samples)
    for name, keys in sorted(data.placeholders.items()):
        marks = ", ".join("{{" + k + "}}" for k in sorted(keys))
        log.warning(
            "dataset %r holds placeholders %s that data.replacements does not fill "
            "(e.g. data.replacements.%s=...); they are trained on as written",
            name, marks, sorted(keys)[0],
        )  # fmt: skip
    probs = cfg.data.interleave_probs if strategy == cfg.data.mix_strategy else None
    return mix_datasets(data, strategy, probs, val_size, cfg.train.seed)


def data_stats(cfg: TrainJobConfig, train: Any, evals: Any) -> dict[str, Any]:
    """``data_stats.json`` (``raylm.data.rows.stats_document``) with the settings behind it."""
    from raylm.data.rows import stats_document

    d = cfg.data
    settings = {"mix_strategy": d.mix_strategy, "interleave_probs": d.interleave_probs,
                "max_samples": d.max_samples, "val_size": d.val_size, "seed": cfg.train.seed}  # fmt: skip
    stats = stats_document(train, evals, settings)
    stats["held_out_evaluated"] = bool(stats["held_out_rows"]) and cfg.eval.strategy != "no"
    for c in stats["datasets"]:
        log.info("data: %s", c)
    if stats["held_out_rows"] and cfg.eval.strategy == "no":
        log.warning(
            "data: %d examples held out (data.val_size / data.eval_datasets), counted in %s, "
            "and never scored: eval.strategy=no",
            stats["held_out_rows"], STATS,
        )  # fmt: skip
    return stats


def open_stream(shard: Any, cfg: TrainJobConfig, rank: int, world: int):
    """This rank's ``RankStream`` from the plan dataset a worker got (``build_dataset``).

    Anything else iterable as rows (bench/train.py's torchrun ranks hand each rank its
    own list of tokenized rows) is taken as this rank's rows, held in memory.
    """
    import pyarrow as pa

    from raylm.train.stream import RankStream, plan_of_table

    rows = list(itertools.islice(shard.iter_rows(), 2))
    if len(rows) == 1 and "plan" in rows[0]:
        plan = pickle.loads(rows[0]["plan"])
    else:
        table = pa.Table.from_pylist(list(shard.iter_rows()))
        plan, rank, world = plan_of_table(table, cfg.data.shuffle_row_groups), 0, 1
    missing = [c for c in COLUMNS.get(cfg.stage, ()) if plan.rows and not plan.has_columns([c])]
    if missing:
        raise ConfigError(f"training data lacks columns {missing} needed by stage={cfg.stage}")
    per_step = cfg.train.micro_batch_size * cfg.train.grad_accum
    return RankStream(plan, cfg.train.seed, rank, world, per_step)
