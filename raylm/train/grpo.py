"""The train job's ``grpo`` stage: rollouts on a vLLM engine, rewards, GRPO's loss.

Each optimizer step (``GRPOStep``, driven by ``raylm.train.worker._Loop``):

1. **Weight sync.** The policy's weights go to the engine before it samples, so every
   rollout comes from the weights being trained (and a resumed run's engine holds the
   checkpoint's weights, not the base's). LoRA: rank 0 saves the gathered adapter and the
   engine loads it under a new ``LoRARequest`` id. Full / freeze: the gathered state dict
   replaces the engine's weights in place (``reload_weights``, vLLM's in-place reload,
   which re-runs the CPU backend's weight packing; plain ``load_weights`` fails on
   repacked layers). Seconds per sync are logged.
2. **Rollouts.** Rank 0 gathers every rank's prompts and sends them to the engine in
   one batch (one engine, a Ray actor rank 0 owns: a vLLM engine in a training process
   slows it about 40-fold, DESIGN.md), ``num_generations`` requests per prompt, each
   seeded by (train.seed, step, prompt id, k): a resumed run samples the same completions.
3. **Rewards and advantages** on each rank for its own prompts
   (``raylm.rl.verifiers.score``, ``raylm.rl.advantages.group_advantages``).
4. **Loss** per micro batch (``micro_batch_size`` prompts times ``num_generations``):
   the policy's log-probs through the DeepSpeed engine, the reference's when beta > 0,
   the rollout importance-sampling ratio, ``raylm.rl.loss.grpo_loss``.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

PROMPT_KEYS = ("prompt", "messages", "question", "instruction")
"""Record fields read as the prompt, first found wins; the rest are reward columns."""


# ---- data: one raw record -> one prompt row ------------------------------------------
def prompt_row(record: Any, src: Any, stage: str, tok: Any, cutoff: int, *_: Any, **__: Any):
    """The row a prompt trains from: its token ids (chat messages through the chat
    template with the assistant's turn opened; text as is), the prompt itself (JSON, as
    reward functions get it) and every other field as reward columns (JSON: any type).
    ``raylm.train.data`` reads records with it in place of ``tokenize_record`` (same
    arguments), so a prompt file is read by the same reader as every raw dataset."""
    if not isinstance(record, dict):
        raise ValueError("a grpo record is an object with a prompt field")
    key = next((k for k in PROMPT_KEYS if k in record), None)
    if key is None:
        raise ValueError(f"a grpo record needs one of the fields {list(PROMPT_KEYS)}")
    prompt = record[key]
    if isinstance(prompt, list):  # chat messages; generation continues the assistant
        ids = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    elif isinstance(prompt, str):
        ids = tok(prompt, add_special_tokens=True)["input_ids"]
    else:
        raise ValueError(f"field {key!r} must be text or a list of chat messages")
    if len(ids) >= cutoff:
        raise ValueError(f"prompt has {len(ids)} tokens, data.cutoff_len={cutoff} leaves none")
    columns = {k: v for k, v in record.items() if k != key}
    return {"prompt_ids": list(map(int, ids)), "prompt": json.dumps(prompt),
            "reward_columns": json.dumps(columns)}  # fmt: skip


def sample_seed(seed: int, step: int, prompt_id: Any, k: int) -> int:
    """The sampling seed of completion ``k`` of a prompt at a step: a stable hash (not
    Python's salted ``hash``), so every process and every resumed run agrees."""
    key = f"{seed}/{step}/{prompt_id}/{k}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "little") & 0x7FFFFFFF


def assemble(prompts: list[list[int]], completions: list[list[int]], pad_id: int):
    """One forward batch: prompts left-padded to a common start of the completion,
    completions right-padded. Returns input_ids, attention_mask, position_ids (counted
    over real tokens, so left padding does not shift positions), the completion token
    ids (B, C) and their mask, and P, the column where completions begin."""
    import torch

    p = max(map(len, prompts))
    c = max(1, max(map(len, completions)))
    n = len(prompts)
    ids = torch.full((n, p + c), pad_id, dtype=torch.long)
    attn = torch.zeros((n, p + c), dtype=torch.long)
    for i, (pr, co) in enumerate(zip(prompts, completions, strict=True)):
        ids[i, p - len(pr) : p] = torch.tensor(pr, dtype=torch.long)
        attn[i, p - len(pr) : p] = 1
        if co:
            ids[i, p : p + len(co)] = torch.tensor(co, dtype=torch.long)
            attn[i, p : p + len(co)] = 1
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": attn, "position_ids": pos,
            "completion_ids": ids[:, p:], "completion_mask": attn[:, p:], "start": p}  # fmt: skip


def token_logps(model: Any, batch: dict[str, Any], temperature: float):
    """(log-probs, entropies) of the completion tokens under ``model`` at the sampling
    temperature, each (B, C)."""
    return completion_logps(forward(model, batch).logits, batch, temperature)


def forward(model: Any, batch: dict[str, Any], hidden: bool = False) -> Any:
    """The model's output on an ``assemble`` batch (with the hidden states: PPO's values)."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 position_ids=batch["position_ids"], use_cache=False,
                 output_hidden_states=hidden)  # fmt: skip


def completion_positions(x: Any, batch: dict[str, Any]) -> Any:
    """``x`` (B, T, ...) at the positions that predict each completion token (B, C, ...)."""
    start, c = batch["start"], batch["completion_ids"].shape[1]
    return x[:, start - 1 : start - 1 + c]


def completion_logps(logits: Any, batch: dict[str, Any], temperature: float):
    """(log-probs, entropies) of the completion tokens from the full logits."""
    import torch

    logits = completion_positions(logits, batch).float() / temperature
    logp = torch.log_softmax(logits, dim=-1)
    picked = logp.gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        entropy = -(logp.exp() * logp).sum(-1)
    return picked, entropy


# ---- the step ------------------------------------------------------------------------
class GRPOStep:
    """GRPO's part of one optimizer step, for the worker loop: ``prepare`` (sync, rollouts,
    rewards, advantages) once per step on every rank, then ``loss`` per micro batch."""

    def __init__(self, loop: Any) -> None:
        import torch.distributed as dist

        from raylm.rl.verifiers import build_rewards
        from raylm.train.config_rl import rollout_config
        from raylm.train.rollout_engine import EngineGroup

        self.loop, self.g = loop, rollout_config(loop.cfg)
        self.rewards = build_rewards(self.g) if self.g.rewards else []
        self.lora = loop.cfg.finetuning_type == "lora"
        box = [f"raylm-{loop.cfg.stage}-{uuid.uuid4().hex[:12]}"]
        dist.broadcast_object_list(box, src=0)
        self.engines = EngineGroup(loop.cfg, box[0]) if loop.rank == 0 else None
        self.rollouts: dict[Any, list[Any]] = {}
        self.metrics: dict[str, float] = {}
        self.items = 1.0

    # -- weights -------------------------------------------------------------------------
    def sync(self, step: int) -> float:
        """Send the policy's weights to the engine; every rank joins the ZeRO-3 gather.
        Returns the wall seconds of the whole sync (gather, transfer, load)."""
        import torch.distributed as dist

        start = time.perf_counter()
        module = self.loop.engine.module
        named = [(n, p) for n, p in module.named_parameters() if not self.lora or "lora_" in n]
        with _gathered([p for _, p in named]):
            if self.loop.rank == 0:
                if self.lora:
                    files = _adapter_files(module)
                    self.engines.load_adapter(files, step)
                else:
                    items = [(n, p.detach().cpu().clone()) for n, p in named]
                    self.engines.load_weights(items)
        dist.barrier()
        return time.perf_counter() - start

    # -- rollouts ------------------------------------------------------------------------
    def prepare(self, step: int, rows: list[dict[str, Any]]) -> None:
        """Rollouts, rewards and advantages of this rank's ``rows`` (the step's prompts)."""
        from raylm.rl.advantages import group_advantages

        outs, texts = self.rollout(step, rows)
        table = self._score(rows, texts)
        names = [n for n, _ in self.rewards]
        k = self.g.num_generations
        adv = group_advantages(table, k, self.g.reward_weights, self.g.scale_rewards,
                               self.g.multi_objective_aggregation, names)  # fmt: skip
        self.rollouts = {}
        for i, r in enumerate(rows):
            self.rollouts[r.get("id", i)] = [
                (*outs[i * k + j], float(adv.advantages[i * k + j])) for j in range(k)
            ]
        self.metrics |= adv.metrics

    def rollout(self, step: int, rows: list[dict[str, Any]]) -> tuple[list[Any], list[str]]:
        """Sync, then ``num_generations`` completions per row: (engine outputs, their
        decoded texts); the rollout metrics go to ``self.metrics``."""
        import torch
        import torch.distributed as dist

        sync_s = self.sync(step)
        k, seed = self.g.num_generations, self.loop.cfg.train.seed
        requests = [(r["prompt_ids"], sample_seed(seed, step, r.get("id", i), j))
                    for i, r in enumerate(rows) for j in range(k)]  # fmt: skip
        start = time.perf_counter()
        outs = self._generate(requests)
        gen_s = time.perf_counter() - start
        completions = [o[0] for o in outs]
        n_tok = sum(map(len, completions))
        truncated = sum(1 for o in outs if not o[2])
        counts = torch.tensor([float(n_tok), float(truncated), float(len(outs))])
        dist.all_reduce(counts)
        # dapo / cispo / vespo divide by the step's loss tokens on every rank (LossScale).
        self.items = max(float(counts[0]), 1.0) / self.loop.cfg.train.grad_accum
        self.metrics = {
            "completion_length": n_tok / max(len(outs), 1),
            "completions/clipped_ratio": float(counts[1] / counts[2]),
            "rollout_tokens_per_s": float(counts[0]) / max(gen_s, 1e-9),  # one engine batch
            "rollout_s": gen_s,
            "weight_sync_s": sync_s,
        }
        return outs, self.loop.tok.batch_decode(completions, skip_special_tokens=True)

    def _generate(self, requests: list[tuple[list[int], int]]) -> list[Any]:
        """Every rank's requests in one batch (rank 0 calls the engines)."""
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.loop.world
        dist.all_gather_object(gathered, requests)
        box: list[Any] = [None]
        if self.loop.rank == 0:
            flat = [req for part in gathered for req in part]
            params = [self._params(s) for _, s in flat]
            outs = self.engines.generate([p for p, _ in flat], params)
            split, at = [], 0
            for part in gathered:
                split.append(outs[at : at + len(part)])
                at += len(part)
            box = [split]
        dist.broadcast_object_list(box, src=0)
        return box[0][self.loop.rank]

    def _params(self, seed: int) -> dict[str, Any]:
        g = self.g
        return {"n": 1, "temperature": g.temperature, "top_p": g.top_p, "seed": seed,
                "max_tokens": g.max_completion_length, "logprobs": 0}  # fmt: skip

    def _score(self, rows: list[dict[str, Any]], texts: list[str]):
        """The reward matrix; chat prompts get chat completions, as TRL passes them."""
        from raylm.rl.verifiers import score

        k = self.g.num_generations
        prompts = [json.loads(r["prompt"]) for r in rows for _ in range(k)]
        chat = bool(prompts) and isinstance(prompts[0], list)
        completions: list[Any] = (
            [[{"role": "assistant", "content": t}] for t in texts] if chat else texts
        )
        columns: dict[str, list[Any]] = {}
        for r in rows:
            extra = json.loads(r.get("reward_columns") or "{}")
            for name in extra:
                columns.setdefault(name, [])
        for r in rows:
            extra = json.loads(r.get("reward_columns") or "{}")
            for name, values in columns.items():
                values.extend([extra.get(name)] * k)
        return score(self.rewards, completions, prompts=prompts, **columns)

    # -- the loss ------------------------------------------------------------------------
    def loss(self, rows: list[dict[str, Any]]):
        """(loss, metrics, tokens) of the micro batch of these prompts' completions."""
        import torch

        from raylm.rl.loss import LossScale, grpo_loss
        from raylm.rl.rollout import rollout_is_ratio, truncated_mask

        g, loop = self.g, self.loop
        prompts, comps, sampled, advs = [], [], [], []
        for i, r in enumerate(rows):
            for ids, lps, _, a in self.rollouts[r.get("id", i)]:
                prompts.append(r["prompt_ids"])
                comps.append(ids)
                sampled.append(lps)
                advs.append(a)
        batch = assemble(prompts, comps, loop.tok.pad_token_id)
        mask = batch["completion_mask"].float()
        logps, entropy = token_logps(loop.engine, batch, g.temperature)
        ref = self._ref_logps(batch) if g.beta > 0 else None
        if g.mask_truncated_completions:
            eos = loop.tok.eos_token_id
            mask = truncated_mask(comps, mask, [eos] if eos is not None else [], -1)
        is_ratio, metrics = None, {}
        if g.rollout_is_correction:
            engine_lps = torch.full_like(mask, float("nan"))
            for i, lps in enumerate(sampled):
                engine_lps[i, : len(lps)] = torch.tensor(lps, dtype=engine_lps.dtype)
            is_ratio, metrics = rollout_is_ratio(
                logps.detach(), engine_lps, mask, g.rollout_is_mode,
                g.rollout_is_clip_min, g.rollout_is_clip_max,
            )  # fmt: skip
        scale = LossScale(1, 1, self.items, loop.world)  # DeepSpeed averages micro batches
        out = grpo_loss(logps, None, torch.tensor(advs), mask, g, ref_logps=ref,
                        is_ratio=is_ratio, entropies=entropy, scale=scale)  # fmt: skip
        return out.loss, {**self.metrics, **metrics, **out.metrics}, int(mask.sum())

    def _ref_logps(self, batch: dict[str, Any]):
        import torch

        with torch.no_grad():
            if self.loop.ref is not None:
                return token_logps(self.loop.ref, batch, self.g.temperature)[0]
            with self.loop.engine.module.disable_adapter():  # LoRA: the base is the reference
                return token_logps(self.loop.engine.module, batch, self.g.temperature)[0]

    def finish(self) -> dict[str, float]:
        """After the step's optimizer step (PPO steps its value head); more metrics."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must hold beyond DeepSpeed's (rollouts are recomputed)."""
        return {}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore :meth:`state_dict` on resume."""

    def close(self) -> None:
        """End the engine actors (they would also end with rank 0's process)."""
        if self.engines is not None:
            self.engines.close()
            self.engines = None


def _gathered(params: list[Any]):
    """ZeRO-3's full parameters for the block (a no-op at other stages)."""
    import contextlib

    if params and hasattr(params[0], "ds_id"):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def _adapter_files(module: Any) -> dict[str, bytes]:
    """The adapter as PEFT saves it (config + safetensors), read back as bytes, so the
    engine actor may live on another node than rank 0."""
    with tempfile.TemporaryDirectory(prefix="raylm-grpo-lora-") as tmp:
        module.save_pretrained(tmp, safe_serialization=True)
        return {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}
