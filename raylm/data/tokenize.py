"""Token ids and loss masks for pt / sft / dpo / kto, plus greedy packing.

The masks are derived from the tokenizer's chat template (its own, or a named one from
``raylm.templates`` that ``raylm.tokenizer.load_tokenizer`` put there) by rendering
prefixes of the conversation, never from a hard-coded template, so any model's template
works: the assistant reply of turn i is the text between ``render(turns[:i], generation
prompt)`` and ``render(turns[:i+1])``. The reply runs from the end of the generation
prompt (so what a template puts before the content, such as qwen3's empty think block,
is trained, as in LLaMA-Factory) through the content and its end-of-turn token. Character
spans map to tokens through the fast tokenizer's offsets, so the ids are exactly those of
tokenizing the whole rendered chat.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator
from typing import Any


def tokenize_pt(text: str, tokenizer: Any, cutoff_len: int | None) -> dict[str, list[int]]:
    """Pre-training: every token is a target; EOS marks where the document ends."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    if cutoff_len is not None:
        ids = ids[:cutoff_len]
    return {"input_ids": ids, "loss_mask": [1] * len(ids)}


def _render(
    tokenizer: Any,
    messages: list[dict],
    generation_prompt: bool = False,
    tools: list[dict] | None = None,
) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "the tokenizer has no chat template (a base model?): name one with template "
            "(data job: tokenize.template, train job: model.template), e.g. chatml or default"
        )
    return tokenizer.apply_chat_template(
        messages, tools=tools or None, tokenize=False, add_generation_prompt=generation_prompt
    )


def check_tools_rendered(messages: list[dict], tokenizer: Any, tools: list[dict] | None) -> None:
    """A conversation with tool definitions, calls or results must render all of them:
    a template that drops them would train on a conversation that is not the dataset's.
    Raises ValueError naming what the template cannot render."""
    calls = [c["function"] for m in messages for c in m.get("tool_calls", ())]
    results = [m["content"] for m in messages if m["role"] == "tool"]
    if not (tools or calls or results):
        return
    from jinja2 import TemplateError

    try:
        text = _render(tokenizer, messages, tools=tools)
    except (TemplateError, TypeError) as err:
        raise ValueError(f"cannot render them: {err}") from None
    names = {c.get("name", "") for c in calls} | {
        t["function"].get("name", "") for t in tools or ()
    }
    lost = [f"tool {n!r}" for n in sorted(names) if n not in text]
    lost += [f"tool result {r[:40]!r}" for r in results if r not in text]
    if lost:
        raise ValueError(f"cannot render them (it drops {', '.join(lost[:3])})")


def _assistant_spans(
    tokenizer: Any, messages: list[dict], only_last: bool, tools: list[dict] | None = None
) -> tuple[str, list]:
    """The rendered chat and, per trained assistant turn, (reply start, content end, turn end).

    The reply starts where the generation prompt ends when that prompt is a prefix of the
    chat (everything after it is the model's to produce), else where the content starts.
    A turn that calls tools is trained whole: the calls are what the model must produce.
    """
    full = _render(tokenizer, messages, tools=tools)
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant" or (only_last and i != len(messages) - 1):
            continue
        before = _render(tokenizer, messages[:i], generation_prompt=True, tools=tools)
        upto = _render(tokenizer, messages[: i + 1], tools=tools)
        start = len(before) if full.startswith(before) else 0
        end = len(upto) if full.startswith(upto) else len(full)
        content = msg["content"].strip()
        at = full.find(content, start, end) if content else -1
        c_start, c_end = (at, at + len(content)) if at >= 0 else (start, start)
        if at >= 0 and start:  # the generation prompt is a prefix: the reply follows it
            c_start = start
        if msg.get("tool_calls") and full.startswith(upto):
            c_start, c_end = start, end
        spans.append((c_start, c_end, end))
    return full, spans


def _chat_ids(
    tokenizer: Any,
    messages: list[dict],
    cutoff_len: int | None,
    only_last: bool = False,
    tools: list[dict] | None = None,
) -> tuple[list[int], list[int]]:
    """Ids of the whole rendered chat; mask 1 on assistant replies + their end-of-turn token."""
    full, spans = _assistant_spans(tokenizer, messages, only_last, tools)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    mask = _span_mask(full, offsets, spans)
    if cutoff_len is not None:
        ids, mask = ids[:cutoff_len], mask[:cutoff_len]
    return ids, mask


def _span_mask(full: str, offsets: list, spans: list) -> list[int]:
    """1 on the tokens of each (reply start, content end, turn end) span's reply and on
    the first token after its content (the end-of-turn token)."""
    mask = [0] * len(offsets)
    for c_start, c_end, turn_end in spans:
        closed = False
        for t, (a, b) in enumerate(offsets):
            if b > c_start and a < c_end:
                mask[t] = 1
            elif not closed and a >= c_end and b <= turn_end and full[a:b].strip():
                mask[t] = 1  # the end-of-turn token: the model must learn to stop
                closed = True
    return mask


def infer_seqlen(source_len: int, target_len: int, cutoff_len: int) -> tuple[int, int]:
    """LLaMA-Factory's ``processor_utils.infer_seqlen``: how much of a (prompt, reply)
    pair fits in ``cutoff_len``: a short reply is kept whole, else a short prompt, else
    both are cut in proportion."""
    if target_len * 2 < cutoff_len:
        max_target_len = cutoff_len
    elif source_len * 2 < cutoff_len:
        max_target_len = cutoff_len - source_len
    else:
        max_target_len = int(cutoff_len * (target_len / (source_len + target_len)))
    new_target_len = min(max_target_len, target_len)
    new_source_len = min(max(cutoff_len - new_target_len, 0), source_len)
    return new_source_len, new_target_len


def _last_turns(ids: list, mask: list, pairs: list, cutoff_len: int) -> tuple[list, list]:
    """LLaMA-Factory's ``mask_history`` cut: (prompt, reply) pairs of token ranges taken
    last first, each cut by ``infer_seqlen`` to what is left of ``cutoff_len``, until it
    is spent; earlier turns are lost from the front, the trained last reply kept."""
    keep: list[int] = []
    for s0, t0, t1 in reversed(pairs):
        left = cutoff_len - len(keep)
        if left <= 0:
            break
        n_src, n_tgt = infer_seqlen(t0 - s0, t1 - t0, left)
        keep = [*range(s0, s0 + n_src), *range(t0, t0 + n_tgt), *keep]
    return [ids[i] for i in keep], [mask[i] for i in keep]


def tokenize_sft(
    messages: list[dict],
    tokenizer: Any,
    cutoff_len: int | None,
    tools: list[dict] | None = None,
    train_on_prompt: bool = False,
    mask_history: bool = False,
) -> dict[str, list[int]]:
    """Supervised fine-tuning: the loss sees only what the assistant says (and calls);
    with ``train_on_prompt`` every token, with ``mask_history`` the last reply only
    (LLaMA-Factory's settings: raylm's ``loss.*``, its ``SupervisedDatasetProcessor``)."""
    if not (train_on_prompt or mask_history):
        ids, mask = _chat_ids(tokenizer, messages, cutoff_len, tools=tools)
        return {"input_ids": ids, "loss_mask": mask}
    full, spans = _assistant_spans(tokenizer, messages, False, tools)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    if train_on_prompt:
        mask = [1] * len(ids)
        return {"input_ids": ids[:cutoff_len], "loss_mask": mask[:cutoff_len]}
    mask = _span_mask(full, offsets, spans[-1:])
    if cutoff_len is not None and len(ids) > cutoff_len and spans:
        starts = [a for a, _ in offsets]

        def tok(pos: int) -> int:  # the first token starting at or after char pos
            return bisect.bisect_left(starts, pos)

        bounds = [0, *(tok(end) for _, _, end in spans[:-1]), len(ids)]
        pairs = [(bounds[k], max(bounds[k], tok(s[0])), bounds[k + 1]) for k, s in enumerate(spans)]
        ids, mask = _last_turns(ids, mask, pairs, cutoff_len)
    return {"input_ids": ids, "loss_mask": mask}


def tokenize_preference(
    prompt_messages: list[dict],
    chosen: str,
    rejected: str,
    tokenizer: Any,
    cutoff_len: int | None,
) -> dict[str, list[int]]:
    """DPO: the same prompt completed both ways; only the response tokens are scored."""
    out: dict[str, list[int]] = {}
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        chat = [*prompt_messages, {"role": "assistant", "content": answer}]
        ids, mask = _chat_ids(tokenizer, chat, cutoff_len, only_last=True)
        out[f"{name}_input_ids"], out[f"{name}_loss_mask"] = ids, mask
    return out


LF_BLOCK = 1000
"""LLaMA-Factory's preprocessing batch: KTO's KL partners are cycled within each such block."""


def tokenize_kto(payload: dict, tok: Any, cutoff: int | None) -> dict[str, Any]:
    """A KTO payload (a conversation ending in the judged answer, and ``kto_label``) ->
    ``input_ids`` / ``loss_mask`` on that answer alone, and the label.

    The label judges the last answer only, so only the last assistant turn is a target;
    earlier turns are prompt, as LLaMA-Factory encodes a KTO example.
    """
    messages = payload["messages"]
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("a KTO example must end with the assistant answer its label judges")
    ids, mask = _chat_ids(tok, messages, cutoff, only_last=True, tools=payload.get("tools"))
    return {"input_ids": ids, "loss_mask": mask, "kto_label": bool(payload["kto_label"])}


def _answer_start(row: dict[str, Any]) -> int:
    """Where a KTO row's answer starts: its first target token (the whole row if none
    survived the cutoff)."""
    mask = row["loss_mask"]
    return next((t for t, m in enumerate(mask) if m), len(mask))


def with_kl_rows(rows: list[dict[str, Any]], cutoff: int | None) -> list[dict[str, Any]]:
    """KTO rows with ``kl_input_ids`` / ``kl_loss_mask``: row i's prompt followed by the
    answer of row i-1 of its block of ``LF_BLOCK`` rows (LLaMA-Factory's +1 offset; the
    block's first row takes its last's answer), cut at ``cutoff``. The mismatched pairs
    of KTO's KL estimate (``raylm.train.kto``): the train job adds them to raw rows, the
    data job writes them into its kto shards, so both train on the same pairs."""
    out = []
    for start in range(0, len(rows), LF_BLOCK):
        block = rows[start : start + LF_BLOCK]
        for i, row in enumerate(block):
            other = block[i - 1]  # i == 0 takes the block's last answer
            p, a = _answer_start(row), _answer_start(other)
            ids = list(row["input_ids"][:p]) + list(other["input_ids"][a:])
            mask = [0] * p + list(other["loss_mask"][a:])
            out.append(row | {"kl_input_ids": ids[:cutoff], "kl_loss_mask": mask[:cutoff]})
    return out


def tokenize_payload(
    payload: dict, tokenizer: Any, cutoff_len: int | None, **sft: bool
) -> dict[str, Any]:
    """A canonical payload (``raylm.data.formats.to_payload``) -> the shard columns of its
    task: the one tokenization path of the data job and of the train job's raw files (a
    KTO payload, with ``kto_label``, through ``tokenize_kto``). ``sft``: ``tokenize_sft``'s
    ``train_on_prompt`` / ``mask_history`` for a conversation."""
    if "text" in payload:
        return tokenize_pt(payload["text"], tokenizer, cutoff_len)
    if "kto_label" in payload:
        return tokenize_kto(payload, tokenizer, cutoff_len)
    if "messages" in payload:
        return tokenize_sft(payload["messages"], tokenizer, cutoff_len, payload.get("tools"), **sft)
    return tokenize_preference(
        payload["prompt"], payload["chosen"], payload["rejected"], tokenizer, cutoff_len
    )


def pack(examples: Iterable[dict], block_len: int, max_open: int = 8) -> Iterator[dict]:
    """First-fit packing into rows of at most ``block_len`` tokens.

    ``position_ids`` restart at 0 for each packed sample, which lets a trainer with
    varlen attention (flash-attention's position-id mode) keep samples from attending
    to each other. A few bins stay open so short samples fill gaps; the fullest bin is
    emitted when too many are open, keeping memory bounded on an endless stream.
    Examples longer than ``block_len`` are truncated (the data job truncates at
    cutoff_len first, so this only guards direct callers).
    """
    if block_len <= 0:
        raise ValueError(f"block_len must be > 0, got {block_len}")
    bins: list[dict] = []
    for ex in examples:
        ids = list(ex["input_ids"])[:block_len]
        mask = list(ex.get("loss_mask") or [1] * len(ids))[: len(ids)]
        target = next((b for b in bins if len(b["input_ids"]) + len(ids) <= block_len), None)
        if target is None:
            target = {"input_ids": [], "loss_mask": [], "position_ids": [], "source_ids": []}
            bins.append(target)
        target["input_ids"] += ids
        target["loss_mask"] += mask
        target["position_ids"] += list(range(len(ids)))
        target["source_ids"].append(ex.get("id"))
        if len(target["input_ids"]) == block_len:
            bins.remove(target)
            yield target
        elif len(bins) > max_open:
            fullest = max(bins, key=lambda b: len(b["input_ids"]))
            bins.remove(fullest)
            yield fullest
    yield from bins
