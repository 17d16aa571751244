"""The embedded local Ray cluster, and how every command finds the cluster to use.

``ray stop`` stops every Ray cluster on the machine, which breaks a test suite or a
second user sharing the box. A LocalCluster therefore owns exactly one head node: it
runs ``ray start --head --block`` in a new process group, with its own temp dir and
free ports, and ``down`` ends that process group by PID and nothing else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raylm.process_groups import alive, kill_group
from raylm.ray_auth import auth_headers, use_token_auth_if_configured

NODE_LABEL = "raylm.io/node"
"""Ray node label naming a worker node that ``LocalCluster.add_node`` started."""

HOME_ENV = "RAYLM_HOME"
"""Directory for raylm's local state (the cluster record); default ``~/.raylm``."""


def raylm_home() -> Path:
    return Path(os.environ.get(HOME_ENV, Path.home() / ".raylm"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class ClusterInfo:
    """What a running local cluster is and how to reach it (persisted as JSON)."""

    gcs_address: str
    """``host:port`` of the GCS: what ``ray.init(address=...)`` and RAY_ADDRESS take."""

    dashboard_url: str
    """Dashboard and job API: what JobSubmissionClient and ``ray job submit`` take."""

    temp_dir: str
    """Ray's session/log directory for this cluster only."""

    pid: int
    """PID of ``ray start --block``; its process group holds every process of the cluster."""

    num_cpus: int
    """Logical CPUs the head advertises."""

    started_at: float
    """Unix time the cluster came up."""

    nodes: list[NodeInfo] = dataclasses.field(default_factory=list)
    """Worker nodes added with ``add_node``; ``down`` stops them with the head."""

    env: dict[str, str] = dataclasses.field(default_factory=dict)
    """Extra environment every node of the cluster started with (``up``'s ``env``)."""

    def __post_init__(self) -> None:
        self.nodes = [n if isinstance(n, NodeInfo) else NodeInfo(**n) for n in self.nodes]


@dataclasses.dataclass
class NodeInfo:
    """A worker node of the local cluster: its own ``ray start --block`` process group,
    so losing it (``remove_node``) is what losing a machine looks like to Ray."""

    name: str
    """The node's label (``raylm.io/node``), to find it in Ray's node list."""

    pid: int
    """PID of its ``ray start --block``; its process group holds the raylet and workers."""

    num_cpus: int
    """Logical CPUs it advertises."""


class ClusterError(RuntimeError):
    """The local cluster could not be started, reached or stopped."""


class LocalCluster:
    """One local Ray cluster (a head, and worker nodes if added) owned by this machine's
    user or by one test."""

    def __init__(self, state_dir: Path | None = None) -> None:
        self.state_dir = Path(state_dir or raylm_home() / "cluster")
        self.state_file = self.state_dir / "cluster.json"

    def info(self) -> ClusterInfo | None:
        """The recorded cluster if its head process is still alive."""
        if not self.state_file.exists():
            return None
        info = ClusterInfo(**json.loads(self.state_file.read_text()))
        return info if alive(info.pid) else None

    def up(
        self,
        num_cpus: int | None = None,
        timeout: float = 300.0,
        env: Callable[[str], dict[str, str]] | None = None,
        retry: bool = True,
        object_store_gb: float | None = None,
    ) -> ClusterInfo:
        """Start the cluster (or return the running one) and wait for its head node.

        ``env(temp_dir)`` gives extra environment for every node, e.g. what a cluster that
        serves needs (``raylm.serve.cluster_env``); the caller's own environment wins.
        ``object_store_gb`` caps Ray's shared-memory object store (default: 30 % of
        memory); objects beyond it spill to disk, which is what keeps a data job's memory
        within a budget (docs/data.md, "Memory").
        """
        running = self.info()
        if running is not None:
            return running
        self.state_dir.mkdir(parents=True, exist_ok=True)
        # Unix socket paths are capped at 107 bytes, so the temp dir must be short.
        temp_dir = tempfile.mkdtemp(prefix="raylm-", dir="/tmp")
        ports = {name: free_port() for name in _PORT_FLAGS}
        cpus = (os.cpu_count() or 1) if num_cpus is None else num_cpus
        cmd = [_ray_cli(), "start", "--head", "--block", f"--num-cpus={cpus}"]
        cmd += [f"--temp-dir={temp_dir}", "--include-dashboard=true", "--disable-usage-stats"]
        cmd += ["--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1"]
        cmd += [f"--{flag}={port}" for flag, port in ports.items()]
        if object_store_gb:
            cmd.append(f"--object-store-memory={int(object_store_gb * 2**30)}")
        extra = env(temp_dir) if env else {}
        log = open(self.state_dir / "ray-start.log", "ab")  # noqa: SIM115 (the child owns it)
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=_child_env(f"127.0.0.1:{ports['port']}", extra),
        )
        info = ClusterInfo(
            gcs_address=f"127.0.0.1:{ports['port']}",
            dashboard_url=f"http://127.0.0.1:{ports['dashboard-port']}",
            temp_dir=temp_dir,
            pid=proc.pid,
            num_cpus=cpus,
            started_at=time.time(),
            env=extra,
        )
        self.state_file.write_text(json.dumps(dataclasses.asdict(info), indent=2))
        try:
            _wait_ready(info, proc, timeout, self.state_dir / "ray-start.log")
        except ClusterError:
            self.down()
            if proc.poll() is not None and retry:  # start-up lost a race with load: again
                return self.up(num_cpus, timeout, env, retry=False, object_store_gb=object_store_gb)
            raise
        return info

    def add_node(self, num_cpus: int = 1, timeout: float = 120.0, attempts: int = 2) -> NodeInfo:
        """Start a worker node on this machine and wait until Ray counts it alive.

        Each node gets its own ports and process group; several nodes on one machine
        are how the multi-node paths (spreading, losing a node) are tested here. A node
        whose ``ray start`` exits during start-up is started again, with fresh ports, up
        to ``attempts`` times: Ray gives a raylet a fixed 30 s to register with the GCS
        (``ray._private.node``), which a busy 2-core machine can miss, and a port picked
        free can be taken before the node binds it.
        """
        for attempt in range(1, attempts + 1):
            info = self.info()
            if info is None:
                raise ClusterError("no local cluster to add a node to; `raylm cluster up` first")
            node, proc = self._start_node(info, num_cpus)
            try:
                _wait_node(info, node.name, proc, timeout)
                return node
            except ClusterError as err:
                if proc.poll() is None or attempt == attempts:
                    raise ClusterError(f"{err} (attempt {attempt} of {attempts}); "
                                       f"log: {self.state_dir / node.name}.log") from err  # fmt: skip
                self.remove_node(node)  # whatever it left running (a raylet) goes too
                print(f"raylm cluster: {err}; starting it again", file=sys.stderr)
        raise AssertionError("unreachable")

    def _start_node(self, info: ClusterInfo, num_cpus: int) -> tuple[NodeInfo, Any]:
        """One ``ray start`` of a worker node, recorded in the state file."""
        name = f"node{len(info.nodes) + 1}-{os.getpid()}-{int(time.time() * 1000) % 100000}"
        cmd = [_ray_cli(), "start", f"--address={info.gcs_address}", "--block"]
        cmd += [f"--num-cpus={num_cpus}", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
        cmd += [f"--labels={json.dumps({NODE_LABEL: name})}"]
        cmd += [f"--{flag}={free_port()}" for flag in _NODE_PORT_FLAGS]
        log = open(self.state_dir / f"{name}.log", "ab")  # noqa: SIM115 (the child owns it)
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env=_child_env(info.gcs_address, info.env),
        )  # fmt: skip
        node = NodeInfo(name=name, pid=proc.pid, num_cpus=num_cpus)
        info.nodes.append(node)
        self.state_file.write_text(json.dumps(dataclasses.asdict(info), indent=2))
        return node, proc

    def remove_node(self, node: NodeInfo) -> None:
        """Kill a worker node's whole process group with SIGKILL: a lost machine, not a
        drained one (nothing of it gets to say goodbye)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.pid, signal.SIGKILL)
        self._forget(node)

    def _forget(self, node: NodeInfo) -> None:
        """Reap a node's process and drop it from the state file."""
        with contextlib.suppress(ChildProcessError):
            os.waitpid(node.pid, 0)
        info = self.info()
        if info is not None:
            info.nodes = [n for n in info.nodes if n.pid != node.pid]
            self.state_file.write_text(json.dumps(dataclasses.asdict(info), indent=2))

    def down(self, timeout: float = 30.0) -> bool:
        """Stop this cluster's processes (and only them); False if none was running."""
        if not self.state_file.exists():
            return False
        info = ClusterInfo(**json.loads(self.state_file.read_text()))
        for node in info.nodes:
            kill_group(node.pid, timeout / 3)
        stopped = kill_group(info.pid, timeout)
        self.state_file.unlink(missing_ok=True)
        shutil.rmtree(info.temp_dir, ignore_errors=True)
        return stopped

    def status(self) -> dict[str, Any] | None:
        """Liveness plus the resources Ray reports, for ``raylm cluster status``."""
        info = self.info()
        if info is None:
            return None
        with _get(f"{info.dashboard_url}/api/cluster_status", timeout=10) as r:
            body = json.loads(r.read())
        return {"cluster": dataclasses.asdict(info), "ray": body.get("data", body)}


# Every port the head opens, so two clusters on one machine never collide.
_PORT_FLAGS = (
    "port",
    "dashboard-port",
    "ray-client-server-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "metrics-export-port",
    "runtime-env-agent-port",
    "node-manager-port",
    "object-manager-port",
)


# The ports a worker node opens besides the head's.
_NODE_PORT_FLAGS = (
    "node-manager-port",
    "object-manager-port",
    "metrics-export-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
)


def _wait_node(info: ClusterInfo, name: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ClusterError(f"worker node {name} exited with {proc.returncode}")
        with contextlib.suppress(OSError, ValueError):  # briefly unavailable at times
            if any(n["labels"].get(NODE_LABEL) == name for n in alive_nodes(info)):
                return
        time.sleep(1.0)
    raise ClusterError(f"worker node {name} did not join within {timeout:.0f}s")


def alive_nodes(info: ClusterInfo) -> list[dict[str, Any]]:
    """The cluster's live nodes (id, labels, resources) from its own dashboard.

    Asked by URL rather than through ``ray.util.state``, whose client replaces an explicit
    address with RAY_ADDRESS when that is set, and so may ask another cluster.
    """
    rows = state_rows(info, "nodes")
    return [n for n in rows if n["state"] == "ALIVE"]


def state_rows(info: ClusterInfo, kind: str) -> list[dict[str, Any]]:
    """Rows of Ray's state API (``nodes``, ``actors``, ...) from this cluster's dashboard."""
    with _get(f"{info.dashboard_url}/api/v0/{kind}?detail=1&limit=10000", timeout=10) as r:
        return json.loads(r.read())["data"]["result"]["result"]


def _ray_cli() -> str:
    """The ``ray`` script of this interpreter's environment, so the cluster runs our stack."""
    candidate = Path(sys.executable).parent / "ray"
    return str(candidate) if candidate.exists() else "ray"


def _child_env(gcs_address: str, extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    # Its own address, never another cluster's: every process of this cluster inherits it,
    # so Ray's own background ray.init() calls (Train's placement-group cleaner, the state
    # API) find this cluster even when several run on one machine.
    env["RAY_ADDRESS"] = gcs_address
    # Token auth on, explicitly: Ray's own clients (`ray job submit`, `ray status`) then
    # need RAY_AUTH_MODE=token too, which `raylm cluster up` prints; without it the
    # cluster's mode would depend on whether ~/.ray/auth_token happened to exist.
    env.setdefault("RAY_AUTH_MODE", "token")
    if env["RAY_AUTH_MODE"] == "token":
        ensure_auth_token()
    # A single node has nowhere to drain work to; draining only delays `down` by 30 s.
    env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")
    # Every node of this cluster shares one host, so a raylet that stops answering is
    # dead, not behind a flaky network: the GCS may declare it so after 5 refused checks
    # a second apart instead of Ray's 5 x 3 s. A hung (not dead) raylet still needs 5
    # timed-out checks of 10 s each. Training resumes that much sooner after a lost node.
    env.setdefault("RAY_health_check_period_ms", "1000")
    env.setdefault("RAY_health_check_initial_delay_ms", "1000")
    for key, value in extra.items():
        env.setdefault(key, value)
    # Job drivers inherit PATH from the raylet: put our interpreter first.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _wait_ready(info: ClusterInfo, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise ClusterError(f"ray start exited with {proc.returncode}:\n{tail}")
        # Serving jobs is not enough: on a loaded machine the head's raylet can miss
        # Ray's fixed registration window after the dashboard is up, and `ray start` then
        # exits. Ready means the head node counts as alive too.
        with (
            contextlib.suppress(OSError, KeyError, ValueError),
            _get(f"{info.dashboard_url}/api/jobs/", 2) as r,
        ):
            if r.status == 200 and alive_nodes(info):
                return
        time.sleep(0.5)
    raise ClusterError(f"local Ray cluster not ready after {timeout:.0f}s; see {log}")


def ensure_auth_token() -> None:
    """Create Ray's token file (``~/.ray/auth_token``) if neither it nor RAY_AUTH_TOKEN
    exists, with Ray's own command, as Ray documents for clusters started by ``ray start``."""
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    if (Path.home() / ".ray" / "auth_token").exists():
        return
    subprocess.run([_ray_cli(), "get-auth-token", "--generate"], check=True, capture_output=True)


def client_env(info: ClusterInfo) -> dict[str, str]:
    """What Ray's own CLI needs to reach this cluster: ``export`` these, then
    ``ray job submit --working-dir . -- python jobs/JOB.py ...`` works as documented."""
    return {
        "RAY_ADDRESS": info.gcs_address,
        "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token"),
    }


def _get(url: str, timeout: float) -> Any:
    """GET a dashboard endpoint, with Ray's auth header when token auth is on."""
    request = urllib.request.Request(url, headers=auth_headers())
    return urllib.request.urlopen(request, timeout=timeout)


def resolve_address(explicit: str | None = None) -> str | None:
    """The GCS address a job should join: flag, RAY_ADDRESS, the local cluster, or None."""
    if explicit:
        return explicit
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    info = LocalCluster().info()
    return info.gcs_address if info else None


def resolve_dashboard(explicit: str | None = None) -> str:
    """The job-API URL for ``raylm submit`` / ``raylm jobs``."""
    use_token_auth_if_configured()
    for candidate in (explicit, os.environ.get("RAY_DASHBOARD_ADDRESS")):
        if candidate:
            return candidate
    if os.environ.get("RAY_ADDRESS", "").startswith("http"):
        return os.environ["RAY_ADDRESS"]
    info = LocalCluster().info()
    if info is None:
        raise ClusterError(
            "no cluster to submit to: pass --address http://HEAD:8265, set RAY_ADDRESS, "
            "or start the local one with `raylm cluster up`"
        )
    return info.dashboard_url


def init_ray(address: str | None = None, namespace: str = "raylm") -> dict[str, Any]:
    """Join the cluster a job should run on, or start an embedded one in this process."""
    import ray

    from raylm import storage

    target = resolve_address(address)
    use_token_auth_if_configured()  # ray.init never does it for an explicit address
    # Workers get the node's environment, not this process's: pass storage credentials
    # and endpoints on. A submitted job got them at submission (raylm.submit).
    env = storage.forwarded_env()
    in_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
    runtime_env = {"env_vars": env} if env and not in_job else None
    ctx = ray.init(
        address=target, namespace=namespace, ignore_reinit_error=True, runtime_env=runtime_env
    )
    return {"address": target or "embedded", "dashboard_url": ctx.dashboard_url}
