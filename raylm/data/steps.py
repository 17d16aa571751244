"""The per-record steps of the data job, each a small block with one ``run`` and its own counts.

Shaped like datatrove's pipeline blocks: parse, normalise, filter, scrub PII, then sign
(hashes for dedup) and score (perplexity, when on) a whole block at once. A step never drops a row: it sets ``status``
(``quarantine:<reason>`` or ``filter:<name>``) and the steps after it skip that row, so
every input row leaves the stage exactly once and the job's accounting adds up. All the
steps run fused in one plain Ray task per read block (``process_block``): the blocks are
already sized for one task each, and a Ray Data operator would add start-up for nothing.
"""

from __future__ import annotations

import abc
import json
from collections import Counter
from collections.abc import Callable
from functools import cache
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from raylm.data import dedup, filters, formats, perplexity, pii, simhash
from raylm.data.config import DataJobConfig
from raylm.data.rows import BadRow, parse_row

PII_KINDS = tuple(pii.PLACEHOLDERS)
QUARANTINE = "quarantine"
FILTER = "filter"

PROCESSED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("status", pa.string()),
        ("doc", pa.string()),
        ("raw", pa.string()),
        ("nbytes", pa.int64()),
        ("exact_hash", pa.string()),
        ("sig", pa.binary()),
        ("shingles", pa.binary()),
        ("perplexity", pa.float64()),
        *[(f"pii_{k}", pa.int32()) for k in PII_KINDS],
    ]
)

_PAYLOAD, _TEXT = "_payload", "_text"
"""Row keys that carry a row between steps (the canonical payload, its text); not columns."""


def map_strings(payload: dict, fn: Callable[[str], str]) -> dict:
    """Apply ``fn`` to every piece of text a payload holds: contents, answers, and the
    string values of tool-call arguments (an e-mail address a model passes to a tool is
    PII too). Everything else (tool schemas, a KTO label) passes through unchanged."""
    if "text" in payload:
        return {**payload, "text": fn(payload["text"])}
    if "messages" in payload:
        return {**payload, "messages": [_map_message(m, fn) for m in payload["messages"]]}
    prompt = [_map_message(m, fn) for m in payload["prompt"]]
    chosen, rejected = fn(payload["chosen"]), fn(payload["rejected"])
    return {**payload, "prompt": prompt, "chosen": chosen, "rejected": rejected}


def _map_message(message: dict, fn: Callable[[str], str]) -> dict:
    out = {**message, "content": fn(message["content"])}
    if message.get("tool_calls"):
        out["tool_calls"] = [_map_call(c, fn) for c in message["tool_calls"]]
    return out


def _map_call(call: Any, fn: Callable[[str], str]) -> Any:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or "arguments" not in function:
        return call
    args = function["arguments"]
    if isinstance(args, str):  # OpenAI: a JSON string; re-serialised only if a value changed
        try:
            parsed = json.loads(args)
        except json.JSONDecodeError:
            mapped_args = fn(args)
        else:
            mapped = _map_json(parsed, fn)
            mapped_args = args if mapped == parsed else json.dumps(mapped, ensure_ascii=False)
    else:
        mapped_args = _map_json(args, fn)
    return {**call, "function": {**function, "arguments": mapped_args}}


def _map_json(value: Any, fn: Callable[[str], str]) -> Any:
    """``fn`` on every string value of a JSON value (keys stay: they are parameter names)."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, list):
        return [_map_json(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: _map_json(v, fn) for k, v in value.items()}
    return value


def strings_of(payload: dict) -> str:
    """The payload's text, joined: what the quality filters judge."""
    if len(payload) == 1 and "text" in payload:  # pt: the one string, no walk
        return payload["text"]
    seen: list[str] = []
    map_strings(payload, lambda s: seen.append(s) or s)
    return "\n".join(seen)


def dedup_text(payload: dict) -> str:
    """What dedup compares: the whole example, so two examples are duplicates only when
    everything the model trains on agrees: the text, the tool calls (names and arguments)
    and tool schemas, and a KTO example's label (the same answer judged good and bad is
    two examples; ``Sign`` also keeps the labels apart for fuzzy dedup)."""
    if payload.keys() == {"text"}:  # pt: the text is all there is
        return payload["text"]
    parts = [strings_of(payload)]
    messages = payload.get("messages") or payload.get("prompt") or []
    calls = [c for m in messages for c in m.get("tool_calls") or ()]
    for extra in (calls, payload.get("tools")):
        if extra:
            parts.append(json.dumps(extra, ensure_ascii=False, sort_keys=True))
    if "kto_label" in payload:
        parts.append(f"kto_label={bool(payload['kto_label'])}")
    return "\n".join(parts)


def _label_salt(row: dict[str, Any]) -> int:
    """XORed into an undesirable KTO example's shingle hashes: its shingles then share none
    with a desirable one's, so fuzzy dedup never merges examples with different labels."""
    return _SALT if row[_PAYLOAD].get("kto_label") is False else 0


_SALT = 0x9E3779B97F4A7C15

_to_json = json.JSONEncoder(ensure_ascii=False).encode
"""``json.dumps(value, ensure_ascii=False)`` without building an encoder per row."""

_json_string = json.encoder.encode_basestring  # type: ignore[attr-defined]


def _doc_json(payload: dict) -> str:
    """``_to_json(payload)``; a pt payload's one string written directly (10x faster)."""
    if payload.keys() == {"text"}:
        return '{"text": ' + _json_string(payload["text"]) + "}"
    return _to_json(payload)


class Step(abc.ABC):
    """One per-record step: ``run`` changes a row in place; ``stats`` counts what it did."""

    name: ClassVar[str]

    def __init__(self, cfg: DataJobConfig, kind: str) -> None:
        self.cfg, self.kind = cfg, kind
        self.stats: Counter[str] = Counter()

    @abc.abstractmethod
    def run(self, row: dict[str, Any]) -> None:
        """Apply this step to one row (each subclass does its one thing)."""

    def run_batch(self, rows: list[dict[str, Any]]) -> None:
        """Apply this step to a block's rows still in play; steps whose work vectorises
        over a block (normalise, filter, PII) do it here at once, with the same result."""
        for row in rows:
            self.run(row)


@cache
def _columns(spec: str) -> dict[str, str]:
    """One source's column mapping, parsed once per worker rather than once per row."""
    return json.loads(spec)


class Parse(Step):
    """Raw row -> canonical payload of this job's kind; anything else is quarantined."""

    name = "parse"

    def run(self, row: dict[str, Any]) -> None:
        self.stats.update(documents=1, bytes=row["nbytes"])
        self._parse(row)

    def run_batch(self, rows: list[dict[str, Any]]) -> None:
        if rows:  # no keys for no rows, as row by row
            self.stats.update(documents=len(rows), bytes=sum(r["nbytes"] for r in rows))
        for row in rows:
            self._parse(row)

    def _parse(self, row: dict[str, Any]) -> None:
        try:
            record = parse_row(row)
            row[_PAYLOAD] = self._payload(record, row)
            if self.cfg.id_column:
                row["id"] = self._id(record)
        except BadRow as err:
            self._quarantine(row, str(err))
        except ValueError as err:
            self._quarantine(row, f"malformed: {err}")

    def _payload(self, record: Any, row: dict[str, Any]) -> dict:
        columns = _columns(row["columns"])
        payload = formats.to_payload(record, row["fmt"], columns, self.cfg.text_column, self.kind)
        found = formats.payload_kind(payload)
        if found != self.kind:
            raise ValueError(f"record is {found} data but this job is {self.kind}")
        return payload

    def _id(self, record: dict) -> str:
        value = record.get(self.cfg.id_column)  # type: ignore[arg-type]
        if value in (None, ""):
            raise ValueError(f"missing id column {self.cfg.id_column!r}")
        return str(value)

    def _quarantine(self, row: dict[str, Any], reason: str) -> None:
        row["status"] = f"{QUARANTINE}:{reason}"
        self.stats["quarantined"] += 1


class Normalise(Step):
    """Unicode NFKC on every string, so filters and dedup see one spelling of each text."""

    name = "normalise"

    def run(self, row: dict[str, Any]) -> None:
        if not self.cfg.filters.nfkc:
            return
        before = row[_PAYLOAD]
        row[_PAYLOAD] = map_strings(before, filters.nfkc)
        self.stats["changed"] += row[_PAYLOAD] != before

    def run_batch(self, rows: list[dict[str, Any]]) -> None:
        if not self.cfg.filters.nfkc or not rows:
            return
        before = [r[_PAYLOAD] for r in rows]
        _map_batch(rows, filters.nfkc_batch)
        self.stats["changed"] += sum(r[_PAYLOAD] != b for r, b in zip(rows, before, strict=True))


class Filter(Step):
    """Quality filters: the first one a document fails is its one removal reason."""

    name = "filter"

    def run(self, row: dict[str, Any]) -> None:
        self._mark(row, filters.first_failure(strings_of(row[_PAYLOAD]), self.cfg.filters))

    def run_batch(self, rows: list[dict[str, Any]]) -> None:
        texts = [strings_of(r[_PAYLOAD]) for r in rows]
        for row, failed in zip(rows, filters.first_failures(texts, self.cfg.filters), strict=True):
            self._mark(row, failed)

    def _mark(self, row: dict[str, Any], failed: str | None) -> None:
        if failed:
            row["status"] = f"{FILTER}:{failed}"
            self.stats[failed] += 1


class ScrubPII(Step):
    """PII -> typed placeholders; the replacements per type land in the row and here."""

    name = "pii"

    def __init__(self, cfg: DataJobConfig, kind: str) -> None:
        super().__init__(cfg, kind)
        self.stats.update(dict.fromkeys(PII_KINDS, 0))

    def run(self, row: dict[str, Any]) -> None:
        found: Counter[str] = Counter()

        def scrub(text: str) -> str:
            clean, counts = pii.scrub(text, self.cfg.pii)
            found.update(counts)
            return clean

        row[_PAYLOAD] = map_strings(row[_PAYLOAD], scrub)
        row.update({f"pii_{k}": found[k] for k in PII_KINDS})
        self.stats.update(found)

    def run_batch(self, rows: list[dict[str, Any]]) -> None:
        per_string: list[dict[str, int]] = []

        def scrub_all(texts: list[str]) -> list[str]:
            clean, counts = pii.scrub_batch(texts, self.cfg.pii)
            per_string.extend(counts)
            return clean

        owners = _map_batch(rows, scrub_all)
        totals = {k: [0] * len(rows) for k in PII_KINDS}
        for owner, counts in zip(owners, per_string, strict=True):
            for k, v in counts.items():
                if v:
                    totals[k][owner] += v
        for k in PII_KINDS:
            for row, v in zip(rows, totals[k], strict=True):
                row[f"pii_{k}"] = v
            self.stats[k] += sum(totals[k])


def _map_batch(rows: list[dict[str, Any]], fn: Callable[[list[str]], list[str]]) -> list[int]:
    """``map_strings`` over a block: every string of the rows' payloads goes through
    ``fn`` as one list (in the order ``map_strings`` visits them), and comes back in
    place. Returns the row each string belongs to."""
    if all(r[_PAYLOAD].keys() == {"text"} for r in rows):  # pt: one string a row, no walk
        for row, text in zip(rows, fn([r[_PAYLOAD]["text"] for r in rows]), strict=True):
            row[_PAYLOAD] = {"text": text}
        return list(range(len(rows)))
    seen: list[str] = []
    owners: list[int] = []
    for i, row in enumerate(rows):
        n = len(seen)
        map_strings(row[_PAYLOAD], lambda s: seen.append(s) or s)
        owners += [i] * (len(seen) - n)
    mapped = iter(fn(seen))
    for row in rows:
        row[_PAYLOAD] = map_strings(row[_PAYLOAD], lambda s: next(mapped))
    return owners


class Sign:
    """Dedup's keys for a block's kept rows, vectorised over the block: the exact hash,
    and (fuzzy dedup) the MinHash signature and, for verification, the shingle set."""

    name = "sign"

    def __init__(self, cfg: DataJobConfig) -> None:
        self.cfg = cfg.dedup
        self.stats: Counter[str] = Counter()

    def run(self, kept: list[dict[str, Any]]) -> None:
        if not kept:
            return
        texts = [r[_TEXT] for r in kept]
        for r, digest in zip(kept, dedup.exact_hashes(texts), strict=True):
            r["exact_hash"] = digest
        self.stats["signed"] += len(kept)
        if not self.cfg.fuzzy:
            return
        flat, lengths = dedup.shingle_batch(texts, self.cfg.ngram)
        salts = np.array([_label_salt(r) for r in kept], dtype=np.uint64)
        if salts.any():
            flat = flat ^ np.repeat(salts, lengths).astype(flat.dtype)
        if self.cfg.method == "simhash":  # a 64-bit fingerprint in place of the signature
            for r, fp in zip(kept, simhash.fingerprints(flat, lengths), strict=True):
                r["sig"], r["shingles"] = fp.tobytes(), b""
            return
        sigs = dedup.minhash_flat(flat, lengths, self.cfg.num_perm, self.cfg.seed)
        width = sigs.shape[1] * sigs.itemsize
        sig_bytes, set_bytes = sigs.tobytes(), flat.tobytes()  # sliced per row: no arrays
        ends = (np.cumsum(lengths) * flat.itemsize).tolist()
        for i, r in enumerate(kept):
            r["sig"] = sig_bytes[i * width : (i + 1) * width]
            r["shingles"] = set_bytes[ends[i - 1] if i else 0 : ends[i]] if self.cfg.verify else b""


class Score:
    """Each kept document's perplexity (``raylm.data.perplexity``), batched over the
    block: the model-based filter's score, cut at a corpus percentile after all blocks
    (``raylm.data.perplexity_cut``). The scored text is what the job keeps (after
    normalisation and PII scrubbing)."""

    name = "perplexity"

    def __init__(self, cfg: DataJobConfig) -> None:
        self.cfg = cfg.filters.perplexity
        self.on = cfg.filters.perplexity_on
        self.stats: Counter[str] = Counter()

    def run(self, kept: list[dict[str, Any]]) -> None:
        if not self.on or not kept:
            return
        scores = perplexity.score([strings_of(r[_PAYLOAD]) for r in kept], self.cfg)
        for row, value in zip(kept, scores, strict=True):
            row["perplexity"] = value
        self.stats["scored"] += sum(v is not None for v in scores)
        self.stats["unscored"] += sum(v is None for v in scores)


STEPS: tuple[type[Step], ...] = (Parse, Normalise, Filter, ScrubPII)


def new_row(row: dict[str, Any]) -> dict[str, Any]:
    """A read row with the processed columns at their defaults (kept, nothing found)."""
    return {
        **row,
        "status": "",
        "doc": "",
        "exact_hash": "",
        "sig": b"",
        "shingles": b"",
        "perplexity": None,
        **{f"pii_{k}": 0 for k in PII_KINDS},
    }


def process_rows(
    rows: list[dict[str, Any]], cfg: DataJobConfig, kind: str
) -> tuple[list[dict[str, Any]], dict[str, dict[str, int]]]:
    """Every row through every step (a row leaves at the first status), then sign the
    kept ones; returns the rows and each step's counts."""
    steps = [step(cfg, kind) for step in STEPS]
    out = [new_row(r) for r in rows]
    kept = out
    for step in steps:  # each over the rows no earlier step set a status on
        step.run_batch(kept)
        kept = [r for r in kept if not r["status"]]
    for row in kept:
        row["doc"] = _doc_json(row[_PAYLOAD])
        row[_TEXT] = dedup_text(row[_PAYLOAD])
    sign, scored = Sign(cfg), Score(cfg)
    sign.run(kept)
    scored.run(kept)
    for row in kept:  # ``doc`` holds it now; a second copy of the corpus would sit in
        row["raw"] = ""  # the object store until the job ends (docs/data.md, "Memory")
    return out, {s.name: dict(s.stats) for s in (*steps, sign, scored)}


def process_block(
    block: pa.Table, cfg: DataJobConfig, kind: str
) -> tuple[pa.Table, dict[str, dict[str, int]]]:
    """One read block through the steps: the processed block and the steps' counts."""
    rows, stats = process_rows(block.to_pylist(), cfg, kind)
    return pa.Table.from_pylist(rows, schema=PROCESSED_SCHEMA), stats


def sum_stats(parts: list[dict[str, dict[str, int]]]) -> dict[str, Counter[str]]:
    """Per-step counts of all blocks added up (every step present, even with no block)."""
    total: dict[str, Counter[str]] = {s.name: Counter() for s in (*STEPS, Sign, Score)}
    for part in parts:
        for step, counts in part.items():
            total[step].update(counts)
    return total
