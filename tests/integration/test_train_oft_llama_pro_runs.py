"""OFT and LLaMA Pro through the real train job (Ray Train + DeepSpeed ZeRO-3, one CPU
worker): OFT's loss goes down and final/ is the merged model computing base + adapter;
freeze tuning with ``freeze.llama_pro`` changes exactly the inserted blocks of an
expanded model. (Resume restores DeepSpeed's own checkpoint whatever the method trains,
and test_train_resume.py covers it; a second OFT run here only doubled the time.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from raylm.config import load
from raylm.train.report import read_metrics
from raylm.train.trainer import run_training

ROOT = Path(__file__).resolve().parents[2]
IDS = torch.tensor([[1, 17, 40, 99, 301, 7, 1200, 5, 64, 3]])
pytestmark = pytest.mark.timeout(900)  # a run takes 1-5 min on the shared 2-core machine


def _cfg(model: Path, storage: Path, name: str, *overrides: str):
    return load(
        "train",
        [ROOT / "conf/train/sft_lora.yaml"],
        [f"model.name_or_path={model}", f"data.path={ROOT / 'conf/train/data/alpaca_demo.json'}",
         f"storage_path={storage}", f"run_name={name}", "deepspeed.stage=3",
         "scaling.num_workers=1", "scaling.cpus_per_worker=1", "export.merge_lora=false",
         *overrides],
    )  # fmt: skip


@pytest.fixture(scope="module")
def oft_run(ray_connected_module, tiny_model: Path, tmp_path_factory) -> dict:
    storage = tmp_path_factory.mktemp("train_oft")
    cfg = _cfg(tiny_model, storage, "oft", "finetuning_type=oft", "oft.block_size=32",
               "train.lr=2e-2", "train.max_steps=6")  # fmt: skip
    return {"cfg": cfg, "out": run_training(cfg)}


def test_oft_loss_goes_down_under_zero3(oft_run: dict) -> None:
    run = Path(oft_run["out"]["run_dir"])
    losses = [m["loss"] for m in read_metrics(run / "metrics.jsonl")]
    print(f"OFT losses: {losses}")
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.05, losses


def test_oft_final_is_the_merged_model(oft_run: dict, tiny_model: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from raylm.train.job import model_output
    from raylm.train.oft import ADAPTER_DIR

    final = Path(oft_run["out"]["outputs"]["final"])
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    with torch.no_grad():
        plain = base(input_ids=IDS).logits
        merged = AutoModelForCausalLM.from_pretrained(final).eval()(input_ids=IDS).logits
        adapter = PeftModel.from_pretrained(base, str(final / ADAPTER_DIR)).eval()
        on_base = adapter(input_ids=IDS).logits
    print(f"OFT: trained vs base {(merged - plain).abs().max():.4f}, merged vs base+adapter "
          f"{(merged - on_base).abs().max():.2e}")  # fmt: skip
    assert (merged - plain).abs().max() > 1e-2
    assert torch.allclose(merged, on_base, atol=1e-4), (merged - on_base).abs().max()
    out = model_output(oft_run["cfg"], str(final))
    assert (out.adapter, out.trained_adapter) == (False, str(final / ADAPTER_DIR))


def test_llama_pro_changes_exactly_the_inserted_blocks(
    ray_connected_module, tiny_model: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    from raylm.train.llama_pro import expand

    pro = expand(tiny_model, tmp_path / "tiny-pro", num_expand=2)  # 4 -> 6 layers
    cfg = _cfg(pro, tmp_path, "pro", "finetuning_type=freeze", "freeze.trainable_layers=2",
               "freeze.llama_pro=true", "train.lr=1e-2", "train.max_steps=3")  # fmt: skip
    out = run_training(cfg)
    tuned = AutoModelForCausalLM.from_pretrained(out["outputs"]["final"]).state_dict()
    base = AutoModelForCausalLM.from_pretrained(pro).state_dict()
    changed = sorted(k for k in base if not torch.equal(base[k], tuned[k]))
    layers = {int(k.split(".")[2]) for k in changed if k.startswith("model.layers.")}
    print(f"LLaMA Pro: {len(changed)} tensors changed, in layers {sorted(layers)}")
    assert layers == {2, 5} and all(k.startswith("model.layers.") for k in changed), changed
