"""Train-job benchmarks: Ray overhead, recovery after a killed worker, ZeRO memory.

    .venv/bin/python bench/train.py [--steps 12] [--out outputs/bench/train]

1. Throughput: the same model, data and DeepSpeed config (ZeRO-3, fp32, gloo, 2 ranks)
   through raylm's Ray Train path and through ``torchrun`` without Ray, in this run.
   Both run the very same training loop (raylm.train.worker._Loop), so the ratio is
   Ray's overhead. Steady state: median tokens/s over steps 2..N. Also wall time.
2. Recovery: a Ray run whose rank-1 worker is SIGKILLed mid-step; time from the kill to
   the resumed run's first finished step, and steps of work lost.
3. Memory per worker (torchrun, 2 ranks): resident bytes of parameters + gradients +
   AdamW states per rank for ZeRO-0/2/3, against 16*params/N (fp32: 4 B weights + 4 B
   grads + 8 B Adam moments per parameter), plus peak RSS growth.
4. ZeRO-3 at load (``--only load``, torchrun at 1, 2 and 4 ranks, a ~200M-parameter
   fp32 model): each rank's peak RSS growth while ``load_model`` runs and until the
   ZeRO-3 engine (with AdamW) is ready, partitioned at load (zero.Init) against a
   whole-model load, next to P*4 B/N (weights) and P*16 B/N (weights + fp32 master +
   Adam moments).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT / "conf/train/data/pt_demo.jsonl"


def build_model(out: Path) -> Path:
    """A random Llama of ~25M parameters with the tiny tokenizer (no downloads)."""
    from raylm.models.tiny import TinySpec, build

    if not (out / "config.json").exists():
        build(out, TinySpec(hidden_size=512, intermediate_size=1536, num_layers=6, num_heads=8,
                            num_kv_heads=8))  # fmt: skip
    return out


def make_cfg(model: Path, storage: Path, run: str, steps: int, stage: int = 3, save: int = 10**6):
    from raylm.config import load

    return load(
        "train",
        [ROOT / "conf/train/pt_full.yaml"],
        [f"model.name_or_path={model}", f"data.path={DATA}", f"storage_path={storage}",
         f"run_name={run}", f"train.max_steps={steps}", "train.micro_batch_size=4",
         f"deepspeed.stage={stage}", f"checkpoint.save_steps={save}", "train.lr=1e-4",
         "train.lr_scheduler=constant"],
    )  # fmt: skip


# ---- torchrun worker (no Ray) ------------------------------------------------------------
class _ListShard:
    def __init__(self, rows):
        self.rows = rows

    def iter_rows(self):
        return iter(self.rows)


def torchrun_worker(args: argparse.Namespace) -> None:
    spec = json.loads(os.environ["RAYLM_BENCH_WORKER"])
    args = argparse.Namespace(**spec)
    if spec.get("load_only") is not None:
        load_worker(spec)
        return
    """One rank without Ray: the same rows per rank (ordered, equal split) and loop."""
    import resource

    import torch.distributed as dist

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from raylm.train.data import _tokenize_raw, data_inputs
    from raylm.train.worker import _Loop

    cfg = make_cfg(Path(args.model), Path(args.storage), args.run, args.steps, args.stage)
    rows = _tokenize_raw(cfg, data_inputs(cfg))
    per = len(rows) // world
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    loop = _Loop(cfg, str(Path(args.storage) / args.run), rank, world)
    Path(loop.run_dir).mkdir(parents=True, exist_ok=True)
    loop.setup(_ListShard(rows[rank * per : (rank + 1) * per]))
    loop.save = lambda: None  # no checkpoints: measure the training loop only
    loop.run()
    mem = _resident_bytes(loop)
    mem["peak_rss_growth"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024
    mem["params_total"] = loop.n_trainable
    (Path(args.storage) / args.run / f"memory_rank{rank}.json").write_text(json.dumps(mem))
    dist.barrier()
    dist.destroy_process_group()


def load_worker(spec: dict) -> None:
    """One rank: peak RSS growth while the model loads (the rest of setup excluded)."""
    import resource

    import torch.distributed as dist

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    dist.init_process_group("gloo")
    from raylm.train.ds_config import deepspeed_config
    from raylm.train.model import load_model

    cfg = make_cfg(Path(spec["model"]), Path(spec["storage"]), "load", 1, 3)
    ds_config = deepspeed_config(cfg, dist.get_world_size())
    import deepspeed  # imported before measuring: its import is not the model's memory

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    import torch

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = load_model(cfg, ds_config if spec["load_only"] == "zero_init" else None)
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024
    params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    # Then what the train loop does next: a torch AdamW wrapped by the ZeRO-3 engine.
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    deepspeed.initialize(model=model, optimizer=optim, config=ds_config, dist_init_required=False)
    ready = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024
    out = Path(spec["storage"]) / f"load_{spec['load_only']}_{dist.get_world_size()}"
    out.mkdir(parents=True, exist_ok=True)
    record = {"peak": peak, "ready": ready, "params": params}
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()


def _resident_bytes(loop) -> dict[str, int]:
    """Bytes of distinct tensor storage this rank holds after a step: weights, the
    optimizer's (flat, possibly partitioned) fp32 copy and its Adam moments.

    Storages are counted once even when several views share them (ZeRO's flat buffers).
    Gradients are freed after the step, so they show up only in the peak RSS."""
    import torch

    engine = loop.engine
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    seen: dict[int, int] = {}

    def add(t) -> int:
        if not torch.is_tensor(t) or t.numel() == 0:
            return 0
        st = t.untyped_storage()
        if st.data_ptr() in seen:
            return 0
        seen[st.data_ptr()] = st.nbytes()
        return st.nbytes()

    weights = sum(add(getattr(p, "ds_tensor", p)) for p in engine.module.parameters())
    master = sum(add(p) for g in inner.param_groups for p in g["params"])
    moments = sum(
        add(t) for s in inner.state.values() for t in s.values() if torch.is_tensor(t) and t.dim()
    )
    return {"weights": weights, "optimizer_fp32_copy": master, "adam_moments": moments,
            "steady_total": weights + master + moments}  # fmt: skip


def free_port() -> int:
    from raylm.cluster import free_port as port

    return port()


def run_torchrun(
    model: Path, storage: Path, run: str, steps: int, stage: int, nproc: int = 2, **extra
) -> float:
    t0 = time.perf_counter()
    # torchrun parses option-like script arguments itself, so the worker's go by env.
    spec = {
        "model": str(model),
        "storage": str(storage),
        "run": run,
        "steps": steps,
        "stage": stage,
    } | extra
    env = dict(os.environ, OMP_NUM_THREADS="1", RAYLM_BENCH_WORKER=json.dumps(spec))
    cmd = [str(Path(sys.executable).parent / "torchrun"), f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", __file__]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stdout[-3000:] + proc.stderr[-3000:])
    return time.perf_counter() - t0


def steady_tps(run_dir: Path) -> float:
    from raylm.train.report import read_metrics

    rows = read_metrics(run_dir / "metrics.jsonl")[1:]
    return statistics.median(r["tokens_per_s"] for r in rows)


def bench_throughput(model: Path, out: Path, steps: int) -> dict:
    from raylm.train.trainer import run_training

    wall_tr = run_torchrun(model, out, "torchrun", steps, 3)
    t0 = time.perf_counter()
    run_training(make_cfg(model, out, "ray", steps))
    wall_ray = time.perf_counter() - t0
    tr, ray_ = steady_tps(out / "torchrun"), steady_tps(out / "ray")
    return {"torchrun_tokens_per_s": tr, "ray_tokens_per_s": ray_, "ray_over_torchrun": ray_ / tr,
            "torchrun_wall_s": wall_tr, "ray_wall_s": wall_ray}  # fmt: skip


def bench_recovery(model: Path, out: Path, steps: int) -> dict:
    from raylm.train.report import read_metrics
    from raylm.train.trainer import run_training

    kill_step, save = steps // 2 + 1, 2
    marker = out / "recovery.fault"
    fault = {"where": "mid_step", "rank": 1, "step": kill_step, "marker": str(marker)}
    run_training(make_cfg(model, out, "recovery", steps, save=save), fault=fault)
    killed_at = json.loads(marker.read_text())["time"]
    run_dir = out / "recovery"
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    resume = next(e for e in events if e["event"] == "resume")
    first_step = min(
        m["time"] for m in read_metrics(run_dir / "metrics.jsonl") if m["time"] > resume["time"]
    )
    return {"killed_during_step": kill_step + 1, "resumed_from_step": resume["from_step"],
            "steps_lost": kill_step - resume["from_step"], "save_steps": save,
            "kill_to_resumed_s": resume["time"] - killed_at,
            "kill_to_first_step_s": first_step - killed_at}  # fmt: skip


def bench_memory(model: Path, out: Path) -> dict:
    rows = {}
    for stage in (0, 2, 3):
        run_torchrun(model, out, f"mem_z{stage}", 2, stage)
        per_rank = [json.loads((out / f"mem_z{stage}" / f"memory_rank{r}.json").read_text())
                    for r in (0, 1)]  # fmt: skip
        rows[f"zero{stage}"] = per_rank[0]
    return rows


def bench_load(out: Path) -> dict:
    """Peak RSS growth per rank while loading, partitioned (zero.Init) vs whole."""
    from raylm.models.tiny import TinySpec, build

    model = ROOT / "outputs/bench/model-200m"
    if not (model / "config.json").exists():
        build(model, TinySpec(hidden_size=1024, intermediate_size=4096, num_layers=12,
                              num_heads=16, num_kv_heads=16))  # fmt: skip
    rows = {}
    for nproc in (1, 2, 4):
        for mode in ("whole", "zero_init"):
            run_torchrun(model, out, "load", 1, 3, nproc=nproc, load_only=mode)
            ranks = [
                json.loads(p.read_text()) for p in (out / f"load_{mode}_{nproc}").glob("*.json")
            ]
            params = ranks[0]["params"]
            rows[f"{mode}_{nproc}"] = {
                "ranks": nproc, "load_peak_gib": max(r["peak"] for r in ranks) / 2**30,
                "ready_peak_gib": max(r["ready"] for r in ranks) / 2**30,
                "weights_share_gib": params * 4 / nproc / 2**30,
                "steady_share_gib": params * 16 / nproc / 2**30, "params": params,
            }  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", default="outputs/bench/train")
    parser.add_argument(
        "--only", choices=["throughput", "recovery", "memory", "load"], default=None
    )
    args = parser.parse_args()
    if os.environ.get("RAYLM_BENCH_WORKER"):
        torchrun_worker(args)
        return
    os.environ.setdefault(
        "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/raylm/torch_extensions")
    )
    out = (ROOT / args.out).resolve()
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True)
    model = build_model(ROOT / "outputs/bench/model-25m")
    from raylm.cluster import init_ray

    if args.only != "load":
        init_ray()
    results = {}
    if args.only in (None, "throughput"):
        results["throughput"] = bench_throughput(model, out, args.steps)
    if args.only in (None, "recovery"):
        results["recovery"] = bench_recovery(model, out, args.steps)
    if args.only in (None, "memory"):
        results["memory"] = bench_memory(model, out)
    if args.only in (None, "load"):
        results["load"] = bench_load(out)
    print(json.dumps(results, indent=2))
    (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
