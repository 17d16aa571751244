"""GaLore and APOLLO (``train.optimizer`` galore / apollo, LLaMA-Factory's ``use_galore`` /
``use_apollo``), built as LLaMA-Factory builds them.

LLaMA-Factory (``train/trainer_utils.py:_create_galore_optimizer`` and
``_create_apollo_optimizer`` at ff6d4d12) projects the weight of every ``torch.nn.Linear``
whose module name holds a target (``all``: every linear layer's name but the head's),
and gives the other trainable weights plain steps of the same class in two groups, with
and without weight decay (biases and LayerNorm weights: none). The optimizer is the
package's AdamW (HF-style: decoupled decay after the update) with transformers' betas
(0.9, 0.999) and eps 1e-8. raylm builds the same three groups in the same order, so the
same steps follow (tests/unit/test_train_optimizers_lf.py), as DeepSpeed's client
optimizer at ZeRO stage 0 (``raylm.train.config_optim``: whole tensors).

Under bf16, DeepSpeed's stage-0 bf16 wrapper steps per-tensor fp32 copies (LLaMA-Factory's
``pure_bf16`` steps the bf16 weights themselves): the same projections, finer rounding.

``layerwise`` (one optimizer per weight, stepped from a gradient hook in LLaMA-Factory) is
the same update per weight when nothing is clipped or accumulated, which
``raylm.train.config_optim`` requires of it; APOLLO's random projections are then seeded
as LLaMA-Factory's one-weight optimizers seed them (each weight is param 1 of its own).
"""

from __future__ import annotations

from typing import Any

from raylm.train.config_optim import require


def linear_targets(model: Any) -> list[str]:
    """LLaMA-Factory's ``find_all_linear_modules``: the last name part of every Linear-like
    module (class name with ``Linear``, not ``Embedding``) outside the head."""
    names = set()
    for name, module in model.named_modules():
        kind = type(module).__name__
        if "lm_head" not in name and "Linear" in kind and "Embedding" not in kind:
            names.add(name.split(".")[-1])
    return sorted(names)


def decay_names(model: Any) -> set[str]:
    """LLaMA-Factory's ``_get_decay_parameter_names``: all but biases and the weights of
    ``ALL_LAYERNORM_LAYERS`` (torch LayerNorm: a model's RMSNorm weights do decay)."""
    from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS
    from transformers.trainer_pt_utils import get_parameter_names

    return {n for n in get_parameter_names(model, ALL_LAYERNORM_LAYERS) if "bias" not in n}


def projected_params(model: Any, target: list[str]) -> list[Any]:
    """The trainable 2-D weights of the ``nn.Linear`` modules whose name holds a target."""
    import torch

    targets = linear_targets(model) if list(target) == ["all"] else list(target)
    out = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and any(t in name for t in targets):
            out += [p for p in module.parameters() if p.requires_grad and p.dim() > 1]
    return out


def projected_groups(
    model: Any, weight_decay: float, target: list[str], extra: dict[str, Any]
) -> list[dict[str, Any]]:
    """LLaMA-Factory's three groups: no decay, decay (neither projected), projected (with
    decay and ``extra``, the projection's settings); empty ones dropped."""
    proj = projected_params(model, target)
    ids, decay = {id(p) for p in proj}, decay_names(model)
    plain: dict[bool, list[Any]] = {False: [], True: []}
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in ids:
            plain[name in decay].append(p)
    groups = [
        dict(params=plain[False], weight_decay=0.0),
        dict(params=plain[True], weight_decay=weight_decay),
        dict(params=proj, weight_decay=weight_decay, **extra),
    ]
    return [g for g in groups if g["params"]]


def build_galore(model: Any, cfg: Any) -> Any:
    """galore-torch's ``GaLoreAdamW`` over :func:`projected_groups`."""
    from raylm.config import ConfigError

    pkg, g = require("galore"), cfg.galore
    extra = dict(
        rank=g.rank, update_proj_gap=g.update_interval, scale=g.scale, proj_type=g.proj_type
    )
    groups = projected_groups(model, cfg.train.weight_decay, g.target, extra)
    if not any("rank" in group for group in groups):
        raise ConfigError(f"galore.target={g.target}: no trainable linear weight matches")
    return pkg.GaLoreAdamW(
        groups,
        lr=cfg.train.lr,
        betas=cfg.train.betas,
        eps=cfg.train.adam_epsilon,
        no_deprecation_warning=True,
    )


def apollo_class() -> type:
    """apollo-torch's ``APOLLOAdamW`` seeding each weight's random projection lazily,
    wherever it sits when first stepped.

    The package seeds ``state[p]`` in its constructor, by position; DeepSpeed's stage-0
    bf16 wrapper then swaps the params for fp32 copies, whose state is empty (the first
    projection would fail), and the seeds left on the bf16 params break ``state_dict``
    (a checkpoint). :func:`build_apollo` clears them and this subclass seeds by the same
    position at the first step instead (``layerwise``: 1 for every weight, as each
    one-weight optimizer of LLaMA-Factory's layerwise mode seeds)."""
    pkg = require("apollo")

    class Apollo(pkg.APOLLOAdamW):
        layerwise = False

        def step(self, closure: Any = None) -> Any:
            position = 0
            for group in self.param_groups:
                for p in group["params"]:
                    position += 1
                    if p.requires_grad and "seed" not in self.state[p]:
                        self.state[p]["seed"] = 1 if self.layerwise else position
            return super().step(closure)

    return Apollo


def build_apollo(model: Any, cfg: Any) -> Any:
    """apollo-torch's ``APOLLOAdamW`` over :func:`projected_groups`."""
    from raylm.config import ConfigError

    a = cfg.apollo
    extra = dict(
        rank=a.rank,
        proj=a.proj,
        proj_type=a.proj_type,
        update_proj_gap=a.update_interval,
        scale=a.scale,
        scale_type=a.scale_type,
    )
    groups = projected_groups(model, cfg.train.weight_decay, a.target, extra)
    if not any("rank" in group for group in groups):
        raise ConfigError(f"apollo.target={a.target}: no trainable linear weight matches")
    cls = apollo_class()
    optim = cls(groups, lr=cfg.train.lr, betas=cfg.train.betas, eps=cfg.train.adam_epsilon,
                scale_front=a.scale_front)  # fmt: skip
    optim.layerwise = a.layerwise
    optim.state.clear()  # its seeds: the first step sets them on the params it then has
    return optim
