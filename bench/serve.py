"""Serving benchmark: raylm's Ray Serve app vs vLLM's own OpenAI server, same tiny model.

    .venv/bin/python bench/serve.py [--model DIR] [--rounds 3] [--min-requests 48]

Each system has the machine to itself, in three phases: vLLM's own server
(``python -m vllm.entrypoints.openai.api_server``), then raylm's app (``jobs/serve.py``) on
a private 2-CPU local Ray cluster, then vLLM's server again. This machine's speed drifts by
10-20 % over minutes; measuring the peer before and after raylm brackets that drift (both
phases are printed, and the vLLM rows pool them). Per phase, ``--rounds`` passes over 1, 8
and 32 concurrent streaming clients (loopback), at least ``--min-requests`` requests per
level and pass. Per system and level: output tokens/s (median over passes, with the
range), time to first token p50/p99 and mean inter-token latency (over all requests).
raylm alone then gets autoscaling (time from load arriving to a 2nd replica RUNNING, and
from load ending to scale-down) and a bounded load test (fixed request count, capped
duration) that must end with zero failures. Prints a Markdown table with raylm/vLLM
ratios; results also go to --out as JSON.

Engine for engine: raylm runs a one-device CPU engine in vLLM's engine-core process
(``engine.single_process``), while vLLM's CPU default adds a busy-polling worker process.
So vLLM's server gets ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, which gives it the same two
processes (API server + engine core with the model), and the ratios measure the serving
layer. ``--vllm-env VLLM_ENABLE_V1_MULTIPROCESSING=1 --set engine.single_process=false``
compares both with vLLM's CPU default instead.

raylm runs as ``conf/serve/tiny.yaml`` configures it: vLLM's app in the model replica
behind raylm's checks, API keys and Ray's engine metrics on. ``--set
log_engine_metrics=false`` measures the cost of Ray's engine metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import httpx
from serve_common import (
    APP,
    EXTRA,
    KEY,
    VLLM_ENV,
    deploy_raylm,
    http_client,
    pct,
    raylm_cluster,
    vllm_server,
    workdir,
    write_result,
)

from raylm.serve import deploy


async def one_request(c: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> dict:
    """One streamed completion, read as raw SSE lines + ``json.loads``.

    That is how vLLM's own serving benchmark reads streams. The load generator shares
    the 2 cores with the server, and the openai client's per-chunk parsing made it slow
    to notice first tokens: at 32 clients, client TTFT minus vLLM's own TTFT metric was
    150-170 ms for bare vLLM. Tests use the real openai client; the benchmark measures
    servers.
    """
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    start = time.perf_counter()
    first = None
    tokens = 0
    async with c.stream("POST", "/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']}")
            choices = chunk.get("choices")
            if first is None and choices and choices[0].get("text"):
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    ttft = (first or end) - start
    itl = (end - (first or end)) / max(tokens - 1, 1)
    return {"ttft": ttft, "itl": itl, "tokens": tokens}


async def run_level(
    url: str, key: str, model: str, clients: int, per_client: int, max_tokens: int
) -> dict:
    c = http_client(url, key)
    results: list[dict] = []
    failures: list[str] = []

    async def client(i: int) -> None:
        for j in range(per_client):
            try:
                results.append(await one_request(c, model, f"Client {i} request {j}:", max_tokens))
            except Exception as err:
                failures.append(repr(err)[:200])

    start = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    wall = time.perf_counter() - start
    await c.aclose()
    toks = sum(r["tokens"] for r in results)
    return {
        "clients": clients,
        "requests": len(results),
        "failed": len(failures),
        "output_tok_s": toks / wall,
        "ttft_p50_ms": 1000 * pct([r["ttft"] for r in results], 0.5),
        "ttft_p99_ms": 1000 * pct([r["ttft"] for r in results], 0.99),
        "itl_mean_ms": 1000 * statistics.fmean(r["itl"] for r in results) if results else 0,
        "wall_s": wall,
        "samples": results,
    }


LEVELS = (1, 8, 32)


def measure(system: dict, args: argparse.Namespace, tag: str) -> dict[int, list[dict]]:
    """``args.rounds`` passes over the levels; one row per level and round."""
    url, key = system["url"], system["key"]
    # Warm-up at full length: the first requests of a new size pay one-off costs.
    asyncio.run(run_level(url, key, "tiny", 4, 1, args.max_tokens))
    rows: dict[int, list[dict]] = {c: [] for c in LEVELS}
    for rnd in range(args.rounds):
        for clients in LEVELS:
            per_client = max(args.requests_per_client, -(-args.min_requests // clients))
            row = asyncio.run(run_level(url, key, "tiny", clients, per_client, args.max_tokens))
            brief = {k: round(v, 1) for k, v in row.items() if k != "samples"}
            print(f"  {tag} round {rnd}: {json.dumps(brief)}", flush=True)
            rows[clients].append(row)
    return rows


def summarize(rows: list[dict]) -> dict:
    samples = [x for r in rows for x in r["samples"]]
    tok_s = [r["output_tok_s"] for r in rows]
    return {
        "clients": rows[0]["clients"],
        "rounds": len(rows),
        "requests": len(samples),
        "failed": sum(r["failed"] for r in rows),
        "output_tok_s": statistics.median(tok_s),
        "output_tok_s_range": [min(tok_s), max(tok_s)],
        "ttft_p50_ms": 1000 * pct([x["ttft"] for x in samples], 0.5),
        "ttft_p99_ms": 1000 * pct([x["ttft"] for x in samples], 0.99),
        "itl_mean_ms": 1000 * statistics.fmean(x["itl"] for x in samples),
    }


def run(model_dir: str, args: argparse.Namespace, work: Path) -> dict:
    """vLLM alone, then raylm alone, then vLLM again: drift shows as before != after."""
    with vllm_server(model_dir, work) as vllm:
        before = measure(vllm, args, "vLLM (before)")
    raylm = measure_raylm(model_dir, args, work)
    with vllm_server(model_dir, work) as vllm:
        after = measure(vllm, args, "vLLM (after)")
    drift = {
        c: [statistics.median(r["output_tok_s"] for r in phase[c]) for phase in (before, after)]
        for c in LEVELS
    }
    print(f"vLLM tok/s before vs after raylm, per level: {json.dumps(drift)}", flush=True)
    vllm_rows = [summarize(before[c] + after[c]) for c in LEVELS]
    return {"vllm": vllm_rows, "vllm_before_after_tok_s": drift, "raylm": raylm}


def measure_raylm(model_dir: str, args: argparse.Namespace, work: Path) -> dict:
    with raylm_cluster(work / "raylm_home") as (env, dashboard):
        t0 = time.monotonic()
        url = deploy_raylm(model_dir, env, work, "autoscaling.max_replicas=1")
        print(f"raylm app RUNNING in {time.monotonic() - t0:.0f}s at {url}", flush=True)
        rows = measure({"url": url, "key": KEY}, args, "raylm")
        out: dict = {"levels": [summarize(rows[c]) for c in LEVELS]}
        if args.skip_scaling:
            return out
        out["autoscaling"] = autoscale(model_dir, env, work, dashboard)
        bounded = asyncio.run(
            bounded_load(url, requests=args.bounded_requests, clients=16, max_seconds=180)
        )
        print(f"  bounded load: {json.dumps(bounded)}", flush=True)
        out["bounded_load"] = bounded
        return out


def autoscale(model_dir: str, env: dict, work: Path, dashboard: str) -> dict:
    """Lightweight update to min 1 / max 2, then load until 2 replicas, then idle until 1."""
    url = deploy_raylm(
        model_dir,
        env,
        work,
        "autoscaling.max_replicas=2",
        "autoscaling.target_ongoing_requests=2",
        "autoscaling.upscale_delay_s=1",
        "autoscaling.downscale_delay_s=5",
    )
    result = asyncio.run(load_until(url, dashboard, clients=16, target=2, max_seconds=300))
    t0 = time.monotonic()
    down_s = None
    while time.monotonic() - t0 < 180:
        if deploy.replica_count(APP, "tiny", dashboard) <= 1:
            down_s = time.monotonic() - t0
            break
        time.sleep(1)
    result["scale_down_s"] = down_s
    print(f"  autoscaling: {json.dumps(result)}", flush=True)
    return result


async def load_until(
    url: str, dashboard: str, clients: int, target: int, max_seconds: float
) -> dict:
    c = http_client(url, KEY)
    stop = asyncio.Event()
    stats = {"ok": 0, "failed": 0}

    async def client(i: int) -> None:
        while not stop.is_set():
            try:
                await one_request(c, "tiny", f"Load {i}", 48)
                stats["ok"] += 1
            except Exception:
                stats["failed"] += 1

    start = time.monotonic()
    tasks = [asyncio.create_task(client(i)) for i in range(clients)]
    up_s = None
    while time.monotonic() - start < max_seconds:
        await asyncio.sleep(1)
        n = await asyncio.to_thread(deploy.replica_count, APP, "tiny", dashboard)
        if n >= target:
            up_s = time.monotonic() - start
            break
    stop.set()
    await asyncio.gather(*tasks)
    await c.aclose()
    return {**stats, "scale_up_s": up_s, "clients": clients}


async def bounded_load(url: str, requests: int, clients: int, max_seconds: float) -> dict:
    """Exactly ``requests`` requests from ``clients`` workers, abandoned after max_seconds."""
    c = http_client(url, KEY)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    stats = {"requests": requests, "ok": 0, "failed": 0}

    async def worker() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            try:
                r = await one_request(c, "tiny", f"Bounded {i}", 32)
                stats["ok"] += r["tokens"] == 32
                stats["failed"] += r["tokens"] != 32
            except Exception:
                stats["failed"] += 1

    start = time.monotonic()
    try:
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(clients))), max_seconds)
    except TimeoutError:
        stats["timed_out"] = True
    stats["wall_s"] = round(time.monotonic() - start, 1)
    stats["not_run"] = requests - stats["ok"] - stats["failed"]
    await c.aclose()
    return stats


def table(vllm: list[dict], raylm: dict) -> str:
    head = (
        "| clients | engine | output tok/s (range) | TTFT p50 ms | TTFT p99 ms | ITL mean ms |"
        " tok/s ratio | TTFT p50 overhead ms |\n|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for v, r in zip(vllm, raylm["levels"], strict=True):
        for name, row in (("vLLM server", v), ("raylm app", r)):
            lo, hi = row["output_tok_s_range"]
            extra = ""
            if name == "raylm app":
                ratio = r["output_tok_s"] / v["output_tok_s"]
                extra = f" {ratio:.2f}x | {r['ttft_p50_ms'] - v['ttft_p50_ms']:+.0f} |"
            else:
                extra = " | |"
            lines.append(
                f"| {row['clients']} | {name} | {row['output_tok_s']:.0f} ({lo:.0f}-{hi:.0f}) | "
                f"{row['ttft_p50_ms']:.0f} | {row['ttft_p99_ms']:.0f} | {row['itl_mean_ms']:.1f} |"
                + extra
            )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="HF model dir (default: build the tiny model)")
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--min-requests", type=int, default=48, help="per level and round (1 client: sequential)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="turns per system and level")
    parser.add_argument("--bounded-requests", type=int, default=200)
    parser.add_argument("--out", default="outputs/bench/serve.json")
    parser.add_argument(
        "--skip-scaling", action="store_true", help="only the 1/8/32-client comparison"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="serve config override for raylm, e.g. log_engine_metrics=false",
    )
    parser.add_argument(
        "--vllm-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment for vLLM's server, e.g. VLLM_ENABLE_V1_MULTIPROCESSING=0",
    )
    args = parser.parse_args()
    EXTRA.extend(args.set)
    VLLM_ENV.update(kv.split("=", 1) for kv in args.vllm_env)
    work, model_dir = workdir("serve", args.model)
    result = run(model_dir, args, work)
    print(table(result["vllm"], result["raylm"]))
    write_result(args.out, {**result, "args": vars(args)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
