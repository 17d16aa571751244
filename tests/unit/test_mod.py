"""Mixture-of-depths (``model.mixture_of_depths``, ``raylm.train.mod``): the converted model
computes the original one when every token is routed with weight 1, a routed layer runs
exactly the top-k tokens as the original layer would run that subsequence, the router
learns, ``final/`` keeps the routers and ``load`` restores them, and what cannot work is
refused at config load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from raylm.config import ConfigError, load
from raylm.models.mod_marker import refuse_mod_model
from raylm.train import mod

ROOT = Path(__file__).resolve().parents[2]
IDS = torch.tensor([[1, 17, 40, 99, 301, 7, 1200, 5, 64, 3], [9, 8, 7, 6, 5, 4, 3, 2, 11, 12]])


def _model(path: Path, attn: str = "sdpa"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn).eval()


def _routed(model) -> list:
    return [m for m in mod.decoder_layers(model) if isinstance(m, mod._classes()[1])]


def _pass_all(model) -> None:
    """Capacity 1 and a router that scores every token 1: the layer's own output."""
    for layer in _routed(model):
        layer.capacity = 1.0
        with torch.no_grad():
            layer.router.weight_predictor.weight.zero_()
            layer.router.weight_predictor.bias.fill_(1.0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_full_capacity_unit_weight_keeps_the_logits(tiny_model: Path, attn: str) -> None:
    plain, routed = _model(tiny_model, attn), mod.convert(_model(tiny_model, attn))
    assert [i for i, m in enumerate(mod.decoder_layers(routed)) if m in _routed(routed)] == [1, 3]
    _pass_all(routed)
    mask = torch.ones_like(IDS)
    mask[1, :3] = 0  # left padding in the second row
    packed = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2]] * 2)  # three documents a row
    with torch.no_grad():
        for kw in ({}, {"attention_mask": mask}, {"position_ids": packed}):
            want, got = plain(input_ids=IDS, **kw).logits, routed(input_ids=IDS, **kw).logits
            keep = mask.bool() if kw.get("attention_mask") is not None else slice(None)
            assert torch.allclose(got[keep], want[keep], atol=1e-5), (kw, (got - want).abs().max())


def test_a_routed_layer_runs_the_top_k_subsequence(tiny_model: Path) -> None:
    """Capacity 0.5: exactly 5 of 10 tokens per row change, each as the plain layer computes
    that subsequence at its original positions times its score; the rest pass through."""
    model = mod.convert(_model(tiny_model))
    layer = _routed(model)[0]
    layer.capacity = 0.5
    inner = model.model
    x = torch.randn(2, 10, 128)
    pos = torch.arange(10).unsqueeze(0).expand(2, -1)
    cos, sin = inner.rotary_emb(x, pos)
    with torch.no_grad():
        out = layer(x, attention_mask=None, position_ids=pos, position_embeddings=(cos, sin))
        scores = layer.router(x)
        for row in range(2):
            top = scores[row].topk(5).indices.sort().values
            changed = (out[row] != x[row]).any(-1).nonzero().flatten()
            assert changed.tolist() == top.tolist()
            sub = x[row : row + 1, top]
            alone = layer.block(sub, attention_mask=None, position_ids=top[None],
                                position_embeddings=(cos[:1, top], sin[:1, top]))  # fmt: skip
            want = alone[0] * scores[row, top, None]
            assert torch.allclose(out[row, top], want, atol=1e-5)


def test_capacity_schedule_and_segment_positions() -> None:
    assert mod.routed_layers(6) == [1, 3, 5] and mod.routed_layers(1) == []
    assert mod.capacity_at(1) == 1.0 and mod.capacity_at(0) == mod.CAPACITY
    assert mod.capacity_at(7) == pytest.approx(0.25)
    assert mod.top_k(0.125, 10) == 1 and mod.top_k(0.125, 64) == 8 and mod.top_k(1.0, 5) == 5
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2]])
    idx = torch.tensor([[1, 3, 5, 6, 7]])  # the second document's first token is skipped
    assert mod.segment_positions(pos, idx).tolist() == [[0, 1, 0, 1, 0]]


def test_router_learns_and_the_schedule_counts_training_forwards(tiny_model: Path) -> None:
    model = mod.convert(_model(tiny_model)).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = _routed(model)
    loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    for layer in layers:
        grad = layer.router.weight_predictor.weight.grad
        assert grad is not None and grad.abs().sum() > 0
        assert int(layer.mod_step) == 1
    model.eval()
    with torch.no_grad():
        model(input_ids=IDS)
    assert [int(m.mod_step) for m in layers] == [1, 1]  # eval forwards do not count


def test_final_keeps_the_routers_and_load_restores_them(tiny_model: Path, tmp_path: Path) -> None:
    from raylm.train.export import export_to
    from raylm.train.model import load_model, load_tokenizer

    def cfg(path: Path, how: str):
        return load("train", [ROOT / "conf/train/pt_full.yaml"], [
            f"model.name_or_path={path}", f"model.mixture_of_depths={how}",
            "data.path=x.jsonl", "train.precision=fp32",
        ])  # fmt: skip

    first = cfg(tiny_model, "convert")
    model = load_model(first)
    torch.manual_seed(0)
    for layer in _routed(model):  # not the fresh init, which a reload could reproduce
        torch.nn.init.normal_(layer.router.weight_predictor.weight)
    out = tmp_path / "final"
    export_to(first, model, load_tokenizer(first), out, rank=0)
    config = json.loads((out / "config.json").read_text())
    assert config[mod.MARKER] == {"routed_layers": [1, 3], "capacity": mod.CAPACITY}
    assert config["architectures"] == ["LlamaMoDForCausalLM"]
    saved = sorted(mod.router_weights(out))
    assert saved == [f"model.layers.{i}.router.weight_predictor.{w}" for i in (1, 3)
                     for w in ("bias", "weight")]  # fmt: skip
    again = load_model(cfg(out, "load")).eval()
    model.eval()
    with torch.no_grad():
        want, got = model(input_ids=IDS).logits, again(input_ids=IDS).logits
    assert torch.equal(got, want)
    with pytest.raises(ConfigError, match="MoD model already"):
        load_model(cfg(out, "convert"))
    with pytest.raises(ConfigError, match="holds no MoD routers"):
        load_model(cfg(tiny_model, "load"))
    for job in ("serve", "eval", "export"):
        with pytest.raises(ConfigError, match=f"mixture-of-depths model.*{job} cannot"):
            refuse_mod_model(str(out), "model.path", job)
    refuse_mod_model(str(tiny_model), "model.path", "serve")  # a plain model passes


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["model.mixture_of_depths=convrt"], "did you mean 'convert'"),
        (["finetuning_type=lora"], "finetuning_type=lora"),
        (["finetuning_type=freeze"], "finetuning_type=freeze"),
        (["stage=dpo"], "stage dpo"),
    ],
)
def test_config_refusals(overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load("train", [ROOT / "conf/train/pt_full.yaml"], [
            "model.name_or_path=/m", "data.path=x.jsonl", "model.mixture_of_depths=convert",
            *overrides,
        ])  # fmt: skip


def test_llamafactory_mod_example_maps(tmp_path: Path, tiny_model: Path, workspace: Path) -> None:
    from llamafactory_helpers import example, lf

    path = example("extras/mod/llama3_full_sft.yaml", tmp_path, tiny_model, optim="adamw_torch")
    cfg = load("train", [path])
    assert (cfg.model.mixture_of_depths, cfg.finetuning_type) == ("convert", "full")
    with pytest.raises(ConfigError, match="mixture_of_depths=load with finetuning_type=lora"):
        load("train", [lf(tmp_path, mixture_of_depths="load", finetuning_type="lora")])
