"""Multiple choice by log-likelihood, in lm-evaluation-harness's prompt format.

Every option is a continuation of the same prompt; the model's answer is the option whose
continuation has the highest summed log-probability (``acc``), or the highest per character
of the option (``acc_norm``, as lm-eval computes it). The prompt is lm-eval's for the task
(MMLU: ``description + question\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:`` with the
continuations `` A``.. `` D``; C-Eval and CMMLU: their Chinese descriptions and ``答案：``),
few-shot examples (the first ``shots`` of the dev split of the same subject) each followed
by `` <letter>\\n\\n``. Tokenisation follows lm-eval's ``hf`` model: the continuation's
tokens are those of ``encode(context + continuation)`` after ``encode(context)``, both with
the tokenizer's default special tokens, so the two give the same numbers (tested).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from raylm.eval.benchmarks.readers import LETTERS, ChoiceItem

DESCRIPTIONS = {
    "mmlu": "The following are multiple choice questions (with answers) about {subject}.\n\n",
    "ceval": "以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n",
    "cmmlu": "以下是关于{subject}的单项选择题，请直接给出正确答案的选项。\n\n",
}
ANSWER_CUE = {"mmlu": "Answer:", "ceval": "答案：", "cmmlu": "答案："}
TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"


def subject_name(subject: str) -> str:
    return subject.replace("_", " ")


def question_text(fmt: str, item: ChoiceItem) -> str:
    """lm-eval's ``doc_to_text``: the question, lettered options, the answer cue."""
    lines = [item.question.strip()]
    lines += [f"{LETTERS[i]}. {c}" for i, c in enumerate(item.choices)]
    return "\n".join(lines) + "\n" + ANSWER_CUE[fmt]


def context(fmt: str, item: ChoiceItem, shots: Sequence[ChoiceItem]) -> str:
    """The full prompt of one question: description, few-shot examples, the question."""
    text = DESCRIPTIONS[fmt].format(subject=subject_name(item.subject))
    for s in shots:
        gold = LETTERS[s.answer]
        text += question_text(fmt, s) + TARGET_DELIMITER + gold + FEWSHOT_DELIMITER
    return text + question_text(fmt, item)


def fewshot_pool(dev: Sequence[ChoiceItem], shots: int) -> dict[str, list[ChoiceItem]]:
    """The first ``shots`` dev items of each subject (lm-eval's ``first_n`` sampler)."""
    pool: dict[str, list[ChoiceItem]] = {}
    for item in dev:
        if len(pool.setdefault(item.subject, [])) < shots:
            pool[item.subject].append(item)
    return pool


def encode_pair(tokenizer: Any, ctx: str, cont: str) -> tuple[list[int], list[int]]:
    """lm-eval's ``_encode_pair`` for a causal model (trailing context spaces move over)."""
    n = len(ctx) - len(ctx.rstrip())
    if n:
        ctx, cont = ctx[:-n], ctx[-n:] + cont
    whole = tokenizer.encode(ctx + cont)
    ctx_ids = tokenizer.encode(ctx)
    return ctx_ids, whole[len(ctx_ids) :]


def loglikelihoods(
    model: Any, tokenizer: Any, pairs: Sequence[tuple[list[int], list[int]]], batch_size: int = 8
) -> list[float]:
    """Summed log-probability of each continuation given its context (float32 logits)."""
    import torch

    max_len = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
    seqs = [((c + t)[-(max_len + 1) :][:-1], len(t)) for c, t in pairs]
    out: list[float] = []
    pad = tokenizer.pad_token_id or 0
    for start in range(0, len(seqs), batch_size):
        batch = seqs[start : start + batch_size]
        targets = [pairs[start + j][1] for j in range(len(batch))]
        width = max(len(s) for s, _ in batch)
        ids = torch.tensor([s + [pad] * (width - len(s)) for s, _ in batch])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s, _ in batch])
        with torch.inference_mode():
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        for row, (s, n), tgt in zip(logp, batch, targets, strict=True):
            picked = row[len(s) - n : len(s)].gather(1, torch.tensor(tgt)[:, None])
            out.append(float(picked.sum()))
    return out


@dataclass(frozen=True)
class ChoiceResult:
    """Per-question outcome: which option each rule picked, and every option's score."""

    pred: list[int]
    pred_norm: list[int]
    loglikelihoods: list[list[float]]
    contexts: list[str]


def score_choice(
    model: Any,
    tokenizer: Any,
    fmt: str,
    items: Sequence[ChoiceItem],
    dev: Sequence[ChoiceItem],
    shots: int,
    batch_size: int = 8,
) -> ChoiceResult:
    pool = fewshot_pool(dev, shots) if shots else {}
    contexts, pairs, conts = [], [], []
    for item in items:
        ctx = context(fmt, item, pool.get(item.subject, []))
        if shots and len(pool.get(item.subject, [])) < shots:
            from raylm.eval.records import EvalDataError

            raise EvalDataError(f"{fmt}: subject {item.subject!r} has fewer than {shots} dev items")
        contexts.append(ctx)
        options = [TARGET_DELIMITER + LETTERS[i] for i in range(len(item.choices))]
        conts.append([LETTERS[i] for i in range(len(item.choices))])
        pairs += [encode_pair(tokenizer, ctx, o) for o in options]
    flat = loglikelihoods(model, tokenizer, pairs, batch_size)
    lls, pos = [], 0
    for c in conts:
        lls.append(flat[pos : pos + len(c)])
        pos += len(c)
    pred = [int(np.argmax(ll)) for ll in lls]
    lens = [np.array([float(len(x)) for x in c]) for c in conts]
    pred_norm = [int(np.argmax(np.array(ll) / n)) for ll, n in zip(lls, lens, strict=True)]
    return ChoiceResult(pred, pred_norm, lls, contexts)


def choice_stats(items: Sequence[ChoiceItem], res: ChoiceResult) -> dict[str, np.ndarray]:
    """Per-example ``[correct, 1]`` for acc and acc_norm (the mean metrics' statistics)."""
    gold = [it.answer for it in items]
    return {
        "acc": np.array([[float(p == g), 1.0] for p, g in zip(res.pred, gold, strict=True)]),
        "acc_norm": np.array(
            [[float(p == g), 1.0] for p, g in zip(res.pred_norm, gold, strict=True)]
        ),
    }
