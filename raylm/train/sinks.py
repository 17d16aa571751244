"""What a training run reports while it trains: live metric sinks and the non-finite guard.

Rank 0 hands every logged step to each sink named in ``report_to`` as the step happens
(``_Loop._log``), so TensorBoard, MLflow or W&B show a run that is still training;
``metrics.jsonl`` stays the record the job's summary and ``loss.png`` are made from.
Where each sink writes and how a resume continues it: docs/training.md ("Watching a
run"). The driver checks every sink can open before any worker starts (``prepare``),
and hands rank 0 its ``MLFLOW_*`` / ``WANDB_*`` environment.

The non-finite guard (``check_step``): a step whose loss or gradient norm is NaN/inf
stops the run by default (``train.nonfinite=stop``). Resuming would replay the same
batches onto the same weights and fail the same way, so the stop is recorded in
``<run_dir>/nonfinite.json``: Ray Train's retry (``checkpoint.max_failures``) finds it
and ends at once (``train_loop``), and the driver raises ``NonFiniteError`` naming the
step and the value (``stop_on_nonfinite``). ``train.nonfinite=skip`` relies on
DeepSpeed, which drops a step whose gradient norm is not finite (ZeRO stages 1-3 in any
precision, stage 0 in bf16/fp16: no update, no LR-schedule step, ``skipped_steps`` + 1);
a non-finite step DeepSpeed applied all the same (stage 0 in fp32) still stops the run.
"""

from __future__ import annotations

import abc
import contextlib
import importlib.util
import json
import math
import os
import struct
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from raylm import storage
from raylm.config import ConfigError, to_dict
from raylm.job import JobFailed
from raylm.submit import tracking_env

SINKS = ("tensorboard", "mlflow", "wandb")
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow-skinny", "wandb": "wandb"}
"""What ``pip install`` needs for each sink (the import name is the sink's name)."""

STATE_FILE = "sinks.json"
STOP_FILE = "nonfinite.json"
SYNC_S = 30.0
"""A bucket run dir gets the locally written TensorBoard/W&B files this often (and at
the end): those libraries write local files only."""


class NonFiniteError(JobFailed):
    """A step's loss or gradient norm was NaN/inf: deterministic, so never retried."""


# ---- driver side ---------------------------------------------------------------------
def require(names: Iterable[str]) -> None:
    """Fail at config load, not at the first logged step, when a sink's package is absent."""
    for name in names:
        if importlib.util.find_spec(name) is None:
            raise ConfigError(
                f"report_to={name} needs the {PACKAGES[name]} package: pip install {PACKAGES[name]}"
            )


def prepare(report_to: list[str], run_dir: str) -> dict[str, str]:
    """Before any worker starts: check each sink can open, and return the ``MLFLOW_*`` /
    ``WANDB_*`` environment rank 0 opens them with (workers get their node's environment,
    not the driver's)."""
    require(report_to)
    env = tracking_env()
    if "mlflow" in report_to and storage.is_remote(run_dir) and not env.get("MLFLOW_TRACKING_URI"):
        raise ConfigError(
            f"report_to=mlflow with the run dir {run_dir} in a bucket needs a tracking "
            "server: set MLFLOW_TRACKING_URI (its file store only works on a local or NFS "
            "run dir)"
        )
    return env


@contextlib.contextmanager
def stop_on_nonfinite(run_dir: str) -> Iterator[None]:
    """Around ``trainer.fit()``: a non-finite stop recorded by a worker ends the job as
    ``NonFiniteError``, whether Ray Train failed the run or its retry ended at once."""
    marker = storage.join(run_dir, STOP_FILE)
    if storage.exists(marker):  # a resubmission after a stop (new lr, nonfinite=skip)
        fs, path = storage.filesystem(marker)
        fs.delete_file(path)
    err: Exception | None = None
    try:
        yield
    except Exception as failed:
        err = failed
    if storage.exists(marker):
        record = json.loads(storage.read_text(marker))
        kind = ConfigError if record.get("kind") == "config" else NonFiniteError
        raise kind(record["message"]) from err
    if err is not None:
        raise err


def record_config_error(run_dir: str, err: ConfigError) -> None:
    """A worker found a bad setting (deterministic, like a non-finite step): record it so
    Ray Train's retry ends at once and the driver raises it as the ConfigError it is."""
    marker = {"kind": "config", "message": str(err), "time": time.time()}
    storage.write_text(storage.join(run_dir, STOP_FILE), json.dumps(marker))


def stopped(run_dir: str) -> bool:
    """Worker side: an earlier attempt of this run stopped on a non-finite step."""
    return storage.exists(storage.join(run_dir, STOP_FILE))


# ---- the non-finite guard ------------------------------------------------------------
def check_step(
    mode: str, step: int, loss: float, grad_norm: float | None, applied: bool, fp16: bool
) -> str | None:
    """None for a finite step, ``"skipped"`` when ``mode`` is skip and DeepSpeed dropped
    the step; otherwise raises ``NonFiniteError`` naming the step and the value.

    ``applied`` is ``engine.was_step_applied()``. In fp16 the loss scaler owns gradient
    overflow (DeepSpeed skips such a step and lowers the scale, routinely early on), so
    only the loss is checked there. ``grad_norm`` None (not computed) checks the loss.
    """
    values = [("loss", loss)] + ([] if fp16 or grad_norm is None else [("grad_norm", grad_norm)])
    bad = [(k, v) for k, v in values if not math.isfinite(v)]
    if not bad:
        return None
    what = ", ".join(f"{k} is {v}" for k, v in bad)
    if mode == "skip":
        if not applied:
            return "skipped"
        raise NonFiniteError(
            f"step {step}: {what}, and DeepSpeed applied that update anyway (ZeRO stage 0 "
            "in fp32 does not skip non-finite steps), so train.nonfinite=skip cannot skip "
            "it; use deepspeed.stage >= 1 or bf16, lower train.lr, or check the data"
        )
    raise NonFiniteError(
        f"step {step}: {what} (train.nonfinite=stop). The run stopped and is not retried: "
        "a resume would replay the same batches and fail again. Lower train.lr, check "
        "that step's data (checkpoint.log_sample_ids), or set train.nonfinite=skip"
    )


# ---- sinks ---------------------------------------------------------------------------
@dataclass
class RunInfo:
    """What a sink knows of its run: ``resume_step`` is the checkpoint this attempt
    continues from (0: a fresh start); ``local_dir`` is where libraries that only write
    local files write (the run dir, or a staging dir copied to a bucket run dir every
    ``SYNC_S``); ``env`` is the driver's ``MLFLOW_*`` / ``WANDB_*``; ``state`` is
    ``sinks.json``, the ids that let a resumed attempt continue the same sink run."""

    run_dir: str
    run_name: str
    resume_step: int
    local_dir: str
    env: dict[str, str] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)


class Sink(abc.ABC):
    """One metric sink on rank 0: opened once per attempt, fed every logged step."""

    name: ClassVar[str]

    @abc.abstractmethod
    def open(self, run: RunInfo, config: dict[str, Any]) -> None:
        """Start or continue this run's record; ``config`` (the flattened job config and
        the parameter counts) is recorded once, as the sink's params/config."""

    @abc.abstractmethod
    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Record one logged step's metrics (names with their ``train/`` or ``eval/``)."""

    @abc.abstractmethod
    def close(self, failed: bool = False) -> None:
        """Flush and end this attempt's record."""


class TensorBoardSink(Sink):
    name = "tensorboard"

    def open(self, run: RunInfo, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step hides the events of steps a resume replays (same log dir).
        self.writer = SummaryWriter(
            storage.join(run.local_dir, "tensorboard"), purge_step=run.resume_step + 1
        )
        if run.resume_step == 0:
            table = "\n".join(f"| {k} | {v} |" for k, v in config.items())
            self.writer.add_text("config", "| key | value |\n| --- | --- |\n" + table, 0)
            for key in ("n_params", "n_trainable"):
                self.writer.add_scalar(f"model/{key}", config[key], 0)
        self.writer.flush()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a local file: cheap, and what makes it live

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class MLflowSink(Sink):
    name = "mlflow"

    def open(self, run: RunInfo, config: dict[str, Any]) -> None:
        uri = run.env.get("MLFLOW_TRACKING_URI") or (
            "file://" + os.path.abspath(storage.join(run.run_dir, "mlruns"))
        )
        if uri.startswith("file:") or "://" not in uri:
            # MLflow 3 refuses its file store unless told: it is what a run dir can hold.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        known, self.run_id = run.state.get("mlflow_run_id"), None
        with contextlib.suppress(Exception):  # deleted, or another server than last time
            self.run_id = known and self.client.get_run(known).info.run_id
        if self.run_id:
            self.client.update_run(self.run_id, status="RUNNING")
            self.client.set_tag(self.run_id, "raylm.resumed_from_step", run.resume_step)
            return
        name = run.env.get("MLFLOW_EXPERIMENT_NAME", "raylm")
        found = self.client.get_experiment_by_name(name)
        exp = found.experiment_id if found else self.client.create_experiment(name)
        tags = {"raylm.run_dir": run.run_dir}
        self.run_id = self.client.create_run(exp, run_name=run.run_name, tags=tags).info.run_id
        params = [Param(k, str(v)[:500]) for k, v in config.items()]
        for i in range(0, len(params), 100):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])
        run.state["mlflow_run_id"] = self.run_id

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


class WandbSink(Sink):
    name = "wandb"

    def open(self, run: RunInfo, config: dict[str, Any]) -> None:
        import wandb

        # A service handle inherited from another process (the submitter, the raylet)
        # would put this run in that process's service, where a killed attempt's run
        # is still open: "run ID ... is in use". Each attempt starts its own.
        os.environ.pop("WANDB_SERVICE", None)
        run_id = run.state.setdefault("wandb_run_id", uuid.uuid4().hex[:12])
        self.run = wandb.init(
            project=run.env.get("WANDB_PROJECT", "raylm"),
            name=run.run_name,
            id=run_id,
            resume="allow",
            dir=run.local_dir,
            mode=run.env.get("WANDB_MODE", "offline"),  # nothing leaves the cluster unasked
            config=config,
            settings=wandb.Settings(console="off", silent=True, disable_git=True),
        )
        self.file = self.run.settings.sync_file

    def log(self, step: int, metrics: dict[str, float]) -> None:
        # commit=True: with an explicit step W&B would otherwise hold the row back
        # until the next step arrives.
        self.run.log(metrics, step=step, commit=True)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)
        # finish() can return before W&B's service wrote the file's tail: wait for the
        # exit record, so a bucket upload right after, or a reader, sees every step.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                records = wandb_records(Path(self.file).read_bytes())
                if any(r.WhichOneof("record_type") == "exit" for r in records):
                    return
            time.sleep(0.1)


KINDS: dict[str, type[Sink]] = {s.name: s for s in (TensorBoardSink, MLflowSink, WandbSink)}


def param_counts(module: Any) -> dict[str, int]:
    """Total and trainable parameters; ZeRO-3 leaves each rank a shard (``ds_numel`` is
    the whole parameter's size)."""
    sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in module.parameters()]
    return {"n_params": sum(n for n, _ in sizes), "n_trainable": sum(n for n, t in sizes if t)}


def flat_config(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A config as plain data (``to_dict``) with ``train.lr``-style keys, for flat params."""
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    return {
        k: v for key, sub in tree.items() for k, v in flat_config(sub, f"{prefix}{key}.").items()
    }


class Reporter:
    """One training attempt's reporting: every rank's non-finite guard, rank 0's sinks.

    Built at the end of ``_Loop.setup`` from the loop (it reads ``cfg``, ``run_dir``,
    ``rank``, ``latest``, ``engine``, ``sink_env`` and ``_event``)."""

    def __init__(self, loop: Any) -> None:
        cfg = loop.cfg
        self.rank, self.run_dir = loop.rank, loop.run_dir
        self.mode, self.fp16 = cfg.train.nonfinite, cfg.train.precision == "fp16"
        self.event = loop._event
        self.sinks: list[Sink] = []
        self.synced = time.monotonic()
        counts = param_counts(loop.engine.module)
        self.event({"event": "params", **counts})
        if self.rank != 0 or not cfg.report_to:
            return
        env = dict(getattr(loop, "sink_env", None) or {})
        os.environ.update(env)  # credentials and settings the libraries read themselves
        remote = storage.is_remote(self.run_dir)
        state_file = storage.join(self.run_dir, STATE_FILE)
        self.run = RunInfo(
            run_dir=self.run_dir,
            run_name=cfg.run_name,
            resume_step=loop.latest[0] if loop.latest else 0,
            local_dir=tempfile.mkdtemp(prefix="raylm-sinks-") if remote else self.run_dir,
            env=env,
            state=json.loads(storage.read_text(state_file)) if storage.exists(state_file) else {},
        )
        config = flat_config(to_dict(cfg)) | counts
        for name in cfg.report_to:
            sink = KINDS[name]()
            try:
                sink.open(self.run, config)
            except ImportError:
                raise ConfigError(
                    f"report_to={name} needs the {PACKAGES[name]} package on every node: "
                    f"pip install {PACKAGES[name]}"
                ) from None
            self.sinks.append(sink)
        storage.write_text(state_file, json.dumps(self.run.state))

    def check(self, step: int, loss: float, grad_norm: float | None, applied: bool) -> None:
        """Every rank, every step (all see the same reduced loss and global norm, so all
        decide alike). A stop is recorded by rank 0 before any rank raises: Ray tears the
        group down at the first error, and the retry must find the record."""
        import torch.distributed as dist

        try:
            if check_step(self.mode, step, loss, grad_norm, applied, self.fp16):
                self.event({"event": "nonfinite", "step": step, "action": "skipped",
                            "loss": str(loss), "grad_norm": str(grad_norm)})  # fmt: skip
        except NonFiniteError as err:
            if self.rank == 0:
                self.event({"event": "nonfinite", "step": step, "action": "stopped",
                            "loss": str(loss), "grad_norm": str(grad_norm)})  # fmt: skip
                marker = {"step": step, "message": str(err), "time": time.time()}
                storage.write_text(storage.join(self.run_dir, STOP_FILE), json.dumps(marker))
                self.close(failed=True)
            if dist.is_initialized():
                dist.barrier()
            raise

    def log(self, record: dict[str, Any], section: str = "train") -> None:
        """Rank 0: one logged step to every sink, its metrics named ``section/name``
        (``train/loss``; held-out ones ``eval/loss``, without their ``eval_``). A sink
        that fails to log is reported and skipped for that step; ``metrics.jsonl`` or
        ``eval.jsonl`` already holds the step."""
        metrics = {
            f"{section}/{k.removeprefix(section + '_')}": float(v)
            for k, v in record.items()
            if k not in ("step", "time") and isinstance(v, int | float) and not isinstance(v, bool)
        }
        for sink in self.sinks:
            try:
                sink.log(record["step"], metrics)
            except Exception as err:
                print(
                    f"report_to={sink.name}: step {record['step']} not logged: {err}",
                    file=sys.stderr,
                )
        if self.sinks and time.monotonic() - self.synced > SYNC_S:
            self._sync()

    def close(self, failed: bool = False) -> None:
        """End every sink's record (rank 0); idempotent."""
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            sink.close(failed=failed)
        if sinks:
            self._sync()

    def _sync(self) -> None:
        self.synced = time.monotonic()
        if storage.is_remote(self.run_dir):
            storage.copy_dir(self.run.local_dir, self.run_dir)


def wandb_records(data: bytes) -> Iterator[Any]:
    """The protobuf records of a ``.wandb`` file: W&B's LevelDB-style log (a 7-byte file
    header, then records of <crc32, length, type> + payload in 32 KiB blocks, a payload
    split over blocks as FIRST/MIDDLE/LAST). W&B ships no reader for it any more; a run
    still being written ends at its last complete record."""

    from wandb.proto import wandb_internal_pb2

    if len(data) < 7:  # a run that has not written its header yet
        return
    if data[:4] != b":W&B":
        raise ValueError("not a W&B transaction log")
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 or pos + 7 + length > len(data):
            return
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record
