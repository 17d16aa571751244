"""Adapter affinity benchmark: ``lora.affinity`` on vs off, two replicas, more adapters than
one replica keeps.

    .venv/bin/python bench/serve_affinity.py [--adapters 4] [--per-replica 2] [--requests 80]

The tiny model with ``--adapters`` random PEFT LoRAs, served by two replicas that keep
``--per-replica`` adapters each (``lora.max_adapters_per_replica``), on a private 2-CPU
local Ray cluster. Off: the HTTP front end picks any replica, which loads the adapter
asked for and evicts its least recently used one. On: the version router sends each
adapter request with Serve's ``multiplexed_model_id``, so it goes to a replica holding
that adapter. The same sequence of 1-token requests, cycling through the adapters, goes
to each (a seeded random choice of adapter per request: a fixed cycle can line up with a
round-robin front end and give affinity by accident): per setting, how many (adapter,
replica) pairs answered (on: each adapter stays on one replica), the mean and p90 latency
after a warm-up of twice the adapter count.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_common import APP, deploy_raylm, pct, raylm_cluster, workdir, write_result

from raylm.serve import deploy


def make_adapters(base: str, out: Path, n: int) -> Path:
    """``n`` PEFT LoRAs with random nonzero B (outputs differ from the base)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    for i in range(n):
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(base),
            LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        )
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, weight in model.named_parameters():
                if "lora_" in name:
                    weight.copy_(torch.randn(weight.shape, generator=gen) * 0.5)
        model.save_pretrained(out / f"a{i}")
    return out


def run(url: str, adapters: int, requests: int) -> dict:
    headers = {"Authorization": "Bearer sk-bench"}
    seen, lat = set(), []
    with httpx.Client(headers=headers, timeout=120) as h:
        rng = random.Random(0)  # not a cycle, which a round-robin front end could mirror
        for _ in range(requests):
            body = {"model": f"tiny:a{rng.randrange(adapters)}", "prompt": "hi", "max_tokens": 1}
            t = time.perf_counter()
            r = h.post(f"{url}/completions", json=body)
            lat.append(time.perf_counter() - t)
            r.raise_for_status()
            seen.add((body["model"], r.headers["x-raylm-replica"]))
    warm = lat[adapters * 2 :]
    return {
        "adapter_replica_pairs": len(seen),
        "mean_ms": round(1000 * statistics.fmean(warm), 1),
        "p90_ms": round(1000 * pct(warm, 0.9), 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--per-replica", type=int, default=2)
    parser.add_argument("--requests", type=int, default=80)
    parser.add_argument("--out", default="outputs/bench/serve_affinity.json")
    args = parser.parse_args()
    work, model = workdir("affinity", None)
    adapters = make_adapters(model, work / "adapters", args.adapters)
    result: dict = {"args": vars(args)}
    common = ["engine.dtype=float32", f"lora.adapters_dir={adapters}",
              f"lora.max_adapters_per_replica={args.per_replica}",
              "autoscaling.min_replicas=2", "autoscaling.max_replicas=2"]  # fmt: skip
    with raylm_cluster(work / "home") as (env, dashboard):
        os.environ.update(env)
        for setting in ("false", "true"):
            url = deploy_raylm(model, env, work, *common, f"lora.affinity={setting}")
            result[f"affinity_{setting}"] = run(url, args.adapters, args.requests)
            print(f"affinity={setting}: {result[f'affinity_{setting}']}", flush=True)
            deploy.down(APP, dashboard)
    print(json.dumps(result, indent=2))
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
