"""The llmcompressor step, run by ``raylm.export.llmc`` as a subprocess with the python
of llmcompressor's own venv: ``python llmc_worker.py SPEC.json``.

It imports only the standard library, torch, transformers, datasets and llmcompressor
(never raylm: raylm's modules expect the main environment's transformers), so the file
runs as a plain script. SPEC.json (written by ``raylm.export.llmc``):

- ``method``: gptq | awq | w8a8; ``bits``: weight bits for gptq (awq: 4);
- ``model``: the merged model dir; ``out``: where the compressed-tensors checkpoint goes;
- ``calibration`` / ``eval``: lists of texts; ``nsamples`` windows of ``max_length``
  tokens are cut from the calibration texts, the eval texts are scored in windows of
  ``max_length`` (at most ``eval_windows``);
- ``result``: where the figures are written as JSON.

The perplexity of the merged model and of the quantized one (loaded back from ``out``,
decompressed by compressed-tensors) are computed by the same code on the same tokens.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path


def windows(tok, texts: list[str], length: int, limit: int) -> list[list[int]]:
    """Consecutive windows of ``length`` tokens over the texts joined by blank lines; the
    last short window is kept when it is the only one."""
    ids = tok("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    out = [ids[i : i + length] for i in range(0, len(ids), length)]
    if len(out) > 1 and len(out[-1]) < length:
        out.pop()
    return [w for w in out if len(w) > 1][:limit]


def perplexity(model, wins: list[list[int]]) -> float:
    """exp of the mean next-token loss over every predicted token of every window."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for w in wins:
            ids = torch.tensor([w])
            loss = model(input_ids=ids, labels=ids).loss.float().item()
            total, count = total + loss * (len(w) - 1), count + len(w) - 1
    return math.exp(total / count)


def recipe(method: str, bits: int):
    """The llmcompressor modifiers, as its examples write them (lm_head kept dense)."""
    from llmcompressor.modifiers.awq import AWQModifier
    from llmcompressor.modifiers.quantization import GPTQModifier
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

    if method == "gptq":
        weights = {"num_bits": bits, "type": "int", "symmetric": True,
                   "strategy": "group", "group_size": 128}  # fmt: skip
        groups = {"group_0": {"targets": ["Linear"], "weights": weights}}
        return [GPTQModifier(config_groups=groups, ignore=["lm_head"])]
    if method == "awq":
        return [AWQModifier(targets=["Linear"], scheme="W4A16_ASYM", ignore=["lm_head"])]
    if method == "w8a8":
        return [
            SmoothQuantModifier(smoothing_strength=0.8),
            GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"]),
        ]
    raise ValueError(f"unknown method {method!r}")


def cpu_only_fixes() -> None:
    """llmcompressor 0.14's AWQ pins its cached activations for faster host-to-device
    copies (``IntermediatesCache.pin_memory``); pinning needs an accelerator, so on a
    CPU-only torch it raises "Cannot access accelerator device". Nothing is copied to a
    device there: pinning is skipped."""
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if not torch.accelerator.is_available():
        IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None


def main(spec_path: str) -> None:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = json.loads(Path(spec_path).read_text())
    cpu_only_fixes()
    torch.manual_seed(0)
    started = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype="auto")
    model.eval()
    evals = windows(tok, spec["eval"], spec["max_length"], spec["eval_windows"])
    calib = windows(tok, spec["calibration"], spec["max_length"], spec["nsamples"])
    if not evals or not calib:
        raise SystemExit("no eval or calibration tokens: the texts are empty")
    ppl_merged = perplexity(model, evals)
    data = Dataset.from_dict({"input_ids": calib, "attention_mask": [[1] * len(w) for w in calib]})
    t0 = time.perf_counter()
    model = oneshot(model=model, tokenizer=tok, dataset=data, recipe=recipe(spec["method"], spec["bits"]),
                    max_seq_length=spec["max_length"], num_calibration_samples=len(calib))  # fmt: skip
    calibrate_s = time.perf_counter() - t0
    out = Path(spec["out"])
    model.save_pretrained(out, save_compressed=True)
    tok.save_pretrained(out)
    del model
    t0 = time.perf_counter()
    back = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    back.eval()
    ppl_quant = perplexity(back, evals)
    import compressed_tensors
    import llmcompressor
    import transformers

    result = {
        "calibration_windows": len(calib),
        "eval_windows": len(evals),
        "eval_tokens": sum(len(w) - 1 for w in evals),
        "perplexity_merged": ppl_merged,
        "perplexity_quantized": ppl_quant,
        "quantization_config": json.loads((out / "config.json").read_text()).get(
            "quantization_config", {}
        ),
        "calibrate_s": round(calibrate_s, 2),
        "load_and_score_s": round(time.perf_counter() - t0, 2),
        "worker_s": round(time.perf_counter() - started, 2),
        "versions": {
            "llmcompressor": llmcompressor.__version__,
            "compressed_tensors": compressed_tensors.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
    }
    Path(spec["result"]).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(sys.argv[1])
