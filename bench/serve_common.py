"""What the serving benchmarks share: the private cluster raylm's app runs on, the deploy
through ``jobs/serve.py`` (the command users run), vLLM's bare server as the peer, the
HTTP client and where results go.

Kept in one place so every serve bench measures raylm deployed the same way: a change to
how the app is started shows in all of them at once rather than in one of five copies.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from raylm.cluster import LocalCluster, free_port  # noqa: E402
from raylm.serve import deploy  # noqa: E402
from raylm.serve.cluster_env import cluster_env  # noqa: E402

APP = "raylm-bench"
KEY = "sk-bench"
EXTRA: list[str] = []  # --set overrides for every raylm deploy (bench/serve.py)
VLLM_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}  # same engine processes as raylm's


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile; NaN for no values, so an empty level shows as such."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def http_client(url: str, key: str) -> httpx.AsyncClient:
    """No connection cap: the 32-client level must not queue inside the load generator."""
    return httpx.AsyncClient(
        base_url=url,
        headers={"Authorization": f"Bearer {key}"},
        timeout=600,
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
    )


def workdir(name: str, model: str | None) -> tuple[Path, str]:
    """A fresh temp dir for the run and the model to serve: ``model`` or, by default, the
    tiny model built into that dir (no hub download on this machine)."""
    work = Path(tempfile.mkdtemp(prefix=f"raylm-bench-{name}-"))
    if model:
        return work, model
    from raylm.models.tiny import build

    return work, str(build(work / "tiny"))


def write_result(out: str, result: dict) -> Path:
    """The JSON a docs/benchmarks.md row is read from, relative to the repo root."""
    path = ROOT / out
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {path}", flush=True)
    return path


@contextlib.contextmanager
def raylm_cluster(home: Path) -> Iterator[tuple[dict, str]]:
    """A private 2-CPU local Ray cluster under ``home``; yields the environment for
    ``jobs/serve.py`` (RAYLM_HOME, RAY_ADDRESS) and the dashboard URL. On the way out the
    app goes down before the cluster, so no replica outlives the run."""
    cluster = LocalCluster(home / "cluster")
    info = cluster.up(num_cpus=2, env=cluster_env)
    env = os.environ | {"RAYLM_HOME": str(home), "RAY_ADDRESS": info.gcs_address}
    try:
        yield env, info.dashboard_url
    finally:
        try:
            deploy.down(APP, info.dashboard_url)
        finally:
            cluster.down()


def deploy_raylm(model_dir: str, env: dict, work: Path, *overrides: str) -> str:
    """``jobs/serve.py conf/serve/tiny.yaml`` with the bench's settings; returns the URL
    from the job's manifest once the app is RUNNING."""
    cmd = [
        sys.executable,
        str(ROOT / "jobs" / "serve.py"),
        str(ROOT / "conf/serve/tiny.yaml"),
        f"model.path={model_dir}",
        f"app_name={APP}",
        "http.port=0",
        f"auth.api_keys=[{KEY}]",
        f"output_dir={work / 'serve'}",
        "engine.max_num_seqs=32",
        *EXTRA,
        *overrides,
    ]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads((work / "serve" / "manifest.json").read_text())["outputs"]["url"]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Until ``url`` answers below 500; fails at once if ``proc`` (the server) exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} not up after {timeout}s")


@contextlib.contextmanager
def vllm_server(model_dir: str, work: Path) -> Iterator[dict]:
    """vLLM's own OpenAI server on the same model and limits as raylm's deploy, in its own
    process group so that stopping it stops its engine too."""
    port = free_port()
    env = os.environ | {"VLLM_CPU_KVCACHE_SPACE": "1"} | VLLM_ENV
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
           "--model", model_dir, "--served-model-name", "tiny",
           "--port", str(port), "--host", "127.0.0.1",
           "--max-model-len", "512", "--max-num-seqs", "32", "--enforce-eager"]  # fmt: skip
    log = open(work / "vllm.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        t0 = time.monotonic()
        wait_http(f"http://127.0.0.1:{port}/v1/models", 600, proc)
        print(f"vLLM server up in {time.monotonic() - t0:.0f}s", flush=True)
        yield {"url": f"http://127.0.0.1:{port}/v1", "key": "none", "pgid": proc.pid}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
