"""The ollama ``Modelfile`` beside a GGUF export: FROM the file, the chat template in
ollama's Go syntax when raylm can say it is the same prompt (ChatML), and the stop tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CHATML_GO = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
    "{{ end }}<|im_start|>assistant\n"
)
"""Ollama's Go-template form of a ChatML chat template."""

_PROBE = [
    {"role": "system", "content": "SYSTEM-TEXT"},
    {"role": "user", "content": "USER-TEXT"},
    {"role": "assistant", "content": "ASSISTANT-TEXT"},
    {"role": "user", "content": "USER-TEXT-2"},
]


def _is_chatml(tok: Any) -> bool:
    """The template renders a conversation exactly as ChatML does (no default system
    prompt, no BOS), so ollama's ChatML Go template is the same prompt."""
    if not getattr(tok, "chat_template", None):
        return False
    want = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in _PROBE)
    try:
        got = tok.apply_chat_template(_PROBE, tokenize=False, add_generation_prompt=True)
    except Exception:  # a template that refuses system turns, say: not ChatML
        return False
    return got == want + "<|im_start|>assistant\n"


def modelfile(model_dir: Path, gguf_name: str) -> str:
    """An ollama Modelfile: FROM the GGUF file, TEMPLATE for a ChatML template, and the
    stop tokens of ``generation_config.json`` (and ``<|im_end|>`` for ChatML)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    lines = [f"FROM ./{gguf_name}", ""]
    chatml = _is_chatml(tok)
    if chatml:
        lines += [f'TEMPLATE """{CHATML_GO}"""', ""]
    elif getattr(tok, "chat_template", None):
        lines += [
            "# TEMPLATE left out: the chat template is not ChatML, and raylm does not",
            "# translate other Jinja templates into ollama's Go templates. The GGUF file",
            "# carries the Jinja template (tokenizer.chat_template) for llama.cpp; write",
            "# a TEMPLATE here by hand for ollama.",
            "",
        ]
    else:
        lines += ["# No chat template: a base model, prompted with raw text.", ""]
    stops: list[str] = ["<|im_end|>"] if chatml else []
    gen = model_dir / "generation_config.json"
    eos = json.loads(gen.read_text()).get("eos_token_id") if gen.is_file() else tok.eos_token_id
    for i in eos if isinstance(eos, list) else [eos] if eos is not None else []:
        stops.append(tok.convert_ids_to_tokens(int(i)))
    lines += [f'PARAMETER stop "{s}"' for s in dict.fromkeys(stops)]
    return "\n".join(lines) + "\n"
