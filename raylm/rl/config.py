"""Typed settings of online RL (GRPO and PPO), named and defaulted as TRL 1.16 names them.

Each field's docstring gives its TRL ``GRPOConfig`` name where it has one, so a TRL recipe
translates key by key. Validation follows ``raylm.train.config_methods``: a wrong choice
fails at load time naming the key and the closest valid value, before any worker starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from raylm.config import ConfigError, choice, positive
from raylm.engine import EngineConfig

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
"""TRL 1.16's ``loss_type`` values; see ``raylm.rl.loss`` for how each normalises."""

CLIPPED_LOSSES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
"""The loss types that clip the ratio to [1 - epsilon_low, 1 + epsilon_high] (PPO-style)."""

SCALE_REWARDS = ("group", "batch", "none")
"""TRL 1.16's ``scale_rewards`` (its ``True`` / ``False`` are ``group`` / ``none``)."""

AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
"""TRL 1.16's ``multi_objective_aggregation`` (normalize_then_sum is GDPO's)."""

IS_LEVELS = ("token", "sequence")
"""TRL's ``importance_sampling_level``: per-token ratios, or one per sequence (GSPO)."""

IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
"""TRL's ``vllm_importance_sampling_mode``: clip or zero ratios outside the bounds, per
token or per sequence."""

BUILTIN_REWARDS = ("math", "format", "code")
"""Verifiers in ``raylm.rl.verifiers``; anything else must be ``module:function``."""


@dataclass
class RewardConfig:
    """One reward function and its weight (TRL: an entry of ``reward_funcs`` and the
    matching entry of ``reward_weights``)."""

    function: str = "math"
    """``math`` (answer match), ``format`` (regex), ``code`` (tests in the sandbox), or a
    user function as ``module:function`` taking (completions, **columns) and returning
    one float (or None: not applicable) per completion."""

    weight: float = 1.0
    """Multiplies this function's reward before the functions are summed (TRL's
    ``reward_weights``); 1.0 for all reproduces TRL's default."""

    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments of the function, e.g. ``pattern`` for ``format``,
    ``timeout_s`` for ``code``."""

    def __post_init__(self) -> None:
        if ":" not in self.function:
            choice("reward.function", self.function, BUILTIN_REWARDS)


def _rollout_engine() -> EngineConfig:
    """float32 so the engine samples from the numbers the trainer scores (the rollout
    importance-sampling ratio stays at 1 on CPU); a batch that holds a step's requests."""
    return EngineConfig(dtype="float32", max_model_len=1024, max_num_seqs=64, kv_cache_gib=1)


@dataclass
class RolloutConfig:
    """What the online RL stages share: how completions are sampled, which rewards score
    them, and the vLLM engine that samples them (``raylm.train.grpo``)."""

    num_generations: int = 8
    """Completions sampled per prompt, the group the advantage is relative to (TRL:
    ``num_generations``); at least 2, or every advantage is zero."""

    temperature: float = 1.0
    """Sampling temperature of the rollouts (TRL: ``temperature``); the policy's
    log-probabilities are computed at the same temperature."""

    top_p: float = 1.0
    """Nucleus sampling of the rollouts (TRL: ``top_p``); 1.0 keeps every token."""

    max_completion_length: int = 512
    """Most tokens generated per completion (TRL: ``max_completion_length``); also
    dr_grpo's loss normaliser."""

    rewards: list[RewardConfig] = field(default_factory=lambda: [RewardConfig()])
    """The reward functions and weights (TRL: ``reward_funcs`` and ``reward_weights``)."""

    engine: EngineConfig = field(default_factory=_rollout_engine)
    """The train job's rollout engine (``raylm.engine``'s settings, as serve and eval take
    them): one vLLM ``LLM`` in a Ray actor that rank 0 starts (``raylm.train.grpo``)."""

    engine_cpus: float = 0.0
    """CPUs each rollout engine's actor reserves from Ray. 0 on a small node, where the
    training workers hold every CPU (the engines run while they wait for the rollouts)."""

    engines: int = 1
    """Rollout engines (data parallel): each samples a contiguous slice of the step's
    requests, all hold the same weights (every sync reaches each one); with
    ``scaling.use_gpu`` each asks Ray for a GPU of its own."""

    def _check_rollout(self, group: str) -> None:
        """The shared fields' bounds, named under the stage's group (grpo. / ppo.)."""
        positive(f"{group}.num_generations", self.num_generations)
        positive(f"{group}.temperature", self.temperature)
        positive(f"{group}.max_completion_length", self.max_completion_length)
        self.rewards = [
            r if isinstance(r, RewardConfig) else RewardConfig(**r) for r in self.rewards
        ]
        if isinstance(self.engine, dict):
            self.engine = EngineConfig(**self.engine)
        positive(f"{group}.engine_cpus", self.engine_cpus, allow_zero=True)
        positive(f"{group}.engines", self.engines)

    @property
    def reward_weights(self) -> list[float]:
        return [r.weight for r in self.rewards]


@dataclass
class GRPOConfig(RolloutConfig):
    """Group Relative Policy Optimization: sample ``num_generations`` completions per
    prompt, score them with the rewards, and push the policy toward the completions that
    beat their group's mean."""

    beta: float = 0.0
    """KL coefficient to the reference policy (TRL: ``beta``); 0.0 loads no reference
    model. DeepSeek-R1 used 0.001."""

    epsilon_low: float = 0.2
    """Lower clip: ratios below 1 - epsilon_low stop pushing down (TRL: ``epsilon``)."""

    epsilon_high: float | None = None
    """Upper clip, 1 + epsilon_high (TRL: ``epsilon_high``); None: epsilon_low. DAPO
    recommends 0.28; for cispo it is the absolute cap on the ratio (ScaleRL: 5.0)."""

    delta: float | None = None
    """Two-sided GRPO (INTELLECT-2): also cap the unclipped ratio at delta (TRL:
    ``delta``); None: off. Should exceed 1 + epsilon_high."""

    loss_type: str = "dapo"
    """How token losses are aggregated (TRL: ``loss_type``, default dapo): grpo (per
    sequence mean), bnpo (local token mean), dr_grpo (sum / (batch x
    max_completion_length)), dapo (global token mean), cispo, sapo, luspo, vespo."""

    scale_rewards: str = "group"
    """Divide advantages by the group's std, the batch's std, or not at all (TRL:
    ``scale_rewards``: group / batch / none). Dr. GRPO recommends none."""

    multi_objective_aggregation: str = "sum_then_normalize"
    """Several rewards: weighted sum, then normalise; or normalise each per group, then
    sum (GDPO) (TRL: ``multi_objective_aggregation``)."""

    importance_sampling_level: str = "token"
    """Policy ratio per token, or the mean log-ratio per sequence (GSPO) (TRL:
    ``importance_sampling_level``)."""

    use_bias_correction_kl: bool = True
    """Multiply the KL term by the policy ratio, the unbiased reverse-KL gradient of
    DeepSeek-V3.2 (TRL: ``use_bias_correction_kl``, default True in 1.16)."""

    num_iterations: int = 1
    """Optimisation passes over each generated batch (TRL: ``num_iterations``, mu)."""

    rollout_is_correction: bool = True
    """Weight each token's loss by pi_trainer / pi_rollout, correcting for the rollout
    engine (vLLM) sampling from slightly different probabilities than the trainer
    computes (TRL: ``vllm_importance_sampling_correction``)."""

    rollout_is_mode: str = "sequence_mask"
    """How that ratio is bounded (TRL: ``vllm_importance_sampling_mode``): token_truncate,
    token_mask, sequence_truncate or sequence_mask (truncate clips to the bounds, mask
    zeroes what falls outside them)."""

    rollout_is_clip_min: float | None = None
    """Lower bound of the rollout ratio (TRL: ``vllm_importance_sampling_clip_min``)."""

    rollout_is_clip_max: float | None = 3.0
    """Upper bound of the rollout ratio (TRL: ``vllm_importance_sampling_clip_max``)."""

    mask_truncated_completions: bool = False
    """Leave completions cut at max_completion_length out of the loss (TRL:
    ``mask_truncated_completions``); DAPO recommends it."""

    sapo_temperature_pos: float = 1.0
    """sapo: gate temperature for positive advantages (TRL: ``sapo_temperature_pos``)."""

    sapo_temperature_neg: float = 1.05
    """sapo: gate temperature for other advantages (TRL: ``sapo_temperature_neg``)."""

    vespo_k_pos: float = 2.0
    """vespo: power of the gamma weight for non-negative advantages (TRL: ``vespo_k_pos``)."""

    vespo_lambda_pos: float = 3.0
    """vespo: decay of the gamma weight for non-negative advantages (TRL: ``vespo_lambda_pos``)."""

    vespo_k_neg: float = 3.0
    """vespo: power of the gamma weight for negative advantages (TRL: ``vespo_k_neg``)."""

    vespo_lambda_neg: float = 2.0
    """vespo: decay of the gamma weight for negative advantages (TRL: ``vespo_lambda_neg``)."""

    def __post_init__(self) -> None:
        if self.num_generations < 2:
            raise ConfigError(
                f"grpo.num_generations={self.num_generations}: GRPO needs at least 2 "
                "completions per prompt, or every advantage is zero"
            )
        self._check_rollout("grpo")
        positive("grpo.beta", self.beta, allow_zero=True)
        positive("grpo.epsilon_low", self.epsilon_low, allow_zero=True)
        positive("grpo.num_iterations", self.num_iterations)
        choice("grpo.loss_type", self.loss_type, LOSS_TYPES)
        choice("grpo.scale_rewards", self.scale_rewards, SCALE_REWARDS)
        choice("grpo.multi_objective_aggregation", self.multi_objective_aggregation, AGGREGATIONS)
        choice("grpo.importance_sampling_level", self.importance_sampling_level, IS_LEVELS)
        self._check_rollout_is()
        if not self.rewards:
            raise ConfigError("grpo.rewards must name at least one reward function")

    def _check_rollout_is(self) -> None:
        """The bounds TRL requires of the rollout ratio, refused here at load time."""
        choice("grpo.rollout_is_mode", self.rollout_is_mode, IS_MODES)
        lo, hi = self.rollout_is_clip_min, self.rollout_is_clip_max
        if lo is not None and hi is not None and lo >= hi:
            raise ConfigError(f"grpo.rollout_is_clip_min={lo} must be < rollout_is_clip_max={hi}")
        if not self.rollout_is_correction:
            return
        if self.rollout_is_mode.endswith("_truncate") and lo is None and hi is None:
            raise ConfigError(
                f"grpo.rollout_is_mode={self.rollout_is_mode} needs rollout_is_clip_min or _max"
            )
        if self.loss_type == "vespo" and self.rollout_is_mode.startswith("sequence"):
            raise ConfigError(
                "grpo.loss_type=vespo folds per-token rollout ratios into its own sequence "
                "weight: use rollout_is_mode token_truncate or token_mask"
            )

    @property
    def epsilon_upper(self) -> float:
        """The upper clip in use: epsilon_high, or epsilon_low when unset (as TRL does)."""
        return self.epsilon_low if self.epsilon_high is None else self.epsilon_high


@dataclass
class PPOConfig(RolloutConfig):
    """PPO with a value head and GAE (Schulman et al. 2016), rewards from a reward model
    (the rm stage's output) and / or the verifiers, and a per-token KL penalty to the
    reference folded into the rewards. TRL 1.16 ships no PPO trainer; the names are those
    of TRL's earlier ``PPOConfig`` (and LLaMA-Factory's ``ppo_*`` keys)."""

    num_generations: int = 1
    """Completions sampled per prompt; PPO's advantage comes from the value head, not the
    group, so 1 is the usual choice (several give more samples per prompt)."""

    rewards: list[RewardConfig] = field(default_factory=list)
    """Verifier / user reward functions added to the reward model's score (weighted, as
    in grpo); empty: the reward model alone."""

    reward_model: str | None = None
    """The rm stage's output: its run directory (read through its manifest, which must
    record stage rm) or a model directory with a sequence-classification head (LoRA: its
    ``final/merged``). Loaded on every worker, scoring prompt + completion token ids, so
    it must share the policy's tokenizer. None: the verifiers in ``rewards`` alone."""

    reward_model_weight: float = 1.0
    """Multiplies the reward model's score before the rewards are summed."""

    gamma: float = 1.0
    """Discount per token; 1.0 for a sequence-level reward at the last token."""

    lam: float = 0.95
    """GAE lambda: 0 is one-step TD (low variance, biased), 1 is Monte Carlo returns."""

    cliprange: float = 0.2
    """Policy ratio clip, as GRPO's epsilon_low / epsilon_high with both equal."""

    cliprange_value: float = 0.2
    """Value clip: new values may move at most this far from the rollout's values."""

    vf_coef: float = 0.1
    """Weight of the value loss next to the policy loss (the value head shares the
    policy's backbone, as TRL's value-head model and LLaMA-Factory's ppo do)."""

    value_lr: float | None = None
    """Learning rate of the value head (its own AdamW, outside DeepSpeed); None: train.lr."""

    kl_coef: float = 0.05
    """Per-token KL penalty folded into the rewards before GAE; > 0 loads the reference
    (the frozen base for full / freeze, the disabled adapter for LoRA)."""

    whiten_advantages: bool = True
    """Normalise advantages to zero mean, unit variance over each worker's tokens of the
    step (earlier TRL always did); the value targets are taken before whitening."""

    def __post_init__(self) -> None:
        self._check_rollout("ppo")
        if not 0.0 <= self.gamma <= 1.0:
            raise ConfigError(f"ppo.gamma={self.gamma} must be in [0, 1]")
        if not 0.0 <= self.lam <= 1.0:
            raise ConfigError(f"ppo.lam={self.lam} must be in [0, 1]")
        positive("ppo.cliprange", self.cliprange)
        positive("ppo.cliprange_value", self.cliprange_value)
        positive("ppo.vf_coef", self.vf_coef, allow_zero=True)
        positive("ppo.kl_coef", self.kl_coef, allow_zero=True)
        if self.value_lr is not None:
            positive("ppo.value_lr", self.value_lr)
