"""PPO's reward model: the rm stage's output, loaded on each training worker.

The rm stage writes a plain transformers ``*ForSequenceClassification`` directory
(``raylm.train.reward``) and records it in its manifest as a ``ModelOutput`` with
``stage: rm``. ``ppo.reward_model`` names that run (the manifest says where its model
is, and LoRA's ``final/merged``) or a model directory directly. A completion is scored
the way the rm stage trained: prompt + completion token ids, right-padded, read at the
last token that is not the pad id (transformers' own rule), so the reward model must
share the policy's tokenizer: that is checked, not assumed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from raylm import storage
from raylm.config import ConfigError, local_model, resolve_path
from raylm.manifest import Manifest
from raylm.outputs import ModelOutput

KEY = "ppo.reward_model"


def reward_model_path(source: str) -> str:
    """The model directory ``source`` names: an rm run (through its manifest) or a model;
    checked to be a reward model when it is on this machine."""
    where = resolve_path(source)
    if not storage.is_dir(where):
        raise ConfigError(f"{KEY}={source}: no such directory ({where})")
    manifest = Manifest.read(where)
    path = where if manifest is None else _from_manifest(source, manifest)
    if not storage.is_remote(path):
        _check_head(source, Path(path))
    return path


def _from_manifest(source: str, manifest: Manifest) -> str:
    """The model an rm run's manifest records (LoRA: its merged copy)."""
    if manifest.status != "succeeded":
        raise ConfigError(f"{KEY}={source}: that run's manifest says {manifest.status}")
    out = ModelOutput.from_record(manifest.output, f"{KEY}={source}")
    if out.stage != "rm":
        raise ConfigError(
            f"{KEY}={source}: its manifest records a stage {out.stage} model; PPO scores "
            "completions with a reward model (train one with stage rm)"
        )
    if out.adapter and not out.merged:
        raise ConfigError(f"{KEY}={source}: a LoRA reward model needs its final/merged")
    return out.merged if out.adapter else out.path


class RewardModel:
    """One sequence score per (prompt ids, completion ids), without gradients."""

    def __init__(self, source: str, tok: Any, batch_size: int = 16) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        local = local_model(reward_model_path(source))
        _check_head(source, Path(local))
        if AutoTokenizer.from_pretrained(local).get_vocab() != tok.get_vocab():
            raise ConfigError(
                f"{KEY}={source}: its tokenizer differs from the policy's "
                f"({getattr(tok, 'name_or_path', '')}); the reward model scores the "
                "policy's token ids, so train it from the same base model"
            )
        self.model = AutoModelForSequenceClassification.from_pretrained(
            local, dtype=torch.float32
        ).eval()
        self.pad = self.model.config.pad_token_id
        if self.pad is None:
            self.pad = tok.pad_token_id
            self.model.config.pad_token_id = self.pad
        self.batch_size = batch_size

    def score(self, prompts: list[list[int]], completions: list[list[int]]) -> list[float]:
        import torch

        scores: list[float] = []
        seqs = [p + c for p, c in zip(prompts, completions, strict=True)]
        for at in range(0, len(seqs), self.batch_size):
            part = seqs[at : at + self.batch_size]
            width = max(map(len, part))
            ids = torch.full((len(part), width), self.pad, dtype=torch.long)
            attn = torch.zeros_like(ids)
            for i, s in enumerate(part):
                ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
                attn[i, : len(s)] = 1
            with torch.no_grad():
                logits = self.model(input_ids=ids, attention_mask=attn).logits
            scores += logits[:, 0].float().tolist()
        return scores


def _check_head(source: str, local: Path) -> None:
    """A causal LM here would load with a random head and score noise: refuse it."""
    config = local / "config.json"
    if not config.exists():
        raise ConfigError(f"{KEY}={source}: no config.json in {local}")
    archs = json.loads(config.read_text()).get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise ConfigError(
            f"{KEY}={source}: {local} is a {archs or 'model without architectures'}, not "
            "a reward model (*ForSequenceClassification, what stage rm writes)"
        )
