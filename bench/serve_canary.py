"""Canary benchmark: the version router's split, how fast promote/rollback act, its cost.

    .venv/bin/python bench/serve_canary.py [--model DIR] [--requests 1000] [--rounds 2]

On a private 2-CPU local Ray cluster, with the tiny model (the same weights in both
versions, so the engines do the same work):

1. **Cost of the router.** The one-version app (``conf/serve/tiny.yaml``, the replica is
   the HTTP ingress) and then the two-version app with all traffic on v1 (``{v1: 100,
   v2: 0}``: one engine busy, as in the first) take the same streaming load at 1 and 8
   clients (bench/serve.py's load generator): output tokens/s and TTFT, and their ratio.
2. **Split.** ``promote v2 5`` (through ``raylm.serve.deploy.change_traffic``, what the
   CLI calls), then ``--requests`` sequential 1-token requests: the share each version got,
   read from ``x-raylm-version``, against 95/5.
3. **Time to take effect.** One client sends 1-token requests back to back while
   ``promote v2`` (100 %) and then ``rollback`` run: seconds from the call's start, and
   from its return, to the first answer from the new split (every version's answer is
   logged with its send time). The CLI adds its interpreter start (a few seconds) before
   the same call.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import ROOT, deploy_raylm, run_level

from raylm.cluster import LocalCluster
from raylm.serve import deploy, versions
from raylm.serve.cluster_env import cluster_env

APP = "raylm-bench"
KEY = "sk-bench"


def load(url: str, rounds: int, max_tokens: int) -> dict[int, dict]:
    """Output tok/s and TTFT p50 at 1 and 8 streaming clients (median over rounds)."""
    out = {}
    asyncio.run(run_level(url, KEY, "tiny", 4, 1, max_tokens))  # warm-up
    for clients in (1, 8):
        rows = [asyncio.run(run_level(url, KEY, "tiny", clients, max(4, 32 // clients),
                                      max_tokens)) for _ in range(rounds)]  # fmt: skip
        rows.sort(key=lambda r: r["output_tok_s"])
        mid = rows[len(rows) // 2]
        out[clients] = {k: round(mid[k], 1) for k in ("output_tok_s", "ttft_p50_ms", "failed")}
        print(f"  {clients} clients: {out[clients]}", flush=True)
    return out


def one(h: httpx.Client, url: str) -> str:
    r = h.post(f"{url}/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 1})
    r.raise_for_status()
    return r.headers["x-raylm-version"]


def split(url: str, n: int) -> dict[str, int]:
    with httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as h:
        picks = [one(h, url) for _ in range(n)]
    return {v: picks.count(v) for v in sorted(set(picks))}


def time_to_effect(url: str, change, new: str, only: bool, dashboard: str) -> dict[str, float]:
    """Seconds from ``change``'s start and return to the first answer of the new split:
    the first from ``new`` sent after the change began, and with ``only`` (everything to
    ``new``), the first after which no other version answered (3 s of requests later)."""
    seen: list[tuple[float, str]] = []
    stop = threading.Event()

    def loop() -> None:
        with httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as h:
            while not stop.is_set():
                sent = time.monotonic()
                seen.append((sent, one(h, url)))

    t = threading.Thread(target=loop)
    t.start()
    time.sleep(1.0)
    began = time.monotonic()
    deploy.change_traffic(APP, change, dashboard)
    returned = time.monotonic()
    time.sleep(3.0 if only else 0.0)
    while time.monotonic() < returned + 30 and not any(s >= began and v == new for s, v in seen):
        time.sleep(0.02)
    stop.set()
    t.join()
    last_other = max([s for s, v in seen if v != new] if only else [began], default=began)
    first = min(s for s, v in seen if s >= max(began, last_other) and v == new)
    return {"call_s": round(returned - began, 3), "from_start_s": round(first - began, 3),
            "from_return_s": round(first - returned, 3)}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="HF model dir (default: build the tiny model)")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", default="outputs/bench/serve_canary.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="raylm-bench-canary-"))
    model = args.model
    if not model:
        from raylm.models.tiny import build

        model = str(build(work / "tiny"))
    cluster = LocalCluster(work / "home" / "cluster")
    info = cluster.up(num_cpus=2, env=cluster_env)
    env = os.environ | {"RAYLM_HOME": str(work / "home"), "RAY_ADDRESS": info.gcs_address}
    os.environ.update(env)
    result: dict = {"args": vars(args)}
    try:
        print("one-version app (no router):", flush=True)
        url = deploy_raylm(model, env, work, "engine.dtype=float32")
        result["one_version"] = load(url, args.rounds, args.max_tokens)
        deploy.down(APP, info.dashboard_url)
        print("two-version app, all traffic on v1 (router in front):", flush=True)
        url = deploy_raylm(model, env, work, "engine.dtype=float32",
                           f"versions={{v2: {model}}}", "traffic={v1: 100}")  # fmt: skip
        result["routed"] = load(url, args.rounds, args.max_tokens)
        deploy.change_traffic(APP, partial(versions.promote, version="v2", percent=5),
                              info.dashboard_url)  # fmt: skip
        time.sleep(2)
        result["split_95_5"] = split(url, args.requests)
        print(f"split over {args.requests} requests: {result['split_95_5']}", flush=True)
        to_v2 = partial(versions.promote, version="v2", percent=100)
        result["promote"] = time_to_effect(url, to_v2, "v2", True, info.dashboard_url)
        back = versions.rollback
        result["rollback"] = time_to_effect(url, back, "v1", False, info.dashboard_url)
        print(f"promote: {result['promote']}, rollback: {result['rollback']}", flush=True)
    finally:
        try:
            deploy.down(APP, info.dashboard_url)
        finally:
            cluster.down()
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "args"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
