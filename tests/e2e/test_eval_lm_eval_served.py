"""lm-eval's ``local-completions`` against a served OpenAI endpoint equals its ``hf`` model on
the same directory, and so raylm's own picks: the served half of the lm_eval section.

The endpoint is vLLM's OpenAI server on the tiny model (the engine under ``raylm serve``),
started here as a subprocess and stopped by its process group; multiple choice needs its
prompt log-probabilities (``echo: true, logprobs: 1``)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from raylm.eval.benchmarks.choice import score_choice
from raylm.eval.benchmarks.lm_eval_run import make_lm, run_lm_eval_benchmark
from raylm.eval.benchmarks.readers import read_choice
from raylm.eval.config import LmEvalConfig

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "benchmarks"


@pytest.fixture(scope="module")
def vllm_url(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    pytest.importorskip("vllm")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_model)]
    cmd += ["--dtype", "float32", "--port", str(port), "--host", "127.0.0.1"]
    cmd += ["--max-model-len", "1024", "--enforce-eager"]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    server = subprocess.Popen(
        cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                urllib.request.urlopen(f"{url}/v1/models", timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    pytest.fail(f"vLLM server did not start:\n{log.read_text()[-3000:]}")
                time.sleep(2)
        yield f"{url}/v1/completions"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


@pytest.mark.timeout(900)
def test_served_endpoint_gives_the_same_picks(vllm_url: str, tiny_model: Path) -> None:
    pytest.importorskip("lm_eval")
    from raylm.eval.model import load_model

    os.environ["HF_DATASETS_OFFLINE"] = "1"
    items = read_choice("mmlu", ASSETS / "mmlu", "test")
    dev = read_choice("mmlu", ASSETS / "mmlu", "dev")
    served = make_lm(str(tiny_model), LmEvalConfig(base_url=vllm_url))
    theirs = run_lm_eval_benchmark(served, "mmlu", "mmlu", items, dev, 2)
    model, tokenizer, _ = load_model(tiny_model)
    ours = score_choice(model, tokenizer, "mmlu", items, dev, 2)
    assert ours.contexts == [r["context"] for r in theirs["rows"]]
    for a, r in zip(ours.loglikelihoods, theirs["rows"], strict=True):
        assert a == pytest.approx(r["loglikelihoods"], abs=1e-3)
    assert ours.pred == [r["pred"] for r in theirs["rows"]]
