"""Named chat templates (``raylm.templates``) render what LLaMA-Factory's templates build,
mask exactly the assistant replies, and travel with the tokenizer into ``final/``.

The expected strings below are written out by hand from LLaMA-Factory's slot definitions
in ``src/llamafactory/data/template.py`` (hiyouga/LLaMA-Factory commit ff6d4d12, 2026-08):
prefix + system + user slots, ``{"bos_token"}`` / ``{"eos_token"}`` being the tokenizer's
own (the tiny tokenizer's ``<|bos|>`` and ``<|im_end|>``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from raylm import templates
from raylm.config import ConfigError, load
from raylm.data.tokenize import tokenize_preference, tokenize_sft
from raylm.outputs import TOKENIZER_FILES, tokenizer_hash
from raylm.tokenizer import apply_template, load_tokenizer, require_chat_template, stop_token_ids

ROOT = Path(__file__).resolve().parents[2]

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello friend."},
    {"role": "user", "content": "More?"},
]
IM = "<|im_start|>{}\n{}<|im_end|>\n"
EXPECTED = {
    "chatml": IM.format("system", "Be brief.") + IM.format("user", "Hi there")
    + "<|im_start|>assistant\nHello friend.<|im_end|>\n" + IM.format("user", "More?")
    + "<|im_start|>assistant\n",
    "qwen3": IM.format("system", "Be brief.") + IM.format("user", "Hi there")
    + "<|im_start|>assistant\n<think>\n\n</think>\n\nHello friend.<|im_end|>\n"
    + IM.format("user", "More?") + "<|im_start|>assistant\n",
    "llama3": "<|bos|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nHello friend.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nMore?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "llama2": "<|bos|>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi there [/INST]"
    "Hello friend.<|im_end|><|bos|>[INST] More? [/INST]",
    "mistral": "<|bos|>[INST] Be brief.\n\nHi there[/INST] Hello friend.<|im_end|>[INST] More?[/INST]",
    "gemma": "<|bos|><start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n<start_of_turn>model\n"
    "Hello friend.<end_of_turn>\n<start_of_turn>user\nMore?<end_of_turn>\n<start_of_turn>model\n",
    "default": "System: Be brief.<|im_end|>\nHuman: Hi there<|im_end|>\nAssistant:"
    "Hello friend.<|im_end|>\nHuman: More?<|im_end|>\nAssistant:",
    "alpaca": "Be brief.### Instruction:\nHi there\n\n### Response:\nHello friend.<|im_end|>\n\n"
    "### Instruction:\nMore?\n\n### Response:\n",
    "vicuna": "Be brief.USER: Hi there ASSISTANT:Hello friend.<|im_end|>USER: More? ASSISTANT:",
    "phi": "<|system|>\nBe brief.<|end|>\n<|user|>\nHi there<|end|>\n<|assistant|>\n"
    "Hello friend.<|end|>\n<|user|>\nMore?<|end|>\n<|assistant|>\n",
    "deepseek3": "<|bos|>Be brief.<｜User｜>Hi there<｜Assistant｜>Hello friend.<|im_end|>"
    "<｜User｜>More?<｜Assistant｜>",
    "empty": "Be brief.Hi thereHello friend.More?",
}  # fmt: skip


@pytest.fixture
def tok(tiny_model: Path):
    """A fresh tiny tokenizer per test (templates are set on it)."""
    return load_tokenizer(str(tiny_model))


@pytest.fixture(scope="module")
def base_tokenizer(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny tokenizer without any chat template: a base model's."""
    out = tmp_path_factory.mktemp("base_tok")
    for name in TOKENIZER_FILES:
        if name != "chat_template.jinja" and (tiny_model / name).is_file():
            shutil.copy(tiny_model / name, out / name)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


def _render(tok, name: str, messages: list[dict], **kw) -> str:
    tok.chat_template = templates.get(name).jinja()
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kw)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_rendering_matches_llamafactory(tok, name: str) -> None:
    assert _render(tok, name, CHAT) == EXPECTED[name]


def test_default_system_prompts_and_qwen3_nothink(tok) -> None:
    no_system = CHAT[1:2]
    assert _render(tok, "qwen", no_system) == (
        IM.format("system", "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.")
        + IM.format("user", "Hi there")
        + "<|im_start|>assistant\n"
    )
    assert _render(tok, "qwen3_nothink", CHAT) == EXPECTED["chatml"]  # no think block
    assert _render(tok, "vicuna", no_system).startswith("A chat between a curious user")


def test_qwen3_thinking_off_puts_the_empty_thought_in_the_prompt(tok) -> None:
    prompt = _render(tok, "qwen3", CHAT[:2], enable_thinking=False)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    kept = [*CHAT[1:2], {"role": "assistant", "content": "<think>\nhm\n</think>\n\nA"}]
    assert "<think>\nhm" in _render(tok, "qwen3", kept)


def test_every_template_renders_and_its_prompt_prefixes_the_chat(tok) -> None:
    chat = [*CHAT, {"role": "assistant", "content": "No."}]
    for name in templates.TEMPLATES:
        prompt = _render(tok, name, CHAT)
        full = tok.apply_chat_template(chat, tokenize=False)
        assert full.startswith(prompt) and full != prompt, name
        assert templates.get(name).doc, name


def test_tool_results_render_and_function_calls_fail_by_role(tok) -> None:
    chat = [*CHAT[1:3], {"role": "tool", "content": '{"t": 3}'}]
    out = _render(tok, "qwen", chat)
    assert '<|im_start|>user\n<tool_response>\n{"t": 3}\n</tool_response><|im_end|>\n' in out
    with pytest.raises(Exception, match=r"chat template qwen .*role function is not supported"):
        _render(tok, "qwen", [*CHAT[1:3], {"role": "function", "content": "{}"}])


@pytest.mark.parametrize(
    ("name", "replies"),
    [
        ("chatml", "Hello friend.<|im_end|>|No.<|im_end|>"),
        ("qwen3", "<think>\n\n</think>\n\nHello friend.<|im_end|>|<think>\n\n</think>\n\nNo.<|im_end|>"),
        ("default", "Hello friend.<|im_end|>|No.<|im_end|>"),
        ("alpaca", "Hello friend.<|im_end|>|No.<|im_end|>"),
        ("llama2", "Hello friend.<|im_end|>|No.<|im_end|>"),
        ("mistral", " Hello friend.<|im_end|>| No.<|im_end|>"),
        ("deepseek3", "Hello friend.<|im_end|>|No.<|im_end|>"),
        ("empty", "Hello friend.|No."),
    ],
)  # fmt: skip
def test_the_loss_mask_covers_exactly_the_replies(
    tiny_model: Path, name: str, replies: str
) -> None:
    tok = load_tokenizer(str(tiny_model), name)
    chat = [*CHAT, {"role": "assistant", "content": "No."}]
    out = tokenize_sft(chat, tok, None)
    ids, mask = out["input_ids"], out["loss_mask"]
    assert tok.decode(ids) == tok.apply_chat_template(chat, tokenize=False)
    runs, run = [], []
    for i, m in zip(ids, mask, strict=True):
        if m:
            run.append(i)
        elif run:
            runs, run = [*runs, run], []
    runs += [run] if run else []
    assert "|".join(tok.decode(r) for r in runs) == replies


def test_dpo_masks_only_the_response_with_a_named_template(tiny_model: Path) -> None:
    tok = load_tokenizer(str(tiny_model), "qwen3")
    out = tokenize_preference(CHAT[:2], "good", "bad", tok, None)
    masked = [i for i, m in zip(out["chosen_input_ids"], out["chosen_loss_mask"], strict=True) if m]
    assert tok.decode(masked) == "<think>\n\n</think>\n\ngood<|im_end|>"


def test_a_base_tokenizer_needs_a_named_template(base_tokenizer: Path) -> None:
    bare = load_tokenizer(str(base_tokenizer))
    assert not bare.chat_template
    with pytest.raises(ValueError, match=r"no chat template.*tokenize\.template"):
        tokenize_sft([*CHAT, {"role": "assistant", "content": "No."}], bare, None)
    with pytest.raises(ConfigError, match=r"set tokenize\.template to a named template"):
        require_chat_template(bare, "sft", "tokenize.template")
    require_chat_template(bare, "pt", "tokenize.template")  # pt renders no conversation
    named = load_tokenizer(str(base_tokenizer), "chatml")
    assert named.chat_template == templates.get("chatml").jinja()
    assert sum(
        tokenize_sft([*CHAT, {"role": "assistant", "content": "No."}], named, None)["loss_mask"]
    )


def test_train_on_raw_files_with_a_base_tokenizer(base_tokenizer: Path) -> None:
    from raylm.train.data import _tokenize_raw, data_inputs

    def cfg(*extra: str):
        overrides = [f"model.name_or_path={base_tokenizer}", *extra]
        return load("train", [ROOT / "conf/train/sft_lora.yaml"], overrides)

    with pytest.raises(ConfigError, match=r"set model\.template to a named template"):
        _tokenize_raw(cfg(), data_inputs(cfg()))
    rows = _tokenize_raw(cfg("model.template=alpaca"), data_inputs(cfg("model.template=alpaca")))
    assert rows and all(sum(r["loss_mask"]) for r in rows)


def test_replace_eos_sets_the_stop_word_or_refuses_a_missing_one(tok) -> None:
    apply_template(tok, "smollm")  # keeps EOS; <|im_end|> is a stop word
    assert tok.eos_token == "<|im_end|>"
    apply_template(tok, "chatml")
    assert tok.eos_token == "<|im_end|>"
    assert stop_token_ids(tok, "chatml") == [
        tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|im_start|>")
    ]
    with pytest.raises(ConfigError, match=r"'<\|eot_id\|>', which .* vocabulary lacks"):
        apply_template(tok, "llama3")


def test_unknown_names_fail_at_config_load_with_did_you_mean() -> None:
    with pytest.raises(ConfigError, match="did you mean 'qwen3_nothink'"):
        templates.get("qwen3_notink")
    with pytest.raises(ConfigError, match="efficient_eos"):
        templates.get("glm4")
    with pytest.raises(ConfigError, match=r"model.template='lama3'.*did you mean 'llama3'"):
        load("train", [ROOT / "conf/train/sft_lora.yaml"], ["model.template=lama3"])
    with pytest.raises(ConfigError, match=r"tokenize.template='chatm'.*did you mean 'chatml'"):
        load("data", [ROOT / "conf/data/sample_sft.yaml"], ["tokenize.template=chatm"])
    ok = load("data", [ROOT / "conf/data/sample_sft.yaml"], ["tokenize.template=qwen3_nothink"])
    assert ok.tokenize.template == "qwen3_nothink"


def test_tokenizer_hash_differs_by_template(tiny_model: Path) -> None:
    plain = tokenizer_hash(str(tiny_model))
    assert tokenizer_hash(str(tiny_model), None) == plain
    named = {tokenizer_hash(str(tiny_model), t) for t in ("chatml", "qwen", "qwen3")}
    assert len(named) == 3 and plain not in named
    assert tokenizer_hash("org/m", "chatml") != tokenizer_hash("org/m")


def test_final_carries_the_template_and_its_stop_words(tiny_model: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from raylm.train.export import export_to
    from raylm.train.model import load_tokenizer as run_tokenizer

    overrides = [f"model.name_or_path={tiny_model}", "model.template=chatml"]
    cfg = load("train", [ROOT / "conf/train/pt_full.yaml"], overrides)
    module = AutoModelForCausalLM.from_pretrained(tiny_model)
    export_to(cfg, module, run_tokenizer(cfg), tmp_path / "final", rank=0)
    final = tmp_path / "final"
    assert AutoTokenizer.from_pretrained(final).chat_template == templates.get("chatml").jinja()
    tok = AutoTokenizer.from_pretrained(final)
    stops = GenerationConfig.from_pretrained(final).eos_token_id
    assert stops == [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|im_start|>")]
    assert json.loads((final / "raylm_train.json").read_text())["template"] == "chatml"


def test_the_data_job_checks_its_tokenizer_once_the_kind_is_known(base_tokenizer: Path) -> None:
    from raylm.data.shards import check_tokenizer

    def cfg(*extra: str):
        overrides = ["tokenize.enabled=true", f"tokenize.tokenizer={base_tokenizer}", *extra]
        return load("data", [ROOT / "conf/data/sample_sft.yaml"], overrides)

    with pytest.raises(ConfigError, match=r"stage dpo .* set tokenize\.template"):
        check_tokenizer(cfg(), "dpo")
    check_tokenizer(cfg(), "pt")
    check_tokenizer(cfg("tokenize.template=chatml"), "sft")
