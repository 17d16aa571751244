"""ZeRO-3 at load: each rank builds and fills only its partition of the weights.

Two real ranks (gloo, one process each, no Ray needed) load the tiny model through
``raylm.train.model.load_model`` with the DeepSpeed config the train job generates.
Every parameter must arrive partitioned (a DeepSpeed ZeRO-3 parameter holding about
half of its elements on each rank), and gathering it must give back exactly the
checkpoint's values: partitioning changed where the weights live, not what they are.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[2]


def _rank(rank: int, world: int, port: int, model: str, out: str) -> None:
    import json

    import deepspeed
    import torch
    import torch.distributed as dist
    from safetensors.torch import load_file

    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # what Ray Train (and torchrun) set for every rank
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from raylm.config import load
    from raylm.train.ds_config import deepspeed_config
    from raylm.train.model import load_model

    cfg = load("train", [ROOT / "conf/train/pt_full.yaml"], [f"model.name_or_path={model}"])
    params = dict(load_model(cfg, deepspeed_config(cfg, world)).named_parameters())
    on_disk = load_file(str(Path(model) / "model.safetensors"))
    report = {"partitioned": 0, "local": 0, "total": 0, "equal": True}
    for name, p in params.items():
        report["partitioned"] += int(hasattr(p, "ds_id") and p.numel() == 0)
        report["local"] += p.ds_tensor.numel()
        report["total"] += p.ds_numel
        with deepspeed.zero.GatheredParameters([p]):
            want = on_disk.get(name, on_disk.get(name.removeprefix("model.")))
            if want is None or not torch.equal(p.data, want.to(p.dtype)):
                report["equal"] = report["equal"] and name == "lm_head.weight"  # may be tied
    report["params"] = len(params)
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


def test_zero3_load_partitions_every_parameter_and_keeps_its_values(
    tiny_model: Path, tmp_path: Path
) -> None:
    import json

    import torch.multiprocessing as mp

    from raylm.cluster import free_port

    world = 2
    mp.start_processes(
        _rank, args=(world, free_port(), str(tiny_model), str(tmp_path)), nprocs=world,
        start_method="spawn",
    )  # fmt: skip
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    for report in reports:
        assert report["partitioned"] == report["params"], report
        assert report["equal"], "gathered weights differ from the checkpoint"
        # each rank holds about half (ZeRO pads each parameter to a multiple of world)
        assert report["local"] <= report["total"] / world + report["params"] * world
    assert sum(r["local"] for r in reports) >= reports[0]["total"]
