"""The per-worker training loop: one DeepSpeed engine per Ray Train worker.

Position in the data is a pure function of the optimizer step (``raylm.train.stream``:
a seeded order per epoch, fixed micro-batches per step), so resuming at step s replays
exactly the batches an uninterrupted run would have seen from s on: nothing twice,
nothing skipped.

Elastic resume (a checkpoint written by N workers, resumed on M): the checkpoint's
marker carries the stream's history of world sizes, and the resumed stream re-splits
what no rank reached yet of the current epoch over the M ranks (``RankStream.resized``),
so that epoch still sees each example once. An epochs-based run's length is counted from
that history (``raylm.train.stream.stop_step``): what is honoured is the epoch's
examples, so 2 -> 1 workers mid-epoch takes twice the steps for the rest of the epoch,
not ``epochs`` x the new steps per epoch. ``max_steps`` is a step count and stays one.
The LR schedule is rebuilt for the new length (its step count comes back from the
checkpoint), so it bends where the size changed; at one size it is the same as before.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

from raylm import storage
from raylm.config import ConfigError
from raylm.train import checkpoint as ckpt
from raylm.train import sinks
from raylm.train.config import TrainJobConfig
from raylm.train.evaluate import HeldOut, held_out_rows
from raylm.train.stream import rows_taken, stop_step


def train_loop(config: dict[str, Any]) -> None:
    """Entry point Ray Train runs on every worker."""
    cfg: TrainJobConfig = config["cfg"]
    if sinks.stopped(config["run_dir"]):
        return  # an earlier attempt stopped (a non-finite step, a bad setting): no retry
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cfg.scaling.use_gpu else "cpu")
    import ray.train
    import torch

    ctx = ray.train.get_context()
    state = _Loop(cfg, config["run_dir"], ctx.get_world_rank(), ctx.get_world_size())
    state.fault = config.get("fault")
    state.sink_env = config.get("sinks", {})
    torch.manual_seed(cfg.train.seed)
    try:
        state.setup(ray.train.get_dataset_shard("train"))
    except ConfigError as err:  # the same on every retry: recorded, then no retries
        if state.rank == 0:
            sinks.record_config_error(config["run_dir"], err)
        raise
    state.resume()
    state.run()
    state.export()


class _Loop:
    def __init__(self, cfg: TrainJobConfig, run_dir: str, rank: int, world: int) -> None:
        """``run_dir`` is a local/NFS path or an object-store URI (``raylm.storage``)."""
        self.cfg, self.run_dir, self.rank, self.world = cfg, run_dir, rank, world
        self.step = 0
        self.samples_seen = 0
        """Examples all ranks trained on so far (a resumed run starts from its history)."""
        self.step_metrics: list[dict[str, float]] = []
        """This step's preference metrics, one dict per micro-batch (logged, then reset)."""
        self.fault: dict[str, Any] | None = None
        self.metrics_file = storage.join(run_dir, "metrics.jsonl")
        self.events_file = storage.join(run_dir, "events.jsonl")
        self.samples_file = storage.join(run_dir, "samples.jsonl")

    # ---- setup -------------------------------------------------------------------------
    def setup(self, shard: Any) -> None:
        import deepspeed

        from raylm.train.data import REF_COLUMNS, open_stream
        from raylm.train.ds_config import deepspeed_config
        from raylm.train.model import build_optimizer, load_model, load_reference, load_tokenizer
        from raylm.train.reward import load_reward_model

        cfg, t = self.cfg, self.cfg.train
        self.tok = load_tokenizer(cfg)
        self.stream = open_stream(shard, cfg, self.rank, self.world)
        self.held_out = HeldOut(self, held_out_rows(shard))
        self.per_step = t.micro_batch_size * t.grad_accum
        self.steps_per_epoch = self._all_min(self.stream.steps_per_epoch)
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"each of {self.world} workers has {self.stream.rows_per_rank} examples, "
                "fewer than one step "
                f"needs (micro_batch_size*grad_accum={self.per_step}); add data or reduce them"
            )
        self.ds_config = deepspeed_config(cfg, self.world)
        self._plan_resume()
        self.total_steps = t.max_steps or self._all_min(
            stop_step(t.epochs, self.stream.worlds, self.stream.plan.rows, self.per_step)
        )
        partitioned = self.ds_config if cfg.deepspeed.zero3_init else None
        if cfg.stage == "rm":  # the LM with a score head (raylm.train.reward)
            model = load_reward_model(cfg, partitioned, self.tok.pad_token_id)
        else:
            model = load_model(cfg, partitioned)
        # simpo/orpo score the policy alone: no reference model, no precomputed columns.
        needs_ref = (
            (cfg.stage == "dpo" and cfg.dpo.needs_reference)
            or cfg.stage == "kto"
            or cfg.loss.type == "asft"  # ASFT's KL to the reference (raylm.train.objectives)
            or (cfg.stage == "grpo" and cfg.grpo.beta > 0)  # GRPO's KL penalty
            or (cfg.stage == "ppo" and cfg.ppo.kl_coef > 0)  # PPO's per-token KL
        )
        # Precomputed sequence log-probs serve DPO/KTO only, not ASFT's per-token KL.
        precomputable = cfg.stage in ("dpo", "kto")
        self.precomputed_ref = (
            needs_ref and precomputable and self.stream.plan.has_columns(REF_COLUMNS)
        )
        self.ref = None
        if needs_ref and not self.precomputed_ref and cfg.finetuning_type in ("full", "freeze"):
            self.ref = load_reference(cfg)
        self.n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        # A client optimizer (LoRA+'s param groups included) that DeepSpeed wraps.
        optim, sched = build_optimizer(model, cfg, self.total_steps)
        self.engine, self.optim, _, self.sched = deepspeed.initialize(
            model=model, optimizer=optim, lr_scheduler=sched, config=self.ds_config,
            dist_init_required=False,
        )  # fmt: skip
        self.gauges = _gauges(cfg.run_name) if self.rank == 0 and _in_ray() else None
        self.report = sinks.Reporter(self)  # report_to sinks (rank 0), non-finite guard
        self.rl = None  # stages grpo / ppo: rollouts, rewards, loss (raylm.train.grpo, .ppo)
        if cfg.stage == "grpo":
            from raylm.train.grpo import GRPOStep

            self.rl = GRPOStep(self)
        elif cfg.stage == "ppo":
            from raylm.train.ppo import PPOStep

            self.rl = PPOStep(self)

    def _all_min(self, value: int) -> int:
        import torch
        import torch.distributed as dist

        t = torch.tensor([value])
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    # ---- resume ------------------------------------------------------------------------
    def _plan_resume(self) -> None:
        """Before the engine exists: a checkpoint written by another world size (a run that
        shrank or grew with its spot capacity) loads through DeepSpeed's universal form, and
        the stream takes on the checkpoint's history of sizes (every resume, not only a
        resized one: a run that shrank once and restarts at its new size must keep reading
        the epoch as re-split), which the run's length in steps depends on."""
        self.latest = ckpt.latest_complete(self.run_dir)
        record = ckpt.marker(self.latest[1]) if self.latest else None
        self.saved_world = (record or {}).get("world_size", self.world)
        if self.latest and record is not None:
            self.stream.resized(record.get("worlds"), self.saved_world, self.latest[0])
        if self.saved_world != self.world:
            self.ds_config["checkpoint"] = {"load_universal": True}

    def resume(self) -> None:
        import torch
        import torch.distributed as dist

        if self.latest is None:
            self._event({"event": "start", "total_steps": self.total_steps})
            return
        step, path = self.latest
        resized = self.saved_world != self.world
        if resized:
            if self.rank == 0:
                with storage.local_copy(path) as local:
                    ckpt.ensure_universal(path, local)
            dist.barrier()
        with storage.local_copy(path) as local:
            self.engine.load_checkpoint(
                str(local), tag=ckpt.UNIVERSAL_TAG if resized else ckpt.DS_TAG,
                load_optimizer_states=True, load_lr_scheduler_states=True,
            )  # fmt: skip
            # After a resize a rank may have no state file of its own: RNG state is only
            # exact at an unchanged world size anyway.
            state = local / f"trainer_state_rank{self.rank % self.saved_world}.pt"
            own = torch.load(state, weights_only=False)
        ckpt.set_rng_state(own["rng"])
        if self.rl:
            self.rl.load_state_dict(own.get("rl"))
        self.step = own["step"]
        assert self.step == step, (self.step, step)
        self.samples_seen = rows_taken(self.step, self.stream.worlds, self.per_step)
        if self.rank == 0:
            for log in (self.metrics_file, self.samples_file, self.held_out.file):
                _truncate_metrics(log, self.step)
        name = path.rstrip("/").rpartition("/")[2]
        self._event({"event": "resume", "from_step": self.step, "checkpoint": name,
                     "world_size_from": self.saved_world, "world_size": self.world,
                     "total_steps": self.total_steps})  # fmt: skip

    # ---- training ----------------------------------------------------------------------
    def run(self) -> None:
        mbs = self.cfg.train.micro_batch_size
        while self.step < self.total_steps:
            start = time.perf_counter()
            epoch, step_rows = self.stream.step(self.step)
            if self.rl:  # weight sync, then this step's rollouts, rewards and advantages
                self.rl.prepare(self.step, step_rows)
            losses, tokens, samples, ids = [], 0, 0, []
            self.step_metrics = []
            for micro in range(self.cfg.train.grad_accum):
                rows = step_rows[micro * mbs : (micro + 1) * mbs]
                self._maybe_fault("mid_step", micro)
                loss, n_tok = self._loss(rows)
                self.engine.backward(loss)
                self.engine.step()
                losses.append(float(loss.detach()))
                tokens, samples = tokens + n_tok, samples + len(rows)
                ids += [r.get("id") for r in rows]
            if self.rl:  # after the optimizer step (PPO's value head steps here)
                extra = self.rl.finish()
                self.step_metrics = [m | extra for m in self.step_metrics]
            self.step += 1
            self._audit(epoch, ids)
            self._log(epoch, losses, tokens, samples, time.perf_counter() - start)
            if self.held_out.due(self.step, self.total_steps):
                record = self.held_out.run(self.step, epoch)
                if record is not None:
                    self.report.log(record, section="eval")
            if self.step % self.cfg.checkpoint.save_steps == 0 or self.step == self.total_steps:
                self.save()
        if self.rl:
            self.rl.close()
        self.report.close()

    def _loss(self, rows: list[dict[str, Any]]):
        import torch

        from raylm.train import objectives as obj
        from raylm.train import preference as pref

        pad = self.tok.pad_token_id
        if self.rl:
            loss, metrics, n_tok = self.rl.loss(rows)
            self.step_metrics.append(metrics)
            return loss, n_tok
        if self.cfg.stage in ("rm", "kto"):  # raylm.train.reward / raylm.train.kto
            from raylm.train.kto import kto_step
            from raylm.train.reward import rm_step

            if self.cfg.stage == "rm":
                loss, metrics, n_tok = rm_step(self.cfg.rm, self.engine, rows, pad)
            else:
                loss, metrics, n_tok = kto_step(self.cfg.kto, self.engine, self.ref, rows, pad)
            self.step_metrics.append(metrics)
            return loss, n_tok
        if self.cfg.stage != "dpo":
            batch = obj.collate(rows, "", pad)
            loss, _ = obj.lm_loss(self.engine, batch, self.cfg.loss, self.ref)
            return loss, int(batch["attention_mask"].sum())
        batch = obj.pair_batch(rows, pad)
        policy = pref.pair_logps(self.engine, batch)
        ref = None
        if self.precomputed_ref:
            ref = policy.with_sums(
                torch.tensor([r["ref_chosen_logps"] for r in rows]),
                torch.tensor([r["ref_rejected_logps"] for r in rows]),
            )
        elif self.cfg.dpo.needs_reference:
            with torch.no_grad():
                ref = self._ref_logps(batch)
        loss, metrics = pref.preference_loss(self.cfg.dpo, policy, ref)
        self.step_metrics.append(metrics)
        return loss, int(batch["attention_mask"].sum())

    def _ref_logps(self, batch):
        from raylm.train.preference import pair_logps

        if self.ref is not None:
            return pair_logps(self.ref, batch)
        with self.engine.module.disable_adapter():  # LoRA: the base model is the reference
            return pair_logps(self.engine.module, batch)

    def _log(self, epoch: int, losses: list[float], tokens: int, samples: int, secs: float) -> None:
        import torch
        import torch.distributed as dist

        # Preference metrics: mean over this rank's micro-batches, then over ranks; every
        # rank has the same keys (same config), so they ride the one all_reduce.
        names = sorted({k for m in self.step_metrics for k in m})
        means = [sum(m[k] for m in self.step_metrics) / len(self.step_metrics) for k in names]
        totals = torch.tensor(
            [sum(losses) / len(losses), float(tokens), float(samples), *means],
            dtype=torch.float64,
        )
        dist.all_reduce(totals)
        self.samples_seen += int(totals[2].item())
        loss = totals[0].item() / self.world
        tps = totals[1].item() / secs
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = None if grad_norm is None else float(grad_norm)
        self.report.check(self.step, loss, grad_norm, self.engine.was_step_applied())
        if self.rank != 0 or (
            self.step % self.cfg.train.logging_steps and self.step != self.total_steps
        ):
            return
        record = {
            "step": self.step,
            "epoch": epoch,
            "loss": loss,
            "lr": self.sched.get_last_lr()[0],
            "grad_norm": grad_norm,
            "skipped_steps": self.engine.skipped_steps,
            "tokens": int(totals[1].item()),
            "tokens_per_s": tps,
            "samples_seen": self.samples_seen,
            "time": time.time(),
            **{k: v / self.world for k, v in zip(names, totals[3:].tolist(), strict=True)},
        }
        storage.append_text(self.metrics_file, json.dumps(record) + "\n")
        self.report.log(record)
        if self.gauges:
            self.gauges["loss"].set(loss)
            self.gauges["tokens_per_s"].set(tps)
            self.gauges["step"].set(self.step)
            for key in RL_GAUGES:  # stages grpo / ppo: headline metrics, rank-averaged
                if key in record:
                    self.gauges[key].set(record[key])
        print(f"step {self.step}/{self.total_steps} loss {loss:.4f} tok/s {tps:.0f}", flush=True)

    def _audit(self, epoch: int, ids: list[Any]) -> None:
        if not self.cfg.checkpoint.log_sample_ids:
            return
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, ids)
        if self.rank == 0:
            flat = [i for rank_ids in gathered for i in rank_ids]
            line = json.dumps({"step": self.step, "epoch": epoch, "ids": flat})
            storage.append_text(self.samples_file, line + "\n")

    # ---- checkpoints -------------------------------------------------------------------
    def save(self) -> None:
        import ray.train
        import torch
        import torch.distributed as dist

        name = self._broadcast_name(ckpt.checkpoint_name(self.step))
        local = Path(tempfile.mkdtemp(prefix=f"raylm-ckpt-r{self.rank}-"))
        self.engine.save_checkpoint(str(local), tag=ckpt.DS_TAG, client_state={"step": self.step})
        own = {"step": self.step, "rng": ckpt.rng_state()}
        if self.rl:
            own["rl"] = self.rl.state_dict()  # PPO's value head and its optimizer
        torch.save(own, local / f"trainer_state_rank{self.rank}.pt")
        metrics = {"step": self.step, "checkpoint_name": name}
        checkpoint = ray.train.Checkpoint.from_directory(str(local))
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name,
                         delete_local_checkpoint_after_upload=True)  # fmt: skip
        self._maybe_fault("after_upload", 0)
        dist.barrier()  # every rank's files are in storage now
        if self.rank == 0:
            path = storage.join(self.run_dir, name)
            ckpt.mark_complete(path, self.step, self.world, self.stream.worlds)
            self._event({"event": "checkpoint", "step": self.step, "name": name})
        dist.barrier()

    def _broadcast_name(self, name: str) -> str:
        import torch.distributed as dist

        box = [name]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _maybe_fault(self, where: str, micro: int) -> None:
        """Test hook: SIGKILL this worker once at a chosen point, as a lost node would."""
        f = self.fault
        if not f or f["where"] != where or f["rank"] != self.rank or micro != 0:
            return
        if self.step != f["step"] or Path(f["marker"]).exists():
            return
        Path(f["marker"]).write_text(json.dumps({"step": self.step, "time": time.time()}))
        os.kill(os.getpid(), signal.SIGKILL)

    def _event(self, record: dict[str, Any]) -> None:
        if self.rank == 0:
            storage.append_text(self.events_file, json.dumps(record | {"time": time.time()}) + "\n")

    # ---- export ------------------------------------------------------------------------
    def export(self) -> None:
        from raylm.train.export import export_final

        export_final(self)


def _truncate_metrics(path: str, step: int) -> None:
    """Drop lines logged after the checkpoint we resume from: they are replayed."""
    if not storage.exists(path):
        return
    lines = storage.read_text(path).splitlines()
    keep = [ln for ln in lines if ln and json.loads(ln)["step"] <= step]
    storage.write_text(path, "".join(ln + "\n" for ln in keep))


def _in_ray() -> bool:
    """Ray metrics need a Ray worker; the same loop also runs under torchrun (bench)."""
    import ray

    return ray.is_initialized()


RL_GAUGES = {
    "reward": "RL mean reward",
    "kl": "RL KL to the reference",
    "weight_sync_s": "RL seconds to sync weights to the rollout engine",
    "rollout_tokens_per_s": "RL rollout tokens/s",
}
"""Stages grpo and ppo: their metrics also shown as gauges (``raylm_train_<key>``)."""


def _gauges(run_name: str) -> dict[str, Any]:
    """Ray metrics, visible in the dashboard's Metrics tab and Prometheus."""
    from ray.util.metrics import Gauge

    tags = {"run": run_name}
    gauges = {
        "loss": Gauge("raylm_train_loss", "training loss (mean over ranks)", tag_keys=("run",)),
        "tokens_per_s": Gauge(
            "raylm_train_tokens_per_s", "tokens/s over all ranks", tag_keys=("run",)
        ),
        "step": Gauge("raylm_train_step", "optimizer step", tag_keys=("run",)),
    }
    gauges |= {k: Gauge(f"raylm_train_{k}", d, tag_keys=("run",)) for k, d in RL_GAUGES.items()}
    for g in gauges.values():
        g.set_default_tags(tags)
    return gauges
