"""bitsandbytes' optimizers (``train.optimizer`` adamw_8bit, paged_adamw_8bit,
paged_adamw_32bit, lion_8bit, lion_32bit, paged_lion_8bit, paged_lion_32bit: LLaMA-Factory's
``optim``), built as transformers' Trainer builds them for LLaMA-Factory.

LLaMA-Factory leaves these to transformers (5.x: ``Trainer.create_optimizer`` and
``trainer_optimizer._get_bitsandbytes_optimizer``): two groups, the weights that decay
(``Trainer.get_decay_parameter_names``: all but biases and norm weights) at
``weight_decay`` and the rest at 0; ``bitsandbytes.optim.AdamW`` or ``Lion`` with
``optim_bits`` 8 or 32 and ``is_paged``; AdamW takes ``adam_beta1/2`` and ``adam_epsilon``
(``train.adam_beta1/2``, ``train.adam_epsilon``), Lion ``adam_beta1/2`` only (defaults
0.9, 0.999: not bitsandbytes' own 0.99). ``optim_args`` (which these classes do not read)
is refused in a LLaMA-Factory YAML.
With 8-bit state the Trainer keeps every ``nn.Embedding`` weight's state in 32 bits
(bitsandbytes' ``GlobalOptimManager`` override); raylm does the same.

DeepSpeed then wraps the optimizer (``zero_allow_untested_optimizer``). Stage 0 steps
whole tensors (in bf16, per-tensor fp32 copies in the same positions), so the Trainer's
rules hold: state of tensors under 4096 elements (``min_8bit_size``) and of embeddings
stays 32-bit. ZeRO-1/2/3 hand the optimizer one flat fp32 partition per group: the
4096-element rule then applies to each rank's partition (the decaying weights', embeddings
included, goes 8-bit, quantized in 256-element blocks of it; the small no-decay group of
norms may stay 32-bit), exactly what transformers' Trainer gets under a DeepSpeed ZeRO
file (its embedding override then matches no param either). docs/training.md: memory.
"""

from __future__ import annotations

from typing import Any

from raylm.train.config_optim import BNB, require, zero_stage


def decay_groups(model: Any, cfg: Any) -> list[dict[str, Any]]:
    """raylm's param groups (one at ``train.lr``, or LoRA+'s, ``model.param_groups``),
    each split as transformers' Trainer splits the trainable weights: decaying ones at
    ``train.weight_decay`` first, then the rest at 0; empty groups dropped."""
    from transformers import Trainer

    from raylm.train.model import param_groups

    # Trainer.get_decay_parameter_names reads nothing of the Trainer; called unbound so
    # the rule stays transformers' own (bias, LayerNorm, and *norm* names never decay)
    decay = set(Trainer.get_decay_parameter_names(None, model))  # type: ignore[arg-type]
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for group in param_groups(model, cfg):
        for wd, on in ((cfg.train.weight_decay, True), (0.0, False)):
            params = [p for p in group["params"] if (names[id(p)] in decay) == on]
            if params:
                out.append({**group, "params": params, "weight_decay": wd})
    return out


def build_bnb(model: Any, cfg: Any) -> Any:
    """The ``bitsandbytes.optim`` class ``train.optimizer`` names, over :func:`decay_groups`."""
    name = cfg.train.optimizer
    bnb = require(name)
    cls_name, bits, paged = BNB[name]
    kwargs: dict[str, Any] = {"lr": cfg.train.lr, "betas": cfg.train.betas}
    if cls_name == "AdamW":
        kwargs["eps"] = cfg.train.adam_epsilon
    cls = getattr(bnb.optim, cls_name)
    optim = cls(decay_groups(model, cfg), optim_bits=bits, is_paged=paged, **kwargs)
    if bits == 8:
        embeddings_32bit(model, optim, zero_stage(cfg))
    return optim


def embeddings_32bit(model: Any, optim: Any, stage: int) -> list[tuple[int, int]]:
    """Keep the state of every trainable ``nn.Embedding`` weight in 32 bits, as the Trainer
    does; returns their (group, position) in ``optim``.

    bitsandbytes looks an override up by the param's (group, position) in its process-wide
    ``GlobalOptimManager``. The Trainer registers the module, which bitsandbytes matches by
    the param's id at the first step; DeepSpeed's stage-0 bf16 wrapper has swapped in fp32
    copies by then (same positions, new ids), so raylm registers the positions. Stages 1-3
    step flat partitions: no override (as under the Trainer, where it matches nothing).
    The manager is reset first: a worker builds one optimizer, and an earlier one's
    positions (another model in the same process) must not carry over."""
    import torch

    mng = require("adamw_8bit").optim.GlobalOptimManager.get_instance()
    mng.initialize()
    if stage != 0:
        return []
    weights = {
        id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)
    }  # fmt: skip
    found = []
    for g, group in enumerate(optim.param_groups):
        for i, p in enumerate(group["params"]):
            if id(p) in weights:
                mng.index2config[(g, i)] = {"optim_bits": 32}
                found.append((g, i))
    return found


def state_mib(optim: Any) -> float:
    """MiB held by the tensors of an optimizer's state (DeepSpeed's wrapper: its client's)."""
    import torch

    inner = getattr(optim, "optimizer", optim)
    tensors = [v for s in inner.state.values() for v in s.values() if torch.is_tensor(v)]
    return sum(t.nbytes for t in tensors) / 2**20


def main() -> None:
    """``python -m raylm.train.bnb_optim``: optimizer-state memory of torch AdamW and
    adamw_8bit after one step on a 45.4M-parameter Llama (vocab 32000, hidden 512, 4
    layers), through build_optimizer and DeepSpeed's engine at ZeRO stages 0 and 2, one
    gloo rank on this machine (docs/training.md has the figures)."""
    import importlib
    import os

    import deepspeed
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from raylm.config import load
    from raylm.train.ds_config import deepspeed_config
    from raylm.train.model import build_optimizer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29517", RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")  # fmt: skip
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # one rank
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    conf = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376,
                       num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8)  # fmt: skip
    for stage in (0, 2):
        for name in ("adamw", "adamw_8bit"):
            torch.manual_seed(0)
            model = LlamaForCausalLM(conf)
            cfg = load("train", ["conf/train/sft_lora.yaml"], ["model.name_or_path=/m",
                       "finetuning_type=full", f"deepspeed.stage={stage}",
                       f"train.optimizer={name}"])  # fmt: skip
            optim, sched = build_optimizer(model, cfg, 10)
            engine, *_ = deepspeed.initialize(model=model, optimizer=optim, lr_scheduler=sched,
                                              config=deepspeed_config(cfg, 1))  # fmt: skip
            ids = torch.randint(0, conf.vocab_size, (1, 16))
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            engine.step()
            n = sum(p.numel() for p in model.parameters())
            mib = state_mib(engine.optimizer)
            print(f"ZeRO {stage} {name}: {n / 1e6:.1f}M params, optimizer state "
                  f"{mib:.1f} MiB ({mib * 2**20 / n:.2f} B/param)")  # fmt: skip


if __name__ == "__main__":
    main()
