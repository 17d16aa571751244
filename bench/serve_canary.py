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
import threading
import time
from functools import partial
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import run_level
from serve_common import APP, KEY, deploy_raylm, raylm_cluster, workdir, write_result

from raylm.serve import deploy, versions


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
    work, model = workdir("canary", args.model)
    result: dict = {"args": vars(args)}
    with raylm_cluster(work / "home") as (env, dashboard):
        os.environ.update(env)
        print("one-version app (no router):", flush=True)
        url = deploy_raylm(model, env, work, "engine.dtype=float32")
        result["one_version"] = load(url, args.rounds, args.max_tokens)
        deploy.down(APP, dashboard)
        print("two-version app, all traffic on v1 (router in front):", flush=True)
        url = deploy_raylm(model, env, work, "engine.dtype=float32",
                           f"versions={{v2: {model}}}", "traffic={v1: 100}")  # fmt: skip
        result["routed"] = load(url, args.rounds, args.max_tokens)
        deploy.change_traffic(APP, partial(versions.promote, version="v2", percent=5),
                              dashboard)  # fmt: skip
        time.sleep(2)
        result["split_95_5"] = split(url, args.requests)
        print(f"split over {args.requests} requests: {result['split_95_5']}", flush=True)
        to_v2 = partial(versions.promote, version="v2", percent=100)
        result["promote"] = time_to_effect(url, to_v2, "v2", True, dashboard)
        back = versions.rollback
        result["rollback"] = time_to_effect(url, back, "v1", False, dashboard)
        print(f"promote: {result['promote']}, rollback: {result['rollback']}", flush=True)
    print(json.dumps({k: v for k, v in result.items() if k != "args"}, indent=2))
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
