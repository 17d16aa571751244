"""The train job's config: one typed group per concern, validated before workers start."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from raylm import storage, templates
from raylm.config import ConfigError, RayConfig, choice, positive, resolve_path
from raylm.data.formats import INPUT_FORMATS
from raylm.data.sources import MIX_STRATEGIES, check_mix
from raylm.rl.config import GRPOConfig, PPOConfig
from raylm.train.config_methods import (
    SCHEDULERS,
    DPOConfig,
    FreezeConfig,
    KTOConfig,
    LoraConfig,
    LossConfig,
    OftConfig,
    RMConfig,
)
from raylm.train.config_optim import (
    OPTIMIZERS,
    ApolloConfig,
    BAdamConfig,
    GaLoreConfig,
    check_optimizer,
    zero_stage,
)
from raylm.train.config_rl import check_rl_stage
from raylm.train.config_run import (
    CheckpointConfig,
    DeepSpeedConfig,
    ExportConfig,
    HeldOutConfig,
    ScalingConfig,
)

STAGES = ("pt", "sft", "dpo", "rm", "kto", "grpo", "ppo")
"""pt: continued pretraining (every token a target). sft: the assistant replies of
conversations. dpo: preference pairs (``DPOConfig``'s losses). rm: a reward model, the
LM with a one-output score head (``AutoModelForSequenceClassification``), trained on
dpo's preference pairs so that the chosen answer scores higher (``RMConfig``). kto:
unpaired answers each labelled desirable or not (LLaMA-Factory's ``kto_tag``), KTO's
loss against a reference model (``KTOConfig``). grpo: online RL, prompts whose
completions a vLLM engine samples and rewards score (``raylm.train.grpo``, docs/rl.md;
the ``grpo`` group). ppo: the same rollouts, a value head and GAE, rewards from an rm
run's model and / or verifiers (``raylm.train.ppo``, the ``ppo`` group)."""
STAGE_DATA = {"rm": "dpo"}
"""The data kind a stage reads when it is another stage's: rm trains on preference pairs."""
FINETUNING_TYPES = ("full", "lora", "freeze", "qlora", "oft")
PRECISIONS = ("fp32", "bf16", "fp16")
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")


@dataclass
class ModelConfig:
    """The model to start from."""

    name_or_path: str = MISSING
    """A local Hugging Face directory (a train job's ``final/``, the tiny model) or a hub id."""

    trust_remote_code: bool = False
    """Allow custom modelling code shipped with the checkpoint."""

    template: str | None = None
    """Chat template (LLaMA-Factory's ``template:``). None: the tokenizer's own template; a
    name from raylm.templates (chatml, default, llama3, qwen, qwen3, qwen3_nothink, mistral,
    gemma, alpaca, ...): that template replaces it (and, where LLaMA-Factory does, its stop
    word becomes EOS), for sft/dpo on a base model. Shards must be tokenized with the same
    one (the data job's ``tokenize.template``); ``final/``'s tokenizer carries it."""

    default_system: str | None = None
    """System prompt of conversations with none (or an empty one), LLaMA-Factory's
    ``default_system``: it replaces a named template's default, or leads the model's own
    template's messages; ``final/``'s tokenizer carries it. None: the template's own.
    Raw data only (a data job's shards were rendered without it)."""

    attn_implementation: str = "auto"
    """Attention kernel, given to ``from_pretrained``: auto (transformers' choice, sdpa
    where the model supports it), sdpa, eager (plain matmuls: for models or debugging
    where sdpa misbehaves) or flash_attention_2 (CUDA only, bf16/fp16, needs the
    flash-attn package on every worker; fastest and leanest on long sequences).
    LLaMA-Factory's ``flash_attn``."""

    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass instead of keeping them (non-reentrant,
    which ZeRO-3 and frozen embeddings need): about a third more compute for much less
    activation memory; turn on when long sequences or large micro batches run out of
    memory. LLaMA-Factory checkpoints by default (``disable_gradient_checkpointing``)."""

    mixture_of_depths: str | None = None
    """Mixture-of-depths (LLaMA-Factory's ``mixture_of_depths``; ``raylm.train.mod``):
    convert (wrap every odd decoder layer with a router that picks the top 12.5% of each
    sequence's tokens, after a schedule from 100%; the rest skip the layer) or load
    (continue a MoD model: a raylm ``final/`` or a LLaMA-Factory MoD checkpoint). Full
    fine-tuning of stage pt or sft only; ``final/`` keeps the routers, and serve, eval and
    export refuse it (vLLM has no MoD layers). None: a plain model."""

    def __post_init__(self) -> None:
        templates.check(self.template, "model.template")
        choice("model.attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS)
        if self.mixture_of_depths is not None:
            choice("model.mixture_of_depths", self.mixture_of_depths, ("convert", "load"))
        if self.default_system == "" and self.template is None:
            raise ConfigError(
                "model.default_system='' clears a named template's default system prompt; "
                "the model's own template (model.template=null) keeps its own: leave it unset"
            )


@dataclass
class TrainDataConfig:
    """Where the training examples come from."""

    path: str = MISSING
    """A data job's output dir (its Parquet shards stream to the workers), a raw jsonl/
    json/parquet/text file or a dataset named in the ``dataset_info.json`` beside it (raw
    data is tokenized on the fly, in memory: small sets); with ``datasets``, the dir of
    that registry (LLaMA-Factory's ``dataset_dir``). Local or a URI (``s3://``)."""

    datasets: list[str] = field(default_factory=list)
    """Names in ``path``'s ``dataset_info.json`` (LLaMA-Factory's ``dataset: a,b``)."""

    eval_datasets: list[str] = field(default_factory=list)
    """Registered datasets held out (``eval_dataset``): counted in data_stats.json, never
    trained on; no held-out loss is computed yet (use the eval job on ``final/``)."""

    mix_strategy: str = "concat"
    """concat, or HF ``interleave_datasets`` seeded by train.seed (as LLaMA-Factory):
    interleave_under (stop at the first exhausted), interleave_over (until all were
    exhausted; short ones repeat), interleave_once (until all, none repeated)."""

    interleave_probs: list[float] | None = None
    """Chance of drawing from each of ``datasets`` (interleave_*); None: round robin."""

    replacements: dict[str, str] = field(default_factory=dict)
    """``{{key}}`` -> value in every text field (identity.json: ``{name: .., author: ..}``);
    a dataset that still holds placeholders is named in a warning."""

    format: str = "auto"
    """Format of a raw file: auto, text, alpaca, sharegpt, openai, preference (shards: detected)."""

    cutoff_len: int = 512
    """Maximum tokens per example (LLaMA-Factory's cutoff_len); longer ones are truncated."""

    max_samples: int | None = None
    """At most this many examples (None: all): the first of each dataset before mixing,
    as LLaMA-Factory does (shards: of the whole set)."""

    val_size: float = 0.0
    """Held out after mixing (a share < 1, or a whole count), seeded by train.seed as
    LLaMA-Factory's ``train_test_split``; counted in data_stats.json. 0: none."""

    shuffle_row_groups: int = 4
    """Parquet row groups whose rows are shuffled together: each epoch permutes the
    shards' row groups, then shuffles rows within each run of this many (see
    ``raylm.train.stream``). A worker holds about this many row groups in memory."""

    tokenized_path: str | None = None
    """Where this run's tokenized set is kept (LLaMA-Factory's ``tokenized_path``): when
    it holds a finished set, the run trains on it and never reads ``path``; else the run
    tokenizes ``path``, saves the set there (a data job output), then trains. A set made
    with another tokenizer, template, cutoff, stage or data settings is refused
    (``raylm.train.tokenized``). Local or a URI."""

    def __post_init__(self) -> None:
        choice("data.format", self.format, INPUT_FORMATS)
        choice("data.mix_strategy", self.mix_strategy, MIX_STRATEGIES)
        positive("data.cutoff_len", self.cutoff_len)
        positive("data.shuffle_row_groups", self.shuffle_row_groups)
        if self.max_samples is not None:
            positive("data.max_samples", self.max_samples)
        if self.val_size < 0 or (self.val_size >= 1 and self.val_size != int(self.val_size)):
            raise ConfigError(
                f"data.val_size={self.val_size} must be a share in [0, 1) or a whole count"
            )
        if self.val_size and self.eval_datasets:
            raise ConfigError(
                "data.val_size and data.eval_datasets both hold examples out; set one "
                "(LLaMA-Factory refuses val_size with eval_dataset too)"
            )
        check_mix(self.mix_strategy, self.interleave_probs, self.datasets)


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

    warmup_steps: int = 0
    """Steps spent warming the learning rate up from 0; wins over ``warmup_ratio`` when
    > 0 (as in transformers): a warmup that must not change with the data size."""

    weight_decay: float = 0.0
    """AdamW weight decay."""

    adam_beta1: float = 0.9
    """Adam's first-moment decay (LLaMA-Factory's ``adam_beta1``), for every Adam-family
    optimizer raylm builds (AdamW, Muon's AdamW half, GaLore, APOLLO, Adam-mini, BAdam's
    base, bitsandbytes' AdamW) and bitsandbytes' Lion, as transformers' Trainer passes it."""

    adam_beta2: float = 0.999
    """Adam's second-moment decay (``adam_beta2``; pretraining recipes often use 0.95)."""

    adam_epsilon: float = 1e-8
    """Adam's denominator term (``adam_epsilon``; Lion has none)."""

    optimizer: str = "adamw"
    """adamw: torch AdamW. muon (LLaMA-Factory's ``use_muon``): Muon on every trainable 2-D
    weight but embeddings and lm_head, AdamW on the rest, as LLaMA-Factory splits them;
    DeepSpeed's Muon, so every ZeRO stage orthogonalises whole matrices (raylm.train.muon).
    LLaMA-Factory's extras, each from its package, at ``deepspeed.stage=0`` (whole
    tensors): galore (``use_galore``, the ``galore`` group; raylm.train.projected), apollo
    (``use_apollo``, ``apollo``), adam_mini (``use_adam_mini``; raylm.train.adam_mini_optim),
    badam (``use_badam``, ``badam``: one decoder layer trains at a time;
    raylm.train.badam_optim). See raylm.train.config_optim for why stage 0."""

    neftune_noise_alpha: float | None = None
    """NEFTune (LLaMA-Factory's and transformers' ``neftune_noise_alpha``): while training,
    the input embeddings get uniform(-1, 1) x alpha / sqrt(seq_len x hidden) noise
    (``raylm.train.neftune``); off in evaluation and never saved. None: off; 5 is usual."""

    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables clipping)."""

    precision: str = "fp32"
    """fp32, bf16 or fp16. CPUs run fp32 or bf16; fp16 needs a GPU."""

    seed: int = 42
    """Seeds model init of new modules, data order and dropout; equal seeds give equal losses."""

    logging_steps: int = 1
    """Report metrics every this many optimizer steps."""

    nonfinite: str = "stop"
    """A step whose loss or gradient norm is NaN/inf. stop: end the run with an error
    naming the step and the value, without Ray Train's retries (a resume would replay
    the same batches and fail again). skip: DeepSpeed drops that step's update (ZeRO
    stages 1-3, or bf16/fp16; stage 0 in fp32 cannot skip and stops), the run goes on,
    and events.jsonl records it. In fp16 gradient overflow is the loss scaler's and only
    the loss is checked. See ``raylm.train.sinks``."""

    def __post_init__(self) -> None:
        positive("train.lr", self.lr)
        positive("train.epochs", self.epochs)
        positive("train.micro_batch_size", self.micro_batch_size)
        positive("train.grad_accum", self.grad_accum)
        positive("train.logging_steps", self.logging_steps)
        choice("train.nonfinite", self.nonfinite, ("stop", "skip"))
        choice("train.optimizer", self.optimizer, OPTIMIZERS)
        positive("train.max_grad_norm", self.max_grad_norm, allow_zero=True)
        choice("train.lr_scheduler", self.lr_scheduler, SCHEDULERS)
        choice("train.precision", self.precision, PRECISIONS)
        if self.max_steps is not None:
            positive("train.max_steps", self.max_steps)
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"train.warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        positive("train.warmup_steps", self.warmup_steps, allow_zero=True)
        for key in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"train.{key}={getattr(self, key)} must be in [0, 1)")
        positive("train.adam_epsilon", self.adam_epsilon)
        if self.neftune_noise_alpha is not None:
            positive("train.neftune_noise_alpha", self.neftune_noise_alpha)

    @property
    def betas(self) -> tuple[float, float]:
        """``(adam_beta1, adam_beta2)``, as optimizers take them."""
        return (self.adam_beta1, self.adam_beta2)

    def warmup(self, total_steps: int) -> int:
        """Warmup steps of a ``total_steps`` run: ``warmup_steps``, else the ratio's share."""
        return self.warmup_steps or int(self.warmup_ratio * total_steps)


@dataclass
class TrainJobConfig:
    """The train job: Ray Train workers running DeepSpeed for every stage in ``STAGES``."""

    stage: str = "sft"
    """pt (continued pretraining), sft (responses-only loss), dpo (preference pairs), rm
    (a reward model on preference pairs), kto (answers labelled good or bad), grpo or ppo
    (online RL from prompts and rewards); see ``STAGES``."""

    finetuning_type: str = "lora"
    """full, lora, freeze (last N layers, or LLaMA Pro's inserted blocks), qlora (4-bit
    base; CUDA only) or oft (orthogonal fine-tuning; final/ is the merged model)."""

    run_name: str = "raylm-train"
    """Run name; submitting again with the same name and storage resumes the run."""

    storage_path: str = "outputs/train"
    """Where runs live: a bucket (``s3://``, ``gs://``), or a local path, or a shared
    filesystem (NFS) every node mounts at the same path on a multi-node cluster; the run
    dir is storage_path/run_name."""

    report_to: list[str] = field(default_factory=list)
    """Live metric sinks, fed by rank 0 every logged step while the run trains:
    tensorboard, mlflow, wandb (metrics.jsonl and Ray metrics are always on). Install
    the one you use (the ``dev`` extra has all three): ``pip install tensorboard``,
    ``mlflow-skinny`` or ``wandb``; a missing one fails at config load. Where each
    writes and how to watch it: ``raylm.train.sinks``, docs/training.md."""

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

    oft: OftConfig = field(default_factory=OftConfig)
    """OFT adapters (finetuning_type oft)."""

    galore: GaLoreConfig = field(default_factory=GaLoreConfig)
    """GaLore's projection (train.optimizer=galore)."""

    apollo: ApolloConfig = field(default_factory=ApolloConfig)
    """APOLLO's projection and scaling (train.optimizer=apollo)."""

    badam: BAdamConfig = field(default_factory=BAdamConfig)
    """BAdam's blocks and switching (train.optimizer=badam)."""

    dpo: DPOConfig = field(default_factory=DPOConfig)
    """DPO loss."""

    rm: RMConfig = field(default_factory=RMConfig)
    """Reward-model loss (stage rm)."""

    kto: KTOConfig = field(default_factory=KTOConfig)
    """KTO loss (stage kto)."""

    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    """GRPO (stage grpo): TRL 1.16's GRPO settings, the rewards and the rollout engine;
    ``train.micro_batch_size`` counts prompts, each sampled ``num_generations`` times."""

    ppo: PPOConfig = field(default_factory=PPOConfig)
    """PPO (stage ppo): the rollouts as grpo's, the reward model, GAE and the value head."""

    loss: LossConfig = field(default_factory=LossConfig)
    """The pt/sft token loss: cross-entropy or LLaMA-Factory's dft, eaft, asft."""

    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """DeepSpeed / ZeRO."""

    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    """Workers and resources."""

    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing and retries."""

    eval: HeldOutConfig = field(default_factory=HeldOutConfig)
    """Held-out loss during training."""

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
        check_rl_stage(self)  # the RL stages' unsupported combinations, by name
        choice("stage", self.stage, STAGES)
        choice("finetuning_type", self.finetuning_type, FINETUNING_TYPES)
        self.loss.check(self.stage, self.finetuning_type, self.lora.init, self.model.template)
        pissa = self.finetuning_type == "lora" and self.lora.init in ("pissa", "olora")
        if self.export.pissa_convert and (not pissa or self.lora.adapter_name_or_path):
            raise ConfigError(
                "export.pissa_convert converts a new adapter of finetuning_type=lora with "
                "lora.init pissa or olora"
            )
        if self.finetuning_type == "oft" and self.stage == "rm":
            raise ConfigError(
                "stage rm with finetuning_type=oft: raylm builds the reward model's score "
                "head with lora, freeze or full; use one of those"
            )
        self._check_mod()
        check_optimizer(self, zero_stage(self))
        from raylm.train.sinks import SINKS, require

        for sink in self.report_to:
            choice("report_to", sink, SINKS)
        require(self.report_to)
        if self.train.precision == "fp16" and not self.scaling.use_gpu:
            raise ConfigError("train.precision=fp16 needs scaling.use_gpu=true; use fp32 or bf16")

    def _check_mod(self) -> None:
        """model.mixture_of_depths trains every weight and the new routers: full only (a
        LoRA/OFT adapter or frozen layers would leave the routers untrained and unsaved),
        pt/sft only (the DPO/KTO reference and the reward head load plain models)."""
        mod = self.model.mixture_of_depths
        if mod is None:
            return
        if self.finetuning_type != "full":
            raise ConfigError(
                f"model.mixture_of_depths={mod} with finetuning_type={self.finetuning_type}: "
                "the new routers must train and be saved with every weight they route; use "
                "finetuning_type=full (as LLaMA-Factory's MoD example)"
            )
        if self.stage not in ("pt", "sft") or self.loss.type == "asft":
            raise ConfigError(
                f"model.mixture_of_depths={mod} with stage {self.stage}, loss.type "
                f"{self.loss.type}: raylm routes the trained model of stage pt or sft only "
                "(a reference or reward model would load without its routers)"
            )


def run_dir_of(cfg: TrainJobConfig) -> str:
    """``storage_path/run_name``: a local or NFS path, or an object-store URI."""
    return storage.join(resolve_path(cfg.storage_path.removeprefix("file://")), cfg.run_name)
