"""Chat templates by name: LLaMA-Factory's ``template:`` as Hugging Face Jinja templates.

A base model's tokenizer has no chat template, and a LLaMA-Factory user names one
(``template: qwen3_nothink``) instead. raylm derives loss masks from whatever Jinja template
the tokenizer carries (``raylm.data.tokenize``), so a named template only has to render the
exact text LLaMA-Factory's encoder builds: each template here is transcribed slot by slot
from ``src/llamafactory/data/template.py`` (hiyouga/LLaMA-Factory, commit ff6d4d12) and
compiled to the ``chat_template`` Jinja form, so the tokenizer saved into ``final/`` serves
with the template it was trained with.

What is reproduced: the prefix, system / user / assistant / observation (``tool``) slots,
default system prompts, Llama-2-style templates that fold the system prompt into the first
user turn, and reasoning templates that prepend an empty think block to an answer without
one. Stop words are recorded (``Template.stop_words``) for generation; with
``replace_eos`` the first one becomes the tokenizer's EOS (``raylm.tokenizer``).

Not reproduced: function-call turns (LLaMA-Factory's per-model tool formats) and tool
definitions render as a clear error naming the role; ``efficient_eos`` templates (glm4,
gemma2, falcon, ...) are refused, because LLaMA-Factory trains them to predict EOS at a
position whose input is the next turn's first token, which token-id + loss-mask shards
cannot express. LLaMA-Factory tokenizes each slot separately; raylm tokenizes the rendered
text whole, which agrees for byte-level BPE tokenizers (Llama 3, Qwen, Gemma) and may
differ by a word-boundary space for SentencePiece ones (Llama 2, Mistral v1).
"""

from __future__ import annotations

import dataclasses
import hashlib

from raylm.config import ConfigError, choice


@dataclasses.dataclass(frozen=True)
class Token:
    """A slot element that is one of the tokenizer's special tokens (``bos`` or ``eos``)."""

    name: str


BOS, EOS = Token("bos"), Token("eos")
Slot = tuple[str | Token, ...]
CONTENT = "{{content}}"
DEFAULT_ASSISTANT: Slot = (CONTENT, EOS)
THOUGHT = ("<think>\n", "\n</think>\n\n")


@dataclasses.dataclass(frozen=True)
class Template:
    """One LLaMA-Factory template: its slots, with ``{{content}}`` where the text goes."""

    name: str
    doc: str
    """What the template is for (one line)."""

    user: Slot = (CONTENT,)
    assistant: Slot = DEFAULT_ASSISTANT
    system: Slot = (CONTENT,)
    observation: Slot | None = None
    """A tool result turn; None: formatted as a user turn (LLaMA-Factory's default)."""

    prefix: Slot = ()
    default_system: str = ""
    """Used when the conversation has no (or an empty) system turn."""

    stop_words: tuple[str, ...] = ()
    """Tokens generation stops at (besides EOS)."""

    replace_eos: bool = False
    """The first stop word becomes the tokenizer's EOS."""

    merge_system: bool = False
    """Llama2Template: the system text is prepended to the first user turn."""

    think: bool = False
    """ReasoningTemplate: an answer without a think block gets an empty one (trained on)."""

    @property
    def eos_word(self) -> str | None:
        """The token the tokenizer's EOS is replaced with, if any."""
        return self.stop_words[0] if self.replace_eos else None

    def jinja(self) -> str:
        """The Hugging Face ``chat_template`` rendering what LLaMA-Factory's encoder does."""
        return _jinja(self)

    def digest(self) -> str:
        """Short content hash: shards are tied to the template's text, not just its name."""
        spec = repr((self.jinja(), self.eos_word))
        return hashlib.sha256(spec.encode()).hexdigest()[:16]


def _t(name: str, doc: str, **kw) -> Template:
    return Template(name=name, doc=doc, **kw)


# ChatML family (<|im_start|>role ... <|im_end|>).
_IM_USER: Slot = ("<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n",)
_IM_ASSISTANT: Slot = ("{{content}}<|im_end|>\n",)
_IM_SYSTEM: Slot = ("<|im_start|>system\n{{content}}<|im_end|>\n",)
_IM_TOOL: Slot = ("<|im_start|>tool\n{{content}}<|im_end|>\n<|im_start|>assistant\n",)
_QWEN_TOOL: Slot = (
    "<|im_start|>user\n<tool_response>\n{{content}}\n</tool_response><|im_end|>\n"
    "<|im_start|>assistant\n",
)
_QWEN = dict(
    user=_IM_USER, assistant=_IM_ASSISTANT, system=_IM_SYSTEM, observation=_QWEN_TOOL,
    stop_words=("<|im_end|>",), replace_eos=True,
)  # fmt: skip
_CHATML = dict(
    user=_IM_USER, assistant=_IM_ASSISTANT, system=_IM_SYSTEM, observation=_IM_TOOL,
    stop_words=("<|im_end|>", "<|im_start|>"), replace_eos=True,
)  # fmt: skip
_SMOL = dict(user=_IM_USER, assistant=_IM_ASSISTANT, system=_IM_SYSTEM, stop_words=("<|im_end|>",))

# Llama 2 ([INST] ... [/INST], system folded into the first user turn).
_LLAMA2 = dict(
    user=(BOS, "[INST] {{content}} [/INST]"),
    system=("<<SYS>>\n{{content}}\n<</SYS>>\n\n",),
    merge_system=True,
)

# Gemma (<start_of_turn>user ... model; system folded into the first user turn).
_GEMMA = dict(
    user=("<start_of_turn>user\n{{content}}<end_of_turn>\n<start_of_turn>model\n",),
    assistant=("{{content}}<end_of_turn>\n",),
    system=("{{content}}\n\n",),
    observation=("<start_of_turn>tool\n{{content}}<end_of_turn>\n<start_of_turn>model\n",),
    prefix=(BOS,),
    stop_words=("<end_of_turn>",),
    replace_eos=True,
    merge_system=True,
)

_DEEPSEEK3 = dict(user=("<｜User｜>{{content}}<｜Assistant｜>",), prefix=(BOS,))

_ALL = [
    _t(
        "alpaca",
        "Stanford Alpaca's instruction / response format, for base models.",
        user=("### Instruction:\n{{content}}\n\n### Response:\n",),
        assistant=(CONTENT, EOS, "\n\n"),
        default_system=(
            "Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.\n\n"
        ),
    ),
    _t("chatml", "Plain ChatML (<|im_start|> / <|im_end|>), EOS set to <|im_end|>.", **_CHATML),
    _t(
        "chatml_de",
        "ChatML with a German default system prompt.",
        **_CHATML,
        default_system="Du bist ein freundlicher und hilfsbereiter KI-Assistent.",
    ),
    _t(
        "deepseek",
        "DeepSeek LLM (v1) chat: 'User: ... Assistant:'.",
        user=("User: {{content}}\n\nAssistant:",),
        system=("{{content}}\n\n",),
        prefix=(BOS,),
    ),
    _t("deepseek3", "DeepSeek-V3 / V3.1 chat (<｜User｜> / <｜Assistant｜>).", **_DEEPSEEK3),
    _t("deepseekr1", "DeepSeek-R1: deepseek3 with think blocks.", **_DEEPSEEK3, think=True),
    _t(
        "default",
        "LLaMA-Factory's generic 'Human: / Assistant:' format with EOS after each turn.",
        user=("Human: {{content}}", EOS, "\nAssistant:"),
        assistant=(CONTENT, EOS, "\n"),
        system=("System: {{content}}", EOS, "\n"),
    ),
    _t("empty", "No markup at all: turns are concatenated as they are.", assistant=(CONTENT,)),
    _t("gemma", "Gemma / Gemma 1.1 instruction models.", **_GEMMA),
    _t("gemma3", "Gemma 3 (text only; same turns as gemma).", **_GEMMA),
    _t("llama2", "Llama 2 chat ([INST] / <<SYS>>).", **_LLAMA2),
    _t(
        "llama2_zh",
        "Llama 2 chat with a bilingual (English / Chinese) default system prompt.",
        **_LLAMA2,
        default_system="You are a helpful assistant. 你是一个乐于助人的助手。",
    ),
    _t(
        "llama3",
        "Llama 3 / 3.1 / 3.2 / 3.3 instruct (header ids, <|eot_id|>).",
        user=(
            "<|start_header_id|>user<|end_header_id|>\n\n{{content}}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
        ),
        assistant=("{{content}}<|eot_id|>",),
        system=("<|start_header_id|>system<|end_header_id|>\n\n{{content}}<|eot_id|>",),
        observation=(
            "<|start_header_id|>ipython<|end_header_id|>\n\n{{content}}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
        ),
        prefix=(BOS,),
        stop_words=("<|eot_id|>", "<|eom_id|>"),
        replace_eos=True,
    ),
    _t(
        "llama4",
        "Llama 4 instruct (text only).",
        user=(
            "<|header_start|>user<|header_end|>\n\n{{content}}<|eot|>"
            "<|header_start|>assistant<|header_end|>\n\n",
        ),
        assistant=("{{content}}<|eot|>",),
        system=("<|header_start|>system<|header_end|>\n\n{{content}}<|eot|>",),
        observation=(
            "<|header_start|>ipython<|header_end|>\n\n{{content}}<|eot|>"
            "<|header_start|>assistant<|header_end|>\n\n",
        ),
        prefix=(BOS,),
        stop_words=("<|eot|>", "<|eom|>"),
        replace_eos=True,
    ),
    _t(
        "mistral",
        "Mistral instruct (tokenizer v3: '[INST] ...[/INST]').",
        user=("[INST] {{content}}[/INST]",),
        assistant=(" {{content}}", EOS),
        system=("{{content}}\n\n",),
        observation=('[TOOL_RESULTS] {"content": {{content}}}[/TOOL_RESULTS]',),
        prefix=(BOS,),
        merge_system=True,
    ),
    _t(
        "phi",
        "Phi-3 / Phi-3.5 instruct (<|user|> ... <|end|>).",
        user=("<|user|>\n{{content}}<|end|>\n<|assistant|>\n",),
        assistant=("{{content}}<|end|>\n",),
        system=("<|system|>\n{{content}}<|end|>\n",),
        stop_words=("<|end|>",),
        replace_eos=True,
    ),
    _t(
        "phi4",
        "Phi-4 (<|im_start|>role<|im_sep|>).",
        user=("<|im_start|>user<|im_sep|>{{content}}<|im_end|><|im_start|>assistant<|im_sep|>",),
        assistant=("{{content}}<|im_end|>",),
        system=("<|im_start|>system<|im_sep|>{{content}}<|im_end|>",),
        stop_words=("<|im_end|>",),
        replace_eos=True,
    ),
    _t(
        "qwen",
        "Qwen 1.5 / 2 / 2.5 chat (ChatML with Qwen's default system prompt).",
        **_QWEN,
        default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    ),
    _t(
        "qwen3",
        "Qwen3 thinking models: answers without a think block get an empty one.",
        **_QWEN,
        think=True,
    ),
    _t(
        "qwen3_nothink",
        "Qwen3 instruct (non-thinking, e.g. 2507 Instruct): ChatML, no think.",
        **_QWEN,
    ),
    _t("qwen3_5", "Qwen3.5 (text only), thinking: as qwen3.", **_QWEN, think=True),
    _t("qwen3_5_nothink", "Qwen3.5 (text only), non-thinking: as qwen3_nothink.", **_QWEN),
    _t("smollm", "SmolLM instruct (ChatML; EOS kept, <|im_end|> a stop word).", **_SMOL),
    _t(
        "smollm2",
        "SmolLM2 instruct (ChatML with its default system prompt).",
        **_SMOL,
        default_system="You are a helpful AI assistant named SmolLM, trained by Hugging Face.",
    ),
    _t(
        "vicuna",
        "Vicuna v1.1+ ('USER: ... ASSISTANT:'), for base models.",
        user=("USER: {{content}} ASSISTANT:",),
        default_system=(
            "A chat between a curious user and an artificial intelligence assistant. "
            "The assistant gives helpful, detailed, and polite answers to the user's questions."
        ),
    ),
    _t("yi", "Yi chat (ChatML; EOS kept, <|im_end|> a stop word).", **_SMOL),
    _t(
        "zephyr",
        "Zephyr (<|user|> ... EOS <|assistant|>).",
        user=("<|user|>\n{{content}}", EOS, "<|assistant|>\n"),
        system=("<|system|>\n{{content}}", EOS),
        default_system="You are Zephyr, a helpful assistant.",
    ),
]
TEMPLATES: dict[str, Template] = {t.name: t for t in _ALL}
"""Every named template, by LLaMA-Factory's name."""

UNSUPPORTED: dict[str, str] = dict.fromkeys(
    ("bailing", "bailing_v2", "breeze", "chatglm3", "dots_ocr", "falcon", "fewshot", "gemma2",
     "glm4", "glm4_moe", "glm4v", "glm4_5v", "glm4_7", "glmz1", "solar", "aeva"),
    "it is an efficient_eos template: LLaMA-Factory trains EOS at the next turn's first "
    "token, which token-id + loss-mask shards cannot express",
)  # fmt: skip
"""LLaMA-Factory templates raylm refuses, and why (others it lacks are simply unknown)."""


def get(name: str, key: str = "template") -> Template:
    """The named template; an unknown name fails naming the closest one (``key`` is the
    config key being validated, for the message)."""
    if name in UNSUPPORTED:
        raise ConfigError(
            f"{key}={name!r}: LLaMA-Factory's {name!r} template is not supported: "
            f"{UNSUPPORTED[name]}. Supported: {sorted(TEMPLATES)}"
        )
    choice(key, name, sorted(TEMPLATES))
    return TEMPLATES[name]


def check(name: str | None, key: str) -> None:
    """Config validation: None (the tokenizer's own template) or a known name."""
    if name is not None:
        get(name, key)


def lit(text: str) -> str:
    """A Jinja string literal (Jinja decodes Python-style escapes in literals)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def _expr(slots: Slot, placeholder: str = "content") -> str:
    """A Jinja expression concatenating the slots, ``{{content}}`` -> ``placeholder``."""
    items = []
    for slot in slots:
        if isinstance(slot, Token):
            items.append(slot.name)
            continue
        before, found, after = slot.partition(CONTENT)
        items += [lit(before)] if before else []
        items += [placeholder] if found else []
        items += [lit(after)] if after else []
    return " + ".join(items) or "''"


def _raise(t: Template, what: str) -> str:
    return (
        "{{- raise_exception('chat template " + t.name + " (raylm.templates): ' ~ " + what + ") -}}"
    )


def _jinja(t: Template) -> str:
    """LLaMA-Factory's ``Template._encode`` (and ``Llama2Template._encode``, and the empty
    thought of ``ReasoningTemplate.encode_multiturn``) as one Jinja template."""
    thought = lit("".join(THOUGHT))
    lines = [
        "{#- raylm.templates '" + t.name + "': LLaMA-Factory's template of that name -#}",
        "{%- set bos = bos_token if bos_token is defined and bos_token else '' -%}",
        "{%- set eos = eos_token if eos_token is defined and eos_token else '' -%}",
        "{%- if tools is defined and tools -%}",
        _raise(t, "'tool definitions are not supported'"),
        "{%- endif -%}",
        "{%- set has_system = messages and messages[0]['role'] == 'system' -%}",
        "{%- set system_message = messages[0]['content'] if has_system else '' -%}",
        "{%- set loop_messages = messages[1:] if has_system else messages -%}",
    ]
    if t.default_system:
        lines.append(f"{{%- set system_message = system_message or {lit(t.default_system)} -%}}")
    if t.think:
        lines.append(
            "{%- set thinking = not (enable_thinking is defined and enable_thinking is false) -%}"
        )
    if t.prefix:
        lines.append("{%- if loop_messages -%}{{- " + _expr(t.prefix) + " -}}{%- endif -%}")
    if not t.merge_system:
        lines.append(
            "{%- if loop_messages and system_message -%}"
            "{{- " + _expr(t.system, "system_message") + " -}}{%- endif -%}"
        )
    lines += [
        "{%- for message in loop_messages -%}",
        "{%- set content = message['content'] -%}",
        "{%- if content is not string -%}",
        _raise(t, "message['role'] ~ ' content must be a string'"),
        "{%- endif -%}",
    ]
    if t.merge_system:
        system_text = _expr(t.system, "system_message")
        lines.append(
            "{%- if loop.first and system_message and message['role'] == 'user' -%}"
            "{%- set content = " + system_text + " + content -%}{%- endif -%}"
        )
    lines += [
        "{%- if message['role'] == 'user' -%}",
        "{{- " + _expr(t.user) + " -}}",
        "{%- elif message['role'] == 'assistant' -%}",
        "{%- if message['tool_calls'] is defined and message['tool_calls'] -%}",
        _raise(t, "'assistant tool calls are not supported'"),
        "{%- endif -%}",
    ]
    if t.think:
        lines.append(
            "{%- if not thinking and '<think>\\n' in content and '\\n</think>\\n\\n' in content -%}"
            "{%- set content = (content.split('<think>\\n', 1)[0] + "
            "content.split('\\n</think>\\n\\n', 1)[1]).lstrip('\\n') -%}{%- endif -%}"
        )
        lines.append(
            "{%- if '<think>' not in content and '</think>' not in content -%}"
            "{{- " + thought + " -}}{%- endif -%}"
        )
    lines += [
        "{{- " + _expr(t.assistant) + " -}}",
        "{%- elif message['role'] in ['tool', 'observation'] -%}",
        "{{- " + _expr(t.observation or t.user) + " -}}",
        "{%- else -%}",
        _raise(t, "'role ' ~ message['role'] ~ ' is not supported'"),
        "{%- endif -%}",
        "{%- endfor -%}",
    ]
    if t.think:
        # enable_thinking=false (vLLM's chat_template_kwargs): the empty thought is prompt.
        lines.append(
            "{%- if add_generation_prompt and not thinking -%}{{- " + thought + " -}}{%- endif -%}"
        )
    return "\n".join(lines) + "\n"
