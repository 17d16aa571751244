"""Shared fixtures. Tests that need Ray get their own local cluster and stop only it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from raylm.cluster import HOME_ENV, ClusterInfo, LocalCluster

ROOT = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tier marker follows the folder, so no test can forget it."""
    for item in items:
        for tier in ("unit", "integration", "e2e"):
            if f"{os.sep}{tier}{os.sep}" in str(item.path):
                item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(scope="session", autouse=True)
def ray_token_auth() -> None:
    """Run every cluster and client of the suite in Ray's token-auth mode.

    Ray 2.60 turns token auth on for any cluster started once ``~/.ray/auth_token``
    exists, and the first local ``ray.init()`` creates that file: left alone, clusters
    started before and after it would disagree. Making the mode explicit up front keeps
    the suite deterministic, and exercises the mode real users end up in.
    """
    from ray._private.authentication.authentication_token_setup import (
        _get_default_token_path,
        generate_and_save_token,
    )
    from ray._raylet import Config

    if not _get_default_token_path().exists():
        generate_and_save_token()
    os.environ["RAY_AUTH_MODE"] = "token"
    Config.initialize("")  # Ray caches the mode at import; make this process see it


@pytest.fixture(scope="session")
def raylm_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private RAYLM_HOME, so tests never see or stop a developer's own cluster."""
    home = tmp_path_factory.mktemp("raylm_home")
    old = os.environ.get(HOME_ENV)
    os.environ[HOME_ENV] = str(home)
    yield home
    if old is None:
        os.environ.pop(HOME_ENV, None)
    else:
        os.environ[HOME_ENV] = old


@pytest.fixture(scope="session")
def ray_cluster(raylm_home: Path) -> Iterator[ClusterInfo]:
    """One 2-CPU local cluster for the session (own temp dir and ports), RAY_ADDRESS set."""
    from raylm.serve.cluster_env import cluster_env

    cluster = LocalCluster(raylm_home / "cluster")
    info = cluster.up(num_cpus=2, env=cluster_env)  # the serve tests use it too
    old = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = info.gcs_address
    try:
        yield info
    finally:
        if old is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = old
        cluster.down()


def _joined(cluster: ClusterInfo) -> Iterator[ClusterInfo]:
    import ray

    os.environ.setdefault(
        "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/raylm/torch_extensions")
    )
    ray.init(address=cluster.gcs_address, namespace="raylm-tests", ignore_reinit_error=True)
    try:
        yield cluster
    finally:
        ray.shutdown()


@pytest.fixture
def ray_connected(ray_cluster: ClusterInfo) -> Iterator[ClusterInfo]:
    """This process joined to the session cluster for one test."""
    yield from _joined(ray_cluster)


@pytest.fixture(scope="module")
def ray_connected_module(ray_cluster: ClusterInfo) -> Iterator[ClusterInfo]:
    """This process joined to the session cluster for a module whose module-scoped
    fixtures run jobs (a trained run shared by its tests)."""
    yield from _joined(ray_cluster)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama + BPE tokenizer, built once per session."""
    from raylm.models.tiny import build

    return build(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def s3_bucket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One real S3-compatible server for the session (moto's, on a free loopback port),
    with the standard AWS environment pointing at it and one bucket; yields its URI.

    Stopped by PID; the environment is restored so later tests see no endpoint.
    """
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("s3") / "moto.log"
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "raylm-test",
        "AWS_SECRET_ACCESS_KEY": "raylm-test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(f"moto_server did not start: {log.read_text()}") from None
                time.sleep(0.2)
        import boto3

        boto3.client("s3").create_bucket(Bucket="raylm-test")
        yield "s3://raylm-test"
    finally:
        server.terminate()
        server.wait(timeout=30)
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def multinode_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """One head (no CPUs: it only hosts drivers and controllers) and three 1-CPU worker
    nodes, each its own ``ray start`` process group, for the tests where nodes are the
    subject. Separate from ``ray_cluster``; stopped by PID like it."""
    cluster = LocalCluster(tmp_path_factory.mktemp("multinode") / "cluster")
    cluster.up(num_cpus=0)
    try:
        for _ in range(3):
            cluster.add_node(num_cpus=1)
        yield cluster
    finally:
        cluster.down()


@pytest.fixture(scope="session")
def pt_train_config(tiny_model: Path):
    """Configs of the small run the fault-tolerance tests share: pt, full fine-tuning,
    DeepSpeed ZeRO-3, micro batch 2, a checkpoint every 2 steps; extra overrides last."""
    from raylm.config import load

    os.environ.setdefault(
        "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/raylm/torch_extensions")
    )

    def make(storage: str | Path, run_name: str, steps: int, *overrides: str):
        return load(
            "train",
            [ROOT / "conf/train/pt_full.yaml"],
            [
                f"model.name_or_path={tiny_model}",
                f"data.path={ROOT / 'conf/train/data/pt_demo.jsonl'}",
                f"storage_path={storage}",
                f"run_name={run_name}",
                f"train.max_steps={steps}",
                "train.micro_batch_size=2",
                "checkpoint.save_steps=2",
                *overrides,
            ],
        )

    return make


@pytest.fixture(scope="session")
def pt_reference(ray_cluster: ClusterInfo, pt_train_config, tmp_path_factory) -> Path:
    """The uninterrupted run every fault-tolerance test holds its interrupted run against
    (a worker killed, a job killed, a node lost): ``pt_train_config``'s run for 6 steps,
    keeping its two newest complete checkpoints, trained once on the session cluster.
    An interrupted run must match it loss for loss and weight for weight; what does not
    touch the numbers (placement, failure budget, sinks, where it is stored) may differ.
    Session-scoped, so it is set up before any module's own connection to its cluster."""
    import ray

    from raylm.train.trainer import run_training

    ray.shutdown()  # whatever this process was connected to: this run is the session's
    ray.init(address=ray_cluster.gcs_address, namespace="raylm-tests")
    try:
        cfg = pt_train_config(tmp_path_factory.mktemp("pt_reference"), "reference", 6,
                              "checkpoint.keep=2")  # fmt: skip
        return Path(run_training(cfg)["run_dir"])
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One real ``redis-server`` (the Debian package, `make setup` installs it) for the
    session, on a free loopback port in a temp dir, without persistence; yields its URL.
    Stopped by PID."""
    import shutil
    import socket
    import subprocess
    import time

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail(
            "redis-server is not installed: run `make setup` (apt-get install redis-server)"
        )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir = tmp_path_factory.mktemp("redis")
    args = ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir)]
    args += ["--save", "", "--appendonly", "no", "--protected-mode", "yes"]
    log = (workdir / "redis.log").open("wb")
    server = subprocess.Popen([binary, *args], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(64).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError(
                    f"redis-server did not start: {(workdir / 'redis.log').read_text()}"
                )
            time.sleep(0.1)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
