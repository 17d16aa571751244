"""How a train run runs, beside what it trains (``raylm.train.config``): DeepSpeed,
workers and resources, checkpoints and retries, held-out loss, and what ``final/`` holds."""

from __future__ import annotations

from dataclasses import dataclass

from raylm.config import ConfigError, choice, positive


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
    """Elastic training: Ray Train's ``num_workers=(min_workers, num_workers)`` (its
    elastic scaling policy, Ray 2.60). The group starts with as many workers as the
    cluster has room for, between the two (it waits while fewer than ``min_workers``
    fit); a lost worker is a failure (``checkpoint.max_failures``) after which the group
    restarts at whatever size fits; while running, Ray looks for room every 60 s and, if
    more workers fit, restarts the whole group at the larger size. Every resize is a
    restart: the workers resume from the newest complete checkpoint, so the steps since
    it are trained again (``checkpoint.save_steps`` bounds that). A checkpoint written at
    another worker count is converted to DeepSpeed's universal form and loaded with its
    optimizer state; the data stream re-splits the rest of the epoch over the new ranks,
    so no example of it is seen twice or skipped, and an epochs-based run's length is
    recounted from that (``raylm.train.worker``). The global batch is micro_batch_size x
    grad_accum x workers, so it changes with the size (the LR is not rescaled). None, or
    equal to ``num_workers``: a fixed size."""

    use_gpu: bool = False
    """One GPU per worker; False trains on CPU with gloo (the same code path)."""

    cpus_per_worker: float = 1.0
    """CPUs reserved per worker."""

    placement_strategy: str = "PACK"
    """Ray placement group strategy: PACK, SPREAD, STRICT_PACK, STRICT_SPREAD."""

    @property
    def ray_num_workers(self) -> int | tuple[int, int]:
        """Ray Train's ``ScalingConfig(num_workers=...)``: a ``(min, max)`` tuple turns on its
        elastic policy; an equal pair would too, for nothing, so it stays a fixed size."""
        if self.min_workers is None or self.min_workers == self.num_workers:
            return self.num_workers
        return self.min_workers, self.num_workers

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
class HeldOutConfig:
    """Held-out loss while the run trains (``eval.*``), on what ``data.val_size`` or
    ``data.eval_datasets`` keep out of training (``raylm.train.evaluate``)."""

    strategy: str = "steps"
    """steps: every ``eval.steps`` optimizer steps; epoch: at each epoch's end; no: never
    (held-out examples are still kept out and counted). Any but no also scores after the
    last step. LLaMA-Factory's ``eval_strategy``."""

    steps: int | None = None
    """Steps between evaluations; unset: ``train.logging_steps``, as in transformers."""

    batch_size: int | None = None
    """Held-out examples per worker per forward; unset: ``train.micro_batch_size``."""

    def __post_init__(self) -> None:
        if str(self.strategy) == "False":  # YAML 1.1 reads a bare no as false
            self.strategy = "no"
        choice("eval.strategy", self.strategy, ("steps", "epoch", "no"))
        for key, value in (("eval.steps", self.steps), ("eval.batch_size", self.batch_size)):
            if value is not None:
                positive(key, value)


@dataclass
class ExportConfig:
    """What ``final/`` holds."""

    merge_lora: bool = False
    """Also write a merged full model (``final/merged``) for LoRA runs."""

    shard_mb: int = 2000
    """Largest safetensors file in ``final/``, in MiB. Rank 0 gathers the ZeRO-3 pieces
    and writes one shard at a time, so its host memory peaks near this, not at the
    model's size; a model over one shard gets ``model.safetensors.index.json``."""

    pissa_convert: bool = False
    """lora.init pissa/olora: write final/ as the equivalent plain LoRA of the original
    base (twice the rank), which engines that do not redo the decomposition (vLLM) serve
    right; the trained PiSSA adapter stays in final/pissa_backup (LLaMA-Factory's
    ``pissa_convert``; raylm.train.pissa)."""

    def __post_init__(self) -> None:
        positive("export.shard_mb", self.shard_mb)
