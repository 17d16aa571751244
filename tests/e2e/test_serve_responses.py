"""Conversations kept on the server, end to end: the real `openai` client holds a
multi-turn conversation through ``previous_response_id`` across the two replicas of a
deployment and across a redeploy (the app deleted, then deployed again with one replica:
every replica new), with the session's real redis-server; with the embedded SQLite store
across a redeploy from one replica to a new one (two replicas on one node share the
file as two processes do, which tests/unit/test_serve_store.py shows without the
minute each replica of the tiny model takes to start here).

Which replica answered each turn is read from the ``x-raylm-replica`` header; that the
model saw the history is read from ``usage.input_tokens``, which must grow by more than
the previous turn's input plus output. One app per store, deployed twice (a replica of
the tiny model starts in about a minute on 2 CPUs: five replica starts in all).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from raylm.cluster import ClusterInfo
from raylm.serve import deploy

ROOT = Path(__file__).resolve().parents[2]
APP = "raylm-conversations"
KEYS = ("sk-e2e-conv-a1", "sk-e2e-conv-b2")  # test-only keys
TURN = {"model": "tiny", "max_output_tokens": 4, "temperature": 0}


def serve(tiny_model: Path, out: Path, store: str, replicas: int) -> str:
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
@pytest.mark.parametrize(("backend", "replicas"), [("redis", 2), ("sqlite", 1)])
def test_conversation_across_replicas_and_a_redeploy(
    backend: str,
    replicas: int,
    request: pytest.FixtureRequest,
    ray_cluster: ClusterInfo,
    tiny_model: Path,
    tmp_path: Path,
) -> None:
    if backend == "redis":
        store = request.getfixturevalue("redis_url")
    else:
        store = f"sqlite://{tmp_path / 'sessions.sqlite'}"
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

        assert deploy.down(APP)  # every replica gone; the store keeps the conversation
        url = serve(tiny_model, tmp_path / "second", store, replicas=1)
        c = client(url)
        assert c.responses.retrieve(first.id).id == first.id
        last, later_replicas = converse(c, first, replicas=1, max_turns=2)
        assert not later_replicas & first_replicas  # new replicas continued it
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
    finally:
        deploy.down(APP)


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
