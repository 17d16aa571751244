"""Answer extraction for generation benchmarks (GSM8K's ``#### N``, ``\\boxed{}``) and the
numeric comparison of extracted answers.

The prompt is lm-eval's GSM8K one: ``Question: ...\\nAnswer:`` with few-shot examples whose
answers are the full worked solutions ending in ``#### N``; the generated text is cut at
the next ``Question:`` (lm-eval's stop sequence) before extraction.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from raylm.eval.benchmarks.readers import MathItem

_NUMBER = re.compile(r"-?[$]?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_HASHES = re.compile(r"####\s*(-?[$]?[\d,]*\.?\d+)")
STOP = ("Question:", "</s>", "<|im_end|>")


def math_prompt(item: MathItem, shots: Sequence[MathItem]) -> str:
    text = "".join(f"Question: {s.question}\nAnswer: {s.solution}\n\n" for s in shots)
    return text + f"Question: {item.question}\nAnswer:"


def cut_at_stop(text: str) -> str:
    cut = min((i for s in STOP if (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


def boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (nested braces kept), or None."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


def extract_answer(text: str) -> str | None:
    """The final answer of a generated solution: ``\\boxed{}``, else ``#### N``, else the
    last number in the text (lm-eval's "flexible-extract"); None when there is none."""
    text = cut_at_stop(text)
    inner = boxed(text)
    if inner is not None:
        nums = _NUMBER.findall(inner)
        return _clean(nums[-1]) if nums else inner.strip()
    m = _HASHES.search(text)
    if m:
        return _clean(m.group(1))
    nums = _NUMBER.findall(text)
    return _clean(nums[-1]) if nums else None


def _clean(number: str) -> str:
    return number.replace(",", "").replace("$", "").rstrip(".")


def numeric_equal(pred: str | None, gold: str) -> bool:
    """Equal as numbers (``18``, ``18.0`` and ``18.00`` agree), else as stripped strings."""
    if pred is None:
        return False
    try:
        return abs(float(_clean(pred)) - float(_clean(gold))) < 1e-6
    except ValueError:
        return pred.strip() == gold.strip()
