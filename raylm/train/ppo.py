"""The train job's ``ppo`` stage: grpo's rollouts, a value head, GAE and PPO's losses.

Each optimizer step (``PPOStep``, driven by ``raylm.train.worker._Loop`` as GRPO is):

1. **Rollouts** exactly as grpo's (``GRPOStep.rollout``): the weights synced to the
   vLLM engine, ``num_generations`` seeded completions per prompt.
2. **Scores**: the reward model's (``raylm.train.reward_model``, the rm stage's output)
   times ``reward_model_weight``, plus the weighted verifiers in ``ppo.rewards``.
3. **The rollout pass** (no gradient), micro batch by micro batch so every rank joins
   the same number of ZeRO-3 forwards: the policy's log-probs and values, and the
   reference's log-probs. Per-token rewards are the KL penalty on every token and the
   score on the last (``kl_shaped_rewards``), then GAE (``gae``) gives advantages and
   value targets, advantages whitened over the rank's tokens of the step.
4. **Loss** per micro batch: the clipped surrogate against the rollout pass's log-probs
   (``ppo_policy_loss``) plus ``vf_coef`` times the clipped value loss (``value_loss``).

The value head is ``Linear(hidden, 1)`` on the policy's last hidden state, as TRL's
value-head model and LLaMA-Factory's ppo have it: the value loss reaches the backbone
through DeepSpeed's engine, the head itself is a small float32 module outside DeepSpeed
(replicated on every rank, its gradients averaged across ranks, its own AdamW), saved in
each checkpoint's trainer state so a resumed run continues with it. ``final/`` holds the
policy only (what eval, export and serve take); the critic is a training device.

One PPO epoch per rollout batch: the rollout pass's log-probs equal the loss pass's (same
weights, same batch), so the ratio is 1 and the clip binds only when the two differ.
"""

from __future__ import annotations

from typing import Any

from raylm.train.grpo import GRPOStep, assemble, completion_logps, completion_positions, forward


class ValueHead:
    """``Linear(hidden, 1)`` in float32, zero-initialised: values start at 0 and the
    value loss sends no gradient into the backbone until the head has learned."""

    def __init__(self, hidden: int, lr: float, train: Any) -> None:
        import torch

        self.linear = torch.nn.Linear(hidden, 1, dtype=torch.float32)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)
        self.optim = torch.optim.AdamW(
            self.linear.parameters(), lr=lr, betas=(train.adam_beta1, train.adam_beta2),
            eps=train.adam_epsilon, weight_decay=0.0,
        )  # fmt: skip
        self.max_grad_norm = train.max_grad_norm

    def __call__(self, hidden: Any) -> Any:
        return self.linear(hidden.float()).squeeze(-1)

    def step(self, world: int) -> float:
        """Average the gradients over ranks, clip, step; returns the gradient norm."""
        import torch
        import torch.distributed as dist

        params = list(self.linear.parameters())
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= world
        norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm or float("inf"))
        self.optim.step()
        self.optim.zero_grad(set_to_none=True)
        return float(norm)


class PPOStep(GRPOStep):
    """PPO's part of one optimizer step: ``prepare`` (rollouts, scores, the rollout pass,
    GAE) once per step on every rank, ``loss`` per micro batch, ``finish`` after the
    optimizer step (the value head's own step)."""

    def __init__(self, loop: Any) -> None:
        from raylm.train.reward_model import RewardModel

        super().__init__(loop)
        config = loop.engine.module.config
        lr = self.g.value_lr or loop.cfg.train.lr
        self.value = ValueHead(config.hidden_size, lr, loop.cfg.train)
        rm = self.g.reward_model
        self.reward_model = RewardModel(rm, loop.tok) if rm else None

    # -- the step's rollouts, scores and advantages ---------------------------------------
    def prepare(self, step: int, rows: list[dict[str, Any]]) -> None:
        import torch

        from raylm.rl.advantages import gae, kl_shaped_rewards, whiten

        outs, texts = self.rollout(step, rows)
        scores = torch.tensor(self._scores(rows, outs, texts), dtype=torch.float32)
        logps, values, ref, mask = self._rollout_pass(rows, outs)
        g = self.g
        rewards = kl_shaped_rewards(scores, logps, ref, mask, g.kl_coef)
        adv, returns = gae(rewards, values, mask, g.gamma, g.lam)
        if g.whiten_advantages:
            adv = whiten(adv, mask)
        self.rollouts, k = {}, g.num_generations
        for i, r in enumerate(rows):
            group = []
            for j in range(k):
                n = i * k + j
                c = len(outs[n][0])
                group.append((*outs[n], logps[n, :c], values[n, :c], adv[n, :c],
                              returns[n, :c]))  # fmt: skip
            self.rollouts[r.get("id", i)] = group
        kl = ((logps - ref) * mask).sum(-1)
        n = mask.sum().clamp(min=1.0)
        # The engine sampled from the weights being trained (each step's sync reached it)
        # when its log-probs of the sampled tokens equal the trainer's.
        engine = _padded([torch.tensor(o[1], dtype=torch.float32) for o in outs], mask)
        diff = (engine - logps).abs()[mask.bool() & ~engine.isnan()]
        self.metrics |= {
            "sampling/sampling_logp_difference/max": float(diff.max()) if diff.numel() else 0.0,
            "reward": float(scores.mean()),
            "reward_std": float(scores.std()) if len(scores) > 1 else 0.0,
            "kl": float(kl.mean()),
            "non_score_reward": float(-g.kl_coef * kl.mean()),
            "value_mean": float((values * mask).sum() / n),
            "returns_mean": float((returns * mask).sum() / n),
        }

    def _scores(self, rows: list[dict[str, Any]], outs: list[Any], texts: list[str]) -> list:
        """Each completion's score: the reward model's plus the weighted verifiers'."""
        k = self.g.num_generations
        total = [0.0] * len(outs)
        if self.reward_model is not None:
            prompts = [r["prompt_ids"] for r in rows for _ in range(k)]
            rm = self.reward_model.score(prompts, [o[0] for o in outs])
            total = [self.g.reward_model_weight * s for s in rm]
            self.metrics["rm_score"] = sum(rm) / max(len(rm), 1)
        if self.rewards:
            table = self._score(rows, texts)  # (completions, functions); None: not scored
            for (name, _), w, column in zip(
                self.rewards, self.g.reward_weights, table.T.tolist(), strict=True
            ):
                vals = [0.0 if v != v else v for v in column]  # NaN (None) adds nothing
                total = [t + w * v for t, v in zip(total, vals, strict=True)]
                self.metrics[f"rewards/{name}/mean"] = sum(vals) / max(len(vals), 1)
        return total

    def _rollout_pass(self, rows: list[dict[str, Any]], outs: list[Any]):
        """(log-probs, values, reference log-probs, mask), each (completions, tokens),
        micro batch by micro batch: every rank runs grad_accum forwards (ZeRO-3 gathers)."""
        import torch

        mbs, k = self.loop.cfg.train.micro_batch_size, self.g.num_generations
        parts = []
        for micro in range(self.loop.cfg.train.grad_accum):
            lo, hi = micro * mbs * k, (micro + 1) * mbs * k
            prompts = [r["prompt_ids"] for r in rows[micro * mbs : (micro + 1) * mbs]
                       for _ in range(k)]  # fmt: skip
            batch = assemble(prompts, [o[0] for o in outs[lo:hi]], self.loop.tok.pad_token_id)
            with torch.no_grad():
                logps, values, _ = self._forward(batch)
                ref = self._ref_logps(batch) if self.g.kl_coef > 0 else logps
            parts.append((logps, values, ref, batch["completion_mask"].float()))
        width = max(p[0].shape[1] for p in parts)
        return tuple(
            torch.cat([torch.nn.functional.pad(p[i], (0, width - p[i].shape[1])) for p in parts])
            for i in range(4)
        )

    def _forward(self, batch: dict[str, Any]):
        """(log-probs, values, entropies) of the completion tokens in one forward."""
        out = forward(self.loop.engine, batch, hidden=True)
        logps, entropy = completion_logps(out.logits, batch, self.g.temperature)
        values = self.value(completion_positions(out.hidden_states[-1], batch))
        return logps, values, entropy

    # -- the loss ------------------------------------------------------------------------
    def loss(self, rows: list[dict[str, Any]]):
        """(loss, metrics, tokens) of the micro batch of these prompts' completions."""
        from raylm.rl.loss import ppo_policy_loss, value_loss

        prompts, comps, saved = [], [], []
        for i, r in enumerate(rows):
            for ids, _, _, *rest in self.rollouts[r.get("id", i)]:
                prompts.append(r["prompt_ids"])
                comps.append(ids)
                saved.append(rest)
        batch = assemble(prompts, comps, self.loop.tok.pad_token_id)
        mask = batch["completion_mask"].float()
        logps, values, entropy = self._forward(batch)
        old_logps, old_values, adv, returns = (_padded([s[i] for s in saved], mask)
                                               for i in range(4))  # fmt: skip
        g = self.g
        pg, metrics = ppo_policy_loss(logps, old_logps, adv, mask, g.cliprange)
        vf, vf_metrics = value_loss(values, old_values, returns, mask, g.cliprange_value)
        n = mask.sum().clamp(min=1.0)
        metrics |= vf_metrics | {"entropy": float((entropy * mask).sum() / n)}
        return pg + g.vf_coef * vf, {**self.metrics, **metrics}, int(mask.sum())

    # -- the value head's step and state -------------------------------------------------
    def finish(self) -> dict[str, float]:
        return {"value_grad_norm": self.value.step(self.loop.world)}

    def state_dict(self) -> dict[str, Any]:
        return {"value_head": self.value.linear.state_dict(),
                "value_optim": self.value.optim.state_dict()}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if not state:
            raise RuntimeError("a ppo checkpoint without its value head: not a ppo run's")
        self.value.linear.load_state_dict(state["value_head"])
        self.value.optim.load_state_dict(state["value_optim"])


def _padded(rows: list[Any], mask: Any) -> Any:
    """Per-completion 1-D tensors into the (B, C) shape of ``mask``, zeros after each."""
    import torch

    out = torch.zeros_like(mask)
    for i, t in enumerate(rows):
        out[i, : len(t)] = t
    return out
