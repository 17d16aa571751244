"""Export quantization benchmark: each format of ``raylm.export`` on a tiny Llama.

For the merged float32 model and each quantized format (GGUF f16 / q8_0 / q4_0 through
``raylm.export.gguf``, dynamic INT8 through ``raylm.export.int8``): export time, file
size, perplexity on the held-out text (``raylm/eval/sample/heldout.jsonl`` unless
``--eval-text``) and its change against the merged model, and tokens/s of a greedy
generation (batch 1, ``--new-tokens`` tokens forced, best of ``--repeats``) in
transformers on CPU.

Caveat in the numbers: transformers dequantizes a GGUF file to float32 when it loads it,
so the GGUF rows' transformers tokens/s are float32 speed; the GGUF speed that matters is
llama.cpp's, in the last column (``llama-bench``, generation of 32 tokens, every core, as
the export job records it). The INT8 row's speed is real (int8 kernels).

Run: ``.venv/bin/python bench/export_quant.py`` (tiny model, about a minute);
``--size small`` for a ~30M-parameter model of the same shape family; ``--model DIR`` for
any Llama-architecture HF directory in safetensors.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIZES = {
    "tiny": {},
    "small": dict(
        hidden_size=512, intermediate_size=1536, num_layers=8, num_heads=8, num_kv_heads=4
    ),
    # TinyLlama-1.1B's shape (hidden 2048, MLP 5632, 32 heads, 4 KV heads) at 16 layers and
    # raylm's 2048-token vocabulary: 0.74B parameters, 2.9 GB in float32, the largest that
    # stays comfortable next to its quantized copies on this 24 GB, 2-core machine.
    "large": dict(
        hidden_size=2048, intermediate_size=5632, num_layers=16, num_heads=32, num_kv_heads=4
    ),
}


def tokens_per_s(model: Any, tok: Any, new_tokens: int, repeats: int) -> float:
    import torch

    ids = tok("The Apache License grants", return_tensors="pt")
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                **ids,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
        made = out.shape[1] - ids["input_ids"].shape[1]
        best = max(best, made / (time.perf_counter() - start))
    return best


def train(model_dir: Path, steps: int, seq: int = 128, batch: int = 8) -> float:
    """About a hundred AdamW steps of next-token loss on the tokenizer's corpus, so the
    perplexity figures come from trained weights (a random model's sit near the vocab
    size and hide what quantization costs); saved over ``model_dir``; returns the loss."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raylm.models.tiny import CORPUS_DIR

    tok = AutoTokenizer.from_pretrained(model_dir)
    text = "\n\n".join(p.read_text() for p in sorted(CORPUS_DIR.glob("*.txt")))
    ids = torch.tensor(tok(text)["input_ids"])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    loss = torch.tensor(0.0)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - seq, (batch,), generator=gen)
        x = torch.stack([ids[s : s + seq] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(model_dir)
    return loss.detach().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--model", help="a Llama HF directory instead of the built tiny model")
    p.add_argument("--gguf-types", default="f16,q8_0,q4_0,q4_k_m")
    p.add_argument("--eval-text", default=None)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--train-steps", type=int, default=120, help="0: the random model")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)"
    )
    args = p.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raylm import config
    from raylm.export import gguf, int8
    from raylm.models.tiny import TinySpec, build

    with tempfile.TemporaryDirectory(prefix="raylm-bench-export-") as tmp:
        merged = Path(args.model) if args.model else build(
            Path(tmp) / "model", TinySpec(**SIZES[args.size])
        )  # fmt: skip
        t0 = time.perf_counter()
        loss = train(merged, args.train_steps) if args.train_steps and not args.model else None
        trained = (
            f", trained {args.train_steps} steps in {time.perf_counter() - t0:.0f} s (loss {loss:.2f})"
            if loss
            else ""
        )
        torch.set_num_threads(args.threads)
        params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(merged).parameters())
        over = [f"model={merged}", f"quantize.gguf_types=[{args.gguf_types}]"]
        if args.eval_text:
            over.append(f"quantize.eval_text={args.eval_text}")
        rows = []
        tok = AutoTokenizer.from_pretrained(merged)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        source = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
        figures = gguf.quantize(config.load("export", [], over), merged, Path(tmp) / "gguf")
        base_ppl, base_bytes = figures["merged_perplexity"], figures["merged_bytes"]
        speed = tokens_per_s(source, tok, args.new_tokens, args.repeats)
        rows.append(("merged (safetensors f32)", base_bytes, None, base_ppl, speed, None))
        del source
        for f in figures["files"]:
            model = gguf.load_gguf(Path(tmp) / "gguf", f["file"])
            speed = tokens_per_s(model, tok, args.new_tokens, args.repeats)
            lcpp = f["llama_cpp"]["generate_tokens_per_s"]
            rows.append(
                (f"gguf {f['type']}", f["bytes"], f["seconds"], f["perplexity"], speed, lcpp)
            )
        cfg = config.load("export", [], [*over, "quantize.method=int8_dynamic"])
        figures = int8.quantize(cfg, merged, Path(tmp) / "int8")
        (f,) = figures["files"]
        model, _ = int8.load_int8(Path(tmp) / "int8")
        speed = tokens_per_s(model, tok, args.new_tokens, args.repeats)
        rows.append(
            ("int8_dynamic (torch)", f["bytes"], f["seconds"], f["perplexity"], speed, None)
        )

    name = args.model or f"{args.size} Llama (raylm.models.tiny)"
    print(f"model: {name}, {params / 1e6:.2f}M parameters{trained}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; eval: {figures['eval_docs']} docs of "
          f"{figures['eval_text']}; generation: {args.new_tokens} tokens greedy, batch 1, "
          f"best of {args.repeats}")  # fmt: skip
    print()
    print("| format | size | vs f32 | export s | perplexity | ppl change | gen tok/s "
          "(transformers) | gen tok/s (llama.cpp) |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for fmt, size, secs, ppl, speed, lcpp in rows:
        print(
            f"| {fmt} | {size / 2**20:.2f} MiB | {size / base_bytes:.2f} | "
            f"{'-' if secs is None else f'{secs:.2f}'} | {ppl:.2f} | "
            f"{100 * (ppl / base_ppl - 1):+.2f}% | {speed:.0f} | "
            f"{'-' if lcpp is None else f'{lcpp:.0f}'} |"
        )


if __name__ == "__main__":
    main()
