"""Orthogonal fine-tuning (finetuning_type oft, LLaMA-Factory's OFT): PEFT's ``OFTConfig``
built as LLaMA-Factory builds it, and the ``final/`` it leaves.

OFT rotates each adapted layer's input by a trained block-diagonal orthogonal matrix,
so the update to a weight is multiplicative (W R), not an added low-rank term. vLLM
serves LoRA adapters only, so an OFT run's ``final/`` is the base with the adapter
merged in (PEFT's ``merge_and_unload``): a plain transformers directory that serve,
eval and export take as a full model (its manifest's ``ModelOutput.adapter`` is false).
The trained adapter is kept beside it in ``final/oft_adapter`` (``ModelOutput.
trained_adapter``): small, and what PEFT puts back on the base to continue or inspect.

Under ZeRO-3 only the adapter is gathered (its parameters are all that trained); rank 0
then loads the base whole on the host, as ``export.merge_adapter`` does for LoRA, merges and
writes it. Checkpoints need nothing special: DeepSpeed saves the adapter's parameters
with the module, and a resumed run rebuilds the same adapter before loading them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from raylm.config import ConfigError

ADAPTER_DIR = "oft_adapter"
"""final/'s sub-directory holding the trained OFT adapter (PEFT's layout)."""


def peft_config(cfg: Any, task_type: str = "CAUSAL_LM") -> Any:
    """PEFT's ``OFTConfig`` for ``cfg.oft``: LLaMA-Factory passes r, oft_block_size,
    target_modules, module_dropout and modules_to_save and leaves the rest at PEFT's
    defaults, which the raylm keys default to too."""
    from peft import OFTConfig

    oft, target = cfg.oft, cfg.oft.target
    return OFTConfig(
        r=oft.rank,
        oft_block_size=oft.block_size,
        # peft's "all-linear" is every linear layer except the output head, as
        # LLaMA-Factory's find_all_linear_modules picks for "all".
        target_modules="all-linear" if target == ["all"] else list(target),
        module_dropout=oft.module_dropout,
        use_cayley_neumann=oft.use_cayley_neumann,
        num_cayley_neumann_terms=oft.num_cayley_neumann_terms,
        coft=oft.coft,
        eps=oft.eps,
        block_share=oft.block_share,
        modules_to_save=list(oft.additional_target) or None,
        task_type=task_type,
    )


def add_oft(model: Any, cfg: Any, task_type: str = "CAUSAL_LM") -> Any:
    """``model`` under a fresh OFT adapter, only the adapter (and ``additional_target``)
    trainable; an unknown target is named with the model's module names."""
    from peft import get_peft_model

    try:
        return get_peft_model(model, peft_config(cfg, task_type))
    except ValueError as err:
        names = sorted({n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if n})
        raise ConfigError(
            f"oft.target={cfg.oft.target}, oft.additional_target={cfg.oft.additional_target}: "
            f"{err}. Module names in this model: {names}"
        ) from None


def save_oft_adapter(module: Any, state: dict[str, Any], tok: Any, out: Path) -> Path:
    """The adapter of an OFT run's ``final/`` (``state``: the gathered trained parameters)
    in ``out/oft_adapter``; ``raylm.train.export`` merges it into the base at ``out``,
    as it merges a LoRA adapter (one PEFT ``merge_and_unload`` for both)."""
    adapter = out / ADAPTER_DIR
    module.save_pretrained(str(adapter), state_dict=state)
    tok.save_pretrained(str(adapter))
    return adapter
