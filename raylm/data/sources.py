"""Which files a job reads and in which record format (driver side: paths, never bytes).

The data job and the train job both come here: an input is a file, a directory, a glob,
or a dataset registered in a LLaMA-Factory ``dataset_info.json``, each local or in a
bucket (``s3://b/corpus/*.jsonl``, ``gs://b/data/dataset_info.json#alpaca``); what comes
back is a list of ``Source`` (one file, its format, its column names). Bucket paths go
through ``raylm.storage`` and never through ``pathlib`` (which collapses ``s3://``).
``registry_sources`` is the one reader of ``dataset_info.json``, so a registry means the
same to both jobs.
"""

from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raylm import storage
from raylm.config import ConfigError, resolve_path
from raylm.data.formats import FORMATS

DATASET_INFO = "dataset_info.json"

EXTENSIONS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".txt": "text",
    ".md": "text",
    ".text": "text",
}


@dataclass
class Source:
    """One input file and how to interpret its records."""

    path: str
    """Local path or URI of the file."""

    name: str
    """Short name used in ids (relative to the input's root)."""

    fmt: str
    """Record format, or ``auto`` to detect per record."""

    columns: dict[str, str] = field(default_factory=dict)
    """Canonical name -> record key."""

    dataset: str = ""
    """The dataset the file belongs to (its registry name; ``""`` outside a registry):
    what ``max_samples``, mixing and per-source counts work on."""

    def for_task(self) -> dict[str, str]:
        """The plain dict a read task gets (columns as JSON: one Arrow-friendly string)."""
        return {
            "path": self.path,
            "name": self.name,
            "fmt": self.fmt,
            "columns": json.dumps(self.columns),
        }


def file_kind(path: str) -> str:
    """jsonl, json, parquet or text; any other extension is read as plain text."""
    ext = os.path.splitext(path)[1].lower()
    return EXTENSIONS.get(ext, "text")


def expand_inputs(inputs: list[str], fmt: str, columns: dict[str, str]) -> list[Source]:
    """Every input file, expanding globs, directories and LLaMA-Factory registries."""
    sources: list[Source] = []
    for spec in inputs:
        path, _, names = spec.partition("#")
        if os.path.basename(path) == DATASET_INFO:
            wanted = [n for n in names.split(",") if n]
            sources += registry_sources(resolve_path(path), wanted, fmt)
            continue
        try:
            files = list_files(path)
        except OSError as err:  # a bucket without credentials, an unreachable endpoint
            raise ConfigError(f"input {spec!r} cannot be listed: {err}") from None
        if not files:
            raise ConfigError(f"input {spec!r} matches no file")
        root = common_root(files)
        sources += [Source(f, _rel(f, root), fmt, dict(columns)) for f in files]
    names_seen = [s.name for s in sources]
    if len(set(names_seen)) != len(names_seen):  # ids must stay unique across inputs
        sources = [Source(s.path, s.path, s.fmt, s.columns, s.dataset) for s in sources]
    return sources


def _rel(path: str, root: str) -> str:
    if storage.is_remote(path):
        return path.removeprefix(root).lstrip("/") if root else path
    return os.path.relpath(path, root)


def common_root(files: list[str]) -> str:
    """The directory the files' short names are relative to (URIs: their common prefix
    up to a ``/``, so names stay unique and readable)."""
    if not storage.is_remote(files[0]):
        return os.path.dirname(files[0]) if len(files) == 1 else os.path.commonpath(files)
    common: list[str] = []
    for level in zip(*(f.split("/")[:-1] for f in files), strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return "/".join(common) + "/"


def _beside(path: str, name: str) -> str:
    """``name`` in the directory of ``path`` (a registry's ``file_name``), local or URI."""
    if storage.is_remote(path):
        return storage.join(path.rpartition("/")[0], name)
    return os.path.join(os.path.dirname(path), name)


def _is_glob(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def list_files(spec: str) -> list[str]:
    """The files a path, directory, glob or URI names, sorted; hidden files skipped."""
    if storage.is_remote(spec):
        return _list_uri(spec)
    path = resolve_path(spec.removeprefix("file://"))
    if _is_glob(path):
        return sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
    if os.path.isdir(path):
        return sorted(
            str(p) for p in Path(path).rglob("*") if p.is_file() and not p.name.startswith(".")
        )
    return [path] if os.path.isfile(path) else []


def _list_uri(uri: str) -> list[str]:
    """An object, every object under a prefix, or the objects a glob matches
    (``s3://b/corpus/*.jsonl``; ``**`` crosses ``/``, ``*`` does not), sorted."""
    from pyarrow import fs

    head = uri.partition("://")[0] + "://"
    if not _is_glob(uri):
        filesystem, root = storage.filesystem(uri)
        if filesystem.get_file_info(root).type == fs.FileType.File:
            return [uri]
        return [head + p for p in _objects_under(filesystem, root)]
    cut = min(uri.find(c) for c in "*?[" if c in uri)
    base = uri[:cut].rpartition("/")[0]
    filesystem, root = storage.filesystem(base)
    pattern = _glob_regex(root + uri[len(base) :])
    return [head + p for p in _objects_under(filesystem, root) if pattern.fullmatch(p)]


def _objects_under(filesystem: Any, root: str) -> list[str]:
    """Paths of the non-hidden objects under ``root`` (none if it is absent), sorted."""
    from pyarrow import fs

    if filesystem.get_file_info(root).type != fs.FileType.Directory:
        return []
    infos = filesystem.get_file_info(fs.FileSelector(root, recursive=True))
    return sorted(i.path for i in infos if i.is_file and not i.base_name.startswith("."))


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """A shell glob as a regex, with ``glob``'s meaning of ``/``: ``*`` and ``?`` stay
    within one path level, ``**/`` spans any number of them (none included)."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:[^/]*/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 1 :]:
            end = pattern.index("]", i + 1)
            body = pattern[i + 1 : end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


# ---- LLaMA-Factory's dataset_info.json ---------------------------------------------------


def registry_sources(
    path: str, names: list[str], fmt: str = "auto", registry: dict[str, Any] | None = None
) -> list[Source]:
    """The files of datasets registered in a ``dataset_info.json`` (all when ``names`` is
    empty), each with its format and its columns and tags as one column mapping.

    ``fmt`` is the job's own format setting: it fills in for an entry that declares no
    ``formatting`` (LLaMA-Factory would assume alpaca), and must agree with one that does.
    ``registry``: the file's entries as already read (a Hub repo's, its files fetched:
    ``raylm.data.hub.resolve``).
    """
    registry = _read_registry(path) if registry is None else registry
    wanted = names or list(registry)
    missing = [n for n in wanted if n not in registry]
    if missing:
        raise ConfigError(f"{path} has no dataset(s) {missing}; it has {sorted(registry)}")
    sources = []
    for name in wanted:
        entry = registry[name]
        if "file_name" not in entry:
            raise ConfigError(
                f"{path}: dataset {name!r} needs 'file_name' (hub/script datasets cannot be "
                "read offline); keys present: " + ", ".join(sorted(entry))
            )
        entry_fmt = _entry_format(entry, f"{path}: dataset {name!r}", fmt)
        columns = {**entry.get("columns", {}), **entry.get("tags", {})}
        target = _beside(path, entry["file_name"])
        files = list_files(target)
        if not files:
            raise ConfigError(f"{path}: dataset {name!r} file {target} not found")
        sources += [
            Source(f, f"{name}/{os.path.basename(f)}", entry_fmt, columns, name) for f in files
        ]
    return sources


def _read_registry(path: str) -> dict[str, Any]:
    """The registry's JSON, local or in a bucket; a missing one names the path."""
    try:
        text = storage.read_text(path)
    except FileNotFoundError:
        raise ConfigError(f"dataset registry not found: {path}") from None
    except OSError as err:  # a directory, no credentials, an unreachable endpoint
        raise ConfigError(f"dataset registry {path} cannot be read: {err}") from None
    try:
        registry = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(registry, dict):
        raise ConfigError(f"{path}: expected an object of dataset name -> entry")
    return registry


def _entry_format(entry: dict[str, Any], where: str, fmt: str) -> str:
    """``ranking: true`` makes preference pairs; else ``formatting`` (alpaca by default)."""
    formatting = entry.get("formatting")
    if formatting is not None and formatting not in FORMATS:
        raise ConfigError(
            f"{where}: formatting={formatting!r} is not a record format; "
            f"expected one of {list(FORMATS)}"
        )
    declared = "preference" if entry.get("ranking") else formatting
    if declared is None:
        return "alpaca" if fmt == "auto" else fmt
    if fmt not in ("auto", declared):
        raise ConfigError(
            f"{where} is {declared} data but format={fmt!r}; drop the format setting "
            "or fix the entry's formatting/ranking"
        )
    return declared


# ---- several datasets in one run (LLaMA-Factory's mix_strategy and val_size) --------------

MIX_STRATEGIES = ("concat", "interleave_under", "interleave_over", "interleave_once")
"""LLaMA-Factory's ``mix_strategy``; the interleave ones are Hugging Face
``interleave_datasets`` with stopping_strategy first_exhausted, all_exhausted and
all_exhausted_without_replacement."""


def check_mix(strategy: str, probs: list[float] | None, names: list[str]) -> None:
    """Probabilities must fit the datasets and the strategy, or sampling is undefined
    (Hugging Face would loop forever on a never-drawn dataset it must exhaust)."""
    if probs is None:
        return
    if not strategy.startswith("interleave"):
        raise ConfigError(
            f"data.interleave_probs is set but data.mix_strategy={strategy!r}; use "
            "interleave_under, interleave_over or interleave_once, or drop the probs"
        )
    if len(probs) != len(names):
        raise ConfigError(
            f"data.interleave_probs has {len(probs)} values for {len(names)} "
            f"data.datasets {list(names)}"
        )
    if any(p < 0 for p in probs) or abs(sum(probs) - 1.0) > 1e-6:
        raise ConfigError(f"data.interleave_probs={list(probs)} must be >= 0 and sum to 1")
    if strategy != "interleave_under" and 0 in probs:
        raise ConfigError(
            f"data.mix_strategy={strategy} must exhaust every dataset, but "
            f"data.interleave_probs={list(probs)} never draws one; give it a share"
        )


def mix_order(
    lengths: list[int], strategy: str, probs: list[float] | None, seed: int
) -> list[tuple[int, int]]:
    """``(dataset, row)`` for every example of the mixed set, in the order Hugging Face's
    ``concatenate_datasets`` / ``interleave_datasets`` (datasets 5.x, map-style) give
    them for the same lengths, probabilities and seed: LLaMA-Factory's ``merge_dataset``.
    interleave_over may repeat rows of the shorter datasets; interleave_under leaves the
    rest of the longer ones out."""
    if len(lengths) == 1 or strategy == "concat":
        return [(d, r) for d, n in enumerate(lengths) for r in range(n)]
    if probs is None:
        return _round_robin(lengths, strategy)
    return _sampled(lengths, strategy, probs, seed)


def _round_robin(lengths: list[int], strategy: str) -> list[tuple[int, int]]:
    """One example from each dataset in turn (no probabilities)."""
    datasets = range(len(lengths))
    if strategy == "interleave_under":
        return [(d, r) for r in range(min(lengths)) for d in datasets]
    if strategy == "interleave_over":
        return [(d, r % lengths[d]) for r in range(max(lengths)) for d in datasets]
    return [(d, r) for r in range(max(lengths)) for d in datasets if r < lengths[d]]


def _sampled(
    lengths: list[int], strategy: str, probs: list[float], seed: int
) -> list[tuple[int, int]]:
    """Draw the dataset of each next example, 1000 draws at a time from
    ``default_rng(seed)`` (Hugging Face's loop): a dataset that runs out starts over
    (interleave_over) or is skipped from then on (interleave_once)."""
    import numpy as np

    rng, n = np.random.default_rng(seed), len(lengths)
    once = strategy == "interleave_once"
    stop = any if strategy == "interleave_under" else all
    exhausted, current = [False] * n, [0] * n
    order: list[tuple[int, int]] = []
    while True:
        for drawn in rng.choice(n, size=1000, p=probs):
            d = int(drawn)
            if stop(exhausted):
                return order
            if not (once and exhausted[d]):
                order.append((d, current[d]))
                current[d] += 1
            if current[d] >= lengths[d]:
                exhausted[d] = True
                current[d] = current[d] if once else 0


def held_out(n: int, val_size: float, seed: int) -> tuple[list[int], list[int]]:
    """``(train, held out)`` positions of ``n`` examples: Hugging Face's
    ``train_test_split(test_size=val_size, seed=seed)`` as LLaMA-Factory calls it (a
    share below 1 rounds the held-out count up; 1 or more is a count)."""
    import math

    import numpy as np

    n_test = int(val_size) if val_size >= 1 else math.ceil(val_size * n)
    if not 0 < n_test < n:
        raise ConfigError(
            f"data.val_size={val_size} holds out {n_test} of {n} examples; "
            "leave at least one to train on"
        )
    permutation = np.random.default_rng(seed).permutation(n).tolist()
    return permutation[n_test:], permutation[:n_test]
