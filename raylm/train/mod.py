"""Mixture-of-depths (LLaMA-Factory's ``mixture_of_depths: convert | load``), built natively.

LLaMA-Factory converts the model with the MoD package (mixture-of-depth 1.2.0, which no
longer imports under transformers 5). raylm does the same conversion itself, keeping the
package's semantics and checkpoint layout:

- **Which layers.** Every odd-numbered decoder layer (1, 3, 5, ...) is wrapped; the even
  ones run on every token.
- **Routing.** A routed layer's router (``Linear(hidden, 1)``, with bias) scores every
  token of a sequence; the top ``k = max(1, int(capacity * seq_len))`` tokens per sequence
  (padding included, as the package) go through the decoder layer, in their original
  order, attending only to each other (the causal / padding / packing mask restricted to
  them) with their original rotary positions; the other tokens pass through unchanged.
- **Weighting.** A processed token's output is the decoder layer's output (residual
  included, as the package) times its raw router score, so the router gets gradients.
- **Capacity.** As the package: training forward number t of a layer uses
  ``0.125 + 0.875 / t`` (1.0 at the first, decaying to 0.125); eval uses the last training
  value, 0.125 on a model that has not trained in this process (a loaded one).
- **Saved.** The wrapped layer's weights live under ``model.layers.N.block.*`` and its
  router under ``model.layers.N.router.weight_predictor.*`` (the package's names), and
  config.json records ``mixture_of_depths: {routed_layers, capacity}`` with the
  architecture renamed ``...MoDForCausalLM``, as the package's save does. ``load`` reads
  such a directory (raylm's ``final/`` or a LLaMA-Factory MoD checkpoint) back.

Differences from the package: exactly k tokens are processed (the package's strict
``score > k-th score`` drops the k-th); the router runs in the model's dtype (the package
forces float32 at every call, which DeepSpeed's bf16 engine cannot hold) and selection
compares its scores in float32; the step counter is a buffer, so a resumed run continues
the capacity schedule instead of restarting it at 1.0.

Routing is not causal (top-k over the whole sequence), as in the package, so there is no
incremental decoding with a KV cache: a forward over a cache that already holds tokens is
refused (generate with ``use_cache=False``). vLLM has no MoD layers, so serve, generate,
eval and export refuse a MoD model (:func:`raylm.models.mod_marker.refuse_mod_model`).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from raylm.config import ConfigError
from raylm.models.mod_marker import MARKER, is_mod_config

MODES = ("convert", "load")
CAPACITY = 0.125
"""The share of a sequence's tokens a routed layer keeps once the schedule has decayed."""
ROUTER = ".router.weight_predictor."
BLOCK_KEYS = {r"^model\.layers\.(\d+)\.block\.": r"model.layers.\1."}
"""``from_pretrained``'s key_mapping that loads a routed layer's weights into the plain
layer before the conversion wraps it again."""


def routed_layers(num_layers: int) -> list[int]:
    """The MoD package's choice: every odd-numbered decoder layer."""
    return list(range(1, num_layers, 2))


def capacity_at(step: int, floor: float = CAPACITY) -> float:
    """Capacity after ``step`` training forwards (0: none in this process: the floor)."""
    return floor + (1.0 - floor) / step if step > 0 else floor


def top_k(capacity: float, seq_len: int) -> int:
    return max(1, min(seq_len, int(capacity * seq_len)))


@functools.cache
def _classes() -> tuple[type, type]:
    """The torch modules, built on first use so the guards above import no torch."""
    import torch
    from torch import nn

    class TokenRouter(nn.Module):
        """One score per token (the package's ``weight_predictor``)."""

        def __init__(self, hidden: int, dtype: Any, device: Any) -> None:
            super().__init__()
            self.weight_predictor = nn.Linear(hidden, 1, dtype=dtype, device=device)

        def forward(self, x: Any) -> Any:
            return self.weight_predictor(x).squeeze(-1)

    class MoDLayer(nn.Module):
        """A decoder layer that runs on the router's top-k tokens of each sequence."""

        def __init__(self, block: Any, hidden: int, capacity: float = CAPACITY) -> None:
            super().__init__()
            p = next(block.parameters())
            self.router = TokenRouter(hidden, p.dtype, p.device)
            self.block = block
            self.capacity = capacity
            self.register_buffer("mod_step", torch.zeros((), dtype=torch.long))
            if hasattr(block, "attention_type"):  # read by some models' layer loops
                self.attention_type = block.attention_type

        def forward(self, hidden_states, attention_mask=None, position_ids=None,
                    past_key_values=None, use_cache=False, position_embeddings=None,
                    **kwargs):  # fmt: skip
            x = hidden_states
            b, s, d = x.shape
            if past_key_values is not None and past_key_values.get_seq_length() > s:
                raise ValueError(
                    "mixture-of-depths layers route over the whole sequence: no "
                    "incremental decoding with a KV cache (generate with use_cache=False)"
                )
            scores = self.router(x)
            step = int(self.mod_step)
            if self.training:
                step += 1
                self.mod_step.fill_(step)
            k = top_k(capacity_at(step, self.capacity), s)
            idx = scores.float().topk(k, dim=1).indices.sort(dim=1).values  # [b, k]
            if position_ids is None:
                position_ids = torch.arange(s, device=x.device).unsqueeze(0)
            if position_embeddings is not None:
                position_embeddings = tuple(rows(t, idx) for t in position_embeddings)
            for name in ("cache_position", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
                         "max_length_k"):  # fmt: skip
                kwargs.pop(name, None)  # they describe the whole sequence
            out = self.block(
                rows(x, idx),
                attention_mask=subset_mask(attention_mask, idx, s),
                position_ids=segment_positions(position_ids.expand(b, s), idx),
                past_key_values=None,
                use_cache=False,
                position_embeddings=position_embeddings,
                **kwargs,
            )
            y = out[0] if isinstance(out, tuple) else out
            weighted = y * scores.gather(1, idx).unsqueeze(-1).to(y.dtype)
            mixed = x.scatter(1, idx.unsqueeze(-1).expand(-1, -1, d), weighted.to(x.dtype))
            return (mixed, *out[1:]) if isinstance(out, tuple) else mixed

    return TokenRouter, MoDLayer


def rows(t: Any, idx: Any) -> Any:
    """``t[i, idx[i]]`` for a [b or 1, s, ...] tensor: the selected tokens, in order."""
    t = t.expand(idx.shape[0], *t.shape[1:])
    view = idx.view(*idx.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:])
    return t.gather(1, view)


def subset_mask(mask: Any, idx: Any, s: int) -> Any:
    """The layer's mask restricted to the selected tokens: None stays None (causal among
    them, since they keep their order), a 2-D padding mask (flash attention) keeps their
    columns, a 4-D mask (sdpa, eager: causal + padding + packed documents) their rows
    and columns."""
    if mask is None:
        return None
    if not hasattr(mask, "dim") or mask.dim() not in (2, 4) or mask.shape[-1] != s:
        raise ValueError(
            f"mixture-of-depths: cannot restrict an attention mask of type "
            f"{type(mask).__name__} to the routed tokens; use attn_implementation "
            "sdpa, eager or flash_attention_2, without a KV cache"
        )
    b = idx.shape[0]
    if mask.dim() == 2:
        return rows(mask, idx)
    mask = mask.expand(b, *mask.shape[1:])
    if mask.shape[2] != 1:
        mask = mask.gather(2, idx[:, None, :, None].expand(-1, mask.shape[1], -1, mask.shape[3]))
    return mask.gather(3, idx[:, None, None, :].expand(-1, mask.shape[1], mask.shape[2], -1))


def segment_positions(position_ids: Any, idx: Any) -> Any:
    """Position ids for the selected tokens as the attention kernels read them: each
    packed document (a run starting at position 0) renumbered 0, 1, ... over its
    selected tokens, so flash attention finds the document bounds even when a
    document's first token was not selected. Rotary positions come from the gathered
    ``position_embeddings``, not from these."""
    import torch

    doc = (position_ids == 0).long().cumsum(1)  # document number of every token
    sel = doc.gather(1, idx)
    first = torch.ones_like(sel, dtype=torch.bool)
    first[:, 1:] = sel[:, 1:] != sel[:, :-1]
    ar = torch.arange(idx.shape[1], device=idx.device).expand_as(sel)
    start = torch.where(first, ar, torch.zeros_like(ar)).cummax(1).values
    return ar - start


def decoder_layers(model: Any) -> Any:
    """The decoder layers' ModuleList (``model.model.layers`` in Llama/Qwen/Mistral)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        kind = getattr(model.config, "model_type", type(model).__name__)
        raise ConfigError(
            f"model.mixture_of_depths: {kind} keeps no decoder layers at model.model.layers "
            "(Llama, Qwen2/3, Mistral and Gemma do); train it without mixture_of_depths"
        )
    return layers


def convert(model: Any, layers: list[int] | None = None, capacity: float = CAPACITY) -> Any:
    """Wrap ``layers`` (default: the odd ones) of ``model`` in place and mark its config."""
    import inspect

    _, mod_layer = _classes()
    decoder = decoder_layers(model)
    chosen = routed_layers(len(decoder)) if layers is None else sorted(layers)
    first = decoder[0]
    if "position_embeddings" not in inspect.signature(first.forward).parameters:
        raise ConfigError(
            f"model.mixture_of_depths: {type(first).__name__} takes no position_embeddings "
            "(transformers 5's decoder-layer call raylm routes); train without it"
        )
    hidden = model.config.get_text_config().hidden_size
    for i in chosen:
        if i >= len(decoder) or isinstance(decoder[i], mod_layer):
            raise ConfigError(f"model.mixture_of_depths: layer {i} cannot be routed")
        decoder[i] = mod_layer(decoder[i], hidden, capacity).train(decoder[i].training)
    model.config.mixture_of_depths = {"routed_layers": chosen, "capacity": capacity}
    name = type(model).__name__
    model.config.architectures = [name.replace("For", "MoDFor", 1) if "For" in name else name]
    return model


def router_weights(model_dir: str | Path) -> dict[str, Any]:
    """The router tensors a MoD checkpoint's safetensors files hold (small: 2 per layer)."""
    from safetensors import safe_open

    found: dict[str, Any] = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is no dict)
                if ROUTER in key:
                    found[key] = f.get_tensor(key)
    return found


def checkpoint_config(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def load_routers(model: Any, model_dir: str | Path) -> Any:
    """``mixture_of_depths: load``: ``model`` (loaded with :data:`BLOCK_KEYS`) wrapped at the
    layers ``model_dir``'s routers name, the routers copied in."""
    import torch

    state = router_weights(model_dir)
    if not state:
        raise ConfigError(
            f"model.mixture_of_depths=load: {model_dir} holds no MoD routers "
            f"(no '*{ROUTER}*' tensors); start a new MoD model with convert"
        )
    layers = sorted({int(k.split(".layers.")[1].split(".")[0]) for k in state})
    marker = checkpoint_config(model_dir).get(MARKER) or {}
    convert(model, layers, float(marker.get("capacity", CAPACITY)))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, tensor in state.items():
            name = key if key in params else key.removeprefix("model.")
            if name not in params:
                raise ConfigError(f"model.mixture_of_depths=load: {key} fits no router here")
            params[name].copy_(tensor.to(params[name].dtype))
    return model


def prepare(model: Any, mode: str | None, model_dir: str) -> Any:
    """The loading hook: ``convert`` wraps a plain model, ``load`` restores a MoD one."""
    saved = is_mod_config(checkpoint_config(model_dir))
    if mode is None:
        if saved:
            raise ConfigError(
                f"model.name_or_path={model_dir!r} is a mixture-of-depths model: set "
                "model.mixture_of_depths=load to train it with its routers"
            )
        return model
    if mode == "convert":
        if saved:
            raise ConfigError(
                f"model.mixture_of_depths=convert: {model_dir} is a MoD model already "
                "(its config.json says so); continue it with model.mixture_of_depths=load"
            )
        return convert(model)
    return load_routers(model, model_dir)
