"""The LLM judge for real: a small OpenAI-compatible HTTP server in this file answers the
``openai`` client deterministically from the prompt, so the swap logic, the verdict
parser, retries, the concurrency bound, the win rate and the gate are checked end to end.
Most tests need no Ray (the judge step runs in the driver on answers that already exist);
the last one runs the eval job on the session cluster with the judge wired in."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from raylm.cluster import ClusterInfo
from raylm.eval.config import EvalDataConfig, EvalJobConfig, GateConfig, JudgeConfig
from raylm.eval.judge import JudgeError, Pair, check_judge, judge_answers, judge_pairs
from raylm.eval.records import EvalRecord
from raylm.eval.run import summarize
from raylm.models.tiny import TinySpec, build

ROOT = Path(__file__).resolve().parents[2]

_ANSWER = re.compile(r"\[The Start of Assistant ([AB])'s Answer\]\n(.*?)\n\[The End of", re.S)


class JudgeServer:
    """A judge that prefers the answer containing GOOD, in the model's reply style:

    - ``keyword``: an explanation, then ``[[A]]``/``[[B]]``/``[[C]]``;
    - ``plain``: just ``A``, ``B`` or ``Tie``;
    - ``biased``: always ``[[A]]`` (pure position bias);
    - ``nonsense``: no verdict at all;
    - ``flaky``: HTTP 503 to the first request, then as ``keyword``.
    Unknown models get a 404, as a real server does."""

    MODELS = ("keyword", "plain", "biased", "nonsense", "flaky")

    def __init__(self, api_key: str | None = None, delay: float = 0.0) -> None:
        self.api_key, self.delay = api_key, delay
        self.lock = threading.Lock()
        self.asked: list[tuple[str, str]] = []  # (answer A, answer B) of every request
        self.in_flight = self.max_in_flight = self.failures = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _authorised(self) -> bool:
                if (
                    server.api_key
                    and self.headers.get("Authorization") != f"Bearer {server.api_key}"
                ):
                    self._send(401, {"error": {"message": "bad key", "type": "auth"}})
                    return False
                return True

            def do_GET(self) -> None:
                if self._authorised() and self.path.endswith("/models"):
                    data = [
                        {"id": m, "object": "model", "created": 0, "owned_by": "t"}
                        for m in server.MODELS
                    ]
                    self._send(200, {"object": "list", "data": data})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if not self._authorised():
                    return
                status, reply = server.answer(body)
                if status != 200:
                    self._send(status, {"error": {"message": reply, "type": "server"}})
                    return
                self._send(200, {
                    "id": "c1", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": reply}}],
                })  # fmt: skip

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def answer(self, body: dict) -> tuple[int, str]:
        model = body["model"]
        if model not in self.MODELS:
            return 404, f"The model {model} does not exist"
        with self.lock:
            if model == "flaky" and self.failures == 0:
                self.failures += 1
                return 503, "overloaded, try again"
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            time.sleep(self.delay)
            answers = dict(_ANSWER.findall(body["messages"][-1]["content"]))
            with self.lock:
                self.asked.append((answers["A"], answers["B"]))
            if model == "nonsense":
                return 200, "I like turtles."
            if model == "biased":
                return 200, "Both are good, but the first one reads better. [[A]]"
            good = [k for k in ("A", "B") if "GOOD" in answers[k]]
            pick = good[0] if len(good) == 1 else None
            if model == "plain":
                return 200, pick or "Tie"
            why = f"Assistant {pick} mentions the key fact." if pick else "They are equally good."
            return 200, f"{why} Final verdict: [[{pick or 'C'}]]"
        finally:
            with self.lock:
                self.in_flight -= 1

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[JudgeServer]:
    s = JudgeServer()
    yield s
    s.close()


def _records_and_outs(n: int = 10) -> tuple[list[EvalRecord], dict[str, dict]]:
    """10 questions (the first ``n``): the tuned answer has GOOD in 7, the base's in 1,
    neither in 2."""
    tuned = ([f"tuned {i} GOOD" for i in range(7)] + ["tuned 7", "tuned 8", "tuned 9"])[:n]
    base = ([f"base {i}" for i in range(7)] + ["base 7 GOOD", "base 8", "base 9"])[:n]
    records = [EvalRecord(id=f"q{i}", references=(f"ref {i}",), prompt=f"question {i}") for i in range(n)]  # fmt: skip
    stats = {"exact_match": np.array(([[1.0, 1.0]] * 5 + [[0.0, 1.0]] * 5)[:n])}
    outs = {
        "model": {"model": {"path": "tuned"}, "stats": stats, "predictions": tuned, "seconds": {}},
        "base_model": {"model": {"path": "base"}, "stats": stats, "predictions": base, "seconds": {}},
    }  # fmt: skip
    return records, outs


def _job(url: str, model: str | None, **gate: Any) -> EvalJobConfig:
    return EvalJobConfig(
        model="tuned",
        base_model="base",
        metrics=["exact_match"],
        data=EvalDataConfig(eval_path="eval.jsonl"),
        judge=JudgeConfig(base_url=url, model=model, max_concurrency=4, max_retries=2),
        gate=GateConfig(**gate),
    )


@pytest.mark.parametrize("model", ["keyword", "plain"])
def test_judge_win_rate_and_gate_end_to_end(server: JudgeServer, model: str) -> None:
    records, outs = _records_and_outs()
    cfg = _job(server.url, model, min_judge_win_rate=0.7)
    judged = judge_answers(cfg, records, outs)

    # every pair asked twice, once in each order
    assert len(server.asked) == 20
    for t, b in zip(outs["model"]["predictions"], outs["base_model"]["predictions"], strict=True):
        assert server.asked.count((t, b)) == 1 and server.asked.count((b, t)) == 1
    assert (judged["wins"], judged["losses"], judged["ties"], judged["inconsistent"]) == (
        7,
        1,
        2,
        0,
    )
    assert judged["win_rate"]["value"] == pytest.approx((7 + 0.5 * 2) / 10)
    assert judged["win_rate"]["ci_low"] < 0.8 < judged["win_rate"]["ci_high"]
    assert judged["first_position_rate"] == pytest.approx(0.5)  # this judge has no bias
    assert judged["outcomes"][7] == "base" and judged["model"] == model
    assert judged["base_url"] == server.url

    results = summarize(cfg, outs, records, [], judged)
    json.dumps(results)  # eval.json can hold it
    assert results["judge"]["win_rate"]["value"] == pytest.approx(0.8)
    assert results["gate"]["passed"], results["gate"]["reasons"]
    assert results["gate"]["reasons"][0].startswith("ok min_judge_win_rate: judge win rate = 0.8")

    strict = summarize(_job(server.url, model, min_judge_win_rate=0.9), outs, records, [], judged)
    assert not strict.get("gate")["passed"]
    assert (
        "FAILED min_judge_win_rate: judge win rate = 0.8 < min 0.9" in strict["gate"]["reasons"][0]
    )
    ci = _job(server.url, model, min_judge_win_rate=0.7, use_ci_bound=True)
    held = summarize(ci, outs, records, [], judged)["gate"]
    assert not held["passed"] and "lower CI bound" in held["reasons"][0]


def test_position_bias_is_cancelled_by_the_swap(server: JudgeServer) -> None:
    records, outs = _records_and_outs()
    judged = judge_answers(_job(server.url, "biased"), records, outs)
    assert (judged["wins"], judged["losses"], judged["ties"], judged["inconsistent"]) == (
        0,
        0,
        10,
        10,
    )
    assert judged["win_rate"]["value"] == 0.5
    assert judged["first_position_rate"] == 1.0


def test_model_defaults_to_the_first_listed(server: JudgeServer) -> None:
    records, outs = _records_and_outs()
    judged = judge_answers(_job(server.url, None), records, outs)
    assert judged["model"] == "keyword" and judged["wins"] == 7


def test_transient_errors_are_retried(server: JudgeServer) -> None:
    records, outs = _records_and_outs(2)
    judged = judge_answers(_job(server.url, "flaky"), records, outs)
    assert server.failures == 1 and judged["wins"] == 2


def test_concurrency_is_bounded() -> None:
    slow = JudgeServer(delay=0.1)
    try:
        cfg = JudgeConfig(base_url=slow.url, model="keyword", max_concurrency=3)
        pairs = [Pair(f"q{i}", f"GOOD {i}", f"bad {i}") for i in range(8)]
        t0 = time.perf_counter()
        assert judge_pairs(cfg, pairs)["wins"] == 8
        assert slow.max_in_flight == 3  # 16 requests, never more than 3 at once
        assert time.perf_counter() - t0 >= 16 / 3 * 0.1 * 0.9
    finally:
        slow.close()


def test_api_key_comes_from_the_named_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    locked = JudgeServer(api_key="s3cret")
    try:
        records, outs = _records_and_outs()
        cfg = _job(locked.url, "keyword")
        cfg.judge.api_key_env = "RAYLM_TEST_JUDGE_KEY"
        monkeypatch.delenv("RAYLM_TEST_JUDGE_KEY", raising=False)
        with pytest.raises(JudgeError, match="RAYLM_TEST_JUDGE_KEY, which is not set"):
            judge_answers(cfg, records, outs)
        monkeypatch.setenv("RAYLM_TEST_JUDGE_KEY", "wrong")
        with pytest.raises(JudgeError, match=rf"{re.escape(locked.url)}.*HTTP 401"):
            judge_answers(cfg, records, outs)
        monkeypatch.setenv("RAYLM_TEST_JUDGE_KEY", "s3cret")
        assert judge_answers(cfg, records, outs)["wins"] == 7
    finally:
        locked.close()


def test_a_nonsense_judge_is_named(server: JudgeServer) -> None:
    records, outs = _records_and_outs(1)
    with pytest.raises(JudgeError) as err:
        judge_answers(_job(server.url, "nonsense"), records, outs)
    msg = str(err.value)
    assert server.url in msg and "'nonsense'" in msg and "no verdict" in msg
    assert "I like turtles." in msg


def test_an_unknown_model_is_named(server: JudgeServer) -> None:
    records, outs = _records_and_outs()
    with pytest.raises(JudgeError, match=r"HTTP 404.*does not exist"):
        judge_answers(_job(server.url, "gpt-judge"), records, outs)


def test_an_unreachable_judge_is_named() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    records, outs = _records_and_outs()
    cfg = _job(url, "keyword")
    cfg.judge.max_retries = 0
    t0 = time.perf_counter()
    with pytest.raises(JudgeError, match=rf"LLM judge at {re.escape(url)} .*is unreachable"):
        judge_answers(cfg, records, outs)
    assert time.perf_counter() - t0 < 30


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


def test_check_judge_fails_fast(server: JudgeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    check_judge(JudgeConfig(base_url=server.url))  # lists models: fine
    url = _closed_port_url()
    with pytest.raises(JudgeError, match=rf"LLM judge at {re.escape(url)} is unreachable"):
        check_judge(JudgeConfig(base_url=url, model="keyword"))
    locked = JudgeServer(api_key="s3cret")
    try:
        monkeypatch.setenv("RAYLM_TEST_JUDGE_KEY", "wrong")
        with pytest.raises(JudgeError, match="HTTP 401 to GET /models"):
            check_judge(JudgeConfig(base_url=locked.url, api_key_env="RAYLM_TEST_JUDGE_KEY"))
    finally:
        locked.close()


def _run_job(conf: Path, cluster: ClusterInfo) -> subprocess.CompletedProcess:
    env = dict(os.environ, RAY_ADDRESS=cluster.gcs_address)
    cmd = [sys.executable, str(ROOT / "jobs/eval.py"), str(conf)]
    try:
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
    except subprocess.TimeoutExpired as err:  # a loaded machine: say where the job was
        tail = (err.stderr or b"")[-3000:]
        pytest.fail(f"eval job still running after 420 s; its log ends with:\n{tail!r}")


def _conf(tmp_path: Path, model: Path, base: Path, url: str, out: Path) -> Path:
    conf = tmp_path / "judge.yaml"
    conf.write_text(
        f"model: {model}\nbase_model: {base}\nmetrics: [exact_match]\n"
        f"data: {{eval_path: {ROOT / 'raylm/eval/sample/eval.jsonl'}, max_samples: 6}}\n"
        "generation: {engine: hf, max_new_tokens: 6}\nbootstrap: {resamples: 200}\n"
        f"judge: {{base_url: '{url}', model: keyword, max_concurrency: 4}}\n"
        f"gate: {{min_judge_win_rate: 0.6}}\nfail_on_gate: true\noutput_dir: {out}\n"
    )
    return conf


@pytest.mark.timeout(600)
def test_eval_job_with_a_judge_gates_on_its_win_rate(
    ray_cluster: ClusterInfo, tiny_model: Path, tmp_path: Path, server: JudgeServer
) -> None:
    """Two untrained tiny models: no answer holds GOOD, so every pair is a tie, the win
    rate is 0.5 and the gate (min 0.6) holds the model back, exit code 3."""
    other = build(tmp_path / "tiny-seed1", TinySpec(seed=1))
    out = tmp_path / "eval"
    proc = _run_job(_conf(tmp_path, tiny_model, other, server.url, out), ray_cluster)
    assert proc.returncode == 3, proc.stderr[-3000:]
    res = json.loads((out / "eval.json").read_text())
    judged = res["judge"]
    assert judged["n"] == 6 and len(server.asked) == 12 and judged["model"] == "keyword"
    assert judged["ties"] == 6 and judged["win_rate"]["value"] == 0.5
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    for row in rows:  # the judge saw exactly the answers the job wrote, in both orders
        pair = (row["prediction"], row["base_prediction"])
        assert pair in server.asked and pair[::-1] in server.asked
    reasons = res["gate"]["reasons"]
    assert reasons[0].startswith("FAILED min_judge_win_rate: judge win rate = 0.5 < min 0.6")

    # An unreachable judge stops the job in its setup: before any model loads or output.
    url = _closed_port_url()
    out2 = tmp_path / "eval-unreachable"
    proc = _run_job(_conf(tmp_path, tiny_model, other, url, out2), ray_cluster)
    assert proc.returncode not in (0, 3)
    assert f"LLM judge at {url} is unreachable" in proc.stderr + proc.stdout
    assert not (out2 / "eval.json").exists()
