"""A train run's checkpoint as the export's input, as well as its ``final/``.

A run killed before its end (a spot node gone for good, a budget spent) has checkpoints
and no ``final/``; a run that overfit has a better checkpoint than its last. DeepSpeed
keeps each one as ZeRO partitions (one file per rank) plus the fp32 master weights, so
no engine or PEFT loader reads it. This module turns one back into what the train job
would have written as ``final/`` at that step, with the train job's own writer
(``raylm.train.export.export_to``), so a checkpoint export and a ``final/`` export are
the same files by construction, and the merge, check and quantizers downstream take it
unchanged.

The consolidation is DeepSpeed's (``zero_to_fp32``) for ZeRO stages 1-3 and the
rank-0 module state for stage 0. A LoRA / OFT run consolidates only its trainable
parameters (the adapter, small); a full or freeze run's whole fp32 model is gathered in
this node's memory, so a model larger than the export node's RAM exports from its
``final/`` (written shard by shard on the training nodes) rather than a checkpoint.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from raylm import storage
from raylm.config import ConfigError

RESOLVED = "config.resolved.yaml"
_NAME = re.compile(r"^checkpoint_\d{8}_[0-9a-f]{8}$")
ADAPTER_TYPES = ("lora", "qlora", "oft")
"""Runs whose checkpoint export consolidates the trainable parameters only."""


def find_checkpoint(model: str, name: str | None) -> tuple[str, str] | None:
    """(run_dir, checkpoint) when ``model`` is a train run's checkpoint directory, or a
    run directory and ``name`` picks one of its checkpoints (``latest``: the newest
    complete one); None when neither applies. An incomplete or unknown one is refused."""
    from raylm.train.checkpoint import latest_complete, list_checkpoints

    path = model.rstrip("/")
    if name is None and _NAME.match(path.rpartition("/")[2]):
        run_dir, name = path.rpartition("/")[0], path.rpartition("/")[2]
    elif name is None:
        return None
    else:
        run_dir = path
    if not storage.exists(storage.join(run_dir, RESOLVED)):
        raise ConfigError(f"checkpoint={name}: {run_dir} is not a raylm train run (no {RESOLVED})")
    found = list_checkpoints(run_dir)
    complete = [p.rpartition("/")[2] for _, p, ok in found if ok]
    if name == "latest":
        latest = latest_complete(run_dir)
        if latest is None:
            raise ConfigError(f"checkpoint=latest: {run_dir} has no complete checkpoint")
        return run_dir, latest[1]
    match = [(p, ok) for _, p, ok in found if p.rpartition("/")[2] == name]
    if not match or not match[0][1]:
        why = "has no COMPLETE marker (a save cut short)" if match else "does not exist"
        raise ConfigError(
            f"checkpoint {name} of {run_dir} {why}; complete ones: {complete or 'none'}"
        )
    return run_dir, match[0][0]


def train_config(run_dir: str) -> Any:
    """The run's resolved train config, as it trained (``final/`` merges left to export)."""
    import tempfile

    from raylm import config

    with tempfile.TemporaryDirectory(prefix="raylm-run-config-") as tmp:
        path = Path(tmp) / RESOLVED
        path.write_text(storage.read_text(storage.join(run_dir, RESOLVED)))
        cfg = config.load("train", [path])
    return replace(cfg, export=replace(cfg.export, merge_lora=False))


def materialize(run_dir: str, checkpoint: str, out: Path) -> Any:
    """Write at ``out`` (local) what the run's ``final/`` would hold at ``checkpoint``;
    returns the run's train config."""
    from raylm.train.checkpoint import DS_TAG
    from raylm.train.export import export_to
    from raylm.train.model import load_tokenizer

    cfg = train_config(run_dir)
    with storage.local_copy(checkpoint) as local:
        state = consolidated(local, DS_TAG, cfg.finetuning_type in ADAPTER_TYPES)
    tok = load_tokenizer(cfg)
    model = _model(cfg, tok)
    load_trained(model, state, checkpoint)
    export_to(cfg, model, tok, out, rank=0)
    return cfg


def consolidated(local: Path, tag: str, trainable_only: bool) -> dict[str, Any]:
    """The checkpoint's full-precision weights by parameter name, on this process."""
    import torch

    stage0 = local / tag / "mp_rank_00_model_states.pt"
    if stage0.is_file():  # no ZeRO: rank 0's module state is the whole model
        return torch.load(stage0, map_location="cpu", weights_only=False)["module"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(
        str(local), tag=tag, exclude_frozen_parameters=trainable_only
    )


def _model(cfg: Any, tok: Any) -> Any:
    """The run's model as training built it (adapter and frozen parts included)."""
    if cfg.stage == "rm":
        from raylm.train.reward import load_reward_model

        return load_reward_model(cfg, None, tok.pad_token_id)
    from raylm.train.model import load_model

    return load_model(cfg, None)


def load_trained(model: Any, state: dict[str, Any], checkpoint: str) -> None:
    """The checkpoint's values into ``model``; every trainable parameter must be in it
    (else this is another run's checkpoint, or a model the config no longer builds)."""
    import torch

    params = dict(model.named_parameters())
    unknown = sorted(set(state) - set(params) - {n for n, _ in model.named_buffers()})
    missing = sorted(n for n, p in params.items() if p.requires_grad and n not in state)
    if unknown or missing:
        raise ConfigError(
            f"checkpoint {checkpoint} does not fit the model its run's config builds: "
            f"{len(missing)} trainable parameter(s) missing (first: {missing[:3]}), "
            f"{len(unknown)} unknown (first: {unknown[:3]})"
        )
    with torch.no_grad():
        for name, value in state.items():
            if name in params:
                params[name].copy_(value.to(params[name].dtype))
