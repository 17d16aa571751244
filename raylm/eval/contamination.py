"""Contamination: which eval examples the model may have seen in training, by n-gram overlap.

What is scanned. Every eval set the job scores: the eval records (prompt or chat turns,
then every reference), each benchmark's items (question and choices; question and worked
solution; code prompt and canonical solution) and the perplexity documents. Each example
is one token sequence (``raylm.eval.text.tokenize``: a word per token, one per CJK
character, after the metrics' normalisation), so an English example is matched on words
and a Chinese one on characters.

Against what. The training data the lineage names (``lineage_sources``): the train run
whose output is the evaluated model (its ``manifest.json`` in the model dir or above it,
as ``final/`` sits in the run dir), its data input (raw files; a LLaMA-Factory registry's
trained datasets; a data job's output dir), and, through a data job's manifest, the raw
files it read when its shards are tokenized (untokenized shards are read as they are).
A base model that is itself a train run's output is followed too: the model saw that data.
``contamination.train_data`` replaces the lineage with explicit paths.

How. The index is built on the eval side, which is small: every n-gram of every example
(its 64-bit polynomial hash over token ids, with the tokens kept to confirm a hit), in
memory proportional to the eval sets. The training text is then streamed once (jsonl line
by line, parquet by record batch through pyarrow, local or in a bucket) in batches of
about a million tokens; a token that occurs in no eval example maps to 0, so only windows
of eval vocabulary can match, and every hash hit is confirmed token by token. Memory is
bounded by the eval sets and one batch, never by the corpus, and the result is exact (no
Bloom-filter false positives). Each matched n-gram remembers the first training record
it was found in (``file:line``), which the report names.

When is an example contaminated. Its overlap is the share of its n-gram positions found
in training; it is contaminated when the overlap is at least ``min_overlap`` (default
0.5) and above 0, so ``min_overlap: 0`` is GPT-3's rule (any shared n-gram). An example
shorter than ``ngram`` tokens is one n-gram of its own length (it must occur whole in one
training record); one shorter than ``min_tokens`` is not checked and counted as
``unchecked``.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from raylm import storage
from raylm.config import ConfigError, resolve_path
from raylm.eval.text import tokenize
from raylm.manifest import MANIFEST, Manifest

BATCH_TOKENS = 1 << 20
"""Training tokens hashed per numpy batch (bounds the scan's working memory)."""

SNIPPET_CHARS = 80
"""Characters of an example kept in the report."""

_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd multiplier of the polynomial hash (mod 2**64)
_SKIP_KEYS = {"id", "role", "from", "tools", "kto_label", "name", "tool_calls"}


@dataclass(frozen=True)
class TrainSource:
    """One training file to scan and how to read its records."""

    path: str
    fmt: str = "auto"
    columns: dict[str, str] = field(default_factory=dict)
    via: str = ""
    """Where it was found: ``train_data`` or the manifest that names it."""


@dataclass
class Example:
    """One eval example: its id, a snippet, and its n-grams (length, hash) by position."""

    id: str
    snippet: str
    grams: list[tuple[int, int]] = field(default_factory=list)


# ---- the training data: from the lineage or from explicit paths --------------------------


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
            return "\n".join(_strings(to_payload(rec, src.fmt, src.columns, "text")))
        except (ValueError, KeyError, TypeError):
            pass
    return "\n".join(_strings(rec))


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            if k not in _SKIP_KEYS:
                yield from _strings(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _strings(v)


# ---- eval examples ---------------------------------------------------------------------


def eval_sets(records: list[Any], docs: list[Any], benchmarks: dict[str, Any] | None) -> dict:
    """{set name: [(id, text)]}: ``eval`` (the records), each benchmark, ``perplexity``."""
    sets: dict[str, list[tuple[str, str]]] = {}
    if records:
        sets["eval"] = [(r.id, _record_example(r)) for r in records]
    for name, data in (benchmarks or {}).items():
        sets[name] = [
            (str(getattr(it, "id", i)), _item_text(it)) for i, it in enumerate(data.items)
        ]
    if docs:
        sets["perplexity"] = [(f"doc {i}", "\n".join(_strings(d))) for i, d in enumerate(docs)]
    return sets


def _record_example(r: Any) -> str:
    prompt = r.prompt if r.prompt is not None else "\n".join(_strings(list(r.messages or [])))
    return "\n".join([prompt, *r.references])


def _item_text(item: Any) -> str:
    """A benchmark item as it would appear in a training file."""
    parts = [getattr(item, k, None) for k in ("question", "prompt")]
    parts += list(getattr(item, "choices", ()) or ())
    parts += [getattr(item, k, None) for k in ("solution", "canonical_solution")]
    return "\n".join(p for p in parts if isinstance(p, str) and p)


# ---- the index and the scan --------------------------------------------------------------


def _hashes(ids: np.ndarray, k: int) -> np.ndarray:
    """Polynomial hash (mod 2**64) of every window of ``k`` ids."""
    n = len(ids) - k + 1
    h = np.zeros(max(n, 0), dtype=np.uint64)
    for j in range(k):
        h = h * _BASE + ids[j : j + n]
    return h


class NgramIndex:
    """Every n-gram of the eval examples, to look training text up against."""

    def __init__(self, ngram: int, min_tokens: int) -> None:
        self.ngram, self.min_tokens = ngram, min_tokens
        self.vocab: dict[str, int] = {}
        self.grams: dict[int, dict[int, tuple[int, ...]]] = {}  # length -> hash -> ids
        self.found: dict[tuple[int, int], str] = {}  # (length, hash) -> first training record
        self._sorted: dict[int, np.ndarray] = {}

    def add(self, example_id: str, text: str) -> Example | None:
        """Index one example; None when it is shorter than ``min_tokens``."""
        ex = Example(example_id, " ".join(text.split())[:SNIPPET_CHARS])
        toks = tokenize(text)
        if len(toks) < self.min_tokens:
            return None
        ids = np.array([self.vocab.setdefault(t, len(self.vocab) + 1) for t in toks], np.uint64)
        k = min(self.ngram, len(ids))
        table = self.grams.setdefault(k, {})
        for i, h in enumerate(_hashes(ids, k).tolist()):
            table.setdefault(h, tuple(ids[i : i + k].tolist()))
            ex.grams.append((k, h))
        self._sorted.pop(k, None)
        return ex

    def scan(self, docs: Iterable[tuple[str, str]]) -> int:
        """Look every training document up; returns how many were read."""
        for k, table in self.grams.items():
            self._sorted[k] = np.array(sorted(table), dtype=np.uint64)
        n_docs, buf, starts, locs, size = 0, [], [], [], 0
        get, zeros = self.vocab.get, itertools.repeat(0)
        for loc, text in docs:
            n_docs += 1
            ids = list(map(get, tokenize(text), zeros))
            if not any(ids):
                continue
            starts.append(size)
            locs.append(loc)
            buf += [*ids, 0]  # a 0 between documents: no n-gram spans two
            size += len(ids) + 1
            if size >= BATCH_TOKENS:
                self._lookup(np.array(buf, np.uint64), np.array(starts), locs)
                buf, starts, locs, size = [], [], [], 0
        if buf:
            self._lookup(np.array(buf, np.uint64), np.array(starts), locs)
        return n_docs

    def _lookup(self, ids: np.ndarray, starts: np.ndarray, locs: list[str]) -> None:
        for k, keys in self._sorted.items():
            if len(ids) < k:
                continue
            h = _hashes(ids, k)
            for i in np.flatnonzero(np.isin(h, keys)).tolist():
                key = (k, int(h[i]))
                if key in self.found or tuple(ids[i : i + k].tolist()) != self.grams[k][key[1]]:
                    continue
                self.found[key] = locs[int(np.searchsorted(starts, i, side="right")) - 1]

    def verdict(self, ex: Example) -> tuple[float, str | None]:
        """(share of the example's n-grams found in training, the record most of them came from)."""
        hits = [self.found[g] for g in ex.grams if g in self.found]
        if not hits:
            return 0.0, None
        return len(hits) / len(ex.grams), Counter(hits).most_common(1)[0][0]


def scan(
    sets: dict[str, list[tuple[str, str]]],
    sources: list[TrainSource],
    ngram: int = 13,
    min_overlap: float = 0.5,
    min_tokens: int = 8,
) -> dict[str, Any]:
    """eval.json's ``contamination``: per set its rate and contaminated examples."""
    t0 = time.perf_counter()
    index = NgramIndex(ngram, min_tokens)
    examples = {
        name: [(i, index.add(i, text)) for i, text in items] for name, items in sets.items()
    }
    n_docs = index.scan(d for src in sources for d in iter_documents(src))
    out: dict[str, Any] = {}
    for name, items in examples.items():
        bad, unchecked = [], 0
        for ex_id, ex in items:
            if ex is None:
                unchecked += 1
                continue
            share, where = index.verdict(ex)
            if share > 0 and share >= min_overlap:
                bad.append({"id": ex_id, "overlap": round(share, 4), "snippet": ex.snippet,
                            "source": where})  # fmt: skip
        bad.sort(key=lambda b: -b["overlap"])
        n = len(items)
        out[name] = {"rate": len(bad) / n if n else 0.0, "n": n,
                     "n_contaminated": len(bad), "unchecked": unchecked, "contaminated": bad}  # fmt: skip
    return {
        "sets": out,
        "ngram": ngram,
        "min_overlap": min_overlap,
        "min_tokens": min_tokens,
        "train_sources": sorted({s.path for s in sources}),
        "train_documents": n_docs,
        "seconds": round(time.perf_counter() - t0, 3),
    }
