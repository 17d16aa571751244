"""Serve job: deploy a model as a long-lived OpenAI-compatible Ray Serve app.

Writes ``serve_config.yaml`` (deployable with ``serve deploy``), deploys it through the
Serve REST API so the app outlives this process, waits until it is RUNNING and records
the endpoint in the manifest. ``raylm serve status`` / ``raylm serve down NAME`` manage it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from raylm.config import resolve_path, save_resolved, to_dict
from raylm.manifest import Manifest
from raylm.runner import entrypoint, load_from_argv
from raylm.serve.app import api_key_hashes, serve_config
from raylm.serve.config import ServeJobConfig
from raylm.serve.deploy import choose_port, deploy, wait_running


def redacted(cfg: ServeJobConfig) -> ServeJobConfig:
    """The config as recorded on disk: API keys replaced, so no file holds a secret."""
    hidden = ["<redacted>"] * len(cfg.auth.api_keys)
    return dataclasses.replace(cfg, auth=dataclasses.replace(cfg.auth, api_keys=hidden))


def main(argv: list[str] | None = None) -> int:
    cfg: ServeJobConfig = load_from_argv("serve", argv)
    out = Path(resolve_path(cfg.output_dir))
    inputs = [resolve_path(cfg.model.path)] + [resolve_path(p) for p in cfg.lora.adapters.values()]
    manifest = Manifest.start("serve", to_dict(redacted(cfg)), inputs=inputs)
    save_resolved(redacted(cfg), out)
    hashes = api_key_hashes(cfg)
    port = choose_port(cfg.http.port, cfg.dashboard_address)
    config = serve_config(cfg, hashes, port)
    config_path = out / "serve_config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    deploy(config, cfg.dashboard_address)
    url = f"http://{cfg.http.host}:{port}{cfg.route_prefix.rstrip('/')}/v1"
    print(f"serve: deployed app {cfg.app_name!r} ({config_path}); waiting for it to be RUNNING")
    state = (
        wait_running(cfg.app_name, cfg.wait_ready_s, cfg.dashboard_address)
        if cfg.wait_ready_s
        else {}
    )
    print(f"serve: {cfg.app_name} {state.get('status', 'DEPLOYING')} at {url}")
    manifest.finish(
        {"serve_config": str(config_path), "url": url},
        {"status": state.get("status", "DEPLOYING"), "port": port},
    )
    manifest.write(out)
    return 0


if __name__ == "__main__":
    entrypoint(main)
