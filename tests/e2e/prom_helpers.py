"""Reading a local cluster's Prometheus metrics as a scraper would (the e2e serve tests)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx


def metric_lines(temp_dir: str) -> list[str]:
    """Every line of every node's metrics endpoint, found through the service-discovery
    file Ray writes for Prometheus; a node not answering contributes nothing."""
    sd = Path(temp_dir) / "session_latest" / "prom_metrics_service_discovery.json"
    lines: list[str] = []
    for target in [t for group in json.loads(sd.read_text()) for t in group["targets"]]:
        try:
            lines += httpx.get(f"http://{target}/metrics", timeout=10).text.splitlines()
        except httpx.HTTPError:
            continue
    return lines
