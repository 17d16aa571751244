"""Config of the generate job: offline batch inference with ``ray.data.llm`` (kept apart
from ``config.py``, the long-lived serve app's)."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from raylm.config import ConfigError, RayConfig, positive
from raylm.engine import EngineConfig


@dataclass
class StageResources:
    """Resources of one ``ray.data.llm`` stage; fractional CPUs avoid deadlock on 2 CPUs."""

    num_cpus: float = 0.25
    """CPUs each worker of the stage reserves."""

    concurrency: int = 1
    """Workers (actors) of the stage."""

    def __post_init__(self) -> None:
        positive("num_cpus", self.num_cpus, allow_zero=True)
        positive("concurrency", self.concurrency)


@dataclass
class SamplingConfig:
    """Sampling parameters applied to every prompt of a batch job."""

    max_tokens: int = 32
    """Completion length cap in tokens."""

    temperature: float = 0.0
    """0 is greedy (reproducible); higher is more random."""

    top_p: float = 1.0
    """Nucleus sampling mass."""

    seed: int | None = 0
    """Per-request seed, so sampled outputs are reproducible."""

    top_k: int | None = None
    """Sample from the k most likely tokens only (None: all)."""

    repetition_penalty: float | None = None
    """vLLM's repetition penalty (None: 1.0, none)."""

    stop_token_ids: list[int] = field(default_factory=list)
    """Token ids that end a completion besides EOS (``input.template``'s stop words are
    added to these)."""

    def __post_init__(self) -> None:
        positive("sampling.max_tokens", self.max_tokens)
        if self.top_k is not None:
            positive("sampling.top_k", self.top_k)
        if self.repetition_penalty is not None:
            positive("sampling.repetition_penalty", self.repetition_penalty)
        positive("sampling.temperature", self.temperature, allow_zero=True)
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"sampling.top_p={self.top_p} must be in (0, 1]")


@dataclass
class GenerateInputConfig:
    """The prompts to complete."""

    path: str = MISSING
    """A jsonl/json/parquet file or a directory of Parquet shards (local or a bucket URI)."""

    prompt_column: str = "prompt"
    """Column with the prompt text (or a list of chat messages if ``chat`` is true)."""

    chat: bool = False
    """Apply the tokenizer's chat template: prompt_column holds a user message or messages."""

    limit: int | None = None
    """Use only the first N rows (None: all); with ``datasets``, of each dataset."""

    datasets: list[str] = field(default_factory=list)
    """Names registered in ``path``'s ``dataset_info.json`` (LLaMA-Factory's eval_dataset):
    each record's conversation up to its last assistant turn is the prompt, rendered with
    ``template``, and that turn is the label. Writes LLaMA-Factory's
    ``generated_predictions.jsonl`` and ``predict_results.json`` (BLEU-4, ROUGE-1/2/L)."""

    template: str | None = None
    """A named chat template (raylm.templates) for ``datasets``' prompts (None: the
    tokenizer's own)."""

    def __post_init__(self) -> None:
        if self.template is not None:
            from raylm import templates

            templates.check(self.template, "input.template")


@dataclass
class GenerateJobConfig:
    """The ``generate`` job: offline batch inference with ray.data.llm + vLLM to Parquet."""

    model: str = MISSING
    """A Hugging Face model directory (a train job's ``final/``), local or a bucket URI
    (copied to the job's node first), or a hub id."""

    lora_path: str | None = None
    """A PEFT adapter directory (local or a bucket URI) applied to every prompt (None: the
    base model)."""

    input: GenerateInputConfig = field(default_factory=GenerateInputConfig)
    """The prompts."""

    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Sampling parameters."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    """vLLM engine settings (max_model_len, dtype, KV cache), as for serve and eval."""

    batch_size: int = 16
    """Rows per batch handed to the engine."""

    engine_stage: StageResources = field(default_factory=lambda: StageResources(num_cpus=0.5))
    """The vLLM stage (one engine per worker)."""

    tokenize_stage: StageResources = field(default_factory=StageResources)
    """The chat-template / tokenize / detokenize stages."""

    output_dir: str = "outputs/generate"
    """Where ``predictions/`` (Parquet) and the manifest go (local or a bucket URI)."""

    ray: RayConfig = field(default_factory=RayConfig)
    """Cluster connection."""

    @staticmethod
    def from_foreign_yaml(data: dict, source: str) -> dict:
        """A LLaMA-Factory do_predict YAML reads as this config (raylm.serve.llamafactory)."""
        from raylm.serve.llamafactory import generate_translate, is_llamafactory

        return generate_translate(data, source) if is_llamafactory(data) else data

    def __post_init__(self) -> None:
        positive("batch_size", self.batch_size)
