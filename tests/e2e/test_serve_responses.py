"""Conversations kept on the server, end to end: the real `openai` client holds a
multi-turn conversation through ``previous_response_id`` across the two replicas of a
deployment and across a redeploy (the app deleted, then deployed again as two versions of
the model behind the version router, 90/10: every replica new), with the session's real
redis-server. The redeployed app then takes the canary checks (``promote_and_roll_back``):
the split is exact, ``raylm serve promote`` moves all traffic without cutting a stream
in flight, ``raylm serve rollback`` restores the split. The embedded SQLite store (the
default) keeps a conversation on the README's own plain deployment in
tests/e2e/test_serve_job.py; that replicas on one node (two processes) share its file, and
that a redeploy's replicas find it again, tests/unit/test_serve_store.py shows without the
minute each replica of the tiny model takes to start here.

Which replica answered each turn is read from the ``x-raylm-replica`` header; that the
model saw the history is read from ``usage.input_tokens``, which must grow by more than
the previous turn's input plus output. One app, deployed twice (a replica of the tiny
model starts in about a minute on 2 CPUs: four replica starts).

The two-replica deployment also takes the engine-death chaos check before it is removed
(``chaos``): one replica's vLLM engine-core process is killed by PID while streams are in
flight; no request fails before its first token (those are re-sent to the other replica),
a stream cut mid-way ends with the error event and ``[DONE]``, the dead replica leaves
(its health check failed: Serve ended its process), and the conversation goes on on the
other (raylm.serve.engine_health). Serve then starts a replacement, as for any replica
that fails its check; the test does not wait the minute that takes
(bench/serve_chaos.py measures it), and new replicas carrying the conversation on are
the redeploy's.
The streams are read with raw httpx, re-sent only when the front end closed their
connection before any response, as the openai client does (``RECONNECTS``): HAProxy's
own reloads do that to a few fresh connections, whatever the engines do.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest
from prom_helpers import metric_lines

from raylm.cluster import ClusterInfo
from raylm.serve import deploy

ROOT = Path(__file__).resolve().parents[2]
APP = "raylm-conversations"
KEYS = ("sk-e2e-conv-a1", "sk-e2e-conv-b2")  # test-only keys
TURN = {"model": "tiny", "max_output_tokens": 4, "temperature": 0}


def serve(tiny_model: Path, out: Path, store: str, replicas: int, *extra: str) -> str:
    """Deploy the app through the real CLI; its OpenAI base URL."""
    cmd = [sys.executable, "-m", "raylm.cli", "serve", str(ROOT / "conf/serve/tiny.yaml")]
    cmd += [
        f"model.path={tiny_model}",
        f"app_name={APP}",
        "route_prefix=/conversations",
        f"output_dir={out}",
        "engine.dtype=float32",
        f"autoscaling.min_replicas={replicas}",
        f"autoscaling.max_replicas={replicas}",
        f"sessions.store={store}",
        "http.port=0",
        "wait_ready_s=420",
        *extra,
    ]
    env = os.environ | {"RAYLM_API_KEY": ",".join(KEYS)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "manifest.json").read_text())["outputs"]["url"]


def client(url: str, key: str = KEYS[0]) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=120)


def turn(c: openai.OpenAI, text: str, previous: str | None) -> tuple[object, str]:
    """One turn; the response and the replica that answered it."""
    raw = c.responses.with_raw_response.create(input=text, previous_response_id=previous, **TURN)
    return raw.parse(), raw.headers["x-raylm-replica"]


def converse(c: openai.OpenAI, previous: object | None, replicas: int, max_turns: int = 16):
    """Turns (two at least) until ``replicas`` distinct replicas answered; each turn's
    input holds the whole history (its input tokens exceed the previous turn's input plus
    output)."""
    seen: set[str] = set()
    last = previous
    for i in range(max_turns):
        r, replica = turn(c, f"turn {i} says hello", last.id if last else None)
        assert r.status in ("completed", "incomplete") and r.output_text is not None
        assert r.previous_response_id == (last.id if last else None)
        if last is not None:
            assert r.usage.input_tokens > last.usage.input_tokens + last.usage.output_tokens
        seen.add(replica)
        last = r
        if len(seen) >= replicas and i >= 1:
            return last, seen
    raise AssertionError(f"only replicas {seen} answered {max_turns} turns")


@pytest.mark.timeout(1200)
def test_conversation_across_replicas_and_a_redeploy(
    redis_url: str, ray_cluster: ClusterInfo, tiny_model: Path, tmp_path: Path
) -> None:
    store, backend, replicas = redis_url, "redis", 2
    try:
        url = serve(tiny_model, tmp_path / "first", store, replicas=replicas)
        c, other = client(url), client(url, KEYS[1])
        first, first_replicas = converse(c, None, replicas=replicas)
        assert len(first_replicas) == replicas
        # retrieval answers from any replica; another key sees a 404, as for no response
        assert c.responses.retrieve(first.id).output_text == first.output_text
        with pytest.raises(openai.NotFoundError):
            other.responses.retrieve(first.id)
        with pytest.raises(openai.NotFoundError):
            other.responses.create(input="x", previous_response_id=first.id, **TURN)
        measure_latency(c, first.id, backend)
        first = chaos(url, c, first, ray_cluster.temp_dir)

        assert deploy.down(APP)  # every replica gone; the store keeps the conversation
        # deployed again as two versions of the model behind the version router (canary)
        canary = [f"versions={{v2: {tiny_model}}}", "traffic={v1: 90, v2: 10}"]
        url = serve(tiny_model, tmp_path / "second", store, 1, *canary)
        c = client(url)
        assert c.responses.retrieve(first.id).id == first.id
        last, later_replicas = converse(c, first, replicas=2)
        assert not later_replicas & first_replicas  # new replicas (both versions) went on
        streamed = list(
            c.responses.create(
                input="and streamed", previous_response_id=last.id, stream=True, **TURN
            )
        )
        done = streamed[-1]
        assert done.type == "response.completed" and done.response.store is True
        assert done.response.usage.input_tokens > last.usage.input_tokens
        assert c.responses.retrieve(done.response.id).output_text == done.response.output_text
        c.responses.delete(last.id)
        with pytest.raises(openai.NotFoundError):
            c.responses.retrieve(last.id)
        promote_and_roll_back(url, tmp_path / "second")
        # the router's per-version counter, as Prometheus scrapes it: at least the picks
        # counted above (36 + 18 to v1; 4 + 2 + the promoted 10 to v2)
        least = {"v1": 54.0, "v2": 16.0}
        assert version_requests(ray_cluster.temp_dir, least) == least
    finally:
        deploy.down(APP)


def versions_of(url: str, n: int) -> list[str]:
    """The version (``x-raylm-version``) that answered each of ``n`` 1-token requests."""
    headers = {"Authorization": f"Bearer {KEYS[0]}"}
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 1}
    out = []
    with httpx.Client(timeout=60, headers=headers) as h:
        for _ in range(n):
            r = h.post(f"{url}/completions", json=body)
            assert r.status_code == 200, r.text
            out.append(r.headers["x-raylm-version"])
    return out


def raylm_serve(*args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "raylm.cli", "serve", *args],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(proc.stdout[proc.stdout.index("{") :])


def held_stream(url: str, out: dict, first: threading.Event, go: threading.Event) -> None:
    """A 256-token chat stream whose reading stops after its first chunk until ``go``:
    it is in flight (not yet delivered) for as long as the caller wants. ``out`` gets
    the version that answered, the completion tokens ``usage`` reports and whether it
    ended with ``[DONE]``."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": "count"}],
            "max_tokens": 256, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    headers = {"Authorization": f"Bearer {KEYS[0]}"}
    with httpx.stream("POST", f"{url}/chat/completions", json=body, headers=headers,
                      timeout=120) as r:  # fmt: skip
        out["version"] = r.headers.get("x-raylm-version")
        for line in r.iter_lines():
            if line == "data: [DONE]":
                out["done"] = True
            elif line.startswith("data: "):
                usage = json.loads(line[6:]).get("usage")
                if usage:
                    out["completion_tokens"] = usage["completion_tokens"]
                if not first.is_set():
                    first.set()
                    go.wait(120)


def version_requests(temp_dir: str, least: dict[str, float]) -> dict[str, float]:
    """``raylm_version_requests`` per version, summed over the nodes, read until each
    reaches ``least`` (Ray exports metrics every few seconds) or 60 s; returns ``least``
    where reached, else what was read."""
    import re

    pattern = re.compile(r'ray_raylm_version_requests_total\{.*version="(\w+)".*\} (\S+)')
    seen: dict[str, float] = {}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        seen = {}
        for found in filter(None, map(pattern.match, metric_lines(temp_dir))):
            seen[found[1]] = seen.get(found[1], 0.0) + float(found[2])
        if all(seen.get(v, 0.0) >= n for v, n in least.items()):
            return dict(least)
        time.sleep(2)
    return seen


def promote_and_roll_back(url: str, out: Path) -> None:
    """The 90/10 split is exact (smooth weighted round robin); ``raylm serve promote``
    sends everything to v2 without cutting a v1 stream in flight; ``rollback`` restores
    90/10. How long each change took to reach requests is printed (docs/benchmarks.md)."""
    recorded = json.loads((out / "manifest.json").read_text())["output"]
    assert recorded["traffic"] == {"v1": 90.0, "v2": 10.0} and set(recorded["versions"]) == {
        "v1", "v2"}  # fmt: skip
    picks = versions_of(url, 40)
    assert picks.count("v2") == 4 and picks.count("v1") == 36, picks
    if picks[-10] == "v2":  # the split repeats every 10: make the next pick v1's
        versions_of(url, 1)
    held: dict = {}
    first, go = threading.Event(), threading.Event()
    long = threading.Thread(target=held_stream, args=(url, held, first, go))
    long.start()
    assert first.wait(60)
    t0 = time.monotonic()
    assert raylm_serve("promote", APP, "v2")["traffic"] == {"v1": 0.0, "v2": 100.0}
    returned = time.monotonic()
    while versions_of(url, 1) != ["v2"] or versions_of(url, 10) != ["v2"] * 10:
        assert time.monotonic() - returned < 30, "promote did not reach requests in 30 s"
    print(f"\n[canary] promote: command {returned - t0:.2f} s, in effect "
          f"{time.monotonic() - returned:.2f} s after it returned (10 requests included)")  # fmt: skip
    go.set()  # the stream begun before the promote, read to its end only now
    long.join(timeout=120)
    assert held == {"version": "v1", "completion_tokens": 256, "done": True}, held
    status = deploy.status()["applications"][APP]
    assert status["traffic"] == {"v1": 0.0, "v2": 100.0}
    t0 = time.monotonic()
    assert raylm_serve("rollback", APP)["traffic"] == {"v1": 90.0, "v2": 10.0}
    returned = time.monotonic()
    while versions_of(url, 1) != ["v1"]:
        assert time.monotonic() - returned < 30, "rollback did not reach requests in 30 s"
    print(f"[canary] rollback: command {returned - t0:.2f} s, in effect "
          f"{time.monotonic() - returned:.2f} s after it returned")  # fmt: skip
    picks = versions_of(url, 20)  # the new split from its first pick: exactly 18/2
    assert picks.count("v2") == 2, picks


def measure_latency(c: openai.OpenAI, previous: str, backend: str, n: int = 5) -> None:
    """Median time of a stored turn continuing a conversation vs a stateless one with the
    same history sent by the client (printed, for docs/operations.md; not asserted)."""
    items = c.responses.input_items.list(previous).data
    history = [i.model_dump(exclude_none=True) for i in reversed(items)]
    history += [o.model_dump(exclude_none=True) for o in c.responses.retrieve(previous).output]
    stored, stateless = [], []
    for _ in range(n):
        t = time.perf_counter()
        c.responses.create(input="x", previous_response_id=previous, **TURN)
        stored.append(time.perf_counter() - t)
        t = time.perf_counter()
        c.responses.create(input=[*history, {"role": "user", "content": "x"}],
                           store=False, **TURN)  # fmt: skip
        stateless.append(time.perf_counter() - t)
    print(
        f"\n[{backend}] stored turn {statistics.median(stored) * 1000:.1f} ms, "
        f"stateless {statistics.median(stateless) * 1000:.1f} ms (median of {n})"
    )


LEFT_WITHIN_S = 120
"""The dead replica's process must be gone by then: the engine's drain (30 s) bounds its
stay once the health check reported it (raylm.serve.engine_health)."""


def replicas_now() -> dict[str, int]:
    """RUNNING replicas of the app's deployment: replica id -> actor PID."""
    app = deploy.details()["applications"][APP]
    (deployment,) = app["deployments"].values()
    return {r["replica_id"]: r["pid"] for r in deployment["replicas"] if r["state"] == "RUNNING"}


def engine_core(replica_pid: int) -> psutil.Process:
    """The vLLM engine-core process of the replica actor ``replica_pid`` (its child)."""
    cores = [
        p
        for p in psutil.Process(replica_pid).children(recursive=True)
        if "EngineCore" in p.name() + " ".join(p.cmdline())
    ]
    assert len(cores) == 1, [(p.pid, p.name()) for p in cores]
    return cores[0]


RECONNECTS = 2
"""Times a stream is re-sent after its connection closed before any response: the
openai client's default ``max_retries``. HAProxy's graceful reload (Serve reloads it when
a replica leaves or joins) closes a few fresh client connections before they carry a
request: measured with a healthy backend, 4 of 609 requests over 20 reloads. A request
the replica lost shows instead as HAProxy's 5xx answer, which is never re-sent here."""


def stream_once(
    url: str, results: list[dict], lock: threading.Lock, max_tokens: int = 64,
    on_first: object = None,
) -> dict:  # fmt: skip
    """One streamed chat completion, read raw: its replica, whether it was retried,
    tokens seen and how it ended ("done", "error_event", "status NNN" or "cut: ...");
    ``reconnects``: connections closed before any response, then re-sent."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": "count"}],
            "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0, "stream": True}  # fmt: skip
    out: dict = {"tokens": 0, "end": None, "retried": False, "start": time.monotonic(),
                 "replica": None, "first": None, "reconnects": 0}  # fmt: skip
    headers = {"Authorization": f"Bearer {KEYS[0]}"}
    for _ in range(RECONNECTS + 1):
        answered = False
        try:
            with httpx.stream("POST", f"{url}/chat/completions", json=body, headers=headers,
                              timeout=120) as r:  # fmt: skip
                answered = True
                read_stream(r, out, on_first)
        except (httpx.RemoteProtocolError, httpx.ConnectError) as err:
            out["end"] = f"cut: {type(err).__name__}"
            if not answered:
                out["reconnects"] += 1
                continue
        except httpx.HTTPError as err:
            out["end"] = f"cut: {type(err).__name__}"
        break
    out["stop"] = time.monotonic()
    with lock:
        results.append(out)
    return out


def read_stream(r: httpx.Response, out: dict, on_first: object) -> None:
    """Fill ``out`` from one streamed answer."""
    out["retried"] = r.headers.get("x-raylm-retried") == "1"
    out["replica"] = r.headers.get("x-raylm-replica")
    if r.status_code != 200:
        out["end"] = f"status {r.status_code}"
        return
    for line in r.iter_lines():
        if line == "data: [DONE]":
            out["end"] = out["end"] or "done"
        elif line.startswith("data: "):
            chunk = json.loads(line[6:])
            if "error" in chunk:
                out["end"] = "error_event"
            elif any(c["delta"].get("content") for c in chunk.get("choices", [])):
                out["tokens"] += 1
                if out["first"] is None and callable(on_first):
                    on_first(out)
                out["first"] = out["first"] or time.monotonic()
    if out["end"] is None or (out["end"] == "done" and not out["tokens"]):
        out["end"] = f"cut: {out['end']}"


def engine_log(temp_dir: str) -> list[str]:
    """The replicas' lines about their engine's death (raylm.serve.engine_health)."""
    marks = (
        "engine is dead",
        "replica exits",
        "retried on another",
        "retry pick",
        "died unexpectedly",
    )
    lines = []
    for log in Path(temp_dir).glob("session_*/logs/**/*"):
        if not log.is_file() or log.suffix not in (".log", ".err", ".out"):
            continue
        lines += [ln for ln in log.read_text(errors="replace").splitlines()
                  if any(m in ln for m in marks)]  # fmt: skip
    return sorted(lines)


def chaos(url: str, c: openai.OpenAI, last: object, temp_dir: str) -> object:
    """Kill one replica's engine core while 8 clients stream; the checks in the module doc.
    Returns the conversation's last response (continued on the replica that lived)."""
    began = time.monotonic()
    before = replicas_now()
    assert len(before) == 2
    victim = next(iter(before))
    core = engine_core(before[victim])
    results: list[dict] = []
    lock, stop = threading.Lock(), threading.Event()

    def client_loop() -> None:
        while not stop.is_set():
            stream_once(url, results, lock)

    threads = [threading.Thread(target=client_loop) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(2)
    killed: list[float] = []

    def kill(out: dict) -> None:  # at a victim stream's first token: it dies mid-way
        if out["replica"] == victim and not killed:
            killed.append(time.monotonic())
            core.send_signal(signal.SIGKILL)

    for _ in range(20):  # a long stream that reaches the victim
        probe = stream_once(url, results, lock, max_tokens=256, on_first=kill)
        if killed:
            break
    assert killed, "no probe stream reached the victim replica"
    killed_at = killed[0]
    left: list[float] = []

    def watch_exit() -> None:  # when the victim's actor process is gone
        while time.monotonic() - killed_at < LEFT_WITHIN_S:
            if not psutil.pid_exists(before[victim]):
                left.append(time.monotonic())
                return
            time.sleep(0.1)

    threading.Thread(target=watch_exit, daemon=True).start()
    time.sleep(8)
    stop.set()
    for t in threads:
        t.join(timeout=150)
    while not left and time.monotonic() - killed_at < LEFT_WITHIN_S:
        time.sleep(0.5)
    ends: dict[str, int] = {}
    for r in results:
        ends[r["end"]] = ends.get(r["end"], 0) + 1
    retried = sum(r["retried"] for r in results)
    reconnects = sum(r["reconnects"] for r in results)
    left_at = left[0] if left else None
    at_kill = sum(r["start"] < killed_at < r["stop"] for r in results)
    print(
        f"\n[chaos] {len(results)} streams ({at_kill} in flight at the kill): {ends}; "
        f"{retried} retried on the other replica; {reconnects} re-sent after the front "
        "end closed their connection unanswered; the replica left "
        + (f"{left_at - killed_at:.1f} s after the kill" if left_at else "(not seen)")
    )
    print("\n".join(engine_log(temp_dir)))
    for r in results:  # what the requests in flight at the kill saw
        if r["start"] < killed_at < r["stop"]:
            t = {k: round(r[k] - killed_at, 2) for k in ("start", "stop")}
            t["first"] = round(r["first"] - killed_at, 2) if r["first"] else None
            print(f"[chaos] {r['replica']} {r['end']} tokens={r['tokens']} {t}")
    assert left_at is not None, f"replica {victim} still ran {LEFT_WITHIN_S} s after the kill"
    # none failed before its first token; a stream cut mid-way ended with the error event
    failed = [r for r in results if r["end"] not in ("done", "error_event")]
    assert not failed, failed
    assert all(r["tokens"] > 0 for r in results if r["end"] == "error_event")
    assert probe["end"] == "error_event" and probe["tokens"] > 0, probe  # died mid-way
    # the load reached the victim, and its death met requests in flight
    assert any(r["replica"] == victim for r in results)
    assert retried + ends.get("error_event", 0) > 0
    # the conversation goes on, on the replica that lived
    r, replica = turn(c, "after the crash", last.id)
    assert replica != victim and replica in before
    assert r.usage.input_tokens > last.usage.input_tokens + last.usage.output_tokens
    print(f"[chaos] the check took {time.monotonic() - began:.1f} s")
    return r
