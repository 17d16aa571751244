"""Responses API benchmark: raylm with sessions on and off against bare vLLM's server.

    .venv/bin/python bench/serve_sessions.py [--model DIR] [--rounds 2] [--min-requests 32]

Issue 18 asks what keeping conversations on the server costs: throughput and time to
first token at 1, 8 and 32 streaming clients against bare vLLM in the same run, with
sessions on and off (goal: within 5 %). Three ways to hold the same conversation, each
request ``POST /v1/responses`` with ``stream: true``, ``max_output_tokens`` 32,
temperature 0 (streams read as raw SSE, as bench/serve.py reads them):

- **vLLM stateless**: vLLM's own OpenAI server (bench/serve.py's ``vllm_server``, the
  same engine processes as raylm's replica); each request carries a 3-turn history as
  ``input`` items plus a new user message, ``store: false``.
- **raylm stateless**: the same bodies to raylm's app (``conf/serve/tiny.yaml``, one
  replica, SQLite session store in the run's temp dir) on a private 2-CPU Ray cluster.
- **raylm sessions**: each client first stores a conversation with the same history once;
  every request then sends only the new user message with ``previous_response_id`` of
  that first stored response (not the latest, so the history stays 3 turns long), and is
  stored itself (``store`` defaults to true): a store read and a write per request.

The history is made by raylm itself: one stored turn on the first 2.5 turns, whose
stored input items plus output become the stateless history, so all three send the
engine the same tokens (temperature 0: every client's stored turn says the same). raylm
runs first, then vLLM's server with the machine to itself (each phase alone, as in
bench/serve.py; this machine drifts 10-20 % over minutes, so the two raylm modes
alternate within each round and their ratio is the steadier figure). A single request
first checks that vLLM's server answers ``/v1/responses`` streaming; if not, only raylm's
two modes are compared. Per mode and level: output tokens/s (median over ``--rounds``)
and TTFT p50; ratios against vLLM and sessions/stateless. JSON to --out, Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_common import (
    KEY,
    deploy_raylm,
    http_client,
    pct,
    raylm_cluster,
    vllm_server,
    workdir,
    write_result,
)

LEVELS = (1, 8, 32)
TURN = {"model": "tiny", "max_output_tokens": 32, "temperature": 0, "stream": True}
OPENING = [
    {"role": "user", "content": "Hello, I am planning a trip to the mountains."},
    {"role": "assistant", "content": "Nice. Which season, and how many days?"},
    {"role": "user", "content": "Late autumn, five days, and I like long walks."},
    {"role": "assistant", "content": "Then pack layers; days are short and cold."},
    {"role": "user", "content": "What should I see on the first day?"},
]
"""Two and a half turns; the model's stored answer to the last message makes the third."""

Body = Callable[[int, int], dict]
"""Client i's request j."""


def new_message(i: int, j: int) -> str:
    return f"Client {i} request {j}: and on the next day?"


async def one_request(c: httpx.AsyncClient, body: dict) -> dict:
    """One streamed Responses request: TTFT (first non-empty text delta), output tokens
    (the final event's usage) and the response id. Raises on an error event."""
    start = time.perf_counter()
    first = None
    final: dict = {}
    async with c.stream("POST", "/responses", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            kind = event.get("type", "")
            if kind in ("error", "response.failed"):
                raise RuntimeError(f"stream error: {json.dumps(event)[:300]}")
            if kind == "response.output_text.delta" and first is None and event.get("delta"):
                first = time.perf_counter()
            if kind in ("response.completed", "response.incomplete"):
                final = event["response"]
    end = time.perf_counter()
    if not final:
        raise RuntimeError("stream ended without response.completed")
    return {"ttft": (first or end) - start, "tokens": final["usage"]["output_tokens"],
            "id": final["id"], "text": final.get("output_text") or text_of(final)}  # fmt: skip


def text_of(response: dict) -> str:
    return "".join(
        part.get("text", "")
        for item in response.get("output", [])
        if item.get("type") == "message"
        for part in item.get("content", [])
    )


async def run_level(url: str, key: str, body: Body, clients: int, per_client: int) -> dict:
    """``clients`` concurrent clients, ``per_client`` requests each, back to back."""
    c = http_client(url, key)
    results: list[dict] = []
    failures: list[str] = []

    async def client(i: int) -> None:
        for j in range(per_client):
            try:
                results.append(await one_request(c, body(i, j)))
            except Exception as err:
                failures.append(repr(err)[:300])

    start = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    wall = time.perf_counter() - start
    await c.aclose()
    return {
        "clients": clients,
        "requests": len(results),
        "failed": len(failures),
        "failures": failures[:3],
        "output_tok_s": sum(r["tokens"] for r in results) / wall,
        "tokens_per_request": statistics.fmean(r["tokens"] for r in results) if results else 0,
        "ttfts": [r["ttft"] for r in results],
    }


def stateless(history: list[dict]) -> Body:
    return lambda i, j: {**TURN, "store": False,
                         "input": [*history, {"role": "user", "content": new_message(i, j)}]}  # fmt: skip


def sessions(first_ids: list[str]) -> Body:
    return lambda i, j: {**TURN, "input": new_message(i, j), "previous_response_id": first_ids[i]}


def summarize(rows: list[dict]) -> dict:
    tok_s = [r["output_tok_s"] for r in rows]
    ttfts = [t for r in rows for t in r["ttfts"]]
    return {
        "clients": rows[0]["clients"],
        "requests": sum(r["requests"] for r in rows),
        "failed": sum(r["failed"] for r in rows),
        "failures": [f for r in rows for f in r["failures"]][:3],
        "output_tok_s": statistics.median(tok_s),
        "output_tok_s_range": [min(tok_s), max(tok_s)],
        "ttft_p50_ms": 1000 * pct(ttfts, 0.5),
        "tokens_per_request": statistics.fmean(r["tokens_per_request"] for r in rows),
    }


def measure(url: str, key: str, modes: dict[str, Body], args: argparse.Namespace) -> dict:
    """Rounds over the levels; within a level the modes take turns (drift hits them alike)."""
    first = next(iter(modes.values()))
    asyncio.run(run_level(url, key, first, 4, 1))  # warm-up: first requests pay one-off costs
    rows: dict[str, dict[int, list[dict]]] = {m: {c: [] for c in LEVELS} for m in modes}
    for rnd in range(args.rounds):
        for clients in LEVELS:
            per_client = max(2, -(-args.min_requests // clients))
            for mode, body in modes.items():
                row = asyncio.run(run_level(url, key, body, clients, per_client))
                brief = {k: round(v, 1) for k, v in row.items() if isinstance(v, float | int)}
                print(f"  {mode} round {rnd}: {json.dumps(brief)} {row['failures'][:1]}",
                      flush=True)  # fmt: skip
                rows[mode][clients].append(row)
    return {m: {c: summarize(rows[m][c]) for c in LEVELS} for m in modes}


async def setup_sessions(url: str, clients: int) -> tuple[list[str], list[dict]]:
    """Each client's stored first turn (on OPENING), and the history it stands for:
    OPENING plus the model's answer, the stateless bodies' history."""
    c = http_client(url, KEY)
    body = {**TURN, "input": OPENING}
    firsts = await asyncio.gather(*(one_request(c, body) for _ in range(clients)))
    await c.aclose()
    texts = {f["text"] for f in firsts}
    if len(texts) != 1:
        print(f"warning: the stored first turns differ ({len(texts)} texts)", flush=True)
    history = [*OPENING, {"role": "assistant", "content": firsts[0]["text"]}]
    return [f["id"] for f in firsts], history


def raylm_phase(model: str, work: Path, args: argparse.Namespace) -> tuple[dict, list[dict]]:
    with raylm_cluster(work / "home") as (env, _dashboard):
        t0 = time.monotonic()
        url = deploy_raylm(model, env, work, "autoscaling.max_replicas=1",
                           f"sessions.store=sqlite://{work / 'sessions.sqlite'}")  # fmt: skip
        print(f"raylm app RUNNING in {time.monotonic() - t0:.0f} s at {url}", flush=True)
        ids, history = asyncio.run(setup_sessions(url, max(LEVELS)))
        modes = {"raylm stateless": stateless(history), "raylm sessions": sessions(ids)}
        return measure(url, KEY, modes, args), history


async def probe_once(url: str, key: str, body: dict) -> dict:
    async with http_client(url, key) as c:
        return await one_request(c, body)


def vllm_phase(model: str, work: Path, history: list[dict], args: argparse.Namespace) -> dict:
    """bare vLLM's server, stateless; {"error": ...} if it cannot stream /v1/responses."""
    with vllm_server(model, work) as v:
        try:
            probe = asyncio.run(probe_once(v["url"], v["key"], stateless(history)(0, 0)))
            print(f"vLLM /v1/responses streams: {probe['tokens']} tokens", flush=True)
        except Exception as err:
            print(f"vLLM's server does not stream /v1/responses: {err!r}", flush=True)
            return {"error": repr(err)[:500]}
        return measure(v["url"], v["key"], {"vLLM stateless": stateless(history)}, args)


def table(result: dict) -> str:
    vllm = result["vllm"].get("vLLM stateless")
    lines = [
        "| clients | mode | output tok/s (range) | TTFT p50 ms | tok/s vs vLLM | "
        "TTFT p50 vs vLLM | tok/s vs raylm stateless | failed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in LEVELS:
        base = result["raylm"]["raylm stateless"][c]
        rows = [("vLLM stateless", vllm[c])] if vllm else []
        rows += [(m, result["raylm"][m][c]) for m in ("raylm stateless", "raylm sessions")]
        for mode, r in rows:
            lo, hi = r["output_tok_s_range"]
            vs = (f"{r['output_tok_s'] / vllm[c]['output_tok_s']:.2f}x | "
                  f"{r['ttft_p50_ms'] - vllm[c]['ttft_p50_ms']:+.0f} ms"
                  if vllm and mode != "vLLM stateless" else " | ")  # fmt: skip
            own = (
                f"{r['output_tok_s'] / base['output_tok_s']:.2f}x"
                if mode == "raylm sessions"
                else ""
            )
            lines.append(
                f"| {c} | {mode} | {r['output_tok_s']:.0f} ({lo:.0f}-{hi:.0f}) | "
                f"{r['ttft_p50_ms']:.0f} | {vs} | {own} | {r['failed']}/{r['requests']} |"
            )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="HF model dir (default: build the tiny model)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--min-requests", type=int, default=32, help="per level, mode and round (at least 2 each)"
    )
    parser.add_argument("--out", default="outputs/bench/serve_sessions.json")
    args = parser.parse_args()
    work, model = workdir("sessions", args.model)
    loads = [os.getloadavg()[0]]
    raylm, history = raylm_phase(model, work, args)
    loads.append(os.getloadavg()[0])
    vllm = vllm_phase(model, work, history, args)
    loads.append(os.getloadavg()[0])
    result = {"raylm": raylm, "vllm": vllm, "history": history,
              "load_avg_1m": [round(x, 1) for x in loads], "args": vars(args)}  # fmt: skip
    print(table(result))
    print(f"load average (1 min) at start, between phases, at end: {result['load_avg_1m']}")
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
