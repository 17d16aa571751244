"""The report_to sinks and the non-finite guard (raylm.train.sinks), without Ray or DeepSpeed.

Each sink is fed through the ``Reporter`` the worker builds, then read back with that
sink's own reader: TensorBoard's event accumulator, MLflow's client on the file store,
and the records of W&B's offline ``.wandb`` file.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from raylm import config
from raylm.config import ConfigError
from raylm.train import sinks
from raylm.train.sink_readers import logged
from raylm.train.sinks import NonFiniteError, Reporter, check_step

ALL = ["tensorboard", "mlflow", "wandb"]


def fake_loop(run_dir: Path, report_to: list[str], latest=None, nonfinite: str = "stop"):
    """What ``Reporter`` reads off ``_Loop``: a config, the rank, the resume point and a
    module whose parameters it counts (8 in all, 6 trainable)."""
    import torch

    cfg = config.load(
        "train",
        [],
        ["model.name_or_path=/m", "data.path=/d", "run_name=unit",
         f"report_to=[{','.join(report_to)}]", f"train.nonfinite={nonfinite}"],
    )  # fmt: skip
    module = torch.nn.Linear(3, 2)
    module.bias.requires_grad_(False)
    events: list[dict] = []
    return SimpleNamespace(
        cfg=cfg, run_dir=str(run_dir), rank=0, latest=latest, sink_env={},
        engine=SimpleNamespace(module=module), _event=events.append, events=events,
    )  # fmt: skip


def record(step: int, loss: float) -> dict:
    """A metrics.jsonl line as ``_Loop._log`` writes it (a DPO key included)."""
    return {"step": step, "epoch": 0, "loss": loss, "lr": 0.01, "grad_norm": 1.5,
            "tokens": 64, "tokens_per_s": 100.0, "samples_seen": 4 * step,
            "skipped_steps": 0, "time": 1.0, "rewards/margins": 0.25}  # fmt: skip


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No sink reaches a server, whatever this machine's environment says."""
    for name in ("MLFLOW_TRACKING_URI", "WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_every_sink_records_each_step_and_the_parameter_counts(tmp_path: Path) -> None:
    loop = fake_loop(tmp_path, ALL)
    report = Reporter(loop)
    assert loop.events == [{"event": "params", "n_params": 8, "n_trainable": 6}]
    for step in (1, 2, 3):
        report.log(record(step, 3.0 - step / 2))
    report.close()

    want = {1: 2.5, 2: 2.0, 3: 1.5}
    for name in ALL:
        assert logged(name, str(tmp_path)) == pytest.approx(want), name
        assert logged(name, str(tmp_path), "rewards/margins") == pytest.approx(
            dict.fromkeys(want, 0.25)
        ), name
        assert set(logged(name, str(tmp_path), "samples_seen")) == {1, 2, 3}, name
    # Parameter counts and the config: MLflow params, W&B config, TensorBoard scalars.
    from mlflow.tracking import MlflowClient

    state = json.loads((tmp_path / "sinks.json").read_text())
    client = MlflowClient(f"file://{tmp_path}/mlruns")
    mlrun = client.get_run(state["mlflow_run_id"])
    assert mlrun.info.status == "FINISHED"
    assert mlrun.data.params["n_trainable"] == "6" and mlrun.data.params["train.lr"] == "0.0001"
    wandb_dirs = list((tmp_path / "wandb").glob(f"offline-run-*-{state['wandb_run_id']}"))
    assert len(wandb_dirs) == 1
    # W&B's own reader of the offline file (`wandb leet inspect`) agrees with sinks.py's.
    cli = Path(sys.executable).parent / "wandb"
    out = subprocess.run(
        [cli, "leet", "inspect", "--json", next(wandb_dirs[0].glob("*.wandb"))],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    history = [r["history"] for r in records if r["type"] == "history"]
    assert {h["step"]["num"]: h["item"]["train/loss"] for h in history} == want
    summary = subprocess.run(
        [cli, "leet", "inspect", "--summary", "--json", wandb_dirs[0]],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert json.loads(summary)["config"]["n_params"] == 8
    tb = logged("tensorboard", str(tmp_path), "x")  # no such tag: empty, not an error
    assert tb == {}


def test_a_resumed_attempt_continues_the_same_sink_runs(tmp_path: Path) -> None:
    first = Reporter(fake_loop(tmp_path, ALL))
    for step in (1, 2, 3):
        first.log(record(step, 1.0))
    first.close()
    ids = json.loads((tmp_path / "sinks.json").read_text())

    # The resume from the step-2 checkpoint replays step 3 (exact replay: same values
    # in a real run; different here, to see which one a sink keeps).
    second = Reporter(fake_loop(tmp_path, ALL, latest=(2, "ckpt")))
    for step in (3, 4):
        second.log(record(step, 0.5))
    second.close()

    assert json.loads((tmp_path / "sinks.json").read_text()) == ids
    assert logged("tensorboard", str(tmp_path)) == {1: 1.0, 2: 1.0, 3: 0.5, 4: 0.5}  # purged
    for name in ("mlflow", "wandb"):  # replayed steps logged twice, same values in a real run
        assert set(logged(name, str(tmp_path))) == {1, 2, 3, 4}, name
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"file://{tmp_path}/mlruns")
    runs = client.search_runs([client.get_experiment_by_name("raylm").experiment_id])
    assert [r.info.run_id for r in runs] == [ids["mlflow_run_id"]]
    assert len(list((tmp_path / "wandb").glob(f"offline-run-*-{ids['wandb_run_id']}*"))) == 2


@pytest.mark.parametrize(("name", "package"), [("wandb", "wandb"), ("mlflow", "mlflow-skinny")])
def test_a_missing_sink_package_fails_at_config_load(
    monkeypatch: pytest.MonkeyPatch, name: str, package: str
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda mod, *a: None if mod == name else real(mod, *a)
    )
    with pytest.raises(ConfigError, match=rf"report_to={name} needs .*pip install {package}"):
        config.load("train", [], ["model.name_or_path=/m", "data.path=/d", f"report_to=[{name}]"])


def test_mlflow_on_a_bucket_run_needs_a_tracking_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI"):
        sinks.prepare(["mlflow"], "s3://bucket/runs/r")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    monkeypatch.setenv("WANDB_PROJECT", "p")
    env = sinks.prepare(["mlflow", "wandb"], "s3://bucket/runs/r")
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.internal:5000"
    assert env["WANDB_PROJECT"] == "p"  # travels to rank 0 with the loop's config


@pytest.mark.parametrize(
    ("mode", "loss", "norm", "applied", "fp16", "outcome"),
    [
        ("stop", 2.0, 1.0, True, False, None),
        ("stop", float("nan"), float("inf"), False, False, "loss is nan, grad_norm is inf"),
        ("stop", 2.0, float("inf"), False, False, "grad_norm is inf"),
        ("stop", 2.0, None, True, False, None),  # no norm computed: the loss decides
        ("skip", float("nan"), float("inf"), False, False, "skipped"),
        ("skip", float("inf"), None, True, False, "loss is inf, and DeepSpeed applied"),  # ZeRO-0
        ("stop", 2.0, float("inf"), False, True, None),  # fp16: the loss scaler's overflow
        ("stop", float("nan"), float("inf"), False, True, "loss is nan"),
    ],
)
def test_nonfinite_guard(mode, loss, norm, applied, fp16, outcome) -> None:
    if outcome in (None, "skipped"):
        assert check_step(mode, 7, loss, norm, applied, fp16) == outcome
        return
    with pytest.raises(NonFiniteError, match=rf"^step 7: {outcome}"):
        check_step(mode, 7, loss, norm, applied, fp16)


def test_a_stop_is_recorded_and_ends_the_job_not_the_retry(tmp_path: Path) -> None:
    """Rank 0 records the stop before raising; the driver turns it into NonFiniteError,
    whether Ray Train raised (no retries left) or the retry ended at once."""
    loop = fake_loop(tmp_path, ["tensorboard"])
    report = Reporter(loop)
    report.log(record(1, 2.0))
    assert report.check(2, 2.0, 3.0, True) is None
    (tmp_path / sinks.STOP_FILE).write_text('{"message": "stale"}')  # an earlier stop
    stop = pytest.raises(NonFiniteError, match=r"^step 2: loss is inf")
    with stop as err, sinks.stop_on_nonfinite(str(tmp_path)):
        assert not sinks.stopped(str(tmp_path))  # a resubmission starts afresh
        try:
            report.check(2, float("inf"), 3.0, True)
        except NonFiniteError as worker_error:
            raise RuntimeError("Training failed due to worker errors") from worker_error
    assert isinstance(err.value.__cause__, RuntimeError)
    assert sinks.stopped(str(tmp_path))  # what the retry's train_loop finds
    assert loop.events[-1] | {"time": 0} == {
        "event": "nonfinite", "step": 2, "action": "stopped", "loss": "inf",
        "grad_norm": "3.0", "time": 0,
    }  # fmt: skip
    assert report.sinks == []  # closed: TensorBoard flushed what it had
    with pytest.raises(NonFiniteError, match="step 2"), sinks.stop_on_nonfinite(str(tmp_path)):
        (tmp_path / sinks.STOP_FILE).write_text(json.dumps({"message": "step 2: x"}))
    with pytest.raises(ValueError, match="unrelated"), sinks.stop_on_nonfinite(str(tmp_path)):
        raise ValueError("unrelated")


def test_skip_records_the_step_and_goes_on(tmp_path: Path) -> None:
    loop = fake_loop(tmp_path, [], nonfinite="skip")
    report = Reporter(loop)
    report.check(5, float("nan"), float("inf"), False)
    assert loop.events[-1]["action"] == "skipped" and loop.events[-1]["step"] == 5
    assert not sinks.stopped(str(tmp_path))
