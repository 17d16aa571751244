"""Reading eval sets and held-out text, refusing malformed records by name.

An eval set is small and every record counts toward a confidence interval, so a bad
record is an error (naming the file, the line and the field), never silently dropped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raylm import storage
from raylm.config import ConfigError

ROLES = ("system", "user", "assistant", "tool")
KEY = "data.perplexity_path"
"""The config key held-out text comes from, named in errors."""


class EvalDataError(ConfigError):
    """An eval or perplexity file is missing or holds a record of the wrong shape.

    A ConfigError, so the runner reports it in one line and exits 2, like a bad key."""


@dataclass(frozen=True)
class EvalRecord:
    """One generation example: what the model sees and what counts as right."""

    id: str
    """The record's ``id`` field, else ``FILE:LINE``."""

    references: tuple[str, ...]
    """Acceptable answers (a record's ``reference``: one string or a list)."""

    prompt: str | None = None
    """Plain prompt text (exclusive with ``messages``)."""

    messages: tuple[dict[str, str], ...] | None = None
    """Chat turns ending before the answer; rendered with the tokenizer's chat template."""

    max_tokens: int | None = None
    """Per-record length budget in tokens (overrides the config's)."""

    max_chars: int | None = None
    """Per-record length budget in characters (overrides the config's)."""

    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    """Any other fields, carried into predictions.jsonl."""


def read_jsonl(path: str | Path, key: str = "data.eval_path") -> list[tuple[str, dict[str, Any]]]:
    """(location, record) pairs of a jsonl (or a json list) file, local or in a bucket;
    bad JSON names its line."""
    p = str(path)
    text = _read_text(p, "eval data file", key)
    if p.endswith(".json"):
        data = json.loads(text)
        if not isinstance(data, list):
            raise EvalDataError(f"{p}: a .json eval file must hold a list of records")
        return [(f"{p}[{i}]", rec) for i, rec in enumerate(data)]
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((f"{p}:{n}", json.loads(line)))
        except json.JSONDecodeError as err:
            raise EvalDataError(f"{p}:{n}: not valid JSON ({err.msg})") from None
    return rows


def _read_text(path: str, what: str, key: str) -> str:
    """A whole file through ``raylm.storage`` (a local path or ``s3://``, ``gs://``)."""
    try:
        if storage.is_remote(path) and not storage.is_dir(path):
            return storage.read_text(path)
        if not storage.is_remote(path) and Path(path).is_file():
            return Path(path).read_text()
    except FileNotFoundError:
        pass
    raise EvalDataError(f"{what} not found: {key}={path}")


def load_eval_records(path: str | Path, max_samples: int | None = None) -> list[EvalRecord]:
    rows = read_jsonl(path, "data.eval_path")[:max_samples]
    if not rows:
        raise EvalDataError(f"{path}: no eval records")
    return [parse_record(where, rec) for where, rec in rows]


def parse_record(where: str, rec: Any) -> EvalRecord:
    if not isinstance(rec, dict):
        raise EvalDataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    has_prompt, has_messages = "prompt" in rec, "messages" in rec
    if has_prompt == has_messages:
        raise EvalDataError(
            f"{where}: needs exactly one of 'prompt' (a string) or 'messages' (chat turns); "
            f"found {'both' if has_prompt else 'neither'} (fields: {sorted(rec)})"
        )
    prompt = _string(where, rec, "prompt") if has_prompt else None
    messages = _messages(where, rec["messages"]) if has_messages else None
    known = {"id", "prompt", "messages", "reference", "max_tokens", "max_chars"}
    return EvalRecord(
        id=str(rec.get("id", where)),
        references=_references(where, rec),
        prompt=prompt,
        messages=messages,
        max_tokens=_budget(where, rec, "max_tokens"),
        max_chars=_budget(where, rec, "max_chars"),
        extra={k: v for k, v in rec.items() if k not in known},
    )


def _string(where: str, rec: dict[str, Any], key: str) -> str:
    value = rec[key]
    if not isinstance(value, str) or not value.strip():
        raise EvalDataError(f"{where}: field '{key}' must be a non-empty string, got {value!r}")
    return value


def _references(where: str, rec: dict[str, Any]) -> tuple[str, ...]:
    if "reference" not in rec:
        raise EvalDataError(
            f"{where}: missing field 'reference' (the expected answer; fields: {sorted(rec)})"
        )
    ref = rec["reference"]
    refs = [ref] if isinstance(ref, str) else ref
    if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
        raise EvalDataError(
            f"{where}: field 'reference' must be a string or a non-empty list of strings, "
            f"got {ref!r}"
        )
    return tuple(refs)


def _messages(where: str, turns: Any, final_answer: bool = False) -> tuple[dict[str, str], ...]:
    """Chat turns; an eval prompt must stop before the answer, held-out text may include it."""
    if not isinstance(turns, list) or not turns:
        raise EvalDataError(f"{where}: field 'messages' must be a non-empty list of turns")
    for i, turn in enumerate(turns):
        ok = isinstance(turn, dict) and turn.get("role") in ROLES
        if not ok or not isinstance(turn.get("content"), str):
            raise EvalDataError(
                f"{where}: field 'messages[{i}]' must be {{role: one of {list(ROLES)}, "
                f"content: string}}, got {turn!r}"
            )
    if turns[-1]["role"] == "assistant" and not final_answer:
        raise EvalDataError(
            f"{where}: field 'messages' ends with an assistant turn; the eval set's answer "
            "belongs in 'reference', the messages must end before it"
        )
    return tuple({"role": t["role"], "content": t["content"]} for t in turns)


def _budget(where: str, rec: dict[str, Any], key: str) -> int | None:
    value = rec.get(key)
    if value is not None and (not isinstance(value, int) or value <= 0):
        raise EvalDataError(f"{where}: field '{key}' must be a positive integer, got {value!r}")
    return value


def load_texts(path: str | Path, max_samples: int | None = None) -> list[str | list[dict]]:
    """Held-out documents for perplexity: strings, or chat turn lists to render."""
    p = str(path)
    if p.endswith(".parquet") or storage.is_dir(p):
        docs: list[str | list[dict]] = _parquet_texts(p)
    elif p.endswith(".txt"):
        text = _read_text(p, "perplexity data file", KEY)
        docs = [d.strip() for d in text.split("\n\n") if d.strip()]
    else:
        docs = [_text_of(where, rec) for where, rec in read_jsonl(p, KEY)]
    docs = docs[:max_samples]
    if not docs:
        raise EvalDataError(f"{path}: no documents for perplexity")
    return docs


def _text_of(where: str, rec: Any) -> str | list[dict]:
    if isinstance(rec, dict) and isinstance(rec.get("text"), str) and rec["text"].strip():
        return rec["text"]
    if isinstance(rec, dict) and "messages" in rec:
        return list(_messages(where, rec["messages"], final_answer=True))
    fields = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
    raise EvalDataError(
        f"{where}: a perplexity record needs a non-empty string field 'text' or chat "
        f"'messages'; got {fields}"
    )


def _parquet_texts(p: str) -> list[str | list[dict]]:
    """Every ``*.parquet`` under a directory (or one file), local or in a bucket."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    fs, root = storage.filesystem(p)
    info = fs.get_file_info(root)
    files = [root] if info.type == pafs.FileType.File else []
    if info.type == pafs.FileType.Directory:
        found = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        files = sorted(i.path for i in found if i.is_file and i.path.endswith(".parquet"))
    if not files:
        raise EvalDataError(f"perplexity data not found: no parquet files at {KEY}={p}")
    texts: list[str | list[dict]] = []
    for f in files:
        where = storage.join(p, f[len(root) :]) if f != root else p
        table = pq.read_table(f, filesystem=fs)
        if "text" in table.column_names:
            texts.extend(t for t in table.column("text").to_pylist() if t)
        elif "messages" in table.column_names:
            rows = table.column("messages").to_pylist()
            texts.extend(
                list(_messages(f"{where}[{i}]", m, final_answer=True)) for i, m in enumerate(rows)
            )
        else:
            raise EvalDataError(
                f"{where}: perplexity parquet needs a 'text' or 'messages' column, "
                f"has {table.column_names}"
            )
    return texts
