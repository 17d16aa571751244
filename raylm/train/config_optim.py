"""The settings of LLaMA-Factory's optimizer extras (``train.optimizer`` galore, apollo,
adam_mini, badam, and bitsandbytes' ``BNB``), and which runs each can serve. Split from
``raylm.train.config``, which re-exports the classes; the optimizers are built in
``raylm.train.projected``, ``raylm.train.adam_mini_optim``, ``raylm.train.badam_optim``
and ``raylm.train.bnb_optim``.

Which ZeRO stage each works at was measured on the tiny model, one rank
(tests/unit/test_train_optimizers_lf.py): ZeRO-1/2/3 (and DeepSpeed's bf16 ZeRO-1
optimizer) hand the client optimizer flat 1-D partitions of each param group, while
GaLore and APOLLO project whole 2-D gradients, Adam-mini takes one second moment per
row or head of each named weight, and BAdam swaps the optimizer's params for another
block's every few steps. Stage 0 (DeepSpeed's data parallelism: gradients all-reduced,
then every rank steps the client optimizer on whole tensors, in bf16 over per-tensor
fp32 copies) keeps each tensor whole, so all four need ``deepspeed.stage=0``; LLaMA-Factory
likewise runs GaLore and APOLLO without DeepSpeed only.

bitsandbytes' optimizers (``BNB``, built in ``raylm.train.bnb_optim``) step any tensor,
whole or a flat partition, so they run at every stage (measured at 0-3 on one CPU rank,
tests/unit/test_bnb_optim.py, with ZeRO-Offload too: DeepSpeed then hands them the
partition in CPU memory and bitsandbytes steps it there); at stages 1-3 their 8-bit state
is quantized in blocks of the flat partition, as under transformers' Trainer with a
DeepSpeed ZeRO file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from raylm.config import ConfigError, choice, positive

BNB: dict[str, tuple[str, int, bool]] = {
    "adamw_8bit": ("AdamW", 8, False),
    "paged_adamw_8bit": ("AdamW", 8, True),
    "paged_adamw_32bit": ("AdamW", 32, True),
    "lion_8bit": ("Lion", 8, False),
    "lion_32bit": ("Lion", 32, False),
    "paged_lion_8bit": ("Lion", 8, True),
    "paged_lion_32bit": ("Lion", 32, True),
}
"""bitsandbytes' optimizers, named as transformers' ``optim`` names them (LLaMA-Factory's
``optim``; ``adamw_bnb_8bit`` is adamw_8bit): the ``bitsandbytes.optim`` class, the bits
of its state (8: blockwise-quantized moments for tensors of 4096+ elements, 32: fp32)
and whether the state is paged (CUDA unified memory, moved to the CPU under GPU memory
pressure; on a CPU bitsandbytes 0.50 warns and keeps it unpaged). AdamW is HF-style
(decoupled decay); Lion keeps one moment (sign updates, use a 3-10x smaller lr)."""

OPTIMIZERS = ("adamw", "muon", "galore", "apollo", "adam_mini", "badam", *BNB)
"""``train.optimizer``: adamw (torch AdamW), muon (``raylm.train.muon``), LLaMA-Factory's
extras, each from its own package (``PACKAGES``), and bitsandbytes' (``BNB``)."""

PACKAGES = {
    "galore": ("galore_torch", "galore-torch"),
    "apollo": ("apollo_torch", "apollo-torch"),
    "adam_mini": ("adam_mini", "adam-mini"),
    "badam": ("badam", "badam"),
    **dict.fromkeys(BNB, ("bitsandbytes", "bitsandbytes")),
}
"""The import name and the pip name of each extra optimizer's package."""

STAGE0 = ("galore", "apollo", "adam_mini", "badam")
"""The optimizers that need whole tensors: ZeRO stage 0 (see the module docstring)."""

GALORE_PROJ_TYPES = ("std", "reverse_std", "right", "left", "full")
APOLLO_PROJ_TYPES = ("std", "right", "left")
BADAM_SWITCH_MODES = ("ascending", "descending", "random", "fixed")


@dataclass
class GaLoreConfig:
    """GaLore (``train.optimizer=galore``, galore-torch's ``GaLoreAdamW``): AdamW whose
    moments live in a rank-``rank`` projection of each targeted matrix's gradient,
    recomputed (an SVD) every ``update_interval`` steps; the update is projected back and
    scaled by ``scale``. Other trainable weights take plain (HF-style) AdamW steps."""

    target: list[str] = field(default_factory=lambda: ["all"])
    """Linear modules whose weights are projected (a name part: q_proj, mlp); ``all``:
    every linear layer but the head (LLaMA-Factory's ``find_all_linear_modules``)."""

    rank: int = 16
    """Rank of the projected gradient (LLaMA-Factory's ``galore_rank``)."""

    update_interval: int = 200
    """Steps between recomputing each projection (``galore_update_interval``)."""

    scale: float = 2.0
    """Factor on the projected-back update (``galore_scale``)."""

    proj_type: str = "std"
    """std (project the smaller side), reverse_std, right, left or full (both sides)."""

    layerwise: bool = False
    """LLaMA-Factory's ``galore_layerwise``: each weight steps alone as soon as its gradient
    is ready, which frees gradients early but leaves no global gradient norm to clip by
    and no room to accumulate. raylm steps all weights at once after the backward pass
    (DeepSpeed's engine owns the step); per weight that is the same update when nothing
    is clipped or accumulated, so ``layerwise: true`` asks for exactly that:
    ``train.max_grad_norm=0`` and ``train.grad_accum=1`` (APOLLO: also its random
    projections seeded as each one-weight optimizer seeds them). The early freeing of
    gradients, the memory saving, is what raylm does not reproduce."""

    def check(self, key: str = "galore", proj_types: tuple[str, ...] = GALORE_PROJ_TYPES) -> None:
        positive(f"{key}.rank", self.rank)
        positive(f"{key}.update_interval", self.update_interval)
        positive(f"{key}.scale", self.scale)
        choice(f"{key}.proj_type", self.proj_type, proj_types)
        if not self.target or any(not t for t in self.target):
            raise ConfigError(f"{key}.target={self.target!r}: name linear modules, or ['all']")

    def __post_init__(self) -> None:
        self.check()


@dataclass
class ApolloConfig:
    """APOLLO (``train.optimizer=apollo``, apollo-torch's ``APOLLOAdamW``): AdamW moments
    in a rank-``rank`` projection of each targeted matrix's gradient, used only to scale
    the raw gradient per channel (or per tensor), with Fira's norm-growth limiter. The
    keys it shares with GaLore mean what they mean there."""

    target: list[str] = field(default_factory=lambda: ["all"])
    """Linear modules whose weights are projected; ``all``: every linear layer but the head."""

    rank: int = 16
    """Rank of the projected gradient (``apollo_rank``)."""

    update_interval: int = 200
    """Steps between renewing each projection (``apollo_update_interval``)."""

    proj_type: str = "std"
    """std (project the smaller side), right or left."""

    layerwise: bool = False
    """``apollo_layerwise``: as ``galore.layerwise`` (max_grad_norm 0, grad_accum 1), and
    every random projection seeded 1, as each one-weight optimizer seeds it."""

    scale: float = 32.0
    """Factor on the scaled gradient, as sqrt(scale) (``apollo_scale``)."""

    proj: str = "random"
    """random (a seeded Gaussian projection) or svd (GaLore's)."""

    scale_type: str = "channel"
    """channel (one factor per row or column) or tensor (one per matrix)."""

    scale_front: bool = False
    """Apply sqrt(scale) before the norm-growth limiter rather than after. LLaMA-Factory
    puts ``apollo_scale_front`` into the param group, where apollo-torch 1.0.3 never reads
    it (it reads the constructor's argument), so there it has no effect; raylm passes it
    to the constructor. At the default (false) the two agree."""

    def __post_init__(self) -> None:
        GaLoreConfig.check(self, "apollo", APOLLO_PROJ_TYPES)  # type: ignore[arg-type]
        choice("apollo.proj", self.proj, ("random", "svd"))
        choice("apollo.scale_type", self.scale_type, ("channel", "tensor"))


@dataclass
class BAdamConfig:
    """BAdam (``train.optimizer=badam``, the badam package's ``BlockOptimizer``): block
    coordinate descent. One decoder layer trains at a time (the embeddings, final norm and
    head stay frozen, as BAdam's default blocks leave them); every ``switch_interval``
    steps the next block becomes trainable and the Adam moments start afresh."""

    mode: str = "layer"
    """layer: one decoder layer at a time (``BlockOptimizer``). ratio (LLaMA-Factory's
    ``BlockOptimizerRatio``, sparse masked gradients) is refused: its sparse-gradient
    hooks fire on every micro batch and DeepSpeed's clipping and all-reduce see sparse
    tensors; it would need a step of raylm's own outside DeepSpeed's engine."""

    start_block: int | None = None
    """The first block's index (None: 0 ascending, the last descending, a random one)."""

    switch_mode: str = "ascending"
    """ascending, descending, random (a fresh permutation per pass) or fixed (never switch)."""

    switch_interval: int = 50
    """Optimizer steps per block (badam 1.4 switches after step k when ``(k + 1) %
    interval == 0``, so the first block gets one step fewer). LLaMA-Factory documents -1
    as "no switching", but that rule switches every step for -1: raylm refuses it and
    ``switch_mode=fixed`` keeps one block."""

    update_ratio: float = 0.05
    """ratio mode only (refused); kept so a LLaMA-Factory value at its default loads."""

    mask_mode: str = "adjacent"
    """ratio mode only (refused), adjacent or scatter."""

    verbose: int = 0
    """BAdam's printing: 0 quiet, 1 the active block at each switch, 2 also its params."""

    def __post_init__(self) -> None:
        choice("badam.mode", self.mode, ("layer", "ratio"))
        choice("badam.switch_mode", self.switch_mode, BADAM_SWITCH_MODES)
        choice("badam.mask_mode", self.mask_mode, ("adjacent", "scatter"))
        choice("badam.verbose", str(self.verbose), ("0", "1", "2"))
        if self.switch_interval <= 0:
            raise ConfigError(
                f"badam.switch_interval={self.switch_interval} must be > 0 (badam 1.4 reads "
                "-1 as switching every step); badam.switch_mode=fixed keeps one block"
            )
        if self.start_block is not None and self.start_block < 0:
            raise ConfigError(f"badam.start_block={self.start_block} must be >= 0 or null")
        if self.start_block is not None and self.switch_mode == "random":
            raise ConfigError(
                "badam.start_block with badam.switch_mode=random: badam 1.4 then has no block "
                "order to draw the next block from; leave start_block null"
            )
        if not 0 < self.update_ratio <= 1:
            raise ConfigError(f"badam.update_ratio={self.update_ratio} must be in (0, 1]")


WHY_WHOLE = {
    "galore": "GaLore projects whole 2-D gradients",
    "apollo": "APOLLO projects whole 2-D gradients",
    "adam_mini": "Adam-mini keeps one second moment per row or head of each named weight",
    "badam": "BAdam swaps the optimizer's params for another block's (LLaMA-Factory's "
    "ZeRO-3 path for it patches DeepSpeed internals raylm does not touch)",
}
TRAINS = {"galore": ("full", "freeze"), "apollo": ("full", "freeze"), "badam": ("full",)}
"""finetuning types each may run with: LLaMA-Factory refuses LoRA with GaLore, APOLLO and
BAdam; BAdam also picks the trainable block itself, which freeze's choice would fight."""


def check_optimizer(cfg: Any, zero_stage: int) -> None:
    """What ``train.optimizer`` needs of the rest of the run; ``zero_stage`` is the one
    DeepSpeed will run (``deepspeed.stage``, or a ``config_file``'s own)."""
    name = cfg.train.optimizer
    if name not in STAGE0:  # adamw, muon and bitsandbytes' (BNB) run at every stage
        return
    if zero_stage != 0:
        raise ConfigError(
            f"train.optimizer={name} needs deepspeed.stage=0, not {zero_stage}: ZeRO stages "
            f"1-3 hand the optimizer flat 1-D partitions, and {WHY_WHOLE[name]}"
        )
    allowed = TRAINS.get(name, (cfg.finetuning_type,))
    if cfg.finetuning_type not in allowed:
        raise ConfigError(
            f"train.optimizer={name} needs finetuning_type {' or '.join(allowed)}, not "
            f"{cfg.finetuning_type} (LLaMA-Factory refuses LoRA with it too)"
        )
    if name in ("galore", "apollo"):
        _check_layerwise(cfg, name)
    if name == "badam" and cfg.badam.mode == "ratio":
        raise ConfigError(
            "badam.mode=ratio (BlockOptimizerRatio) is not built: its sparse-gradient hooks "
            "fire on every micro batch and DeepSpeed's clipping and all-reduce would see "
            "sparse tensors (LLaMA-Factory runs it on one device only); use badam.mode=layer"
        )
    if cfg.lora.loraplus_lr_ratio and cfg.finetuning_type in ("lora", "qlora"):
        raise ConfigError(
            f"train.optimizer={name} and lora.loraplus_lr_ratio both build the optimizer: pick one"
        )
    if name == "badam" and cfg.train.precision == "fp16":
        raise ConfigError(
            "train.optimizer=badam keeps fp32 copies of the active block of a bf16 or fp32 "
            "model: train.precision bf16 or fp32, not fp16"
        )


def zero_stage(cfg: Any) -> int:
    """The ZeRO stage the run will use: ``deepspeed.stage``, unless a ``config_file``
    names its own (it wins in ``raylm.train.ds_config``); an unreadable file is left to
    ds_config to report."""
    import json
    from pathlib import Path

    from raylm.config import resolve_path

    ds = cfg.deepspeed
    if not ds.config_file:
        return ds.stage
    try:
        user = json.loads(Path(resolve_path(ds.config_file)).read_text())
        stage = user.get("zero_optimization", {}).get("stage", ds.stage)
    except (OSError, ValueError, AttributeError):
        return ds.stage
    return ds.stage if stage == "auto" else int(stage)


def _check_layerwise(cfg: Any, name: str) -> None:
    t = cfg.train
    if getattr(cfg, name).layerwise and (t.max_grad_norm or t.grad_accum != 1):
        raise ConfigError(
            f"{name}.layerwise=true steps each weight before a global gradient norm exists "
            "and with nothing accumulated (as LLaMA-Factory's layerwise mode does): set "
            f"train.max_grad_norm=0 and train.grad_accum=1 (now {t.max_grad_norm}, "
            f"{t.grad_accum}), or {name}.layerwise=false"
        )


EXTRA_OF = {"bitsandbytes": "raylm's gpu and dev extras have it"}


def require(name: str) -> Any:
    """The extra optimizer's package, imported; a ConfigError naming the pip package."""
    import importlib

    module, pip = PACKAGES[name]
    try:
        return importlib.import_module(module)
    except ImportError as err:
        extra = EXTRA_OF.get(pip, "raylm's dev extra has it")
        raise ConfigError(
            f"train.optimizer={name} needs the {pip} package: pip install {pip} ({extra}) [{err}]"
        ) from None
