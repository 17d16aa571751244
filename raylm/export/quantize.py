"""Quantized copies of an exported model: one module per method, each behind
``quantize(cfg, merged, out) -> figures`` (``QUANTIZERS``), called by the export job
after the merge and its check, with ``out`` = ``output_dir/quantized``.

A quantizer writes the files its engine loads and returns its figures (files and
their sizes, the perplexity of the quantized model and of the merged one on the same
held-out text, the time it took); the export job records them in ``export_check.json``
and its manifest.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from raylm.export.config import ExportJobConfig

QUANTIZERS: dict[str, str] = {
    "gguf": "raylm.export.gguf:quantize",
    "int8_dynamic": "raylm.export.int8:quantize",
    "gptq": "raylm.export.llmc:quantize",
    "awq": "raylm.export.llmc:quantize",
    "w8a8": "raylm.export.llmc:quantize",
}
"""method -> "module:function"; a method listed in ``QUANT_METHODS`` but not here is
refused when the job starts, naming what is missing."""


def quantize(cfg: ExportJobConfig, merged: Path, out: Path) -> dict[str, Any]:
    module, _, name = QUANTIZERS[cfg.quantize.method].partition(":")
    return getattr(importlib.import_module(module), name)(cfg, merged, out)


def read_docs(path: str, key: str) -> list[str]:
    """Text documents for calibration or perplexity (``key`` names the setting in errors):
    a jsonl with ``text`` per line, or plain text, a document per blank-line paragraph."""
    import json
    import re

    from raylm import storage
    from raylm.config import ConfigError, resolve_path

    where = resolve_path(path)
    if not storage.exists(where):
        raise ConfigError(f"{key}={path}: no such file")
    raw = storage.read_bytes(where)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ConfigError(
            f"{key}={path}: not UTF-8 text (byte {err.start}, line {line}); give a clean "
            "jsonl with `text` or plain text (a raw corpus goes through `raylm data` first)"
        ) from None
    if where.endswith((".jsonl", ".json")):
        docs = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                doc = record["text"] if isinstance(record, dict) else None
            except (json.JSONDecodeError, KeyError):
                doc = None
            if not isinstance(doc, str):
                raise ConfigError(
                    f"{key}={path}: line {n} is not a JSON object with a `text` string"
                )
            docs.append(doc)
    else:
        docs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    if not docs:
        raise ConfigError(f"{key}={path}: no text")
    return docs
