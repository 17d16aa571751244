"""``train.optimizer=muon`` (LLaMA-Factory's ``use_muon``): which weights Muon gets, and
that DeepSpeed's Muon with raylm's per-shape groups steps as LLaMA-Factory's own Muon
class does (transcribed from ``third_party/muon/muon.py`` at ff6d4d12)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from raylm.config import ConfigError, load
from raylm.train import muon

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def eager(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """DeepSpeed compiles its Muon update with torch.compile: a minute on CPU; eager here.
    Newton-Schulz runs in fp32 on both sides: in bf16 (LLaMA-Factory's, and DeepSpeed's
    where the accelerator has bf16) the rounding of each element moves ~5% with the
    scale of the input, and DeepSpeed's momentum is an average where LLaMA-Factory's is
    a sum (the same direction, 20x smaller), so bf16 results agree only to that."""
    from deepspeed.runtime.zero.muon import original_muon

    monkeypatch.setattr(original_muon, "ns_compute_dtype", lambda method: torch.float32)
    with torch._dynamo.config.patch(disable=True):
        yield


def lf_newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """LLaMA-Factory's ``zeropower_via_newtonschulz5``, in fp32 (see ``eager``)."""
    a, b, c = (3.4445, -4.7750, 2.0315)
    x = g.float()
    if g.size(0) > g.size(1):
        x = x.T
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        m = x @ x.T
        x = a * x + (b * m + c * m @ m) @ x
    return x.T if g.size(0) > g.size(1) else x


def lf_muon_step(params, state, lr, wd, use_muon, step) -> None:
    """One step of LLaMA-Factory's Muon (momentum 0.95, nesterov, 5 NS steps) and of its
    AdamW half (betas 0.9/0.999, eps 1e-8)."""
    for p in params:
        g = p.grad
        if use_muon[p]:
            buf = state.setdefault(p, torch.zeros_like(g))
            buf.mul_(0.95).add_(g)
            u = lf_newton_schulz(g.add(buf, alpha=0.95))
            p.data.mul_(1 - lr * wd)
            p.data.add_(u, alpha=-lr * 0.2 * math.sqrt(max(p.shape[:2])))
        else:
            m1, m2 = state.setdefault(p, (torch.zeros_like(g), torch.zeros_like(g)))
            m1.lerp_(g, 0.1)
            m2.lerp_(g.square(), 0.001)
            scale = (1 - 0.9**step) / (1 - 0.999**step) ** 0.5
            p.data.mul_(1 - lr * wd)
            p.data.add_(m1 / (1e-8 + m2.sqrt()), alpha=-lr / scale)


class Toy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(11, 12)
        self.up = torch.nn.Linear(12, 32)  # tall: DeepSpeed scales by sqrt(32/12)
        self.down = torch.nn.Linear(32, 12, bias=False)  # wide
        self.lm_head = torch.nn.Linear(12, 11, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.down(torch.tanh(self.up(self.embed_tokens(ids)))))


def _loss(model: torch.nn.Module, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 11, (4, 6), generator=g)
    return torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.roll(1).flatten())


def test_deepspeed_muon_with_raylm_groups_steps_as_llamafactory() -> None:
    from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam

    torch.manual_seed(0)
    ours, theirs = Toy(), Toy()
    theirs.load_state_dict(ours.state_dict())
    lr, wd = 0.01, 0.1
    groups = muon.muon_param_groups(ours, lr, wd)
    optim = MuonWithAuxAdam(groups, adam_optimizer=torch.optim.AdamW, adam_w_mode=True)
    names = {p: n for n, p in ours.named_parameters()}
    assert sorted(names[p] for g in groups if g["use_muon"] for p in g["params"]) == [
        "down.weight",
        "up.weight",
    ]
    assert groups[0]["lr"] == lr and not groups[0]["use_muon"]
    flags = {p: muon.is_muon(n, p) for n, p in theirs.named_parameters()}
    state: dict = {}
    start = {n: p.detach().clone() for n, p in ours.named_parameters()}
    for step in (1, 2, 3):
        for model in (ours, theirs):
            model.zero_grad()
            _loss(model, step).backward()
        optim.step()
        lf_muon_step(list(theirs.parameters()), state, lr, wd, flags, step)
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        # AdamW: LLaMA-Factory adds eps before the bias correction (31x larger at step 1),
        # which shows only where a gradient is near 0 (embedding rows of unseen ids)
        tol = 1e-5 if flags[b] else 1e-3
        assert torch.allclose(a, b, atol=tol, rtol=0), name
        assert (a - start[name]).abs().max() > 1e-3, name  # every weight moved


def test_llamafactory_split_on_the_tiny_model(tiny_model: Path) -> None:
    from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam

    from raylm.train.model import build_optimizer, load_model

    files = [ROOT / "conf/train/sft_lora.yaml"]
    cfg = load(
        "train",
        files,
        [f"model.name_or_path={tiny_model}", "finetuning_type=full", "train.optimizer=muon"],
    )
    model = load_model(cfg)
    optim, sched = build_optimizer(model, cfg, total_steps=4)
    assert isinstance(optim, MuonWithAuxAdam)
    names = {id(p): n for n, p in model.named_parameters()}
    split = {True: set(), False: set()}
    for g in optim.param_groups:
        split[g["use_muon"]] |= {names[id(p)] for p in g["params"]}
        if g["use_muon"]:
            rows, cols = g["params"][0].shape
            assert g["lr"] == pytest.approx(cfg.train.lr * muon.lr_factor(rows, cols))
    everything = {n for n, p in model.named_parameters() if p.requires_grad}
    assert split[True] | split[False] == everything and not split[True] & split[False]
    assert all(n.endswith("proj.weight") for n in split[True])  # attention and MLP matrices
    assert any("embed_tokens" in n for n in split[False]) and any("norm" in n for n in split[False])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.tensor([[1, 17, 40, 99, 301, 7]])
    model(input_ids=ids, labels=ids).loss.backward()
    optim.step()
    sched.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert split[True] <= changed
    with pytest.raises(ConfigError, match=r"train\.optimizer"):
        load("train", files, [f"model.name_or_path={tiny_model}", "train.optimizer=lion"])
    lora = load(
        "train",
        files,
        [f"model.name_or_path={tiny_model}", "train.optimizer=muon", "lora.loraplus_lr_ratio=16"],
    )
    with pytest.raises(ConfigError, match="pick one"):
        build_optimizer(load_model(lora), lora, total_steps=4)


def test_llamafactory_use_muon_maps(tmp_path: Path, tiny_model: Path) -> None:
    from llamafactory_helpers import example, lf

    cfg = load("train", [example("extras/muon/qwen2_full_sft.yaml", tmp_path, tiny_model)])
    assert (cfg.finetuning_type, cfg.train.optimizer) == ("full", "muon")
    assert load("train", [lf(tmp_path, use_muon=False)]).train.optimizer == "adamw"
