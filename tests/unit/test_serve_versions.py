"""Canary versions: config checks, the weighted split, promote/rollback, the Serve config."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

import pytest

from raylm.config import ConfigError, load
from raylm.manifest import Manifest
from raylm.outputs import ModelOutput
from raylm.serve import app, deploy, versions
from raylm.serve.job import ServeJob


def _model(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


def _cfg(tmp_path: Path, *overrides: str):
    base = _model(tmp_path / "a")
    return load("serve", [], [f"model.path={base}", "auth.required=false", *overrides])


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["traffic={v1: 1}"], "traffic splits requests between versions: set versions too"),
        (["versions={canary: x}", "traffic={canery: 5}"], "did you mean 'canary'"),
        (["versions={v2: x}", "traffic={v1: -1}"], "traffic.v1=-1.0: a weight is a number >= 0"),
        (["versions={v2: x}", "traffic={v1: 0, v2: 0}"], "every weight is 0"),
        (["versions={v1: x}"], "'v1' is model.version already"),
        (["model.version=a:b"], "model.version='a:b'"),
    ],
)
def test_bad_versions_name_the_key(tmp_path: Path, overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        _cfg(tmp_path, *overrides)
    assert needle in str(err.value)


def test_weights_default_to_the_base_version_and_leave_others_at_zero() -> None:
    assert versions.weights_of("v1", {}, {}) == {"v1": 100.0}
    assert versions.weights_of("v1", {"v2": "p"}, {}) == {"v1": 100.0, "v2": 0.0}
    assert versions.weights_of("v1", {"v2": "p", "v3": "q"}, {"v2": 5}) == {
        "v1": 0.0, "v2": 5.0, "v3": 0.0,
    }  # fmt: skip


def test_weighted_picker_matches_95_5_exactly_and_spreads_the_canary() -> None:
    picker = versions.WeightedPicker({"stable": 95, "canary": 5})
    picks = [picker.pick() for _ in range(1000)]
    assert Counter(picks) == {"stable": 950, "canary": 50}
    canary_at = [i for i, p in enumerate(picks) if p == "canary"]
    assert max(b - a for a, b in itertools.pairwise(canary_at)) <= 20  # not in one run
    assert versions.WeightedPicker({"a": 1, "b": 0}).pick() == "a"


def test_promote_then_rollback_returns_to_the_previous_split() -> None:
    start = {"weights": {"v1": 95.0, "v2": 5.0}}
    half = versions.promote(start, "v2", 50)
    assert half["weights"] == {"v1": 50.0, "v2": 50.0}
    full = versions.promote(half, "v2", 100)
    assert full["weights"] == {"v1": 0.0, "v2": 100.0}
    assert versions.rollback(full)["weights"] == {"v1": 50.0, "v2": 50.0}
    three = versions.promoted({"a": 60, "b": 30, "c": 0}, "c", 10)
    assert three == {"a": 60.0, "b": 30.0, "c": 10} and sum(three.values()) == 100
    assert versions.promoted({"a": 100, "b": 0, "c": 0}, "a", 40) == {"a": 40, "b": 30, "c": 30}
    with pytest.raises(ConfigError, match=r"version='v3' is not one of \['v1', 'v2'\]"):
        versions.promote(start, "v3", 10)
    with pytest.raises(ConfigError, match=r"percent=0 must be in \(0, 100\]"):
        versions.promote(start, "v2", 0)
    with pytest.raises(ConfigError, match="has not changed since it was deployed"):
        versions.rollback(start)


def test_serve_config_has_one_deployment_per_version_and_the_router_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-unit")
    b = _model(tmp_path / "b")
    cfg = _cfg(tmp_path, f"versions={{canary: {b}}}", "traffic={v1: 95, canary: 5}")
    entry = app.serve_config(cfg, [], port=1)["applications"][0]
    args = entry["args"]
    assert sorted(args["versions"]) == ["canary", "v1"]
    assert args["weights"] == {"v1": 95.0, "canary": 5.0}
    sources = {n: a["llm_config"]["model_loading_config"] for n, a in args["versions"].items()}
    assert sources["canary"] == {"model_id": "raylm", "model_source": str(b)}
    assert entry["deployments"] == [
        {"name": versions.ROUTER, "user_config": {"weights": args["weights"]}}
    ]
    # one-version apps keep the replica as the ingress: no router, no versions key
    plain = app.serve_config(_cfg(tmp_path / "p"), [], port=1)["applications"][0]
    assert "versions" not in plain["args"] and "deployments" not in plain
    # the written file holds no credential of any version
    for model in args["versions"].values():
        model["llm_config"]["runtime_env"]["env_vars"]["AWS_SECRET_ACCESS_KEY"] = "secret-unit"
    written = app.without_credentials({"applications": [entry]})
    assert "secret-unit" not in json.dumps(written)


def test_a_version_may_be_a_run_dir_whose_manifest_names_the_model(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "sft"
    model = _model(run / "final")
    out = ModelOutput(str(model), False, "base", str(model), 64, "sft")
    m = Manifest.start("train", {}, [])
    m.finish({"final": str(model)}, {}, out.to_record())
    m.write(run)
    assert versions.version_model("v2", str(run)) == str(model)
    cfg = ServeJob().setup(_cfg(tmp_path, f"versions={{v2: {run}}}"))
    assert cfg.versions == {"v2": str(model)}
    m.fail(RuntimeError("boom")).write(run)
    with pytest.raises(ConfigError, match=r"versions\.v2=.*that run's manifest says failed"):
        versions.version_model("v2", str(run))


def test_change_traffic_writes_only_the_router_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """The PUT differs from the running app in the router's user_config alone (Serve's
    lightweight update), and every other app is kept."""
    mine = {"name": "m", "route_prefix": "/", "import_path": "x", "args": {"a": 1},
            "deployments": [{"name": versions.ROUTER, "user_config": {"weights": {"a": 1, "b": 0}}}]}  # fmt: skip
    other = {"name": "o", "route_prefix": "/o", "import_path": "y", "args": {}}
    info = {
        "controller_info": {"node_id": "n"},
        "http_options": {"host": "127.0.0.1", "port": 8123},
        "applications": {n["name"]: {"deployed_app_config": n} for n in (mine, other)},
    }
    sent = []
    monkeypatch.setattr(deploy, "details", lambda address=None: info)
    monkeypatch.setattr(deploy, "_client", lambda a: type("C", (), {
        "deploy_applications": staticmethod(sent.append)})())  # fmt: skip
    new = deploy.change_traffic("m", lambda c: versions.promote(c, "b", 100))
    assert new == {"weights": {"a": 0.0, "b": 100}, "previous": {"a": 1, "b": 0}}
    apps = {a["name"]: a for a in sent[0]["applications"]}
    assert apps["o"] == other and apps["m"]["args"] == mine["args"]
    assert apps["m"]["deployments"][0]["user_config"] == new
    assert sent[0]["http_options"]["port"] == 8123
    summary = deploy.summarize({**info, "applications": {"m": {"deployed_app_config": mine}}})
    assert summary["applications"]["m"]["traffic"] == {"a": 1, "b": 0}
    with pytest.raises(ConfigError, match="no serve app named 'nope'"):
        deploy.change_traffic("nope", versions.rollback)


def test_adapter_affinity_puts_the_router_in_front_of_one_version(tmp_path: Path) -> None:
    (tmp_path / "adapters").mkdir()
    on = _cfg(tmp_path, f"lora.adapters_dir={tmp_path / 'adapters'}", "lora.affinity=true")
    entry = app.serve_config(on, [], port=1)["applications"][0]
    assert list(entry["args"]["versions"]) == ["v1"] and entry["args"]["affinity"] is True
    assert entry["deployments"][0]["user_config"] == {"weights": {"v1": 100.0}}
    off = _cfg(tmp_path / "o", f"lora.adapters_dir={tmp_path / 'adapters'}")
    assert "versions" not in app.serve_config(off, [], port=1)["applications"][0]["args"]


def test_the_router_reads_which_adapter_a_body_asks_for() -> None:
    from raylm.serve.router import requested_adapter

    assert requested_adapter(b'{"model": "tiny:a1", "prompt": "x"}') == "tiny:a1"
    assert requested_adapter(b'{"model": "tiny", "prompt": "a:b"}') is None
    assert requested_adapter(b'{"model": 3, "prompt": "a:b"}') is None
    assert requested_adapter(b"not json: x") is None
    assert requested_adapter(b'["tiny:a1"]') is None
