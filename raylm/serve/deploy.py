"""Declarative deploys through the Serve REST API, as ``serve deploy`` does.

The controller owns an app deployed this way, so it outlives the command (a job that
calls ``serve.run`` does not). The REST API takes the *whole* list of applications:
a PUT without an app deletes it. So deploying or removing one raylm app reads the
current config and writes it back with only that app added, replaced or removed,
leaving everyone else's apps alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from raylm.cluster import ClusterError, free_port, resolve_dashboard
from raylm.config import ConfigError
from raylm.serve import versions


def _client(address: str | None) -> Any:
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    return ServeSubmissionClient(resolve_dashboard(address))


def details(address: str | None = None) -> dict[str, Any]:
    """The Serve REST API's view: proxy options and every app with its deployments."""
    return _client(address).get_serve_details()


def current_port(info: dict[str, Any]) -> int | None:
    """The port of the running proxy (fixed for Serve's lifetime), or None if Serve is down."""
    if not info.get("controller_info", {}).get("node_id"):
        return None
    return (info.get("http_options") or {}).get("port")


def choose_port(requested: int, address: str | None = None) -> int:
    """Serve runs one proxy per cluster: reuse its port, else the requested or a free one."""
    return current_port(details(address)) or requested or free_port()


def _declared_apps(info: dict[str, Any]) -> list[dict[str, Any]]:
    apps = []
    for app in (info.get("applications") or {}).values():
        declared = app.get("deployed_app_config")
        if declared:
            apps.append(declared)
    return apps


def merged(info: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """The full config to PUT: ``config``'s apps added or replaced, everyone else's kept."""
    mine = {a["name"] for a in config["applications"]}
    others = [a for a in _declared_apps(info) if a["name"] not in mine]
    check_route_prefixes(others, config["applications"])
    body = dict(config)
    port = current_port(info)
    if port:  # the proxy cannot move; asking for another port would be rejected
        body["http_options"] = {**config.get("http_options", {}), "port": port}
    body["applications"] = others + list(config["applications"])
    return body


def check_route_prefixes(others: list[dict[str, Any]], mine: list[dict[str, Any]]) -> None:
    """Refuse an app whose route prefix another app holds, before Serve does.

    Serve rejects the whole PUT with a pydantic traceback ("Found duplicate applications
    for route prefix") that names neither app; this says which app holds it and what to do.
    """
    held = {_prefix(a): a["name"] for a in others}
    for app in mine:
        holder = held.get(_prefix(app))
        if holder is not None:
            raise ConfigError(
                f"route prefix {_prefix(app)!r} is held by serve app {holder!r}; deploy "
                f"{app['name']!r} under another prefix, e.g. route_prefix=/{app['name']} "
                f"(its API is then at /{app['name']}/v1), or remove {holder!r} first "
                f"with `raylm serve down {holder}`"
            )


def _prefix(app: dict[str, Any]) -> str:
    return (app.get("route_prefix") or "/").rstrip("/") or "/"


def without(info: dict[str, Any], name: str) -> dict[str, Any]:
    """The full config to PUT with app ``name`` removed."""
    http = {k: v for k, v in (info.get("http_options") or {}).items() if k in ("host", "port")}
    return {
        "http_options": http,
        "proxy_location": info.get("proxy_location") or "HeadOnly",
        "applications": [a for a in _declared_apps(info) if a["name"] != name],
    }


def deploy(config: dict[str, Any], address: str | None = None) -> None:
    """Add or replace the apps in ``config``; other declared apps keep running."""
    _client(address).deploy_applications(merged(details(address), config))


def down(name: str, address: str | None = None, wait_s: float = 180.0) -> bool:
    """Delete app ``name`` and wait until Serve has removed it; False if no such app.

    Other apps keep running. Serve deletes asynchronously (replicas drain first), so
    without the wait a caller that redeploys or checks right after sees it DELETING.
    """
    info = details(address)
    if name not in (info.get("applications") or {}):
        return False
    _client(address).deploy_applications(without(info, name))
    deadline = time.monotonic() + wait_s
    while name in (details(address).get("applications") or {}):
        if time.monotonic() > deadline:
            raise ClusterError(f"app {name!r} still deleting after {wait_s:.0f}s")
        time.sleep(1.0)
    return True


def change_traffic(
    name: str, change: Callable[[dict[str, Any]], dict[str, Any]], address: str | None = None
) -> dict[str, Any]:
    """Apply ``change`` (``versions.promote`` / ``rollback``) to app ``name``'s split.

    Only the router's ``user_config`` differs from the running app's declared config, so
    Serve takes the lightweight path: the router reconfigures in place, no replica
    restarts, and requests in flight finish on the version they started on.
    """
    info = details(address)
    app = next((a for a in _declared_apps(info) if a["name"] == name), None)
    if app is None:
        raise ConfigError(f"no serve app named {name!r} (see `raylm serve status`)")
    new = change(versions.router_config(app))
    http = {k: v for k, v in (info.get("http_options") or {}).items() if k in ("host", "port")}
    config = {"http_options": http, "applications": [versions.with_router_config(app, new)]}
    config["proxy_location"] = info.get("proxy_location") or "HeadOnly"
    deploy(config, address)
    return new


def status(address: str | None = None) -> dict[str, Any]:
    """Per app: status, message, URL and each deployment's status and RUNNING replicas."""
    return summarize(details(address))


def summarize(info: dict[str, Any]) -> dict[str, Any]:
    http = info.get("http_options") or {}
    apps = {}
    for name, app in (info.get("applications") or {}).items():
        deps = {}
        for dname, d in (app.get("deployments") or {}).items():
            running = [r for r in d.get("replicas", []) if r.get("state") == "RUNNING"]
            deps[dname] = {
                "status": d.get("status"),
                "replicas": len(running),
                "message": d.get("message", ""),
            }
        prefix = (app.get("route_prefix") or "/").rstrip("/")
        declared = app.get("deployed_app_config") or {}
        traffic = [d.get("user_config") for d in declared.get("deployments") or []
                   if d.get("name") == versions.ROUTER]  # fmt: skip
        apps[name] = {
            "status": app.get("status"),
            "message": app.get("message", ""),
            "route_prefix": prefix or "/",
            "url": f"http://{http.get('host', '127.0.0.1')}:{http.get('port')}{prefix}/v1",
            "deployments": deps,
            **({"traffic": (traffic[0] or {}).get("weights")} if traffic else {}),
        }
    return {"http": {"host": http.get("host"), "port": http.get("port")}, "applications": apps}


def wait_running(name: str, timeout: float, address: str | None = None) -> dict[str, Any]:
    """Block until app ``name`` is RUNNING; fail fast with Serve's message if it broke."""
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        last = status(address)["applications"].get(name, {})
        if last.get("status") == "RUNNING":
            return last
        if last.get("status") in ("DEPLOY_FAILED", "UNHEALTHY"):
            why = [f"{d}: {v['message']}" for d, v in last["deployments"].items() if v["message"]]
            raise ClusterError(
                f"serve app {name!r} {last['status']}: {last.get('message')}"
                + "".join(f"\n  {w}" for w in why)  # the replica's own error, e.g. a traceback
            )
        time.sleep(1.0)
    raise ClusterError(f"serve app {name!r} not RUNNING after {timeout:.0f}s: {last}")


def replica_count(name: str, model_id: str, address: str | None = None) -> int:
    """RUNNING replicas serving ``model_id`` (its deployment is named ``<ServerClass>:<id>``)."""
    app = status(address)["applications"].get(name, {})
    deps = app.get("deployments", {})
    return sum(d["replicas"] for n, d in deps.items() if n.endswith(f":{model_id}"))
