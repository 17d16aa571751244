"""Rule-based rewards for GRPO / PPO, each on 0-1, with TRL's reward-function signature.

A reward function takes the completions (strings, or chat messages whose last content is
the completion, as TRL passes conversational ones) and the dataset's columns as keyword
arguments, and returns one float per completion, or None where it does not apply (that
completion is then scored by the other functions only; see ``raylm.rl.advantages``).

The built-ins reuse raylm's eval code rather than copies of it: answer extraction from
``raylm.eval.benchmarks.answers`` (GSM8K's) and the sandbox of
``raylm.eval.benchmarks.code_exec`` (HumanEval / MBPP's). A user function is named in
config as ``module:function`` and loaded by :func:`load_function`.

Rewards are what the policy optimises, so each one's failure modes are documented: a
policy will find and exploit them (reward hacking) long before a person would.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch

from raylm.config import ConfigError
from raylm.eval.benchmarks.answers import extract_answer, numeric_equal
from raylm.eval.benchmarks.code_exec import program_of, run_programs, truncate
from raylm.rl.config import GRPOConfig

RewardFn = Callable[..., list[float | None]]
"""``f(completions, **columns) -> [reward or None, ...]``, one entry per completion."""

Completion = str | list[dict[str, Any]]

_FENCE = re.compile(r"```(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL)


def text_of(completion: Completion) -> str:
    """The completion's text: a string as is, a chat completion's last message content."""
    if isinstance(completion, str):
        return completion
    return str(completion[-1].get("content", "")) if completion else ""


def math_reward(completions: Sequence[Completion], answer: Sequence[str], **_: Any) -> list[float]:
    """1.0 when the completion's final answer equals the reference, else 0.0.

    The answer is the last ``\\boxed{}``, else GSM8K's ``#### N``, else the last number
    in the text (raylm's GSM8K extraction, lm-eval's flexible-extract). The reference
    (the ``answer`` column) is extracted the same way, so a full GSM8K solution ending in
    ``#### 42`` works as well as ``42``. Numbers compare as numbers: ``42``, ``42.0``,
    ``42.00`` and ``$1,000`` / ``1000`` agree.

    Failure modes: the last-number fallback rewards a completion whose final number is
    right by accident (e.g. restating a quantity from the question after a wrong
    derivation), so prompt for ``\\boxed{}`` or ``####`` and add a format reward;
    non-numeric answers (``\\frac{1}{2}``, ``x=3``) compare as exact strings, so
    ``\\frac{1}{2}`` and ``0.5`` disagree; a completion with no number at all gets 0.0.
    """
    _same_length("answer", answer, completions)
    out = []
    for completion, gold in zip(completions, answer, strict=True):
        reference = extract_answer(str(gold)) or str(gold).strip()
        out.append(1.0 if numeric_equal(extract_answer(text_of(completion)), reference) else 0.0)
    return out


def format_reward(
    completions: Sequence[Completion], pattern: str, search: bool = False, **_: Any
) -> list[float]:
    """1.0 when the completion matches ``pattern`` (Python ``re``, DOTALL: ``.`` spans
    lines), else 0.0. The whole stripped completion must match, unless ``search`` is True,
    which only asks for the pattern somewhere in it.

    Failure modes: a format reward alone is satisfied by an empty template (``<think>
    </think><answer></answer>``); weight it below the correctness reward. A pattern with
    nested unbounded repeats can backtrack catastrophically on long completions.
    """
    try:
        regex = re.compile(pattern, re.DOTALL)
    except re.error as e:
        raise ConfigError(f"format reward: pattern {pattern!r} is not a valid regex: {e}") from e
    match = regex.search if search else regex.fullmatch
    return [1.0 if match(text_of(c).strip()) else 0.0 for c in completions]


def code_reward(
    completions: Sequence[Completion],
    test: Sequence[str | Sequence[str]],
    prompts: Sequence[Completion] | None = None,
    fmt: str = "mbpp",
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
    workers: int = 2,
    **_: Any,
) -> list[float]:
    """1.0 when the completion's code passes its tests in raylm's sandbox, else 0.0.

    ``test`` (a column) is the test code run after the solution, or a list of assert
    lines. mbpp: the code is the last fenced ```python block, else the completion cut at
    ``[DONE]``. humaneval: the completion continues the function in ``prompts`` (a text
    prompt) and is cut at HumanEval's stop sequences, as the eval job does.

    0.0 covers a failing assert, an exception, a syntax error, a timeout (``timeout_s``
    wall clock; an infinite loop is killed), running out of ``memory_mb``, and anything the
    sandbox refuses (network, subprocesses, writes outside its directory), and any exit
    (``sys.exit(0)``, ``exit()``, ``os._exit``) before the tests finish: the sandbox
    counts a pass only for a program that ran to its end.

    Failure modes: tests that assert little are passed by code that special-cases them
    (hard-coded outputs); the sandbox is a tripwire for careless code, not a boundary
    against hostile code (see ``code_exec``); each completion costs a process start
    (~50 ms) plus its run time, on this node's CPUs.
    """
    _same_length("test", test, completions)
    if fmt not in ("mbpp", "humaneval"):
        raise ConfigError(f"code reward: fmt={fmt!r} is not one of ['mbpp', 'humaneval']")
    if fmt == "humaneval" and prompts is None:
        raise ConfigError("code reward with fmt=humaneval needs the prompts (the function head)")
    programs = []
    for i, (completion, t) in enumerate(zip(completions, test, strict=True)):
        body = _solution(fmt, text_of(completion), text_of(prompts[i]) if prompts else "")
        tests = t if isinstance(t, str) else "\n".join(t)
        programs.append(f"{body}\n\n{tests}\n")
    results = run_programs(programs, timeout_s=timeout_s, memory_mb=memory_mb, workers=workers)
    return [1.0 if passed else 0.0 for passed, _ in results]


def _solution(fmt: str, completion: str, prompt: str) -> str:
    """The code to test: HumanEval's prompt plus completion, MBPP's fenced block."""
    if fmt == "humaneval":
        return program_of(fmt, prompt, truncate(fmt, completion), "").rstrip()
    blocks = _FENCE.findall(completion)
    return blocks[-1] if blocks else truncate(fmt, completion)


BUILTINS: dict[str, RewardFn] = {
    "math": math_reward,
    "format": format_reward,
    "code": code_reward,
}
"""The verifiers ``RewardConfig.function`` can name without a module."""


def load_function(spec: str) -> RewardFn:
    """The callable named ``module:function`` (dots allowed on both sides), with a clear
    ConfigError when the name is malformed, the module is missing, or the attribute is
    missing or not callable."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(
            f"reward function {spec!r}: expected 'module:function' (e.g. my_rewards:length), "
            f"or one of the built-ins {list(BUILTINS)}{_suggest(spec, BUILTINS)}"
        )
    module = _import(spec, module_name)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_") and callable(getattr(obj, n))]
            raise ConfigError(
                f"reward function {spec!r}: {module_name} has no {part!r}{_suggest(part, names)}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"reward function {spec!r} is a {type(obj).__name__}, not a function")
    return obj


def _import(spec: str, module_name: str) -> Any:
    """Import ``module_name``; tell a missing module from one whose own import failed."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            raise ConfigError(
                f"reward function {spec!r}: no module named {e.name!r} on this node's "
                "Python path (ship it with the job's working_dir or py_modules)"
            ) from e
        raise ConfigError(f"reward function {spec!r}: importing {module_name} failed: {e}") from e
    except Exception as e:
        raise ConfigError(f"reward function {spec!r}: importing {module_name} failed: {e}") from e


def build_rewards(cfg: GRPOConfig) -> list[tuple[str, RewardFn]]:
    """(name, function with its config kwargs bound) for each configured reward, in
    order; the names are the ``rewards/NAME/mean`` metric keys."""
    out = []
    for r in cfg.rewards:
        fn = BUILTINS.get(r.function) or load_function(r.function)
        name = r.function if r.function in BUILTINS else r.function.rpartition(":")[2]
        out.append((name, functools.partial(fn, **r.kwargs) if r.kwargs else fn))
    return out


def score(
    rewards: Sequence[tuple[str, RewardFn]], completions: Sequence[Completion], **columns: Any
) -> torch.Tensor:
    """The (completions, functions) reward matrix ``group_advantages`` takes; None
    becomes NaN. A function returning the wrong number of rewards is named."""
    table = torch.empty(len(completions), len(rewards))
    for j, (name, fn) in enumerate(rewards):
        values = list(fn(completions=completions, **columns))
        if len(values) != len(completions):
            raise ValueError(
                f"reward function {name!r} returned {len(values)} rewards for "
                f"{len(completions)} completions; it must return one per completion"
            )
        table[:, j] = torch.tensor([float("nan") if v is None else float(v) for v in values])
    return table


def _suggest(word: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _same_length(column: str, values: Sequence[Any], completions: Sequence[Any]) -> None:
    if len(values) != len(completions):
        raise ValueError(
            f"column {column!r} has {len(values)} entries for {len(completions)} completions"
        )
