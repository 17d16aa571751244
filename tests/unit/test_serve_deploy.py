"""Declarative deploys keep other apps: the PUT body adds/replaces/removes only ours."""

from __future__ import annotations

import pytest

from raylm.config import ConfigError
from raylm.serve import deploy

INFO = {
    "controller_info": {"node_id": "n1"},
    "proxy_location": "HeadOnly",
    "http_options": {"host": "127.0.0.1", "port": 8123, "request_timeout_s": None},
    "applications": {
        "other": {
            "status": "RUNNING",
            "route_prefix": "/other",
            "deployed_app_config": {
                "name": "other",
                "import_path": "x:y",
                "route_prefix": "/other",
            },
            "deployments": {
                "D": {
                    "status": "HEALTHY",
                    "replicas": [{"state": "RUNNING"}, {"state": "STARTING"}],
                }
            },
        },
        "raylm": {
            "status": "DEPLOYING",
            "route_prefix": "/",
            "deployed_app_config": {"name": "raylm", "import_path": "old:app"},
            "deployments": {},
        },
    },
}


def _config(name: str = "raylm", port: int = 9999) -> dict:
    return {
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{"name": name, "import_path": "ray.serve.llm:build_openai_app"}],
    }


def test_deploy_replaces_ours_keeps_others_and_the_running_port() -> None:
    body = deploy.merged(INFO, _config())
    assert [a["name"] for a in body["applications"]] == ["other", "raylm"]
    assert body["applications"][1]["import_path"] == "ray.serve.llm:build_openai_app"
    assert body["http_options"]["port"] == 8123  # the proxy cannot move


def test_first_deploy_uses_the_requested_port() -> None:
    body = deploy.merged({"applications": {}}, _config(port=9999))
    assert body["http_options"]["port"] == 9999
    assert deploy.current_port({}) is None


def test_down_removes_only_the_named_app() -> None:
    body = deploy.without(INFO, "raylm")
    assert [a["name"] for a in body["applications"]] == ["other"]
    assert body["http_options"] == {"host": "127.0.0.1", "port": 8123}


def test_status_summary_counts_running_replicas() -> None:
    s = deploy.summarize(INFO)
    assert s["applications"]["other"]["deployments"]["D"]["replicas"] == 1
    assert s["applications"]["other"]["url"] == "http://127.0.0.1:8123/other/v1"
    assert s["applications"]["raylm"]["url"] == "http://127.0.0.1:8123/v1"


def test_a_taken_route_prefix_names_the_app_that_holds_it() -> None:
    clash = _config(name="second")
    clash["applications"][0]["route_prefix"] = "/other/"
    with pytest.raises(ConfigError) as err:
        deploy.merged(INFO, clash)
    message = str(err.value)
    assert "'/other' is held by serve app 'other'" in message
    assert "route_prefix=/second" in message and "raylm serve down other" in message


def test_replacing_an_app_keeps_its_own_route_prefix() -> None:
    again = _config(name="other")
    again["applications"][0]["route_prefix"] = "/other"
    body = deploy.merged(INFO, again)
    assert [a["name"] for a in body["applications"]] == ["raylm", "other"]
    moved = _config(name="raylm")
    moved["applications"][0]["route_prefix"] = "/"  # the app that held "/" was raylm itself
    assert deploy.merged(INFO, moved)["applications"][-1]["name"] == "raylm"
