"""Record formats -> one canonical shape per task kind.

Datasets arrive as alpaca, sharegpt, OpenAI ``messages`` or preference pairs, with
column names that vary by source (LLaMA-Factory's ``dataset_info.json`` renames them).
Everything downstream (filters, dedup, tokenization, the train job) sees only
``[{"role", "content"}]`` conversations or ``(prompt_messages, chosen, rejected)``, so
format quirks live here and nowhere else. A malformed record raises ``ValueError``
naming the field, so the data job can quarantine it with a reason.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

FORMATS = ("text", "alpaca", "sharegpt", "openai", "preference")
"""Record formats the data and train jobs read (``openai`` = a ``messages`` list of
role/content); the one list both configs and ``dataset_info.json`` are checked against."""

INPUT_FORMATS = ("auto", *FORMATS)
"""A job's ``format`` setting: a record format, or ``auto`` to detect it per record."""

ROLES = ("system", "user", "assistant", "tool")
"""Canonical roles; an assistant turn may carry ``tool_calls`` (Hugging Face's chat shape)."""

# sharegpt ``from`` values (and OpenAI roles) -> canonical roles; LLaMA-Factory's
# ``function_call`` turns become assistant turns with ``tool_calls`` (``_tool_call``).
_ROLE_ALIASES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "function_call": "function_call",
    "observation": "tool",
    "tool": "tool",
}

PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")
"""``{{name}}``: what LLaMA-Factory's identity.json asks its users to fill in."""

# Canonical column name -> default record key, per format (LLaMA-Factory's names).
DEFAULT_COLUMNS: dict[str, dict[str, str]] = {
    "text": {"text": "text"},
    "alpaca": {
        "prompt": "instruction",
        "query": "input",
        "response": "output",
        "system": "system",
        "history": "history",
    },
    "sharegpt": {
        "messages": "conversations",
        "system": "system",
        "role_tag": "from",
        "content_tag": "value",
    },
    "openai": {"messages": "messages", "role_tag": "role", "content_tag": "content"},
    "preference": {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"},
}


def kind_of(fmt: str, columns: dict[str, str] | None = None) -> str:
    """The task kind a format feeds: pt (raw text), sft (conversations) or dpo (pairs);
    conversations whose ``columns`` name a ``kto_tag`` (LLaMA-Factory's feedback data)
    feed kto."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {list(FORMATS)}")
    kind = {"text": "pt", "preference": "dpo"}.get(fmt, "sft")
    return "kto" if kind == "sft" and (columns or {}).get("kto_tag") else kind


def _cols(fmt: str, columns: dict | None) -> dict[str, str]:
    return {**DEFAULT_COLUMNS.get(fmt, {}), **(columns or {})}


def _text(record: dict, key: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None:
        if required:
            raise ValueError(f"missing field {key!r} (have {sorted(record)})")
        return ""
    if not isinstance(value, str):
        raise ValueError(f"field {key!r} must be a string, got {type(value).__name__}")
    return value


def detect_format(
    record: dict, columns: dict[str, str], text_column: str = "text", kind: str | None = None
) -> str:
    """The format a record looks like, from its keys (LLaMA-Factory column names honoured).

    A record can look like two formats (a pretraining record with an ``instruction`` key
    too); when the job's task ``kind`` is known, the first look-alike of that kind wins.
    A block's records share a handful of key sets, so the answer is kept per key set.
    """
    return _format_of(frozenset(record), tuple(columns.items()), text_column, kind)


@functools.lru_cache(maxsize=4096)
def _format_of(
    keys: frozenset[str], columns: tuple[tuple[str, str], ...], text_column: str, kind: str | None
) -> str:
    named = dict(columns)
    looks = (
        ("preference", {named.get("chosen", "chosen"), named.get("rejected", "rejected")}),
        ("openai", {named.get("messages", "messages"), "messages"}),
        ("sharegpt", {named.get("messages", "conversations")}),
        ("sharegpt", {"conversations"}),
        ("alpaca", {named.get("prompt", "instruction")}),
        ("text", {named.get("text", text_column)}),
    )
    found = [fmt for fmt, needed in looks if needed <= keys]
    if not found:
        raise ValueError(f"cannot tell the record's format from its keys {sorted(keys)}")
    conversations = "sft" if kind == "kto" else kind  # kto data is conversations too
    return next((f for f in found if kind_of(f) == conversations), found[0])


def to_payload(
    record: Any, fmt: str, columns: dict[str, str], text_column: str, kind: str | None = None
) -> dict:
    """The canonical payload: {"text"} (pt), {"messages"} (sft) or {"prompt","chosen","rejected"}.

    A conversation also carries ``tools`` (function schemas, when its ``tools`` column
    holds any) and, when the registry names a ``kto_tag`` column holding a boolean,
    ``kto_label``: a KTO example (LLaMA-Factory's feedback data), which is its own kind.
    """
    if not isinstance(record, dict):
        raise ValueError(f"record must be a JSON object, got {type(record).__name__}")
    if fmt == "auto":
        fmt = detect_format(record, columns, text_column, kind)
    if fmt == "text":
        return {"text": to_text(record, columns, text_column)}
    if fmt == "preference":
        prompt, chosen, rejected = to_preference(record, columns)
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    payload: dict[str, Any] = {"messages": to_messages(record, fmt, columns)}
    tools = to_tools(record, columns or {})
    if tools:
        payload["tools"] = tools
    tag = (columns or {}).get("kto_tag")
    if tag and isinstance(record.get(tag), bool):  # LLaMA-Factory: only a boolean tags
        payload["kto_label"] = record[tag]
    return payload


def payload_kind(payload: dict) -> str:
    """pt, sft, dpo or kto: the task a canonical payload feeds."""
    if "text" in payload:
        return "pt"
    if "chosen" in payload:
        return "dpo"
    return "kto" if "kto_label" in payload else "sft"


def to_tools(record: dict, columns: dict[str, str]) -> list[dict]:
    """The function schemas of a record's ``tools`` column (LLaMA-Factory keeps them as a
    JSON string), each in Hugging Face's ``{"type": "function", "function": ...}`` shape
    that chat templates render (LLaMA-Factory's tool formatters wrap them the same way)."""
    value = record.get(columns.get("tools", "tools"))
    if value in (None, ""):
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"field 'tools' is not valid JSON: {err}") from None
    value = [value] if isinstance(value, dict) else value
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise ValueError("field 'tools' must be a list of function schemas (objects)")
    return [
        t if t.get("type") == "function" else {"type": "function", "function": t} for t in value
    ]


def fill_placeholders(record: Any, replacements: dict[str, str]) -> tuple[Any, set[str]]:
    """``record`` with ``{{key}}`` replaced by ``replacements[key]`` in every string it
    holds, and the placeholder names left unreplaced (for the warning that names them)."""
    left: set[str] = set()

    def fill(match: re.Match[str]) -> str:
        key = match.group(1)
        if key in replacements:
            return replacements[key]
        left.add(key)
        return match.group(0)

    def walk(value: Any) -> Any:
        if isinstance(value, str):
            return PLACEHOLDER.sub(fill, value) if "{{" in value else value
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        return value

    return walk(record), left


def to_text(record: dict, columns: dict | None = None, text_column: str = "text") -> str:
    """The document text of a raw-text record: the ``text`` column, else the ``prompt``
    column, which is where LLaMA-Factory's pretraining registrations put it
    (``"columns": {"prompt": "text"}``), else ``text_column``."""
    cols = columns or {}
    return _text(record, cols.get("text") or cols.get("prompt") or text_column)


def to_messages(record: dict, fmt: str, columns: dict | None = None) -> list[dict]:
    """A conversation as ``[{"role": "system"|"user"|"assistant", "content": str}]``.

    ``columns`` maps canonical names (prompt, query, response, system, history, messages,
    role_tag, content_tag) to the record's keys, as LLaMA-Factory's ``columns`` does.
    """
    if not isinstance(record, dict):
        raise ValueError(f"record must be a JSON object, got {type(record).__name__}")
    cols = _cols(fmt, columns)
    if fmt == "alpaca":
        messages = _alpaca(record, cols)
    elif fmt in ("sharegpt", "openai"):
        messages = _chat(record, cols, fmt)
    else:
        raise ValueError(f"format {fmt!r} has no conversation; expected alpaca, sharegpt, openai")
    _check_conversation(messages)
    return messages


def _alpaca(record: dict, cols: dict[str, str]) -> list[dict]:
    prompt = _text(record, cols["prompt"])
    query = _text(record, cols["query"], required=False)
    response = _text(record, cols["response"])
    messages: list[dict] = []
    system = _text(record, cols["system"], required=False)
    if system:
        messages.append({"role": "system", "content": system})
    history = record.get(cols["history"]) or []
    if not isinstance(history, list):
        raise ValueError(f"field {cols['history']!r} must be a list of [prompt, response] pairs")
    for i, turn in enumerate(history):
        if not (
            isinstance(turn, list | tuple)
            and len(turn) == 2
            and all(isinstance(t, str) for t in turn)
        ):
            raise ValueError(
                f"field {cols['history']!r}[{i}] must be a [prompt, response] pair of strings"
            )
        messages += [
            {"role": "user", "content": turn[0]},
            {"role": "assistant", "content": turn[1]},
        ]
    user = "\n".join(part for part in (prompt, query) if part)
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": response}]
    return messages


def _chat(record: dict, cols: dict[str, str], fmt: str) -> list[dict]:
    key = cols["messages"]
    turns = record.get(key)
    if turns is None and fmt == "sharegpt" and "messages" in record:
        key, turns = "messages", record["messages"]  # sharegpt files often use OpenAI's key
    if turns is None:
        raise ValueError(f"missing field {key!r} (have {sorted(record)})")
    messages = parse_turns(
        turns,
        field=key,
        role_tag=cols.get("role_tag"),
        content_tag=cols.get("content_tag"),
        roles=_tag_roles(cols),
    )
    system = record.get(cols.get("system", "system"))
    if isinstance(system, str) and system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return [_tool_call(m, i) if m["role"] == "function_call" else m for i, m in enumerate(messages)]


def _tag_roles(cols: dict[str, str]) -> dict[str, str]:
    """LLaMA-Factory's sharegpt ``tags`` naming the role values (``user_tag: "USER"``)."""
    tags = {
        "user_tag": "user",
        "assistant_tag": "assistant",
        "system_tag": "system",
        "function_tag": "function_call",
        "observation_tag": "tool",
    }
    return {cols[tag].lower(): role for tag, role in tags.items() if cols.get(tag)}


def _tool_call(message: dict, i: int) -> dict:
    """A LLaMA-Factory ``function_call`` turn (JSON ``{"name", "arguments"}``, or a list of
    them) as an assistant turn with Hugging Face ``tool_calls``, which chat templates
    render in the model's own tool-call syntax."""
    try:
        calls = json.loads(message["content"])
    except json.JSONDecodeError as err:
        raise ValueError(f"function_call turn {i} is not valid JSON: {err}") from None
    calls = [calls] if isinstance(calls, dict) else calls
    if not isinstance(calls, list) or not all(isinstance(c, dict) and "name" in c for c in calls):
        raise ValueError(f"function_call turn {i} must hold {{name, arguments}} object(s)")
    tool_calls = [
        {"type": "function", "function": {"name": c["name"], "arguments": c.get("arguments", {})}}
        for c in calls
    ]
    return {"role": "assistant", "content": "", "tool_calls": tool_calls}


def parse_turns(
    turns: Any,
    field: str,
    role_tag: str | None = None,
    content_tag: str | None = None,
    roles: dict[str, str] | None = None,
) -> list[dict]:
    """A list of turns in sharegpt (from/value) or OpenAI (role/content) shape; ``roles``
    adds role values of the dataset's own (lower case) to the usual aliases."""
    aliases = {**_ROLE_ALIASES, **(roles or {})}
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"field {field!r} must be a non-empty list of turns")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ValueError(f"{field}[{i}] must be an object, got {type(turn).__name__}")
        rtag = role_tag if role_tag in turn else ("role" if "role" in turn else "from")
        ctag = content_tag if content_tag in turn else ("content" if "content" in turn else "value")
        role = aliases.get(str(turn.get(rtag, "")).lower())
        if role is None:
            raise ValueError(
                f"{field}[{i}].{rtag}={turn.get(rtag)!r} is not a known role; "
                f"expected one of {sorted(aliases)}"
            )
        content = turn.get(ctag)
        calls = turn.get("tool_calls") if role == "assistant" else None
        if content is None and calls:  # OpenAI: a tool-calling turn may have no content
            content = ""
        if not isinstance(content, str):
            raise ValueError(f"{field}[{i}].{ctag} must be a string, got {type(content).__name__}")
        messages.append(
            {"role": role, "content": content, **({"tool_calls": calls} if calls else {})}
        )
    return messages


def _check_conversation(messages: list[dict]) -> None:
    """Trainers assume user/assistant alternation after an optional system turn; a tool
    result stands where a user turn would (LLaMA-Factory's odd/even tags)."""
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not body:
        raise ValueError("conversation has no user or assistant turn")
    for i, msg in enumerate(body):
        expected = ("user", "tool") if i % 2 == 0 else ("assistant",)
        if msg["role"] not in expected:
            raise ValueError(
                f"turn {i} has role {msg['role']!r} but {expected[0]!r} was expected "
                "(turns must alternate user/assistant after an optional system turn)"
            )
    if body[-1]["role"] != "assistant":
        raise ValueError("conversation must end with an assistant turn (nothing to train on)")


def to_preference(record: dict, columns: dict | None = None) -> tuple[list[dict], str, str]:
    """``(prompt_messages, chosen, rejected)`` from a preference-pair record.

    The prompt may be a string, a message list, alpaca instruction/input or sharegpt
    ``conversations``; chosen/rejected may be strings, one message, or full conversations
    (as in HH-RLHF style data) whose last turn is the assistant's answer.
    """
    if not isinstance(record, dict):
        raise ValueError(f"record must be a JSON object, got {type(record).__name__}")
    cols = _cols("preference", columns)
    prompt = _preference_prompt(record, cols)
    chosen, chosen_prefix = _answer(record, cols["chosen"])
    rejected, _ = _answer(record, cols["rejected"])
    if prompt is None:
        if not chosen_prefix:
            raise ValueError(
                f"missing field {cols['prompt']!r} (have {sorted(record)}) and "
                f"{cols['chosen']!r} is not a conversation that contains the prompt"
            )
        prompt = chosen_prefix
    if not prompt or prompt[-1]["role"] != "user":
        raise ValueError("the prompt must end with a user turn")
    return prompt, chosen, rejected


def _preference_prompt(record: dict, cols: dict[str, str]) -> list[dict] | None:
    value = record.get(cols["prompt"])
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list):
        return parse_turns(value, field=cols["prompt"])
    if value is not None:
        raise ValueError(f"field {cols['prompt']!r} must be a string or a list of turns")
    if "instruction" in record:
        parts = [_text(record, "instruction"), _text(record, "input", required=False)]
        return [{"role": "user", "content": "\n".join(p for p in parts if p)}]
    for key in ("conversations", "messages"):
        if key in record:
            return parse_turns(record[key], field=key)
    return None


def _answer(record: dict, key: str) -> tuple[str, list[dict]]:
    """The answer text, plus the turns before it when the answer is a full conversation."""
    value = record.get(key)
    if value is None:
        raise ValueError(f"missing field {key!r} (have {sorted(record)})")
    if isinstance(value, str):
        return value, []
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list):
        turns = parse_turns(value, field=key)
        if turns[-1]["role"] != "assistant":
            raise ValueError(f"field {key!r} must end with an assistant turn")
        return turns[-1]["content"], turns[:-1]
    raise ValueError(
        f"field {key!r} must be a string or a list of turns, got {type(value).__name__}"
    )
