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
