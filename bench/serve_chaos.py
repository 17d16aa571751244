"""Chaos benchmark: many streams for a minute while one replica's vLLM engine is killed.

    .venv/bin/python bench/serve_chaos.py [--model DIR] [--clients 32] [--seconds 60]
                                          [--kill-at 15]

Issue 18 asks what a client sees when an engine dies under load, and how long the app
runs short of a replica. The e2e test (tests/e2e/test_serve_responses.py, ``chaos``)
checks the behaviour with 8 clients for a few seconds; this measures it at the issue's
size. On a private 2-CPU local Ray cluster, ``conf/serve/tiny.yaml`` with two replicas
(min = max = 2, so the autoscaler neither adds nor removes one) takes ``--clients``
streaming chat clients (raw SSE, as bench/serve.py reads streams) for ``--seconds``. At
``--kill-at`` seconds one replica's engine-core process (the actor's child process named
EngineCore) gets SIGKILL: what vLLM's OOM kill or a crashing kernel looks like to raylm.

Reported: streams in all, failed before their first token (the goal is none: raylm
re-sends those to the other replica, ``x-raylm-retried``), retried, ended mid-way with
the error event (then ``[DONE]``), cut (connection error, non-200, no ``[DONE]``),
seconds from the kill until the victim's actor process is gone and until two RUNNING
replicas again (the victim not among them), and output tokens/s in the 10 s before the
kill against the last 10 s of the load (back to full capacity or not). JSON to --out
and one Markdown row for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_common import APP, KEY, deploy_raylm, http_client, raylm_cluster, workdir, write_result

from raylm.serve import deploy


def replicas_now(dashboard: str) -> dict[str, int]:
    """RUNNING replicas of the app's one deployment: replica id -> actor PID."""
    app = deploy.details(dashboard)["applications"][APP]
    (deployment,) = app["deployments"].values()
    return {r["replica_id"]: r["pid"] for r in deployment["replicas"] if r["state"] == "RUNNING"}


def engine_core(replica_pid: int) -> psutil.Process:
    """The vLLM engine-core process of the replica actor ``replica_pid`` (a child)."""
    cores = [
        p
        for p in psutil.Process(replica_pid).children(recursive=True)
        if "EngineCore" in p.name() + " ".join(p.cmdline())
    ]
    if len(cores) != 1:
        raise RuntimeError(f"expected one engine core under {replica_pid}: {cores}")
    return cores[0]


async def stream_once(c: httpx.AsyncClient, max_tokens: int, ticks: list[float]) -> dict:
    """One streamed chat completion: its replica, whether raylm retried it, tokens seen
    (each token's time goes to ``ticks`` for the tokens/s windows) and how it ended:
    "done", "error_event" (the engine died mid-way), "status NNN" or "cut: ..."."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": "count"}],
            "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0, "stream": True}  # fmt: skip
    out: dict = {"tokens": 0, "end": None, "retried": False, "replica": None,
                 "start": time.monotonic(), "first": None}  # fmt: skip
    try:
        async with c.stream("POST", "/chat/completions", json=body) as r:
            out["retried"] = r.headers.get("x-raylm-retried") == "1"
            out["replica"] = r.headers.get("x-raylm-replica")
            if r.status_code != 200:
                out["end"] = f"status {r.status_code}"
                await r.aread()
            else:
                async for line in r.aiter_lines():
                    if line == "data: [DONE]":
                        out["end"] = out["end"] or "done"
                    elif line.startswith("data: "):
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            out["end"] = "error_event"
                        elif any(x["delta"].get("content") for x in chunk.get("choices", [])):
                            now = time.monotonic()
                            out["tokens"] += 1
                            out["first"] = out["first"] or now
                            ticks.append(now)
                if out["end"] is None or (out["end"] == "done" and not out["tokens"]):
                    out["end"] = f"cut: {out['end']}"
    except httpx.HTTPError as err:
        out["end"] = f"cut: {type(err).__name__}"
    out["stop"] = time.monotonic()
    return out


async def chaos(url: str, dashboard: str, args: argparse.Namespace) -> dict:
    """The load, the kill at ``--kill-at`` and the watch for the replacement."""
    for _ in range(120):  # the app is RUNNING; both replicas' states may lag a little
        before = await asyncio.to_thread(replicas_now, dashboard)
        if len(before) == 2:
            break
        await asyncio.sleep(1)
    if len(before) != 2:
        raise RuntimeError(f"expected 2 RUNNING replicas, got {before}")
    victim = next(iter(before))
    core = engine_core(before[victim])
    c = http_client(url, KEY)
    results: list[dict] = []
    ticks: list[float] = []
    start = time.monotonic()
    end = start + args.seconds

    async def client() -> None:
        while time.monotonic() < end:
            results.append(await stream_once(c, args.max_tokens, ticks))

    tasks = [asyncio.create_task(client()) for _ in range(args.clients)]
    await asyncio.sleep(args.kill_at)
    killed_at = time.monotonic()
    core.send_signal(signal.SIGKILL)
    print(f"killed engine core {core.pid} of replica {victim} at {killed_at - start:.1f} s",
          flush=True)  # fmt: skip
    gone_at = replaced_at = None
    while replaced_at is None and time.monotonic() - killed_at < args.replace_within:
        if gone_at is None and not psutil.pid_exists(before[victim]):
            gone_at = time.monotonic()
        if replaced_at is None:
            now = await asyncio.to_thread(replicas_now, dashboard)
            if len(now) == 2 and victim not in now:
                replaced_at = time.monotonic()
        await asyncio.sleep(0.2)
    if gone_at is None and not psutil.pid_exists(before[victim]):
        gone_at = time.monotonic()
    await asyncio.gather(*tasks)
    stopped = time.monotonic()
    await c.aclose()

    def rate(lo: float, hi: float) -> float:
        return sum(lo <= t < hi for t in ticks) / (hi - lo)

    ends: dict[str, int] = {}
    for r in results:
        ends[r["end"]] = ends.get(r["end"], 0) + 1
    failed_before_first = [r for r in results if r["end"] != "done" and not r["tokens"]]
    in_flight = [r for r in results if r["start"] < killed_at < r["stop"]]
    return {
        "streams": len(results),
        "ends": ends,
        "failed_before_first_token": len(failed_before_first),
        "retried": sum(r["retried"] for r in results),
        "error_event_mid_way": sum(r["end"] == "error_event" and r["tokens"] > 0 for r in results),
        "cut": sum(r["end"].startswith(("cut", "status")) for r in results),
        "in_flight_at_kill": len(in_flight),
        "in_flight_on_victim": sum(r["replica"] == victim for r in in_flight),
        "victim_gone_s": round(gone_at - killed_at, 1) if gone_at else None,
        "two_running_s": round(replaced_at - killed_at, 1) if replaced_at else None,
        "kill_at_s": round(killed_at - start, 1),
        "watched_s": round(stopped - start, 1),  # load end, or the replacement if later
        "tok_s_before_kill": round(rate(max(start, killed_at - 10), killed_at), 1),
        "tok_s_last_10s": round(rate(end - 10, end), 1),
        "replaced_before_load_end": bool(replaced_at and replaced_at < end - 10),
        "failed_examples": [  # times from the kill, as in the e2e test's printout
            {
                **r,
                **{k: round(r[k] - killed_at, 2) for k in ("start", "stop")},
                "first": None,
            }
            for r in failed_before_first[:5]
        ],
    }


def row(r: dict, clients: int, load: str) -> str:
    """One row of docs/benchmarks.md's chaos table (its columns, then the bench's own)."""
    gone = f"{r['victim_gone_s']} s" if r["victim_gone_s"] is not None else "not seen"
    full = f"{r['two_running_s']} s" if r["two_running_s"] is not None else "not replaced"
    return (
        f"| {r['streams']} ({clients} clients, bench/serve_chaos.py{load}) | "
        f"{r['failed_before_first_token']} | {r['retried']} | {r['error_event_mid_way']} | "
        f"{r['cut']} | {gone} | {full} | {r['tok_s_before_kill']:.0f} -> "
        f"{r['tok_s_last_10s']:.0f} |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="HF model dir (default: build the tiny model)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--kill-at", type=float, default=15)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--replace-within", type=float, default=300, help="give up on the replacement after"
    )
    parser.add_argument("--out", default="outputs/bench/serve_chaos.json")
    args = parser.parse_args()
    if not 10 <= args.kill_at < args.seconds:
        parser.error("--kill-at must leave 10 s of load before it and some after")
    work, model = workdir("chaos", args.model)
    load1 = os.getloadavg()[0]
    with raylm_cluster(work / "home") as (env, dashboard):
        os.environ.update(env)
        t0 = time.monotonic()
        url = deploy_raylm(model, env, work, "engine.dtype=float32",
                           "autoscaling.min_replicas=2", "autoscaling.max_replicas=2")  # fmt: skip
        print(f"2 replicas RUNNING in {time.monotonic() - t0:.0f} s at {url}", flush=True)
        result = asyncio.run(chaos(url, dashboard, args))
    result["load_avg_1m"] = [round(load1, 1), round(os.getloadavg()[0], 1)]
    result["args"] = vars(args)
    print(json.dumps({k: v for k, v in result.items() if k != "failed_examples"}, indent=2))
    print(row(result, args.clients, f", {args.seconds:.0f} s, kill at {args.kill_at:.0f} s"))
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
