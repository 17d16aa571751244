"""BAdam (``train.optimizer=badam``, LLaMA-Factory's ``use_badam``), layer mode, built as
LLaMA-Factory's ``_create_badam_optimizer`` (ff6d4d12) builds it.

The badam package's ``BlockOptimizer`` wraps a base AdamW: it makes one decoder layer
(a "block") trainable and freezes every other parameter, keeps fp32 copies of that
block, steps them with the base optimizer and copies them back into the (bf16) model;
every ``switch_interval`` steps it moves to the next block and the Adam moments start
afresh. So in bf16 the model's weights stay bf16 and only the active block has fp32
master weights: raylm turns DeepSpeed's own bf16 wrapper off for BAdam
(``raylm.train.ds_config``), leaving the mixed precision to BAdam as LLaMA-Factory does.
DeepSpeed's engine runs at ZeRO stage 0 (``raylm.train.config_optim``): it all-reduces
the active block's gradients, clips them by ``train.max_grad_norm`` and calls the step.

Weight decay: the base AdamW gets LLaMA-Factory's two groups (no decay for biases and
LayerNorm weights), but badam 1.4 rebuilds the groups of each block from the base
optimizer's defaults, so every active weight decays by the base's default rate.
LLaMA-Factory leaves that at torch AdamW's 0.01 whatever ``weight_decay`` says; raylm
sets it to ``train.weight_decay`` (the same steps as LLaMA-Factory's at 0.01).

A checkpoint holds the block position (which block trains, the next one, the step
count, random mode's order) and the active block's fp32 copies beside the base
optimizer's state, so a resumed run takes the same steps (checked in bf16); badam's own
``state_dict`` holds only the latter.
"""

from __future__ import annotations

from typing import Any

from raylm.train.config_optim import require


def block_class() -> type:
    """badam's ``BlockOptimizer`` with the block position in its state dict."""
    pkg = require("badam")

    class Block(pkg.BlockOptimizer):
        active_block = 0

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.state_dict = self._state_dict  # badam binds the base's over the method

        def switch_trainable_params(self, verbose: int | None = 1) -> None:
            self.active_block = self.current_block_idx
            super().switch_trainable_params(verbose)

        def _state_dict(self) -> dict[str, Any]:
            position = {
                "active_block": self.active_block,
                "next_block": self.current_block_idx,
                "global_step": self.global_step,
                "block_order": list(getattr(self, "block_order", [])),
            }
            # the fp32 copies of a bf16 block are its master weights: the bf16 ones are
            # rounded, so they must come back as they were
            hp = {i: p.detach().clone() for i, p in self.param_idx2hp.items()}
            return {"base": self.base_optimizer.state_dict(), "badam": position, "hp": hp}

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            position = state_dict["badam"]
            self.current_block_idx = position["active_block"]
            self.switch_trainable_params(verbose=0)  # the block's params trainable
            for i, saved in state_dict["hp"].items():
                self.param_idx2hp[i].data.copy_(saved)
            self.current_block_idx = position["next_block"]
            self.global_step = position["global_step"]
            if self.switch_mode == "random":
                self.block_order = list(position["block_order"])
            self.base_optimizer.load_state_dict(state_dict["base"])

    return Block


def base_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """LLaMA-Factory's two groups: no decay (biases, LayerNorm weights), then decay; an
    empty one dropped (a Llama has neither biases nor LayerNorms)."""
    from raylm.train.projected import decay_names

    decay = decay_names(model)
    split: dict[bool, list[Any]] = {False: [], True: []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            split[name in decay].append(p)
    groups = [
        dict(params=split[False], weight_decay=0.0),
        dict(params=split[True], weight_decay=weight_decay),
    ]
    # DeepSpeed drops empty groups after the lr schedule has counted them: drop them first
    return [g for g in groups if g["params"]]


def build_badam(model: Any, cfg: Any) -> Any:
    """``BlockOptimizer`` (layer mode) over a torch AdamW on :func:`base_groups`."""
    import torch

    from raylm.config import ConfigError

    b, t = cfg.badam, cfg.train
    base = torch.optim.AdamW(
        base_groups(model, t.weight_decay), lr=t.lr, betas=t.betas, eps=t.adam_epsilon,
        weight_decay=t.weight_decay,
    )  # fmt: skip
    named = list(model.named_parameters())
    pkg = require("badam")
    blocks = pkg.BlockOptimizer.infer_param_groups(None, [n for n, _ in named], False, False)
    if not blocks:
        raise ConfigError("train.optimizer=badam: no decoder layers (``layers.N.``) to split")
    if b.start_block is not None and b.start_block >= len(blocks):
        raise ConfigError(
            f"badam.start_block={b.start_block}: the model has {len(blocks)} blocks "
            f"(0..{len(blocks) - 1})"
        )
    return block_class()(
        base_optimizer=base,
        named_parameters_list=named,
        block_prefix_list=blocks,  # one block per decoder layer (badam's own split)
        switch_block_every=b.switch_interval,
        start_block=b.start_block,
        switch_mode=b.switch_mode,
        verbose=b.verbose,
    )
