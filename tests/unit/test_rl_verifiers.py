"""raylm.rl.verifiers on the cases a policy will find: extraction variants, near-miss
numbers, code that fails, loops or exits early, and badly named user functions."""

from __future__ import annotations

import math
import sys
import textwrap
import time
from pathlib import Path

import pytest

from raylm.config import ConfigError
from raylm.rl.advantages import group_advantages
from raylm.rl.config import GRPOConfig, RewardConfig
from raylm.rl.verifiers import (
    build_rewards,
    code_reward,
    format_reward,
    load_function,
    math_reward,
    score,
)

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "completion, gold, reward",
    [
        ("So the total is \\boxed{42}.", "42", 1.0),
        ("First 3 + 4 = 7, then \\boxed{42} apples", "42", 1.0),  # boxed beats the last number
        ("She has 40 + 2 = 42 apples.\n#### 42", "42", 1.0),
        ("The answer is 42.0", "42", 1.0),
        ("#### 42.00", "42", 1.0),
        ("It costs $1,000 in total.", "1000", 1.0),
        ("#### 1,234,567", "1234567", 1.0),
        ("The answer is 43.", "42", 0.0),
        ("The answer is 4.2", "42", 0.0),
        ("I don't know.", "42", 0.0),
        ("\\boxed{-3}", "-3", 1.0),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1.0),
        ("42\nQuestion: what is 6*7?\nAnswer: 41", "42", 1.0),  # cut at the next question
    ],
)
def test_math_reward(completion: str, gold: str, reward: float) -> None:
    assert math_reward([completion], answer=[gold]) == [reward]


def test_math_reward_takes_gsm8k_solutions_and_chat_completions() -> None:
    gold = "Natalia sold 48/2 = 24 clips in May.\nAltogether 48+24 = 72 clips.\n#### 72"
    chat = [{"role": "assistant", "content": "48 + 24 = 72, so \\boxed{72}"}]
    assert math_reward([chat, "71"], answer=[gold, gold]) == [1.0, 0.0]


def test_math_reward_wants_one_answer_per_completion() -> None:
    with pytest.raises(ValueError, match="'answer' has 1 entries for 2 completions"):
        math_reward(["1", "2"], answer=["1"])


THINK = r"<think>.+?</think>\s*<answer>.+?</answer>"


def test_format_reward() -> None:
    good = "<think>\n6*7 is 42\n</think>\n<answer>42</answer>"
    assert format_reward([good, " " + good + "\n"], pattern=THINK) == [1.0, 1.0]
    assert format_reward([good + " trailing", "<answer>42</answer>"], pattern=THINK) == [0.0, 0.0]
    assert format_reward([good + " trailing"], pattern=THINK, search=True) == [1.0]
    with pytest.raises(ConfigError, match="not a valid regex"):
        format_reward(["x"], pattern="(unclosed")


ADD_TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0"


def test_code_reward_pass_fail_error() -> None:
    fenced = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    plain = "def add(a, b):\n    return a + b\n[DONE] trailing prose"
    wrong = "def add(a, b):\n    return a - b"
    broken = "def add(a, b) return a + b"
    rewards = code_reward([fenced, plain, wrong, broken], test=[ADD_TESTS] * 4, timeout_s=10)
    assert rewards == [1.0, 1.0, 0.0, 0.0]


def test_code_reward_takes_assert_lists() -> None:
    ok = "def add(a, b):\n    return a + b"
    assert code_reward([ok], test=[["assert add(1, 1) == 2", "assert add(0, 0) == 0"]]) == [1.0]


def test_code_reward_kills_loops_and_times_out() -> None:
    loop = "def add(a, b):\n    while True:\n        pass"
    slow = "import time\ndef add(a, b):\n    time.sleep(30)\n    return a + b"
    start = time.monotonic()
    assert code_reward([loop, slow], test=[ADD_TESTS] * 2, timeout_s=2, workers=2) == [0.0, 0.0]
    assert time.monotonic() - start < 20


@pytest.mark.parametrize(
    "exit_call", ["import sys\nsys.exit(0)", "exit()", "import os\nos._exit(0)"]
)
def test_code_reward_early_exit_is_a_failure(exit_call: str) -> None:
    """Exiting 0 before the tests run would otherwise be the easiest pass of all."""
    hack = f"def add(a, b):\n    return 0\n{exit_call}"
    assert code_reward([hack], test=[ADD_TESTS], timeout_s=10) == [0.0]


def test_code_reward_sandbox_refusal_is_a_failure() -> None:
    net = "import socket\nsocket.socket()\ndef add(a, b):\n    return a + b"
    assert code_reward([net], test=[ADD_TESTS], timeout_s=10) == [0.0]


def test_code_reward_humaneval_continues_the_prompt() -> None:
    prompt = 'def add(a, b):\n    """Sum of a and b."""\n'
    body = "    return a + b\n\ndef unrelated():\n    raise SystemExit(1)"
    assert code_reward([body], test=[ADD_TESTS], prompts=[prompt], fmt="humaneval") == [1.0]
    with pytest.raises(ConfigError, match="needs the prompts"):
        code_reward([body], test=[ADD_TESTS], fmt="humaneval")


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    src = """
        def brevity(completions, **_):
            return [1.0 / (1 + len(c)) for c in completions]

        def picky(completions, **_):
            return [None if c == "skip" else 0.5 for c in completions]

        def short(completions, **_):
            return [1.0]

        NOT_CALLABLE = 3
    """
    (tmp_path / "rl_user_rewards.py").write_text(textwrap.dedent(src))
    (tmp_path / "rl_broken_rewards.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "rl_user_rewards"
    for name in ("rl_user_rewards", "rl_broken_rewards"):
        sys.modules.pop(name, None)


def test_load_function(user_module: str) -> None:
    assert load_function(f"{user_module}:brevity")(["ab"]) == [pytest.approx(1 / 3)]


@pytest.mark.parametrize(
    "spec, match",
    [
        ("rl_user_rewards.brevity", r"expected 'module:function'"),
        ("maths", r"did you mean 'math'"),
        ("rl_user_rewards:", r"expected 'module:function'"),
        ("no_such_module_xyz:f", r"no module named 'no_such_module_xyz'"),
        ("rl_user_rewards:brevty", r"has no 'brevty' \(did you mean 'brevity'\?\)"),
        ("rl_user_rewards:NOT_CALLABLE", r"is a int, not a function"),
        ("rl_broken_rewards:f", r"importing rl_broken_rewards failed: No module named 'no_such"),
    ],
)
def test_bad_user_function_names_are_clear(user_module: str, spec: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_function(spec)


def test_config_to_advantages(user_module: str) -> None:
    """Config -> functions -> reward matrix -> advantages, None included."""
    cfg = GRPOConfig(
        num_generations=2,
        rewards=[
            RewardConfig(function="math", weight=1.0),
            RewardConfig(function=f"{user_module}:picky", weight=0.5),
            RewardConfig(function="format", weight=0.2, kwargs={"pattern": r".*\\boxed\{.*\}.*"}),
        ],
    )
    rewards = build_rewards(cfg)
    assert [name for name, _ in rewards] == ["math", "picky", "format"]
    completions = ["\\boxed{4}", "skip", "5", "\\boxed{5}"]
    table = score(rewards, completions, answer=["4", "4", "5", "6"])
    assert table[:, 0].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert math.isnan(table[1, 1]) and table[0, 1] == 0.5
    assert table[:, 2].tolist() == [1.0, 0.0, 0.0, 1.0]
    adv = group_advantages(table, cfg.num_generations, cfg.reward_weights).advantages
    assert adv[0] > 0 > adv[1] and adv[2] > 0 > adv[3]


def test_score_names_a_function_returning_too_few(user_module: str) -> None:
    short = load_function(f"{user_module}:short")
    with pytest.raises(ValueError, match="'short' returned 1 rewards for 2 completions"):
        score([("short", short)], ["a", "b"])
