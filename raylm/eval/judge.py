"""LLM-as-judge: a served model compares the tuned model's answers with the base model's.

Any OpenAI-compatible chat endpoint can judge (``raylm serve``'s own, vLLM's, a hosted
API), through the ``openai`` client. Every pair of answers is asked **twice, with the
positions swapped** (tuned as A, then tuned as B), because judges favour a position; a
pair is a win or a loss only when both verdicts agree, anything else (including one tie)
counts as a tie, as in MT-bench (Zheng et al. 2023). The win rate counts ties as half and
gets its interval from ``raylm.eval.bootstrap`` over examples, like every other metric.

Requests run concurrently (at most ``judge.max_concurrency``); the client retries
transient failures (connection errors, timeouts, 408/409/429/5xx) with backoff; a verdict
that cannot be parsed is asked once more. An unreachable judge, an HTTP error or replies
that are not verdicts stop the job with an error naming the URL and model.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from raylm.eval.bootstrap import confidence_interval
from raylm.eval.config import BootstrapConfig, JudgeConfig
from raylm.eval.metrics import Metric, ratio
from raylm.job import JobFailed

SYSTEM_PROMPT = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by "
    "two AI assistants to the user question displayed below. You should choose the assistant "
    "that follows the user's instructions and answers the user's question better. Consider "
    "correctness, helpfulness, relevance and accuracy; if a reference answer is given, "
    "compare both answers with it. Avoid any position biases and ensure that the order in "
    "which the responses were presented does not influence your decision. Do not let the "
    "length of the responses or the names of the assistants influence your evaluation. Be "
    "as objective as possible. After a short explanation, output your final verdict by "
    'strictly following this format: "[[A]]" if assistant A is better, "[[B]]" if assistant '
    'B is better, and "[[C]]" for a tie.'
)

WIN_RATE = Metric("judge_win_rate", True, ratio)
"""Per example (score, 1) with score 1 (tuned wins), 0.5 (tie) or 0 (base wins)."""

SCORES = {"tuned": 1.0, "tie": 0.5, "base": 0.0}


class JudgeError(JobFailed):
    """The judge could not be asked or did not answer with verdicts (the job runner prints
    it without a traceback)."""


@dataclass(frozen=True)
class Pair:
    """One eval record's question and the two answers to compare."""

    question: str
    tuned: str
    base: str
    reference: str | None = None


# ---- verdicts ------------------------------------------------------------------------

_LETTER = r"(?:(?-i:[ABC])|tie|draw)"
_BRACKETED = re.compile(rf"\[\[\s*({_LETTER})\s*\]\]", re.I)
_ALONE = re.compile(
    r"^[\W_]*(?:(?:final\s+)?(?:verdict|answer|winner)\s*[:：]?\s*)?"
    r"(?:assistant|response|answer|output)?\s*[\[(]?\s*(a|b|c|tie|draw)\s*[\])]?[\W_]*$",
    re.I,
)
_LABELLED = re.compile(
    r"(?:verdict|winner|better\s+(?:assistant|response|answer))\s*(?:is|:|：)?\s*[:：]?\s*"
    rf"[\[(\"'*]*\s*(?:assistant\s+|response\s+)?({_LETTER})\b",
    re.I,
)
_X_IS_BETTER = re.compile(
    r"\b(?:assistant|response)\s+((?-i:[AB]))(?:'s\s+\w+)?\s+is\s+better\b", re.I
)


def _canonical(token: str) -> str:
    t = token.strip().lower()
    return {"a": "A", "b": "B"}.get(t, "tie")


def parse_verdict(text: str | None) -> str | None:
    """ "A", "B" or "tie" from a judge's reply, None if it holds no verdict.

    Accepts MT-bench's ``[[A]]``/``[[B]]``/``[[C]]`` (the last one wins, so a reply that
    quotes the format before deciding is read right), ``[[tie]]``, a bare letter or word
    (``A``, ``b.``, ``**A**``, ``Tie``), ``Verdict: B`` / ``My final verdict is tie``, and
    ``Assistant B is better``. A lowercase "a" inside a sentence is an article, not a vote."""
    if not text or not text.strip():
        return None
    for pattern in (_BRACKETED,):
        hits = pattern.findall(text)
        if hits:
            return _canonical(hits[-1])
    alone = _ALONE.match(text.strip())
    if alone:
        return _canonical(alone.group(1))
    for pattern in (_LABELLED, _X_IS_BETTER):
        hits = pattern.findall(text)
        if hits:
            return _canonical(hits[-1])
    return None


def combine(tuned_first: str, tuned_second: str) -> str:
    """The outcome of one pair from its two verdicts: ``tuned_first`` was given with the
    tuned answer as A, ``tuned_second`` with it as B. "tuned" or "base" only when both
    verdicts agree; disagreement across the swap (position bias) is a tie."""
    first = {"A": "tuned", "B": "base", "tie": "tie"}[tuned_first]
    second = {"A": "base", "B": "tuned", "tie": "tie"}[tuned_second]
    return first if first == second else "tie"


def judge_messages(pair: Pair, tuned_is_a: bool, use_reference: bool) -> list[dict[str, str]]:
    """The chat messages asking which of the two answers is better."""
    a, b = (pair.tuned, pair.base) if tuned_is_a else (pair.base, pair.tuned)
    parts = [f"[User Question]\n{pair.question}\n"]
    if use_reference and pair.reference:
        parts.append(
            f"[The Start of Reference Answer]\n{pair.reference}\n[The End of Reference Answer]\n"
        )
    parts += [
        f"[The Start of Assistant A's Answer]\n{a}\n[The End of Assistant A's Answer]\n",
        f"[The Start of Assistant B's Answer]\n{b}\n[The End of Assistant B's Answer]",
    ]
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": "\n".join(parts)},
    ]


def summarize_verdicts(
    verdicts: Sequence[tuple[str, str]], boot: BootstrapConfig | None = None
) -> dict[str, Any]:
    """Outcomes, counts, the share of decisive verdicts that picked position A (a position
    bias gauge: 0.5 is none), and the win rate with its bootstrap interval."""
    boot = boot or BootstrapConfig()
    outcomes = [combine(v1, v2) for v1, v2 in verdicts]
    stats = np.array([[SCORES[o], 1.0] for o in outcomes], dtype=np.float64).reshape(-1, 2)
    decisive = [v for pair in verdicts for v in pair if v != "tie"]
    inconsistent = sum(
        1
        for (v1, v2), o in zip(verdicts, outcomes, strict=True)
        if o == "tie" and (v1, v2) != ("tie", "tie")
    )
    interval = confidence_interval(WIN_RATE, stats, boot.resamples, boot.confidence, boot.seed)
    return {
        "n": len(outcomes),
        "win_rate": interval.to_dict(),
        "wins": outcomes.count("tuned"),
        "losses": outcomes.count("base"),
        "ties": outcomes.count("tie"),
        "inconsistent": inconsistent,
        "first_position_rate": (
            sum(v == "A" for v in decisive) / len(decisive) if decisive else None
        ),
        "outcomes": outcomes,
        "verdicts": [list(v) for v in verdicts],
    }


# ---- asking the judge -------------------------------------------------------------------


def _api_key(cfg: JudgeConfig) -> str:
    if cfg.api_key_env is None:
        return "none"
    key = os.environ.get(cfg.api_key_env)
    if not key:
        raise JudgeError(f"judge.api_key_env names {cfg.api_key_env}, which is not set or empty")
    return key


class _Judge:
    def __init__(self, cfg: JudgeConfig) -> None:
        from openai import AsyncOpenAI

        self.cfg = cfg
        self.url = str(cfg.base_url)
        self.model = cfg.model
        self.client = AsyncOpenAI(
            base_url=self.url,
            api_key=_api_key(cfg),
            max_retries=cfg.max_retries,
            timeout=cfg.timeout_s,
        )
        self.limit = asyncio.Semaphore(cfg.max_concurrency)

    def _where(self) -> str:
        return f"LLM judge at {self.url}" + (f" (model {self.model!r})" if self.model else "")

    async def _call(self, what: str, coro: Any) -> Any:
        import openai

        try:
            return await coro
        except openai.APIConnectionError as err:  # includes timeouts
            raise JudgeError(
                f"{self._where()} is unreachable ({what}, after {self.cfg.max_retries} "
                f"retries): {err}" + (f" ({err.__cause__})" if err.__cause__ else "")
            ) from err
        except openai.APIStatusError as err:
            raise JudgeError(
                f"{self._where()} answered HTTP {err.status_code} to {what}: {str(err)[:300]}"
            ) from err
        except openai.OpenAIError as err:
            raise JudgeError(f"{self._where()} answered nonsense to {what}: {err}") from err

    async def resolve_model(self) -> None:
        if self.model:
            return
        page = await self._call("GET /models", self.client.models.list())
        try:
            self.model = page.data[0].id
        except (AttributeError, IndexError, TypeError) as err:
            raise JudgeError(f"{self._where()} lists no model; set judge.model") from err

    async def verdict(self, pair: Pair, tuned_is_a: bool, index: int) -> str:
        messages = judge_messages(pair, tuned_is_a, self.cfg.use_reference)
        reply = ""
        for _ in range(2):  # an unparseable verdict is asked once more
            async with self.limit:
                resp = await self._call(
                    "a chat completion",
                    self.client.chat.completions.create(
                        model=str(self.model),
                        messages=messages,  # type: ignore[arg-type]
                        max_tokens=self.cfg.max_tokens,
                        temperature=self.cfg.temperature,
                    ),
                )
            try:
                reply = resp.choices[0].message.content or ""
            except (AttributeError, IndexError, TypeError) as err:
                raise JudgeError(
                    f"{self._where()} answered something that is not a chat completion: "
                    f"{str(resp)[:200]!r}"
                ) from err
            verdict = parse_verdict(reply)
            if verdict is not None:
                return verdict
        order = "tuned as A" if tuned_is_a else "tuned as B"
        raise JudgeError(
            f"{self._where()} gave no verdict for example {index} ({order}), twice; it "
            f"replied {reply[:300]!r}, expected [[A]], [[B]] or [[C]]"
        )

    async def run(self, pairs: Sequence[Pair]) -> list[tuple[str, str]]:
        try:
            await self.resolve_model()
            flat = await asyncio.gather(
                *(self.verdict(p, first, i) for i, p in enumerate(pairs) for first in (True, False))
            )
        finally:
            await self.client.close()
        return [(flat[2 * i], flat[2 * i + 1]) for i in range(len(pairs))]


def check_judge(cfg: JudgeConfig) -> None:
    """Fail in seconds, before any model is loaded, when the judge cannot be asked: lists
    the endpoint's models (one quick request, no retries). An unreachable URL, a refused
    key, or no way to name the model (``judge.model`` unset and no model list) is an error;
    an endpoint without ``/models`` is fine when ``judge.model`` is set."""
    import openai

    where = f"LLM judge at {cfg.base_url}"
    client = openai.OpenAI(
        base_url=str(cfg.base_url),
        api_key=_api_key(cfg),
        max_retries=0,
        timeout=min(cfg.timeout_s, 30),
    )
    try:
        listed = [m.id for m in client.models.list().data]
    except openai.APIConnectionError as err:
        cause = f" ({err.__cause__})" if err.__cause__ else ""
        raise JudgeError(f"{where} is unreachable: {err}{cause}") from err
    except openai.APIStatusError as err:
        if err.status_code in (401, 403) or cfg.model is None:
            raise JudgeError(
                f"{where} answered HTTP {err.status_code} to GET /models: {str(err)[:300]}"
            ) from err
        return
    except (openai.OpenAIError, AttributeError, TypeError) as err:
        raise JudgeError(f"{where} answered nonsense to GET /models: {err}") from err
    finally:
        client.close()
    if cfg.model is None and not listed:
        raise JudgeError(f"{where} lists no model; set judge.model")


def _run_sync(coro: Any) -> Any:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(1) as pool:  # called from inside an event loop
        return pool.submit(asyncio.run, coro).result()


def judge_pairs(
    cfg: JudgeConfig, pairs: Sequence[Pair], boot: BootstrapConfig | None = None
) -> dict[str, Any]:
    """Ask the judge about every pair (both orders) and summarise: eval.json's ``judge``."""
    if not cfg.base_url:
        raise JudgeError("judge.base_url is not set")
    t0 = time.perf_counter()
    judge = _Judge(cfg)
    verdicts = _run_sync(judge.run(pairs)) if pairs else []
    out = {"base_url": judge.url, "model": judge.model}
    out |= summarize_verdicts(verdicts, boot)
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out


def question_text(record: Any) -> str:
    """An eval record's question as the judge reads it: the prompt, or the chat turns."""
    if record.prompt is not None:
        return str(record.prompt)
    return "\n".join(f"{m['role']}: {m['content']}" for m in record.messages or [])


def judge_answers(cfg: Any, records: Sequence[Any], outs: dict[str, dict]) -> dict[str, Any]:
    """The eval job's judge step (driver, after both models answered): ``cfg`` is the
    EvalJobConfig, ``outs`` the per-model task outputs with their ``predictions``."""
    tuned, base = outs["model"]["predictions"], outs["base_model"]["predictions"]
    pairs = [
        Pair(question_text(r), t, b, " / ".join(r.references) if r.references else None)
        for r, t, b in zip(records, tuned, base, strict=True)
    ]
    return judge_pairs(cfg.judge, pairs, cfg.bootstrap)
