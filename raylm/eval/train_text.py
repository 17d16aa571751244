"""Where the training text behind a model is: the files its lineage names, and their
records as text (``raylm.eval.contamination`` scans them).

The train run whose output is the evaluated model (its ``manifest.json`` in the model dir
or above it, as ``final/`` sits in the run dir), its data input (raw files; a
LLaMA-Factory registry's trained datasets; a data job's output dir), and, through a data
job's manifest, the raw files it read when its shards are tokenized (untokenized shards
are read as they are). A base model that is itself a train run's output is followed too.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from raylm import storage
from raylm.config import ConfigError, resolve_path
from raylm.manifest import MANIFEST, Manifest

_SKIP_KEYS = {"id", "role", "from", "tools", "kto_label", "name", "tool_calls"}


@dataclass(frozen=True)
class TrainSource:
    """One training file to scan and how to read its records."""

    path: str
    fmt: str = "auto"
    columns: dict[str, str] = field(default_factory=dict)
    via: str = ""
    """Where it was found: ``train_data`` or the manifest that names it."""


def find_sources(model: str, train_data: list[str]) -> list[TrainSource]:
    """The training files to scan: ``train_data`` when given, else the model's lineage."""
    if train_data:
        found: list[TrainSource] = []
        for p in train_data:
            found += _path_sources(resolve_path(p), "contamination.train_data", set())
    else:
        found = lineage_sources(model, set())
    unique = {s.path: s for s in found}
    return list(unique.values())


def lineage_sources(model: str, seen: set[str]) -> list[TrainSource]:
    """The training files the manifests above ``model`` name (empty when none does)."""
    found = _run_of(model)
    if found is None:
        return []
    run_dir, manifest = found
    return _manifest_sources(run_dir, manifest, seen)


def _norm(path: str) -> str:
    return path.rstrip("/") if storage.is_remote(path) else os.path.normpath(path)


def _parent(path: str) -> str:
    return path.rstrip("/").rpartition("/")[0] if storage.is_remote(path) else os.path.dirname(path)


def _run_of(model: str, levels: int = 3) -> tuple[str, Manifest] | None:
    """The job dir whose succeeded manifest produced ``model``: the model dir itself, or
    a dir above it whose recorded output (or merged model) is ``model``."""
    target, d = _norm(model), _norm(model)
    for _ in range(levels):
        m = Manifest.read(d) if storage.exists(storage.join(d, MANIFEST)) else None
        if m is not None and m.status == "succeeded" and m.job != "eval":
            out = m.output or {}
            paths = {_norm(str(out[k])) for k in ("path", "merged") if out.get(k)}
            if d == target or target in paths:
                return d, m
        up = _parent(d)
        if not up or up == d:
            break
        d = up
    return None


def _is_model(path: str) -> bool:
    return any(
        storage.is_file(storage.join(path, f)) for f in ("config.json", "adapter_config.json")
    )


def _manifest_sources(run_dir: str, m: Manifest, seen: set[str]) -> list[TrainSource]:
    if run_dir in seen:
        return []
    seen.add(run_dir)
    via = storage.join(run_dir, MANIFEST)
    if m.job == "data":
        return _data_sources(run_dir, m, via)
    found: list[TrainSource] = []
    for p in m.inputs:
        if not storage.exists(p):
            continue
        if storage.is_dir(p) and storage.exists(storage.join(p, MANIFEST)):
            sub = _run_of(p, 1)
            if sub is not None:
                found += _manifest_sources(sub[0], sub[1], seen)
                continue
        if storage.is_dir(p) and _is_model(p):
            found += lineage_sources(p, seen)  # a base that was itself trained here
        elif m.job == "train":
            found += _raw_sources(p, (m.config or {}).get("data") or {}, via)
    return found


def _data_sources(run_dir: str, m: Manifest, via: str) -> list[TrainSource]:
    """Untokenized shards as they are; tokenized ones through the raw files read."""
    meta = m.output or {}
    shards = storage.join(run_dir, "shards")
    if not meta.get("tokenized", True) and storage.exists(shards):
        return [TrainSource(f, via=via) for f in _files(shards) if f.endswith(".parquet")]
    from raylm.data.sources import expand_inputs

    cfg = m.config or {}
    try:
        srcs = expand_inputs(list(cfg.get("inputs") or []), cfg.get("format", "auto"),
                             dict(cfg.get("columns") or {}))  # fmt: skip
        return [TrainSource(s.path, s.fmt, dict(s.columns), via) for s in srcs]
    except ConfigError:  # moved since: the recorded file paths, read as auto
        return [TrainSource(p, via=via) for p in m.inputs if storage.exists(p)]


def _raw_sources(path: str, data: dict[str, Any], via: str) -> list[TrainSource]:
    """A train run's raw data input: a file, a registry's trained datasets, or a dir."""
    from raylm.data.sources import DATASET_INFO, registry_sources

    fmt = data.get("format") or "auto"
    if storage.is_file(path):
        return [TrainSource(path, fmt, via=via)]
    declared = resolve_path(str(data.get("path") or ""))
    for reg in (declared, storage.join(declared, DATASET_INFO) if declared else "",
                storage.join(path, DATASET_INFO)):  # fmt: skip
        if reg and reg.endswith(DATASET_INFO) and storage.is_file(reg):
            names = list(data.get("datasets") or [])
            if not names:
                held = set(data.get("eval_datasets") or [])
                names = [n for n in json.loads(storage.read_text(reg)) if n not in held]
            srcs = registry_sources(reg, names, fmt)
            return [TrainSource(s.path, s.fmt, dict(s.columns), via) for s in srcs]
    return [TrainSource(f, fmt, via=via) for f in _files(path)]


def _path_sources(path: str, via: str, seen: set[str]) -> list[TrainSource]:
    """An explicit ``train_data`` entry: a job dir (data or train run), a model dir (its
    lineage), a registry (``dataset_info.json[#a,b]`` or a dir holding one), a file or dir."""
    from raylm.data.sources import DATASET_INFO, registry_sources

    base, _, names = path.partition("#")
    if base.endswith(DATASET_INFO):
        return [TrainSource(s.path, s.fmt, dict(s.columns), via)
                for s in registry_sources(base, [n for n in names.split(",") if n])]  # fmt: skip
    if not storage.exists(path):
        raise ConfigError(f"contamination.train_data: nothing at {path}")
    if storage.is_dir(path):
        if storage.exists(storage.join(path, MANIFEST)):
            m = Manifest.read(path)
            if m is not None and m.job in ("data", "train"):
                return _manifest_sources(_norm(path), m, seen)
        if _is_model(path):
            return lineage_sources(path, seen)
        if storage.is_file(storage.join(path, DATASET_INFO)):
            return _path_sources(storage.join(path, DATASET_INFO), via, seen)
    return [TrainSource(f, via=via) for f in _files(path)]


def _files(path: str) -> list[str]:
    from raylm.data.sources import list_files

    files = list_files(path) if storage.is_dir(path) else [path]
    return [f for f in files if os.path.basename(f) not in (MANIFEST, "dataset_meta.json")]


# ---- reading training text, streamed --------------------------------------------------


def _open(path: str, random_access: bool = False) -> Any:
    if storage.is_remote(path):
        fs, inner = storage.filesystem(path)
        return fs.open_input_file(inner) if random_access else fs.open_input_stream(inner)
    return open(path.removeprefix("file://"), "rb")


def iter_documents(src: TrainSource) -> Iterator[tuple[str, str]]:
    """(``file:line`` or ``file:#row``, text) of every record of one training file."""
    from raylm.data.sources import file_kind

    kind = file_kind(src.path)
    if kind == "parquet":
        import pyarrow.parquet as pq

        with _open(src.path, random_access=True) as f:  # footer, then one batch at a time
            pf = pq.ParquetFile(f)
            row = 0
            for batch in pf.iter_batches(batch_size=1024):
                for rec in batch.to_pylist():
                    yield f"{src.path}:#{row}", record_text(rec, src)
                    row += 1
        return
    with _open(src.path) as f:
        stream = io.TextIOWrapper(f, encoding="utf-8", errors="replace")
        if kind == "json":
            text = stream.read()
            try:
                value = json.loads(text)
                recs = value if isinstance(value, list) else [value]
                for i, rec in enumerate(recs):
                    yield f"{src.path}:#{i}", record_text(rec, src)
                return
            except json.JSONDecodeError:
                stream = io.StringIO(text)  # JSON Lines under a .json name
                kind = "jsonl"
        if kind == "jsonl":
            for n, line in enumerate(stream, 1):
                if line.strip():
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        rec = line  # scanned as text: a broken line still holds words
                    yield f"{src.path}:{n}", record_text(rec, src)
            return
        block: list[str] = []  # plain text: one document per blank-line-separated block
        start = 1
        for n, line in enumerate(stream, 1):
            if line.strip():
                start = n if not block else start
                block.append(line)
            elif block:
                yield f"{src.path}:{start}", "".join(block)
                block = []
        if block:
            yield f"{src.path}:{start}", "".join(block)


def record_text(rec: Any, src: TrainSource) -> str:
    """The text a training record trains on: its canonical payload's strings (the data
    and train jobs' own reading, ``raylm.data.formats.to_payload``), else every string."""
    from raylm.data.formats import to_payload

    if isinstance(rec, dict):
        try:
            return "\n".join(strings(to_payload(rec, src.fmt, src.columns, "text")))
        except (ValueError, KeyError, TypeError):
            pass
    return "\n".join(strings(rec))


def strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            if k not in _SKIP_KEYS:
                yield from strings(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from strings(v)


# ---- eval examples ---------------------------------------------------------------------
