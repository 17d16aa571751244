"""The grpo stage's glue, without Ray or vLLM: config refusals, prompt rows, the batch
that scores completions, sampling seeds, reward columns and one loss on the tiny model."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch

from raylm.config import ConfigError, load
from raylm.train.grpo import GRPOStep, assemble, prompt_row, sample_seed, token_logps

ROOT = Path(__file__).resolve().parents[2]


def cfg(*overrides: str):
    return load("train", [ROOT / "conf/train/grpo_tiny.yaml"], list(overrides))


def test_grpo_config_loads_with_trl_defaults_and_the_engine_group() -> None:
    c = cfg()
    assert c.stage == "grpo" and c.grpo.num_generations == 8 and c.grpo.loss_type == "dapo"
    assert c.grpo.rewards[0].function == "format" and c.grpo.engine.dtype == "float32"
    assert cfg("grpo.engine.max_num_seqs=16").grpo.engine.max_num_seqs == 16


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["stage=ppo"], "stage ppo needs a reward: ppo.reward_model"),
        (
            ["stage=ppo", "ppo.rewards=[{function: math}]", "train.precision=fp16"],
            "outside DeepSpeed's loss scaler",
        ),
        (
            ["stage=ppo", "ppo.rewards=[{function: math}]", "finetuning_type=oft"],
            "stage ppo with finetuning_type=oft",
        ),
        (["stage=ppo", "ppo.gamma=2"], "ppo.gamma=2"),
        (["finetuning_type=oft"], "use one of \\['full', 'lora', 'freeze'\\]"),
        (["finetuning_type=qlora"], "rollout engine takes full weights or a LoRA adapter"),
        (["grpo.num_iterations=2"], "reusing a batch is not built yet"),
        (["data.val_size=0.1"], "which grpo has none of"),
        (["data.tokenized_path=/tmp/x"], "data.tokenized_path saves token shards"),
        (["model.mixture_of_depths=convert"], "mixture_of_depths is for stage pt or sft"),
        (["finetuning_type=lora", "lora.init=pissa"], "base under the disabled adapter"),
        (["grpo.num_generations=1"], "at least 2"),
        (["grpo.engine.dtype=fp8"], "engine.dtype"),
        (["grpo.engine_cpus=-1"], "grpo.engine_cpus"),
    ],
)
def test_unsupported_grpo_settings_are_refused_by_name(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        cfg(*overrides)


class _Tok:
    """Character-code tokenizer with a chat template stand-in."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [1, *map(ord, text)]}

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        assert add_generation_prompt and tokenize
        return [3, *[ord(c) for m in messages for c in m["content"]], 4]


def _row(record, cutoff):
    return prompt_row(record, None, "grpo", _Tok(), cutoff)


def test_prompt_row_reads_text_and_chat_prompts_and_keeps_reward_columns() -> None:
    row = _row({"prompt": "ab", "answer": "42", "meta": {"k": 1}}, 16)
    assert row["prompt_ids"] == [1, 97, 98]
    assert json.loads(row["prompt"]) == "ab"
    assert json.loads(row["reward_columns"]) == {"answer": "42", "meta": {"k": 1}}
    chat = _row({"messages": [{"role": "user", "content": "hi"}]}, 16)
    assert chat["prompt_ids"] == [3, 104, 105, 4] and isinstance(json.loads(chat["prompt"]), list)
    alpaca = _row({"instruction": "x", "output": "y"}, 16)
    assert json.loads(alpaca["reward_columns"]) == {"output": "y"}
    with pytest.raises(ValueError, match="needs one of the fields"):
        _row({"answer": "1"}, 16)
    with pytest.raises(ValueError, match="leaves none"):
        _row({"prompt": "abcdef"}, 4)


def test_raw_prompt_file_becomes_prompt_rows_through_the_train_reader(tiny_model) -> None:
    from raylm.train.data import _tokenize_raw, data_inputs

    c = cfg(f"model.name_or_path={tiny_model}")
    rows = _tokenize_raw(c, data_inputs(c))
    assert len(rows) == 64 and rows[0]["id"] == "0"
    assert rows[0]["prompt_ids"] and json.loads(rows[0]["prompt"]) == "What color is the hen?"
    assert json.loads(rows[0]["reward_columns"])["output"] == "The hen is teal."


def test_sampling_seeds_are_stable_and_distinct_per_step_prompt_and_sample() -> None:
    s = sample_seed(42, 3, "7", 0)
    assert s == sample_seed(42, 3, "7", 0) and 0 <= s < 2**31
    others = {sample_seed(42, 4, "7", 0), sample_seed(42, 3, "8", 0),
              sample_seed(42, 3, "7", 1), sample_seed(43, 3, "7", 0)}  # fmt: skip
    assert s not in others and len(others) == 4


def test_assemble_left_pads_prompts_right_pads_completions() -> None:
    b = assemble([[5, 6, 7], [8]], [[9], [10, 11, 12]], pad_id=0)
    assert b["start"] == 3
    assert b["input_ids"].tolist() == [[5, 6, 7, 9, 0, 0], [0, 0, 8, 10, 11, 12]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 3, 3], [0, 0, 0, 1, 2, 3]]
    assert b["completion_ids"].tolist() == [[9, 0, 0], [10, 11, 12]]
    assert b["completion_mask"].tolist() == [[1, 0, 0], [1, 1, 1]]


def test_padded_batch_logps_equal_each_sequence_scored_alone(tiny_model) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    prompts, comps = [[1, 50, 60, 70], [1, 80]], [[90, 91], [92, 93, 94]]
    with torch.no_grad():
        batch = assemble(prompts, comps, pad_id=0)
        logps, _ = token_logps(model, batch, temperature=0.7)
        for i, (p, c) in enumerate(zip(prompts, comps, strict=True)):
            logits = model(torch.tensor([p + c])).logits[0, len(p) - 1 : -1] / 0.7
            alone = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c)[:, None])[:, 0]
            torch.testing.assert_close(logps[i, : len(c)], alone, atol=1e-5, rtol=1e-5)


def _step(model, tok, **grpo) -> GRPOStep:
    """A GRPOStep without the engine or a process group: one worker, rollouts given."""
    from raylm.rl.verifiers import build_rewards

    c = cfg(*[f"grpo.{k}={v}" for k, v in grpo.items()])
    step = object.__new__(GRPOStep)
    loop = types.SimpleNamespace(cfg=c, engine=model, tok=tok, ref=None, world=1, rank=0)
    step.loop, step.g, step.lora, step.metrics, step.items = loop, c.grpo, False, {}, 1.0
    step.rewards = build_rewards(c.grpo)
    return step


def test_score_repeats_columns_per_completion_and_wraps_chat_completions() -> None:
    step = _step(None, None, num_generations=2)
    step.g.rewards[0].kwargs = {"pattern": "^a", "search": True}
    from raylm.rl.verifiers import build_rewards

    step.rewards = build_rewards(step.g)
    rows = [{"prompt": json.dumps([{"role": "user", "content": "q"}]),
             "reward_columns": json.dumps({"answer": "1"})},
            {"prompt": json.dumps([{"role": "user", "content": "r"}]),
             "reward_columns": "{}"}]  # fmt: skip
    table = step._score(rows, ["apple", "pear", "art", "b"])
    assert table[:, 0].tolist() == [1.0, 0.0, 1.0, 0.0]


def test_loss_on_the_tiny_model_is_finite_and_pushes_the_rewarded_completion(tiny_model) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    step = _step(model, tok, num_generations=2, beta=0.0)
    good, bad = [40, 41, 2], [42, 43, 44]
    with torch.no_grad():
        lp = token_logps(model, assemble([[1, 5]] * 2, [good, bad], 0), 1.0)[0]
    step.rollouts = {"0": [(good, lp[0, :3].tolist(), True, 1.0),
                           (bad, lp[1, :3].tolist(), False, -1.0)]}  # fmt: skip
    loss, metrics, n_tok = step.loss([{"id": "0", "prompt_ids": [1, 5]}])
    assert torch.isfinite(loss) and n_tok == 6
    assert metrics["sampling/importance_sampling_ratio/mean"] == pytest.approx(1.0, abs=1e-4)
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.05).step()
    with torch.no_grad():
        after = token_logps(model, assemble([[1, 5]] * 2, [good, bad], 0), 1.0)[0]
    assert after[0, :3].sum() > lp[0, :3].sum() and after[1].sum() < lp[1].sum()


def test_lora_sync_sends_the_adapter_files_the_engine_loads(tiny_model) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from raylm.train.grpo import _adapter_files

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    model = get_peft_model(base, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    files = _adapter_files(model)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(files)
    assert json.loads(files["adapter_config.json"])["r"] == 8
