"""The merge check: is the exported model base + adapters, and not just the base?

The reference is PEFT's own forward of base + adapters, unmerged (the model the train
job evaluated), with the adapters switched off for the base's logits. One model is in
memory at a time: the reference's two sets of logits are computed first, then it is
freed and the exported directory is loaded as any engine would load it. Everything
runs in float32 whatever the saved dtype, so the only difference left is the merged
weights' rounding, which the tolerance allows for.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

from raylm.job import JobFailed

TOLERANCE = {"float32": 1e-4, "float16": 2e-3, "bfloat16": 1.6e-2}
"""Relative logit tolerance per saved dtype: a few units of its rounding (2^-7 bf16)."""


def reference_logits(base: str, adapters: list[Path], tok: Any, prompts: list[str], trust: bool):
    """(base + adapters, base alone) logits for each prompt, from PEFT unmerged."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        base, torch_dtype=torch.float32, trust_remote_code=trust
    )
    for i, adapter in enumerate(adapters):
        if i:  # earlier adapters are folded in before the next applies, as the merge does
            model = model.merge_and_unload()
        model = PeftModel.from_pretrained(model, str(adapter), torch_dtype=torch.float32)
    model.eval()
    tuned = _logits(model, tok, prompts)
    with model.disable_adapter():  # the last adapter off; earlier ones are part of "base"
        untuned = _logits(model, tok, prompts) if len(adapters) == 1 else None
    if untuned is None:
        del model
        gc.collect()
        plain = AutoModelForCausalLM.from_pretrained(
            base, torch_dtype=torch.float32, trust_remote_code=trust
        )
        untuned = _logits(plain.eval(), tok, prompts)
    return tuned, untuned


def check_merge(
    exported: Path, reference: tuple[list[Any], list[Any]], tok: Any, prompts: list[str],
    tolerance: float | None, trust: bool,
) -> dict[str, Any]:  # fmt: skip
    """Compare the exported model with the reference; raise ``MergeCheckFailed`` naming
    the failing prompt and the differences, else return them (``export_check.json``)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = str(getattr(AutoConfig.from_pretrained(exported), "torch_dtype", "float32"))
    dtype = dtype.removeprefix("torch.")
    tol = tolerance if tolerance is not None else TOLERANCE.get(dtype, TOLERANCE["float32"])
    merged = AutoModelForCausalLM.from_pretrained(
        exported, torch_dtype=torch.float32, trust_remote_code=trust
    ).eval()
    got = _logits(merged, tok, prompts)
    tuned, untuned = reference
    rows = []
    for prompt, g, t, u in zip(prompts, got, tuned, untuned, strict=True):
        scale = float(t.abs().max())
        rows.append(
            {
                "prompt": prompt,
                "merged_vs_reference": float((g - t).abs().max()) / scale,
                "adapters_effect": float((t - u).abs().max()) / scale,
                "merged_vs_base": float((g - u).abs().max()) / scale,
            }
        )
    report = {"dtype": dtype, "tolerance": tol, "prompts": rows}
    for r in rows:
        if r["merged_vs_reference"] > tol:
            raise MergeCheckFailed(
                f"merge check: on {r['prompt']!r} the exported model's logits differ from "
                f"base + adapters by {r['merged_vs_reference']:.3g} (relative; tolerance "
                f"{tol:g} for {dtype}): the merge is wrong"
            )
    if all(r["adapters_effect"] <= tol for r in rows):
        raise MergeCheckFailed(
            f"merge check: the adapters move the base's logits by at most "
            f"{max(r['adapters_effect'] for r in rows):.3g} (relative) on every check prompt, "
            f"within the tolerance {tol:g}: the export would be indistinguishable from the "
            "base (an untrained or zero adapter?)"
        )
    return report


class MergeCheckFailed(JobFailed):
    """The exported weights are not base + adapters (or the adapters do nothing)."""


def _logits(model: Any, tok: Any, prompts: list[str]) -> list[Any]:
    import torch

    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tok(prompt, return_tensors="pt")
            out.append(model(**ids).logits[0].float())
    return out
