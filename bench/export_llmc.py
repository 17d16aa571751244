"""llmcompressor export benchmark: GPTQ W4A16, AWQ W4A16 and W8A8 INT8 of a model
through ``raylm.export.llmc`` (the export job's quantizer, in llmcompressor's own venv).

Per format: export time (the worker process: imports, calibration, save, load back and
score; and the calibration alone), checkpoint size against the merged model's, and the
perplexity of the quantized and the merged model on the same held-out text (the
calibration file's last tenth). The venv is built first if missing (its build time is
printed, not counted in the export times).

Run: ``.venv/bin/python bench/export_llmc.py`` (tiny model; calibration from
LLaMA-Factory's c4_demo, ``--nsamples`` windows of ``--max-length`` tokens);
``--model DIR`` for another HF directory; ``--methods gptq w8a8`` for a subset.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

C4 = ROOT / "tests" / "assets" / "llamafactory" / "data" / "c4_demo.jsonl"


def main(argv: list[str] | None = None) -> None:
    from raylm.export import llmc
    from raylm.export.config import ExportJobConfig, QuantizeConfig
    from raylm.models.tiny import build

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="HF model dir (default: the tiny model)")
    parser.add_argument("--dataset", default=str(C4), help="calibration jsonl / text")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--methods", nargs="+", default=["gptq", "awq", "w8a8"])
    parser.add_argument("--json", help="write the rows here too")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    python, built = llmc.ensure_env()
    how = f"built in {built:.0f} s" if built else "cached"
    print(f"llmcompressor venv: {python} ({how}; {time.perf_counter() - start:.1f} s)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="raylm-bench-llmc-") as tmp:
        model = Path(args.model) if args.model else build(Path(tmp) / "tiny")
        for method in args.methods:
            q = QuantizeConfig(method=method, dataset=args.dataset, nsamples=args.nsamples,
                               max_length=args.max_length)  # fmt: skip
            fig = llmc.quantize(ExportJobConfig(model=str(model), quantize=q), model,
                                Path(tmp) / method)  # fmt: skip
            rows.append({k: fig[k] for k in ("method", "scheme", "seconds", "calibrate_s",
                                             "bytes", "merged_bytes", "size_ratio", "perplexity",
                                             "merged_perplexity", "perplexity_ratio")})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    print(f"\nmodel: {args.model or 'tiny (1.3M parameters, float32)'}; calibration "
          f"{args.nsamples} x {args.max_length} tokens\n")  # fmt: skip
    print("| format | export s (calibration s) | size | vs merged | perplexity | merged | delta |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} {r['scheme']} | {r['seconds']:.0f} ({r['calibrate_s']:.0f}) | "
              f"{r['bytes'] / 1e6:.2f} MB | {r['size_ratio']:.2f}x | {r['perplexity']:.1f} | "
              f"{r['merged_perplexity']:.1f} | {100 * (r['perplexity_ratio'] - 1):+.2f} % |")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
