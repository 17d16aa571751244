"""The train job's config: one typed group per concern, validated before workers start."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from raylm.config import ConfigError, RayConfig, choice, positive
from raylm.data.formats import INPUT_FORMATS

STAGES = ("pt", "sft", "dpo")
FINETUNING_TYPES = ("full", "lora", "freeze", "qlora")
PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")


@dataclass
class ModelConfig:
    """The model to start from."""

    name_or_path: str = MISSING
    """A local Hugging Face directory (a train job's ``final/``, the tiny model) or a hub id."""

    trust_remote_code: bool = False
    """Allow custom modelling code shipped with the checkpoint."""


@dataclass
class TrainDataConfig:
    """Where the training examples come from."""

    path: str = MISSING
    """A data job's output directory (its Parquet shards stream to the workers), a raw
    jsonl/json/parquet/text file, or a dataset name in the ``dataset_info.json`` beside
    it (raw data is tokenized on the fly and held in memory: small sets). Local or a
    URI (``s3://``, ``gs://``)."""

    format: str = "auto"
    """Format of a raw file: auto, text, alpaca, sharegpt, openai, preference (shards: detected)."""

    cutoff_len: int = 512
    """Maximum tokens per example (LLaMA-Factory's cutoff_len); longer ones are truncated."""

    max_samples: int | None = None
    """Use at most this many examples (None: all), for quick runs."""

    val_size: float = 0.0
    """Share of examples held out for evaluation loss (0 disables it)."""

    shuffle_row_groups: int = 4
    """Parquet row groups whose rows are shuffled together: each epoch permutes the
    shards' row groups, then shuffles rows within each run of this many (see
    ``raylm.train.stream``). A worker holds about this many row groups in memory."""

    def __post_init__(self) -> None:
        choice("data.format", self.format, INPUT_FORMATS)
        positive("data.cutoff_len", self.cutoff_len)
        positive("data.shuffle_row_groups", self.shuffle_row_groups)
        if not 0.0 <= self.val_size < 1.0:
            raise ConfigError(f"data.val_size={self.val_size} must be in [0, 1)")


@dataclass
class OptimConfig:
    """Optimisation hyper-parameters (the ``train.*`` keys)."""

    lr: float = 1e-4
    """Peak learning rate."""

    epochs: float = 1.0
    """Passes over the data; fractional values stop part-way through the last epoch."""

    max_steps: int | None = None
    """Stop after this many optimizer steps (overrides epochs when set)."""

    micro_batch_size: int = 1
    """Examples per worker per forward pass (per_device_train_batch_size)."""

    grad_accum: int = 1
    """Micro batches per optimizer step (gradient_accumulation_steps)."""

    lr_scheduler: str = "cosine"
    """Learning-rate schedule: linear, cosine, constant, constant_with_warmup."""

    warmup_ratio: float = 0.0
    """Share of steps spent warming the learning rate up from 0."""

    weight_decay: float = 0.0
    """AdamW weight decay."""

    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables clipping)."""

    precision: str = "fp32"
    """fp32, bf16 or fp16. CPUs run fp32 or bf16; fp16 needs a GPU."""

    seed: int = 42
    """Seeds model init of new modules, data order and dropout; equal seeds give equal losses."""

    logging_steps: int = 1
    """Report metrics every this many optimizer steps."""

    def __post_init__(self) -> None:
        positive("train.lr", self.lr)
        positive("train.epochs", self.epochs)
        positive("train.micro_batch_size", self.micro_batch_size)
        positive("train.grad_accum", self.grad_accum)
        positive("train.logging_steps", self.logging_steps)
        positive("train.max_grad_norm", self.max_grad_norm, allow_zero=True)
        choice("train.lr_scheduler", self.lr_scheduler, SCHEDULERS)
        choice("train.precision", self.precision, PRECISIONS)
        if self.max_steps is not None:
            positive("train.max_steps", self.max_steps)
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"train.warmup_ratio={self.warmup_ratio} must be in [0, 1)")


@dataclass
class LoraConfig:
    """Low-rank adapters (finetuning_type lora or qlora)."""

    rank: int = 8
    """Adapter rank r."""

    alpha: int = 16
    """Scaling numerator; the update is scaled by alpha / rank."""

    dropout: float = 0.0
    """Dropout on the adapter input."""

    target: list[str] = field(default_factory=lambda: ["all"])
    """Module names to adapt (q_proj, v_proj, ...); ``all`` means every linear layer but the head."""

    def __post_init__(self) -> None:
        positive("lora.rank", self.rank)
        positive("lora.alpha", self.alpha)
        if not self.target:
            raise ConfigError("lora.target must name at least one module (or 'all')")


@dataclass
class FreezeConfig:
    """Partial fine-tuning (finetuning_type freeze)."""

    trainable_layers: int = 2
    """Train only the last N decoder layers; the rest stay frozen."""


@dataclass
class DPOConfig:
    """Direct preference optimisation (stage dpo)."""

    beta: float = 0.1
    """Strength of the KL penalty towards the reference model."""

    loss_type: str = "sigmoid"
    """DPO loss variant; sigmoid is the original paper's."""

    label_smoothing: float = 0.0
    """Conservative DPO: assumed probability that a preference label is flipped."""

    def __post_init__(self) -> None:
        positive("dpo.beta", self.beta)
        choice("dpo.loss_type", self.loss_type, ("sigmoid",))


@dataclass
class DeepSpeedConfig:
    """DeepSpeed settings; the full DeepSpeed JSON is generated from these."""

    stage: int = 3
    """ZeRO stage: 0 (plain data parallel), 1, 2 or 3 (parameters partitioned too)."""

    offload_optimizer: bool = False
    """Keep optimizer states in CPU memory (ZeRO-Offload)."""

    offload_params: bool = False
    """Keep parameters in CPU memory between uses (ZeRO-3 only)."""

    config_file: str | None = None
    """A user DeepSpeed JSON (LLaMA-Factory's ``deepspeed:``); merged over the generated one."""

    zero3_init: bool = False
    """ZeRO-3: build and load the model already partitioned (``deepspeed.zero.Init``). Off by
    default because it measured worse here: transformers maps a safetensors checkpoint
    lazily, and the engine then keeps only each rank's share, which peaked lower at 1, 2
    and 4 ranks than zero.Init's load (docs/benchmarks.md). Turn it on for checkpoints that
    cannot be mapped lazily (``.bin`` files) or models built by custom code."""

    def __post_init__(self) -> None:
        choice("deepspeed.stage", str(self.stage), ("0", "1", "2", "3"))
        if self.offload_params and self.stage != 3:
            raise ConfigError("deepspeed.offload_params needs deepspeed.stage=3")
        if self.zero3_init and self.stage != 3:
            raise ConfigError("deepspeed.zero3_init needs deepspeed.stage=3")


@dataclass
class ScalingConfig:
    """How many Ray Train workers and what each one gets."""

    num_workers: int = 2
    """Data-parallel workers (one DeepSpeed rank each); the most an elastic run uses."""

    min_workers: int | None = None
    """Elastic training: start (or continue) with as few as this many workers when spot
    capacity is short, and grow back to ``num_workers`` when it returns (Ray Train's
    elastic scaling). A checkpoint written at another worker count is converted to
    DeepSpeed's universal form and loaded with its optimizer state. None: fixed size."""

    use_gpu: bool = False
    """One GPU per worker; False trains on CPU with gloo (the same code path)."""

    cpus_per_worker: float = 1.0
    """CPUs reserved per worker."""

    placement_strategy: str = "PACK"
    """Ray placement group strategy: PACK, SPREAD, STRICT_PACK, STRICT_SPREAD."""

    def __post_init__(self) -> None:
        positive("scaling.num_workers", self.num_workers)
        positive("scaling.cpus_per_worker", self.cpus_per_worker)
        if self.min_workers is not None and not 0 < self.min_workers <= self.num_workers:
            raise ConfigError(
                f"scaling.min_workers={self.min_workers} must be between 1 and "
                f"scaling.num_workers={self.num_workers}"
            )
        choice(
            "scaling.placement_strategy",
            self.placement_strategy,
            ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
        )


@dataclass
class CheckpointConfig:
    """Fault tolerance: how often to checkpoint and how often to retry."""

    save_steps: int = 50
    """Checkpoint every this many optimizer steps (and at the end)."""

    keep: int = 2
    """Complete checkpoints to keep; older ones are deleted."""

    max_failures: int = 3
    """Worker/node failures Ray Train absorbs by restarting from the newest checkpoint."""

    log_sample_ids: bool = False
    """Append the ids of the examples each step trained on to ``samples.jsonl``: an audit
    that a resumed run saw every example of an epoch exactly once."""

    def __post_init__(self) -> None:
        positive("checkpoint.save_steps", self.save_steps)
        positive("checkpoint.keep", self.keep)


@dataclass
class ExportConfig:
    """What ``final/`` holds."""

    merge_lora: bool = False
    """Also write a merged full model (``final/merged``) for LoRA runs."""


@dataclass
class TrainJobConfig:
    """The train job: Ray Train workers running DeepSpeed for pt, sft or dpo."""

    stage: str = "sft"
    """pt (continued pretraining), sft (responses-only loss) or dpo (preference pairs)."""

    finetuning_type: str = "lora"
    """full, lora, freeze (last N layers) or qlora (4-bit base; CUDA only)."""

    run_name: str = "raylm-train"
    """Run name; submitting again with the same name and storage resumes the run."""

    storage_path: str = "outputs/train"
    """Where runs live: a local path, or a shared filesystem (NFS) every node mounts at the
    same path on a multi-node cluster; the run dir is storage_path/run_name."""

    report_to: list[str] = field(default_factory=list)
    """Extra metric sinks: tensorboard, mlflow, wandb (Ray metrics are always on)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Base model."""

    data: TrainDataConfig = field(default_factory=TrainDataConfig)
    """Training data."""

    train: OptimConfig = field(default_factory=OptimConfig)
    """Optimisation."""

    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA / QLoRA adapters."""

    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    """Freeze tuning."""

    dpo: DPOConfig = field(default_factory=DPOConfig)
    """DPO loss."""

    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """DeepSpeed / ZeRO."""

    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    """Workers and resources."""

    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing and retries."""

    export: ExportConfig = field(default_factory=ExportConfig)
    """Final artefacts."""

    ray: RayConfig = field(default_factory=RayConfig)
    """Cluster connection."""

    @staticmethod
    def from_foreign_yaml(data: dict, source: str) -> dict:
        """A flat LLaMA-Factory training YAML reads as this config (see llamafactory.py)."""
        from raylm.train.llamafactory import is_llamafactory, translate

        return translate(data, source=source) if is_llamafactory(data) else data

    def __post_init__(self) -> None:
        choice("stage", self.stage, STAGES)
        choice("finetuning_type", self.finetuning_type, FINETUNING_TYPES)
        for sink in self.report_to:
            choice("report_to", sink, ("tensorboard", "mlflow", "wandb"))
        if self.train.precision == "fp16" and not self.scaling.use_gpu:
            raise ConfigError("train.precision=fp16 needs scaling.use_gpu=true; use fp32 or bf16")
