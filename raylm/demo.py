"""``make demo``: the whole lifecycle on this machine, top to bottom.

1. build the tiny model (a random Llama + BPE tokenizer; nothing is downloaded),
2. start the embedded local Ray cluster (or reuse the running one),
3. submit ``conf/pipeline/demo.yaml`` through Ray's job API, exactly as one would to a
   cloud cluster: sample corpus -> clean/dedup/tokenize -> LoRA SFT with DeepSpeed
   ZeRO-3 -> eval -> gate -> serve with vLLM,
4. ask the served model for a chat completion with the ``openai`` client.

The cluster and the app keep running so the dashboard can be explored afterwards;
``raylm serve down raylm`` and ``raylm cluster down`` stop them.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time

from raylm import cli
from raylm.cluster import LocalCluster
from raylm.models.tiny import build
from raylm.serve.cluster_env import cluster_env
from raylm.submit import project_root

ROOT = project_root()
PIPELINE = "conf/pipeline/demo.yaml"
RUN_DIR = ROOT / "outputs" / "pipelines" / "demo"


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def start_cluster() -> str:
    """The serve stage reads API keys from the cluster's environment, so a cluster the
    demo starts gets one; a cluster that was already running must have been started
    with RAYLM_API_KEY exported."""
    cluster = LocalCluster()
    if cluster.info() is None:
        os.environ.setdefault("RAYLM_API_KEY", f"sk-raylm-demo-{secrets.token_hex(8)}")
    elif "RAYLM_API_KEY" not in os.environ:
        raise SystemExit(
            "a local cluster is already running: export the RAYLM_API_KEY it was started "
            "with, or `raylm cluster down` first"
        )
    info = cluster.up(env=cluster_env)  # its last stage serves
    print(f"RAY_ADDRESS={info.gcs_address}\ndashboard: {info.dashboard_url}")
    return info.dashboard_url


def chat(base_url: str, api_key: str) -> str:
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key=api_key)
    ids = [m.id for m in client.models.list().data]
    model = next((i for i in ids if ":" in i), ids[0])  # BASE:ADAPTER, the adapter trained
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What does the license permit?"}],
        max_tokens=32,
        temperature=0.0,
    )
    return f"[{model}] {reply.choices[0].message.content!r}"


def main() -> int:
    started = time.monotonic()
    step("1. build the tiny offline model")
    print(build(ROOT / "outputs" / "models" / "tiny"))

    step("2. start the embedded local Ray cluster")
    dashboard = start_cluster()

    step(f"3. submit the pipeline ({PIPELINE}) as a Ray job")
    code = cli.main(["submit", "pipeline", str(ROOT / PIPELINE)])
    if code != 0:
        print(f"pipeline failed (exit {code}); see `raylm jobs list` and the dashboard")
        return code
    print(cli_lineage())

    step("4. chat with the served model through the OpenAI API")
    serve = json.loads((RUN_DIR / "serve" / "manifest.json").read_text())
    print(chat(serve["outputs"]["url"], os.environ["RAYLM_API_KEY"]))

    print(f"\ndemo finished in {time.monotonic() - started:.0f}s; dashboard: {dashboard}")
    print("stop with: raylm serve down raylm && raylm cluster down")
    return 0


def cli_lineage() -> str:
    from raylm.pipeline.lineage import describe

    return describe(RUN_DIR)


if __name__ == "__main__":
    sys.exit(main())
