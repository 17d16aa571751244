"""What a run tunes and what it optimises: LoRA, OFT and freeze (which weights train), and the
preference objectives' settings (dpo, rm, kto). Split from ``raylm.train.config`` to keep
each file readable; that module re-exports every class here."""

from __future__ import annotations

from dataclasses import dataclass, field

from raylm.config import ConfigError, choice, positive

LORA_INITS = ("default", "gaussian", "pissa", "olora")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
"""Learning-rate schedules (``train.lr_scheduler``); here, below both the train config
and the LLaMA-Factory translation that checks ``lr_scheduler_type`` against them."""


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

    use_dora: bool = False
    """DoRA: learn each adapted weight's magnitude apart from its direction (PEFT's
    ``use_dora``); closer to full fine-tuning at low rank, somewhat slower per step."""

    use_rslora: bool = False
    """Rank-stabilised LoRA: scale the update by alpha / sqrt(rank) instead of alpha / rank
    (PEFT's ``use_rslora``), so high ranks (64+) still learn at a useful rate."""

    init: str = "default"
    """Adapter initialisation (PEFT's ``init_lora_weights``): default (A random, B zero),
    gaussian, pissa (A and B from the weight's top singular vectors, which leave the base
    as the residual; converges faster) or olora (the same from a QR decomposition).
    pissa and olora change the base weights: final/'s adapter is right with PEFT (it
    redoes the decomposition on load: the eval job, ``export.merge_lora``), not on the
    original weights in vLLM (serve ``final/merged``). pissa_niter_N (randomised SVD)
    is refused: its residual cannot be redone when final/ is loaded."""

    additional_target: list[str] = field(default_factory=list)
    """Modules trained in full beside the adapter and saved in it (PEFT's
    ``modules_to_save``): e.g. embed_tokens and lm_head after adding tokens."""

    loraplus_lr_ratio: float | None = None
    """LoRA+: the B matrices (and 1-D adapter weights such as DoRA's magnitudes) learn at
    ``train.lr`` x this ratio, the A matrices at ``train.lr``; faster convergence at the
    same lr (the LoRA+ paper uses 16). None: one learning rate for all."""

    loraplus_lr_embedding: float = 1e-6
    """LoRA+: learning rate of the B matrices of adapted embedding layers (``lora.target``
    with embed_tokens), which the ratio would blow up."""

    adapter_name_or_path: str | None = None
    """An existing PEFT LoRA adapter (a local dir such as an earlier run's final/, a bucket
    URI, or a hub id) to continue training instead of a fresh one; its own rank, alpha,
    targets and variants apply (the keys above that shape an adapter are ignored)."""

    def __post_init__(self) -> None:
        positive("lora.rank", self.rank)
        positive("lora.alpha", self.alpha)
        if not self.target:
            raise ConfigError("lora.target must name at least one module (or 'all')")
        if self.init.startswith("pissa_niter_"):
            raise ConfigError(
                f"lora.init={self.init}: the randomised SVD's residual cannot be redone when "
                "final/ is loaded, so the adapter would not fit its base; use lora.init=pissa "
                "(exact SVD), or it needs an export that converts PiSSA to plain LoRA"
            )
        choice("lora.init", self.init, LORA_INITS)
        if self.loraplus_lr_ratio is not None:
            positive("lora.loraplus_lr_ratio", self.loraplus_lr_ratio)
        positive("lora.loraplus_lr_embedding", self.loraplus_lr_embedding, allow_zero=True)
        if self.adapter_name_or_path and "," in self.adapter_name_or_path:
            raise ConfigError(
                f"lora.adapter_name_or_path={self.adapter_name_or_path!r}: one adapter is "
                "continued; merge the others into the base model first (export.merge_lora)"
            )


@dataclass
class FreezeConfig:
    """Partial fine-tuning (finetuning_type freeze)."""

    trainable_layers: int = 2
    """Train only the last N decoder layers (negative: the first -N, as LLaMA-Factory's
    ``freeze_trainable_layers``); the rest stay frozen."""

    trainable_modules: list[str] = field(default_factory=lambda: ["all"])
    """Which parts of those layers train: ``all``, or names of a decoder layer's modules
    (self_attn, mlp, or deeper, self_attn.q_proj): e.g. only the MLPs, for less memory
    per layer. LLaMA-Factory's ``freeze_trainable_modules``."""

    extra_modules: list[str] = field(default_factory=list)
    """Modules outside the decoder layers that train too (embed_tokens, norm, lm_head):
    e.g. the embeddings after adding tokens. LLaMA-Factory's ``freeze_extra_modules``."""

    llama_pro: bool = False
    """LLaMA Pro (LLaMA-Factory's ``use_llama_pro``): the ``trainable_layers`` trained are
    not the last N but N evenly spaced ones, the last of each group of L / N layers
    (layer ids stride-1, 2*stride-1, ..., stride = L / N): the blocks ``raylm llama-pro``
    (LLaMA-Factory's scripts/llama_pro.py) inserted, each a copy of the block before it
    with o_proj and down_proj zeroed, so training new capacity leaves the original
    blocks untouched. Needs trainable_layers > 0 dividing the layer count."""

    def __post_init__(self) -> None:
        if self.trainable_layers == 0:
            raise ConfigError("freeze.trainable_layers must not be 0 (last N > 0, first -N < 0)")
        if not self.trainable_modules:
            raise ConfigError("freeze.trainable_modules must name at least one module (or 'all')")
        if self.llama_pro and self.trainable_layers < 0:
            raise ConfigError(
                f"freeze.llama_pro trains trainable_layers={self.trainable_layers} evenly "
                "spaced layers: it must be positive (the number of inserted blocks)"
            )


@dataclass
class OftConfig:
    """Orthogonal fine-tuning (finetuning_type oft; PEFT's ``OFTConfig``, as LLaMA-Factory
    builds it): each adapted linear layer's input is rotated by a trained block-diagonal
    orthogonal matrix, which keeps the angles between a layer's weight vectors (the
    pretrained knowledge, by OFT's argument) while learning. The weight update is
    multiplicative, so final/ holds the adapter merged into the base: vLLM serves no
    OFT adapters (``raylm.train.oft``)."""

    block_size: int = 32
    """Side of each orthogonal block (LLaMA-Factory's ``oft_block_size``): larger blocks
    are denser rotations with more trainable parameters (block_size^2 / 2 per block).
    It should divide every adapted layer's input size; PEFT picks the nearest divisor
    otherwise (warned). 0: derive it from ``rank``."""

    rank: int = 0
    """Number of blocks per adapted layer (LLaMA-Factory's ``oft_rank``), the other way to
    size them (block = in_features / rank); exactly one of rank and block_size is set,
    the other 0."""

    target: list[str] = field(default_factory=lambda: ["all"])
    """Module names to adapt (q_proj, v_proj, ...); ``all``: every linear layer but the
    head (LLaMA-Factory's ``oft_target``)."""

    module_dropout: float = 0.0
    """Multiplicative dropout: each block is replaced by the identity with this chance
    per training forward (LLaMA-Factory's ``module_dropout``), OFT's counterpart of
    LoRA's dropout."""

    use_cayley_neumann: bool = True
    """Orthogonalise through a truncated Neumann series of the Cayley transform (PEFT's
    default) instead of its exact matrix inverse: cheaper per step, slightly off
    orthogonal; LLaMA-Factory passes nothing, so it gets this default too."""

    num_cayley_neumann_terms: int = 5
    """Terms of that series (PEFT's default): more are closer to orthogonal, slower."""

    coft: bool = False
    """Constrained OFT: keep each rotation within ``eps`` of the identity, for stability
    at high learning rates."""

    eps: float = 6e-5
    """COFT's freedom of rotation (only with ``coft``)."""

    block_share: bool = False
    """One rotation block shared by all blocks of a layer: far fewer parameters, less
    expressive."""

    additional_target: list[str] = field(default_factory=list)
    """Modules trained in full beside the adapter and saved in it (PEFT's
    ``modules_to_save``; LLaMA-Factory's ``additional_target`` with oft)."""

    def __post_init__(self) -> None:
        positive("oft.block_size", self.block_size, allow_zero=True)
        positive("oft.rank", self.rank, allow_zero=True)
        if (self.rank == 0) == (self.block_size == 0):
            raise ConfigError(
                f"oft.rank={self.rank}, oft.block_size={self.block_size}: set exactly one "
                "(rank x block_size is each layer's input size), the other to 0"
            )
        if not self.target:
            raise ConfigError("oft.target must name at least one module (or 'all')")
        if not 0.0 <= self.module_dropout < 1.0:
            raise ConfigError(f"oft.module_dropout={self.module_dropout} must be in [0, 1)")
        positive("oft.num_cayley_neumann_terms", self.num_cayley_neumann_terms)
        positive("oft.eps", self.eps)


@dataclass
class DPOConfig:
    """Preference optimisation (stage dpo): DPO and its reference-free relatives.

    The variants follow LLaMA-Factory's ``pref_loss`` (and TRL's trainers): sigmoid, hinge
    and ipo score the policy against a reference model; simpo and orpo need none, so no
    reference model is built or run for them (``needs_reference``).
    """

    beta: float = 0.1
    """The loss's one scale, whose meaning depends on ``loss_type``: sigmoid/hinge, the
    strength of the KL penalty towards the reference (0.1 to 0.5 typical; higher keeps the
    policy closer); ipo, the regularisation tau of the IPO paper (the target margin of the
    length-averaged log-ratio is 1/(2 beta)); simpo, the scale of the length-averaged
    reward (the SimPO authors use 2 to 10); orpo, the weight lambda of the odds-ratio
    term next to the SFT loss (about 0.1 in the ORPO paper). LLaMA-Factory's
    ``pref_beta``."""

    loss_type: str = "sigmoid"
    """sigmoid: DPO (Rafailov et al.), the default; the logistic loss on beta times the
    difference of policy/reference log-ratios of chosen and rejected.
    hinge: SLiC's hinge on the same margin; stops pushing once the margin exceeds 1/beta.
    ipo: IPO's squared loss on the length-averaged log-ratios; regresses the margin to a
    target instead of driving it to infinity, which resists overfitting clean preferences.
    simpo: SimPO; no reference model, the length-averaged policy log-probs are the reward,
    with a target margin ``simpo_gamma``; cheapest (one model, one forward).
    orpo: ORPO; no reference model, SFT loss on the chosen response plus beta times an
    odds-ratio penalty; trains from a base model in one stage, no separate SFT needed.
    LLaMA-Factory's ``pref_loss`` (its ``kto_pair`` is not supported)."""

    label_smoothing: float = 0.0
    """Conservative DPO (cDPO), sigmoid only: the assumed probability that a preference
    label is flipped, in [0, 0.5); try 0.1 for noisy preference data. 0 is plain DPO.
    LLaMA-Factory's ``dpo_label_smoothing``."""

    simpo_gamma: float = 0.5
    """SimPO's target reward margin gamma (simpo only): the loss keeps pushing until the
    scaled length-averaged margin beta * (chosen - rejected) exceeds it. The SimPO
    authors' settings put gamma / beta at about 0.3 to 0.8. LLaMA-Factory's and TRL's
    ``simpo_gamma``."""

    sft_weight: float = 0.0
    """Weight of an SFT loss (the length-averaged NLL of the chosen response) added to any
    variant, which keeps the likelihood of chosen answers from falling while their margin
    grows (RPO). 0 disables it; orpo has an SFT term of its own already. LLaMA-Factory's
    ``pref_ftx``."""

    def __post_init__(self) -> None:
        positive("dpo.beta", self.beta)
        choice("dpo.loss_type", self.loss_type, ("sigmoid", "hinge", "ipo", "simpo", "orpo"))
        positive("dpo.simpo_gamma", self.simpo_gamma, allow_zero=True)
        positive("dpo.sft_weight", self.sft_weight, allow_zero=True)
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"dpo.label_smoothing={self.label_smoothing} must be in [0, 0.5)")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ConfigError(
                f"dpo.label_smoothing={self.label_smoothing} only applies to "
                f"dpo.loss_type=sigmoid (cDPO), not {self.loss_type!r}; set it to 0"
            )

    @property
    def needs_reference(self) -> bool:
        """simpo and orpo score the policy alone: no reference model to build or run."""
        return self.loss_type not in ("simpo", "orpo")

    @property
    def length_normalized(self) -> bool:
        """ipo, simpo and orpo compare per-token averages of log-probs (as LLaMA-Factory
        and TRL do), so long answers do not win or lose by length alone."""
        return self.loss_type in ("ipo", "simpo", "orpo")


@dataclass
class RMConfig:
    """Reward modelling (stage rm): TRL's RewardTrainer loss, -log sigmoid(score(chosen) -
    score(rejected)), on the score head's output at each sequence's last token."""

    center_rewards_coefficient: float = 0.0
    """Weight of the mean squared sum of each pair's two scores added to the loss (TRL's
    ``center_rewards_coefficient``; Eisenstein et al. 2023 use 0.01): the pairwise loss
    only fixes score differences, this keeps scores near zero so that a downstream RL
    run or a threshold sees comparable numbers. 0 disables it (LLaMA-Factory has none)."""

    def __post_init__(self) -> None:
        positive("rm.center_rewards_coefficient", self.center_rewards_coefficient, allow_zero=True)


@dataclass
class KTOConfig:
    """KTO (Ethayarajh et al. 2024, stage kto) as LLaMA-Factory's KTO trainer runs TRL's
    loss: each answer's log-ratio to the reference model, minus a KL estimate from
    mismatched prompt/answer pairs, pushed up for desirable answers and down for
    undesirable ones through a sigmoid (``raylm.train.kto``)."""

    beta: float = 0.1
    """Scale of the log-ratios inside the sigmoid: higher keeps the policy closer to the
    reference (the KTO paper uses 0.1; LLaMA-Factory's ``pref_beta``)."""

    desirable_weight: float = 1.0
    """Weight of the desirable examples' losses (LLaMA-Factory's ``kto_chosen_weight``).
    With unbalanced data the KTO paper keeps desirable_weight x desirable count /
    (undesirable_weight x undesirable count) between 1 and 4/3."""

    undesirable_weight: float = 1.0
    """Weight of the undesirable examples' losses (LLaMA-Factory's ``kto_rejected_weight``)."""

    sft_weight: float = 0.0
    """Weight of an SFT loss on the desirable answers (their length-averaged NLL), added
    as LLaMA-Factory adds it (``pref_ftx``), which keeps their likelihood from falling.
    0 disables it."""

    def __post_init__(self) -> None:
        positive("kto.beta", self.beta)
        positive("kto.desirable_weight", self.desirable_weight)
        positive("kto.undesirable_weight", self.undesirable_weight)
        positive("kto.sft_weight", self.sft_weight, allow_zero=True)


LM_LOSSES = ("ce", "dft", "eaft", "asft")
"""The token losses of stages pt and sft (``LossConfig.type``)."""


@dataclass
class LossConfig:
    """The token loss of stages pt and sft (``raylm.train.objectives.lm_loss``): plain
    cross-entropy, or one of LLaMA-Factory's reweighted variants, computed as its
    ``trainer_utils`` does (per micro batch, averaged over its target tokens)."""

    type: str = "ce"
    """ce: mean next-token cross-entropy over the target tokens. dft (Dynamic Fine-Tuning,
    LLaMA-Factory's ``use_dft_loss``): each target's cross-entropy times its probability
    under the model, detached, so tokens the model finds unlikely pull less. eaft
    (``use_eaft_loss``): each target's cross-entropy times (H / 3) ** eaft_alpha, H the
    entropy of the model's top-20 next-token distribution, detached: confident
    positions pull less. asft (``use_asft_loss``): dft plus asft_alpha x KL(reference ||
    model) over the vocabulary at each target; the reference is the base model (a
    frozen copy for full/freeze, the adapter disabled for lora), which costs a second
    forward pass per micro batch."""

    asft_alpha: float = 0.1
    """asft: weight of the KL term that keeps the model near the reference
    (LLaMA-Factory's ``asft_alpha``)."""

    eaft_alpha: float = 1.0
    """eaft: power of the entropy weight; 0 makes eaft plain cross-entropy
    (LLaMA-Factory's ``eaft_alpha``)."""

    label_smoothing: float = 0.0
    """ce of stage pt/sft: (1 - e) x the target's cross-entropy + e x the mean over the
    vocabulary of -log p, averaged over the target tokens (transformers' ``LabelSmoother``,
    LLaMA-Factory's ``label_smoothing_factor``). 0: plain cross-entropy; in [0, 1)."""

    train_on_prompt: bool = False
    """sft: every token of the rendered conversation is a target (system, user turns,
    template tokens too), not only the assistant replies (LLaMA-Factory's
    ``train_on_prompt``). Acts where raylm tokenizes raw data (``raylm.data.tokenize``)."""

    mask_history: bool = False
    """sft: only the last assistant reply is a target (LLaMA-Factory's ``mask_history``);
    past ``data.cutoff_len`` the conversation loses whole earlier turns from the front
    (LLaMA-Factory's per-turn cut, last turn first) so the trained reply is kept.
    Acts where raylm tokenizes raw data; not with ``train_on_prompt``."""

    def __post_init__(self) -> None:
        choice("loss.type", self.type, LM_LOSSES)
        positive("loss.asft_alpha", self.asft_alpha, allow_zero=True)
        positive("loss.eaft_alpha", self.eaft_alpha, allow_zero=True)
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"loss.label_smoothing={self.label_smoothing} must be in [0, 1)")
        if self.train_on_prompt and self.mask_history:
            raise ConfigError(
                "loss.mask_history with loss.train_on_prompt: one trains the last reply only, "
                "the other every prompt token (LLaMA-Factory refuses the pair too)"
            )

    def check(self, stage: str, finetuning_type: str, lora_init: str, template: str | None) -> None:
        """The variants reweight the pt/sft token loss; asft's LoRA reference is the base
        under the disabled adapter, which PiSSA/OLoRA have rewritten. The sft masks and
        label smoothing act on their stages only."""
        self._check_masks(stage, template)
        if self.label_smoothing and (stage not in ("pt", "sft") or self.type != "ce"):
            raise ConfigError(
                f"loss.label_smoothing with stage {stage}, loss.type {self.type}: it smooths "
                "the cross-entropy (loss.type=ce) of stage pt or sft"
            )
        if self.type == "ce":
            return
        if stage not in ("pt", "sft"):
            raise ConfigError(f"loss.type={self.type} is a pt/sft token loss, not for {stage}")
        lora = finetuning_type in ("lora", "qlora")
        if self.type == "asft" and lora and lora_init in ("pissa", "olora"):
            raise ConfigError(
                f"loss.type=asft with lora.init={lora_init}: the base under the disabled "
                "adapter is no longer the reference model asft needs; use lora.init=default"
            )

    @property
    def masks(self) -> dict[str, bool]:
        """``raylm.data.tokenize.tokenize_sft``'s mask settings."""
        return {"train_on_prompt": self.train_on_prompt, "mask_history": self.mask_history}

    def _check_masks(self, stage: str, template: str | None) -> None:
        on = [k for k in ("train_on_prompt", "mask_history") if getattr(self, k)]
        if on and stage != "sft":
            raise ConfigError(f"loss.{on[0]} decides the sft loss masks; not for stage {stage}")
        if self.mask_history and template is not None:
            from raylm import templates

            if templates.get(template).think:
                raise ConfigError(
                    f"loss.mask_history with template {template}: LLaMA-Factory then drops "
                    "the reasoning of the earlier replies, which raylm's template renders; "
                    "use a *_nothink template or the model's own (model.template=null)"
                )

    def raw_only(self, default_system: str | None, where: str) -> None:
        """Settings that act where raylm tokenizes raw data (with ``model.default_system``):
        a data job's shards were rendered and masked without them, so training on shards
        with them set would silently ignore them."""
        keys = [k for k, on in (("loss.train_on_prompt", self.train_on_prompt),
                ("loss.mask_history", self.mask_history),
                ("model.default_system", default_system is not None)) if on]  # fmt: skip
        if keys:
            raise ConfigError(
                f"{where} holds a data job's tokenized shards, rendered and masked without "
                f"{', '.join(keys)}, which act where raylm tokenizes raw data: point "
                "data.path at the raw dataset (data.tokenized_path keeps its tokenization)"
            )
