"""Which files a job reads and in which record format (driver side: paths, never bytes).

The data job and the train job both come here: an input is a file, a directory, a glob,
a URI, or a dataset registered in a LLaMA-Factory ``dataset_info.json``; what comes back
is a list of ``Source`` (one file, its format, its column names). ``registry_sources`` is
the one reader of ``dataset_info.json``, so a registry means the same to both jobs.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
        files = list_files(path)
        if not files:
            raise ConfigError(f"input {spec!r} matches no file")
        root = _common_root(files)
        sources += [Source(f, _rel(f, root), fmt, dict(columns)) for f in files]
    names_seen = [s.name for s in sources]
    if len(set(names_seen)) != len(names_seen):  # ids must stay unique across inputs
        sources = [Source(s.path, s.path, s.fmt, s.columns) for s in sources]
    return sources


def _rel(path: str, root: str) -> str:
    return os.path.relpath(path, root) if "://" not in path else path.removeprefix(root)


def _common_root(files: list[str]) -> str:
    if len(files) == 1:
        return os.path.dirname(files[0])
    return os.path.commonpath(files) if "://" not in files[0] else ""


def list_files(spec: str) -> list[str]:
    """The files a path, directory, glob or URI names, sorted; hidden files skipped."""
    if "://" in spec and not spec.startswith("file://"):
        return _list_uri(spec)
    path = resolve_path(spec.removeprefix("file://"))
    if any(ch in path for ch in "*?["):
        return sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
    if os.path.isdir(path):
        return sorted(
            str(p) for p in Path(path).rglob("*") if p.is_file() and not p.name.startswith(".")
        )
    return [path] if os.path.isfile(path) else []


def _list_uri(uri: str) -> list[str]:
    from pyarrow import fs

    filesystem, root = fs.FileSystem.from_uri(uri)
    info = filesystem.get_file_info(root)
    scheme = uri.split("://", 1)[0]
    if info.type == fs.FileType.File:
        return [uri]
    selector = fs.FileSelector(root, recursive=True)
    return sorted(f"{scheme}://{i.path}" for i in filesystem.get_file_info(selector) if i.is_file)


# ---- LLaMA-Factory's dataset_info.json ---------------------------------------------------


def registry_sources(path: str, names: list[str], fmt: str = "auto") -> list[Source]:
    """The files of datasets registered in a ``dataset_info.json`` (all when ``names`` is
    empty), each with its format and its columns and tags as one column mapping.

    ``fmt`` is the job's own format setting: it fills in for an entry that declares no
    ``formatting`` (LLaMA-Factory would assume alpaca), and must agree with one that does.
    """
    registry = _read_registry(path)
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
        target = os.path.join(os.path.dirname(path), entry["file_name"])
        files = list_files(target)
        if not files:
            raise ConfigError(f"{path}: dataset {name!r} file {target} not found")
        sources += [Source(f, f"{name}/{os.path.basename(f)}", entry_fmt, columns) for f in files]
    return sources


def _read_registry(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"dataset registry not found: {path}")
    try:
        registry = json.loads(Path(path).read_text())
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
