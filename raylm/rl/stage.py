"""The train job's ``grpo`` group: TRL's GRPO settings plus what running them needs (the
rollout engine). Kept apart from ``raylm.rl.config`` so that module stays TRL's names
only, and from ``raylm.train.config`` so the train config stays within its size."""

from __future__ import annotations

from dataclasses import dataclass, field

from raylm.config import positive
from raylm.engine import EngineConfig
from raylm.rl.config import GRPOConfig


def _rollout_engine() -> EngineConfig:
    """float32 so the engine samples from the same numbers the trainer scores (the
    rollout importance-sampling ratio stays near 1 on CPU); a batch that holds a step."""
    return EngineConfig(dtype="float32", max_model_len=1024, max_num_seqs=64, kv_cache_gib=1)


@dataclass
class GRPOStageConfig(GRPOConfig):
    """GRPO in the train job (stage grpo): every ``GRPOConfig`` field, plus the vLLM
    engine that generates the rollouts. ``train.micro_batch_size`` counts prompts, each
    expanded to ``num_generations`` completions in the micro batch."""

    engine: EngineConfig = field(default_factory=_rollout_engine)
    """The rollout engine (``raylm.engine``'s settings, as serve and eval take them): one
    vLLM ``LLM`` in a Ray actor that rank 0 starts; every rank's prompts go through it."""

    engine_cpus: float = 0.0
    """CPUs the engine actor reserves from Ray. 0 on a small node, where the training
    workers hold every CPU (the engine runs while they wait for its rollouts)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.engine, dict):
            self.engine = EngineConfig(**self.engine)
        positive("grpo.engine_cpus", self.engine_cpus, allow_zero=True)
