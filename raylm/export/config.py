"""The export job's config: what to fold together, how to check it, where it goes."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from raylm import templates
from raylm.config import ConfigError, RayConfig, choice, positive

CHECK_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Question: what is 12 + 30? Answer:",
)


@dataclass
class MergeCheckConfig:
    """The merge check: the merged model must compute what base + adapters compute, and
    something else than the base alone (``raylm.export.check``)."""

    enabled: bool = True
    """Run the check; a failed check fails the job (off only for models too large to
    run forward on the export node)."""

    prompts: list[str] = field(default_factory=lambda: list(CHECK_PROMPTS))
    """Texts whose next-token logits are compared (every position of each)."""

    tolerance: float | None = None
    """Largest |merged - (base + adapters)| logit difference allowed, relative to the
    largest |logit|. Unset: by the saved weights' dtype, a few units of its rounding
    (float32 1e-4, float16 2e-3, bfloat16 1.6e-2). The adapters must also move the
    base's logits by more than this, else the merge would be indistinguishable from
    the base and the job fails saying the adapters have no effect."""

    def __post_init__(self) -> None:
        if self.enabled and not self.prompts:
            raise ConfigError("check.prompts is empty; give a few texts or check.enabled=false")
        if self.tolerance is not None:
            positive("check.tolerance", self.tolerance)


QUANT_METHODS = (
    "none",
    "gguf",
    "int8_dynamic",
    "gptq",
    "awq",
    "w8a8",
)
"""Each method with its quantizer in ``raylm.export.quantize.QUANTIZERS``."""


GGUF_WRITTEN = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
"""GGUF types raylm writes itself with the ``gguf`` package (``raylm.export.gguf``)."""

GGUF_K_QUANTS = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s",
                 "q5_k_m", "q6_k")  # fmt: skip
"""llama.cpp's k-quants, which ``llama-quantize`` writes from the f16 file
(``raylm.export.llamacpp``): gguf can only dequantize them."""


def check_gguf_types(types: list[str]) -> list[str]:
    """The requested GGUF types, lower-cased and without repeats; an unknown one (an
    i-quant needs an importance matrix raylm does not compute) is refused."""
    known = GGUF_WRITTEN + GGUF_K_QUANTS
    out = [str(t).lower() for t in types]
    if not out:
        raise ConfigError(f"quantize.gguf_types is empty; give some of {', '.join(known)}")
    for t in out:
        if t not in known:
            hint = " (i-quants need llama.cpp's imatrix: run llama-quantize yourself)"
            raise ConfigError(
                f"quantize.gguf_types: unknown type {t}; one of {', '.join(known)}"
                + (hint if t.startswith("iq") else "")
            )
    return list(dict.fromkeys(out))


@dataclass
class QuantizeConfig:
    """A quantized copy of the merged model (``raylm.export.quantize``), written to
    ``output_dir/quantized`` with its size and perplexity against the merged model."""

    method: str = "none"
    """One of ``QUANT_METHODS``. What each engine runs on which hardware: docs/export.md."""

    bits: int = 4
    """Weight bits for gptq / awq (LLaMA-Factory's ``export_quantization_bit``)."""

    dataset: str | None = None
    """Calibration text for gptq / awq / w8a8 (a jsonl with ``text``, or a plain text
    file; LLaMA-Factory's ``export_quantization_dataset``)."""

    nsamples: int = 128
    """Calibration examples (``export_quantization_nsamples``)."""

    max_length: int = 1024
    """Tokens per calibration example (``export_quantization_maxlen``)."""

    gguf_types: list[str] = field(default_factory=lambda: ["f16", "q8_0"])
    """GGUF files to write, one per type: ``GGUF_WRITTEN`` and llama.cpp's k-quants
    ``GGUF_K_QUANTS`` (``q4_k_m`` is ollama's usual pick)."""

    eval_text: str | None = None
    """Held-out text (jsonl with ``text`` or plain text) for the perplexity of the
    quantized model against the merged one; unset: the calibration data's tail."""

    def __post_init__(self) -> None:
        choice("quantize.method", self.method, QUANT_METHODS)
        if self.method == "gguf":
            check_gguf_types(list(self.gguf_types))
        positive("quantize.nsamples", self.nsamples)
        positive("quantize.max_length", self.max_length)
        if self.method in ("gptq", "awq", "w8a8") and not self.dataset:
            raise ConfigError(f"quantize.method={self.method} needs quantize.dataset (calibration)")
        bits = {"gptq": (2, 3, 4, 8), "awq": (4,)}.get(self.method)  # llmcompressor's
        if bits and self.bits not in bits:
            raise ConfigError(f"quantize.bits={self.bits}: {self.method} takes {list(bits)}")


@dataclass
class ExportJobConfig:
    """The export job: LoRA adapters merged into their base shard by shard and checked,
    with the tokenizer and generation config the served model needs."""

    model: str = MISSING
    """The model: a Hugging Face directory or hub id (the base when ``adapters`` are
    given), a bucket URI, or a train job's output dir, whose manifest names its adapter
    (``final/``) and the base it was trained from."""

    checkpoint: str | None = None
    """Export a checkpoint of the train run ``model`` names instead of its ``final/``:
    ``latest`` (the newest complete one) or a checkpoint directory's name. ``model`` may
    also name the checkpoint directory itself. It is consolidated from its ZeRO
    partitions into what ``final/`` would hold at that step
    (``raylm.export.from_checkpoint``); only complete checkpoints are taken."""

    adapters: list[str] = field(default_factory=list)
    """PEFT LoRA adapters folded into ``model``, in this order (several merge in turn).
    A train job's output dir names its own adapter."""

    template: str | None = None
    """Named chat template (``raylm.templates``) baked into the exported tokenizer and
    its stop tokens into ``generation_config.json``. Unset: the tokenizer's own (a raylm
    train run's ``final/`` already carries the template it trained with)."""

    tokenizer: str | None = None
    """Where the tokenizer comes from. Unset: the first adapter that has one (a raylm
    train run saves its tokenizer beside the adapter), else ``model``."""

    output_dir: str = "outputs/export"
    """The exported model directory (local, NFS or a bucket URI); also holds the job's
    manifest and ``export_check.json``."""

    trust_remote_code: bool = False
    """Allow model code from the checkpoint (the merge check loads the model)."""

    check: MergeCheckConfig = field(default_factory=MergeCheckConfig)
    """The merge check."""

    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    """An optional quantized copy."""

    num_cpus: float = 1.0
    """CPUs of the Ray task that merges (visible in the dashboard)."""

    ray: RayConfig = field(default_factory=RayConfig)
    """Cluster connection."""

    @staticmethod
    def from_foreign_yaml(data: dict, source: str) -> dict:
        """LLaMA-Factory's export YAML (``llamafactory-cli export``) reads as this config."""
        from raylm.export.llamafactory import is_llamafactory, translate

        return translate(data, source=source) if is_llamafactory(data) else data

    def __post_init__(self) -> None:
        if self.template is not None:
            templates.get(self.template)  # an unknown name fails here, with the list
        positive("num_cpus", self.num_cpus)
