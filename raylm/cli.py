"""The ``raylm`` command: run a job here, submit it as a Ray job, manage the local cluster.

``raylm JOB CONFIG [key=value ...]`` and ``raylm submit JOB CONFIG ...`` run the same
``jobs/JOB.py`` entrypoint: the first as a child process of this shell (joined to the
current cluster), the second through Ray's job API, so it appears in the dashboard and
survives this terminal.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

from raylm import config
from raylm.cluster import (
    ClusterError,
    LocalCluster,
    client_env,
    resolve_address,
    resolve_dashboard,
)
from raylm.config import ConfigError
from raylm.runner import split_argv
from raylm.submit import default_python, inside_project, project_root, submit, wait


def job_script(job: str) -> Path:
    script = project_root() / "jobs" / f"{job}.py"
    if not script.exists():
        raise ConfigError(f"no entrypoint for job {job!r} at {script}")
    return script


def run_local(job: str, argv: list[str], address: str | None) -> int:
    """Validate, then run the entrypoint in a child process joined to the cluster."""
    config.load(job, *split_argv(argv))
    env = dict(os.environ)
    target = resolve_address(address)
    if target:
        env["RAY_ADDRESS"] = target
    return subprocess.call([sys.executable, str(job_script(job)), *argv], env=env)


def submit_command(job: str, argv: list[str], args: argparse.Namespace) -> int:
    """``raylm submit JOB ...``: validate here, submit, tail its logs unless --no-wait."""
    from ray.job_submission import JobSubmissionClient

    files, overrides = split_argv(argv)
    config.load(job, files, overrides)  # fail here, not minutes later on the cluster
    dashboard = resolve_dashboard(args.address)
    local = _is_local(dashboard)
    client = JobSubmissionClient(dashboard)
    sid = submit(
        client,
        job,
        [*(inside_project(f) for f in files), *overrides],
        python=args.python or default_python(local),
        local=local,
        submission_id=args.submission_id,
    )
    print(f"submitted {job} job {sid} to {dashboard}", flush=True)
    return 0 if args.no_wait else _follow(client, sid)


def _is_local(dashboard: str) -> bool:
    info = LocalCluster().info()
    return (info is not None and info.dashboard_url == dashboard) or "127.0.0.1" in dashboard


def _follow(client: Any, sid: str) -> int:
    status = wait(client, sid, show=lambda text: print(text, end="", flush=True))
    print(f"job {sid}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def jobs_command(args: argparse.Namespace) -> int:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(resolve_dashboard(args.address))
    if args.action == "list":
        rows = sorted(client.list_jobs(), key=lambda j: j.start_time or 0)
        print(f"{'SUBMISSION ID':<28} {'STATUS':<10} {'JOB':<9} ENTRYPOINT")
        for j in rows:
            job = (j.metadata or {}).get("raylm_job", "-")
            print(f"{j.submission_id or '-':<28} {j.status.value:<10} {job:<9} {j.entrypoint[:80]}")
        return 0
    if not args.id:
        raise ConfigError(f"raylm jobs {args.action} needs a submission id")
    if args.action == "status":
        info = client.get_job_info(args.id)
        print(json.dumps({"status": info.status.value, "message": info.message}, indent=2))
    elif args.action == "logs":
        if args.follow:
            return _follow(client, args.id)
        print(client.get_job_logs(args.id), end="")
    elif args.action == "stop":
        print("stop requested" if client.stop_job(args.id) else "job already finished")
    return 0


def _positive_gb(value: str) -> float:
    """An argparse type: Ray would take 0 or a negative size and fail later, less clearly."""
    try:
        gb = float(value)
    except ValueError:
        gb = 0.0
    if not gb > 0:
        raise argparse.ArgumentTypeError(f"expected a size in GB above 0, got {value!r}")
    return gb


def cluster_command(args: argparse.Namespace) -> int:
    cluster = LocalCluster()
    if args.action == "up":
        from raylm.serve.cluster_env import cluster_env  # the cluster `raylm serve` uses

        info = cluster.up(
            num_cpus=args.num_cpus, env=cluster_env, object_store_gb=args.object_store_gb
        )
        for _ in range(args.worker_nodes - len(info.nodes)):
            node = cluster.add_node(num_cpus=args.cpus_per_node)
            print(f"  worker node {node.name} ({node.num_cpus} CPU) joined")
        exports = " ".join(f"{k}={v}" for k, v in client_env(info).items())
        print(
            f"local Ray cluster up\n  dashboard: {info.dashboard_url}\n"
            f"  for Ray's own CLI (ray job submit, ray status): export {exports}"
        )
    elif args.action == "down":
        print("local Ray cluster stopped" if cluster.down() else "no local Ray cluster running")
    else:
        status = cluster.status()
        print(json.dumps(status, indent=2) if status else "no local Ray cluster running")
        return 0 if status else 1
    return 0


SERVE_ACTIONS = ("status", "down", "promote", "rollback")
"""``raylm serve ACTION ...`` verbs that manage running apps rather than deploy one."""


def serve_command(args: argparse.Namespace) -> int:
    """``raylm serve status|down|promote|rollback ...``: the apps, not a new deployment."""
    from raylm.serve import deploy

    action, names = args.rest[0], args.rest[1:]
    if action == "status":
        print(json.dumps(deploy.status(args.address), indent=2))
        return 0
    if action in ("promote", "rollback"):
        return traffic_command(action, names, args.address)
    if len(names) != 1:
        raise ConfigError("usage: raylm serve down APP_NAME")
    removed = deploy.down(names[0], args.address)
    print(f"app {names[0]} deleted" if removed else f"no app named {names[0]}")
    return 0 if removed else 1


def traffic_command(action: str, names: list[str], address: str | None) -> int:
    """``raylm serve promote APP VERSION [PERCENT]`` / ``raylm serve rollback APP``."""
    from raylm.serve import deploy, versions

    if action == "rollback" and len(names) == 1:
        new = deploy.change_traffic(names[0], versions.rollback, address)
    elif action == "promote" and len(names) in (2, 3):
        percent = float(names[2]) if len(names) == 3 else 100.0
        change = partial(versions.promote, version=names[1], percent=percent)
        new = deploy.change_traffic(names[0], change, address)
    else:
        raise ConfigError(
            "usage: raylm serve promote APP VERSION [PERCENT] | raylm serve rollback APP"
        )
    print(json.dumps({"app": names[0], "traffic": new["weights"]}))
    return 0


def config_command(args: argparse.Namespace) -> int:
    if args.action == "keys":
        for key, typed_default, doc in config.describe(config.config_class(args.job)):
            print(f"{key}: {typed_default}\n    {doc}")
        return 0
    files, overrides = split_argv(args.rest)
    print(config.to_yaml(config.load(args.job, files, overrides)), end="")
    return 0


def llama_pro_command(args: argparse.Namespace) -> int:
    """``raylm llama-pro MODEL OUT --num-expand N``: the expanded model, and how to train it."""
    from raylm.config import local_model
    from raylm.train.llama_pro import expand

    out = expand(local_model(args.model_dir), args.out_dir, args.num_expand, args.shard_mb)
    print(
        f"{out}: {args.num_expand} blocks inserted. Train them with finetuning_type=freeze "
        f"freeze.trainable_layers={args.num_expand} freeze.llama_pro=true (LLaMA-Factory: "
        f"freeze_trainable_layers: {args.num_expand}, use_llama_pro: true)"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raylm", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for job in config.job_names():
        extra = (
            " (or: serve status | down APP | promote APP VERSION [PERCENT] | rollback APP)"
            if job == "serve"
            else ""
        )
        p = sub.add_parser(job, help=f"run the {job} job on the current cluster{extra}")
        p.add_argument("rest", nargs="*", metavar="CONFIG.yaml | key=value")
        p.add_argument("--address", help="Ray cluster (default: RAY_ADDRESS or the local one)")
    p = sub.add_parser("submit", help="submit a job through Ray's job API")
    p.add_argument("job", choices=config.job_names())
    p.add_argument("rest", nargs="*", metavar="CONFIG.yaml | key=value")
    p.add_argument("--address", help="dashboard URL, e.g. http://head:8265")
    p.add_argument("--submission-id", help="job id (default: generated by Ray)")
    p.add_argument("--python", help="interpreter on the cluster (default: this one if local)")
    p.add_argument("--no-wait", action="store_true", help="return after submitting")
    p = sub.add_parser("jobs", help="list, inspect and stop submitted jobs")
    p.add_argument("action", choices=["list", "status", "logs", "stop"])
    p.add_argument("id", nargs="?", help="submission id")
    p.add_argument("--follow", action="store_true", help="logs: stream until the job ends")
    p.add_argument("--address", help="dashboard URL")
    p = sub.add_parser("cluster", help="the embedded local Ray cluster")
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--num-cpus", type=int, help="CPUs the head advertises (default: all)")
    p.add_argument(
        "--worker-nodes", type=int, default=0,
        help="also start this many worker nodes on this machine (multi-node behaviour: "
        "spreading, losing a node)",
    )  # fmt: skip
    p.add_argument("--cpus-per-node", type=int, default=1, help="CPUs per worker node")
    p.add_argument(
        "--object-store-gb", type=_positive_gb,
        help="cap the head's object store (default: 30%% of memory); objects beyond it "
        "spill to disk, which bounds a data job's memory",
    )  # fmt: skip
    p = sub.add_parser("config", help="print a resolved config, or every key of a job")
    p.add_argument("action", choices=["show", "keys"])
    p.add_argument("job", choices=config.job_names())
    p.add_argument("rest", nargs="*", metavar="CONFIG.yaml | key=value")
    p = sub.add_parser("chat", help="chat with a served model (LLaMA-Factory's chat verb)")
    p.add_argument("--url", default="http://127.0.0.1:8000/v1", help="the app's OpenAI URL")
    p.add_argument("--model", help="model id, e.g. raylm:ADAPTER (default: the first listed)")
    p.add_argument("--api-key-env", default="RAYLM_API_KEY", help="env var with the key")
    p.add_argument("--system", help="a system prompt for the conversation")
    p.add_argument("--temperature", type=float, help="sampling temperature")
    p.add_argument("--max-tokens", type=int, help="completion length cap")
    p = sub.add_parser("lineage", help="show what a pipeline run's served model came from")
    p.add_argument("run_dir", help="a pipeline run directory (workspace/name)")
    p = sub.add_parser("tiny-model", help="build the tiny offline Llama model")
    p.add_argument("out_dir")
    p = sub.add_parser(
        "llama-pro",
        help="insert identity blocks for LLaMA Pro (LLaMA-Factory's scripts/llama_pro.py); "
        "train them with finetuning_type freeze, freeze.llama_pro=true",
    )
    p.add_argument("model_dir", help="a local Hugging Face model dir (safetensors)")
    p.add_argument("out_dir")
    p.add_argument("--num-expand", type=int, required=True, help="blocks to insert")
    p.add_argument("--shard-mb", type=int, default=2000, help="largest output file, MiB")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except (ConfigError, ClusterError) as err:
        kind = "config error" if isinstance(err, ConfigError) else "cluster error"
        print(f"raylm: {kind}: {err}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "submit":
        return submit_command(args.job, args.rest, args)
    if args.command == "jobs":
        return jobs_command(args)
    if args.command == "cluster":
        return cluster_command(args)
    if args.command == "config":
        return config_command(args)
    if args.command == "chat":
        from raylm.serve.chat import main as chat

        given = {"temperature": args.temperature, "max_tokens": args.max_tokens}
        sampling = {k: v for k, v in given.items() if v is not None}
        return chat(args.url, args.model, args.api_key_env, args.system, sampling)
    if args.command == "lineage":
        from raylm.pipeline.lineage import describe

        print(describe(args.run_dir))
        return 0
    if args.command == "serve" and args.rest[:1] and args.rest[0] in SERVE_ACTIONS:
        return serve_command(args)
    if args.command == "tiny-model":
        from raylm.models.tiny import build

        print(build(args.out_dir))
        return 0
    if args.command == "llama-pro":
        return llama_pro_command(args)
    return run_local(args.command, args.rest, args.address)


if __name__ == "__main__":
    sys.exit(main())
