"""What the eval job scores beside its metrics: standard benchmarks from local files,
lm-evaluation-harness runs, and an LLM judge (``raylm.eval.config`` holds the rest)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from omegaconf import MISSING

from raylm.config import ConfigError, choice, positive


@dataclass
class JudgeConfig:
    """An LLM that judges the model's answers against ``base_model``'s, pairwise.

    Any OpenAI-compatible chat endpoint: raylm's own (``raylm serve``'s
    ``http://HOST:8000/v1``), vLLM's, or a hosted API. Each pair is asked twice with the
    answers' positions swapped; verdicts that disagree across the swap count as a tie."""

    base_url: str | None = None
    """The endpoint's OpenAI base URL, e.g. ``http://127.0.0.1:8000/v1``. None: no judge."""

    model: str | None = None
    """Model name sent to the endpoint. None: the first model it lists (``raylm serve``
    serves one)."""

    api_key_env: str | None = None
    """Name of the environment variable holding the API key (never the key itself: config
    files end up in version control). None: no key (a local server without auth)."""

    max_concurrency: int = 8
    """Requests in flight at once."""

    max_retries: int = 3
    """Retries of a request on transient errors (connection, timeout, 408/409/429/5xx), with
    the openai client's exponential backoff; an unparseable verdict is asked once more."""

    timeout_s: float = 120.0
    """Seconds one request may take."""

    max_tokens: int = 512
    """Longest judgement (the judge explains, then gives ``[[A]]``, ``[[B]]`` or ``[[C]]``)."""

    temperature: float = 0.0
    """Sampling temperature of the judge (0: its most likely verdict)."""

    use_reference: bool = True
    """Show the judge the record's reference answer (reference-guided judging)."""

    def __post_init__(self) -> None:
        positive("judge.max_concurrency", self.max_concurrency)
        positive("judge.max_retries", self.max_retries, allow_zero=True)
        positive("judge.timeout_s", self.timeout_s)
        positive("judge.max_tokens", self.max_tokens)
        positive("judge.temperature", self.temperature, allow_zero=True)
        if self.api_key_env is not None and not re.fullmatch(r"[A-Za-z_]\w*", self.api_key_env):
            raise ConfigError(
                "judge.api_key_env must name an environment variable (e.g. JUDGE_API_KEY), "
                "not hold the key itself"
            )


BENCHMARK_FORMATS = ("mmlu", "ceval", "cmmlu", "gsm8k", "humaneval", "mbpp")
"""Benchmark layouts read from local files (see raylm.eval.benchmarks and docs/evaluation.md)."""


@dataclass
class BenchmarkConfig:
    """One standard benchmark read from local files; its scores land in ``metrics`` as
    ``<name>/acc`` (and ``acc_norm``), ``<name>/exact_match`` or ``<name>/pass@<k>``."""

    name: str = MISSING
    """Prefix of this benchmark's metric keys (``mmlu`` gives ``mmlu/acc``); unique."""

    format: str = MISSING
    """Layout of the files: mmlu, ceval, cmmlu (multiple choice by log-likelihood), gsm8k
    (generation, numeric answer), humaneval, mbpp (code, pass@k in a sandbox)."""

    path: str = MISSING
    """A local file (jsonl, json, csv, parquet) or a directory holding ``<split>.<ext>`` or
    ``<split>/`` with one file per subject (C-Eval's ``<subject>_<split>.csv``, CMMLU's
    ``<subject>.csv``)."""

    split: str = "test"
    """The split scored when ``path`` is a directory (C-Eval: ``val``; its test has no answers)."""

    fewshot_split: str = "dev"
    """Split the few-shot examples come from (its first ``shots`` per subject; GSM8K: ``train``)."""

    shots: int = 0
    """Few-shot examples before each question (0: zero-shot)."""

    max_samples: int | None = None
    """Score at most this many examples/tasks (None: all)."""

    max_new_tokens: int = 256
    """Longest generated answer or completion, in tokens (gsm8k, humaneval, mbpp)."""

    n_samples: int = 1
    """Completions per code task; 1 is greedy (through ``generation.engine``), more are
    sampled with ``temperature`` on the hf engine."""

    k: list[int] = field(default_factory=lambda: [1])
    """pass@k values reported for code (each <= n_samples), by the unbiased estimator."""

    temperature: float = 0.8
    """Sampling temperature of code completions when ``n_samples`` > 1."""

    timeout_s: float = 10.0
    """Wall-clock limit for running one code completion's tests."""

    memory_mb: int = 1024
    """Address-space limit (RLIMIT_AS) of the process running a completion's tests."""

    def __post_init__(self) -> None:
        choice(f"benchmarks[{self.name}].format", self.format, BENCHMARK_FORMATS)
        if not self.name or "/" in self.name:
            raise ConfigError(f"benchmarks name {self.name!r} must be non-empty, without '/'")
        positive(f"benchmarks[{self.name}].shots", self.shots, allow_zero=True)
        positive(f"benchmarks[{self.name}].n_samples", self.n_samples)
        positive(f"benchmarks[{self.name}].max_new_tokens", self.max_new_tokens)
        positive(f"benchmarks[{self.name}].timeout_s", self.timeout_s)
        positive(f"benchmarks[{self.name}].memory_mb", self.memory_mb)
        if self.max_samples is not None:
            positive(f"benchmarks[{self.name}].max_samples", self.max_samples)
        for k in self.k:
            if not 1 <= k <= self.n_samples:
                raise ConfigError(
                    f"benchmarks[{self.name}].k={k} must be in [1, n_samples={self.n_samples}]"
                )

    def metric_names(self) -> list[str]:
        """The keys this benchmark adds to ``metrics`` (what gate.min_metric can name)."""
        if self.format in ("mmlu", "ceval", "cmmlu"):
            return [f"{self.name}/acc", f"{self.name}/acc_norm"]
        if self.format == "gsm8k":
            return [f"{self.name}/exact_match"]
        return [f"{self.name}/pass@{k}" for k in self.k]


@dataclass
class LmEvalConfig:
    """lm-evaluation-harness run on the multiple-choice benchmarks' local files; its
    results go into eval.json's ``lm_eval`` section beside raylm's own."""

    benchmarks: list[str] = field(default_factory=list)
    """Names of multiple-choice entries of ``benchmarks`` to run (empty: all of them)."""

    base_url: str | None = None
    """An OpenAI-compatible completions URL (e.g. a served app's ``http://HOST:8000/v1/
    completions``): lm-eval's ``local-completions`` model, which needs prompt logprobs.
    None: lm-eval's ``hf`` model on the evaluated model directory."""

    served_model: str | None = None
    """The ``model`` name sent to ``base_url`` (None: the model directory's path)."""

    batch_size: int = 8
    """lm-eval's batch size."""

    def __post_init__(self) -> None:
        positive("lm_eval.batch_size", self.batch_size)


@dataclass
class ContaminationConfig:
    """n-gram overlap between every eval set and the training data (``raylm.eval.
    contamination``); per-set rates go into eval.json's ``contamination`` and
    ``gate.max_contamination_rate`` can hold a model back on them."""

    enabled: bool = False
    """Scan the eval sets (records, benchmarks, perplexity documents) against the
    training data before the gate."""

    train_data: list[str] = field(default_factory=list)
    """Training data to scan: files, dirs, ``dataset_info.json[#a,b]`` registries, a data
    job's output dir or a train run dir (local or bucket URIs). Empty: the evaluated
    model's lineage, i.e. the train run whose manifest records ``model`` as its output
    (in ``model`` or a dir above it), its data input, and through a data job's manifest
    the raw files it read (its shards when they are untokenized)."""

    ngram: int = 13
    """n-gram length in tokens: words, and one token per CJK character (the metrics'
    tokenisation, ``raylm.eval.text``). 13 as in GPT-3's and LLaMA's decontamination."""

    min_overlap: float = 0.5
    """Share of an example's n-grams found in the training data at or above which it is
    contaminated; 0: any shared n-gram (GPT-3's rule), 1: only whole copies."""

    min_tokens: int = 8
    """Examples shorter than ``ngram`` are matched whole (one n-gram of their own length);
    those shorter than this are not checked (``unchecked``; 8 is GPT-3's smallest n)."""

    def __post_init__(self) -> None:
        positive("contamination.ngram", self.ngram)
        positive("contamination.min_tokens", self.min_tokens)
        if not 0.0 <= self.min_overlap <= 1.0:
            raise ConfigError(f"contamination.min_overlap={self.min_overlap} must be in [0, 1]")
        if self.min_tokens > self.ngram:
            raise ConfigError(
                f"contamination.min_tokens={self.min_tokens} must be <= ngram={self.ngram}"
            )
