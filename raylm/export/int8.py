"""Dynamic INT8 for CPU inference (``quantize.method=int8_dynamic``): PyTorch's
``quantize_dynamic`` on every ``nn.Linear`` (weights int8 per output channel, stored;
activations quantized on the fly, per batch), the rest float32.

What is written (``output_dir/quantized``): ``int8_state_dict.pt`` (the quantized model's
state dict: plain tensors and packed int8 weights, which ``torch.load(weights_only=True)``
accepts), ``config.json``, ``generation_config.json``, the tokenizer, and
``raylm_int8.json`` (how it was made). It loads back with :func:`load_int8`, which builds
the architecture from the config, applies the same quantization and loads the state dict:
no pickled model class, so it does not depend on where transformers keeps its classes.
The same torch version family should load it (packed weights are backend structures:
fbgemm on x86, qnnpack on ARM). ``quantize_dynamic`` is deprecated in favour of torchao
but still in torch; transformers and vLLM cannot serve this format: it runs in a PyTorch
process (``load_int8`` then ``generate``).

    from raylm.export.int8 import load_int8
    model, tokenizer = load_int8("outputs/export/quantized")
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

from raylm.export.config import ExportJobConfig

STATE_FILE = "int8_state_dict.pt"
META_FILE = "raylm_int8.json"
COPIED = ("config.json", "generation_config.json")


def _quantize_module(model: Any) -> Any:
    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():  # torch.ao.quantization's deprecation notice (torchao)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig})


def quantize_model(model: Any) -> Any:
    """``model`` (float, eval mode) with its Linear layers dynamic-int8, in place."""
    return _quantize_module(model.eval())


def save_int8(model: Any, tokenizer: Any, source: Path, out: Path) -> Path:
    """Write a quantized model (from :func:`quantize_model`) with ``source``'s configs."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out / STATE_FILE)
    for name in COPIED:
        if (source / name).is_file():
            shutil.copy(source / name, out / name)
    tokenizer.save_pretrained(out)
    meta = {
        "format": "torch.ao.quantization.quantize_dynamic state dict",
        "layers": "torch.nn.Linear",
        "qconfig": "per_channel_dynamic_qconfig (qint8 weights, per output channel)",
        "torch": torch.__version__,
        "engine": torch.backends.quantized.engine,
        "load": "raylm.export.int8.load_int8(dir)",
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2))
    return out / STATE_FILE


def load_int8(path: str | Path) -> tuple[Any, Any]:
    """(model in eval mode on CPU, tokenizer) from a directory :func:`save_int8` wrote."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model = quantize_model(model)
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval(), AutoTokenizer.from_pretrained(path)


def quantize(cfg: ExportJobConfig, merged: Path, out: Path) -> dict[str, Any]:
    """The ``int8_dynamic`` quantizer: the files, their size, the time, and the
    perplexity of the loaded-back int8 model against the merged one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raylm.export.gguf import DEFAULT_EVAL_TEXT, held_out_docs, model_bytes, perplexity

    docs = held_out_docs(cfg.quantize.eval_text)
    tok = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    base_ppl = perplexity(model, tok, docs, cfg.quantize.max_length)
    start = time.perf_counter()
    state = save_int8(quantize_model(model), tok, merged, out)
    seconds = time.perf_counter() - start
    del model
    loaded, _ = load_int8(out)
    ppl = perplexity(loaded, tok, docs, cfg.quantize.max_length)
    return {
        "method": "int8_dynamic",
        "hf_model_dir": False,  # load_int8 in a PyTorch process; vLLM, eval and serve cannot
        "files": [
            {
                "type": "int8_dynamic",
                "file": state.name,
                "bytes": state.stat().st_size,
                "seconds": round(seconds, 3),
                "perplexity": ppl,
                "perplexity_ratio": ppl / base_ppl,
            }
        ],
        "merged_bytes": model_bytes(merged),
        "merged_perplexity": base_ppl,
        "eval_docs": len(docs),
        "eval_text": cfg.quantize.eval_text or str(DEFAULT_EVAL_TEXT),
        "load": "raylm.export.int8.load_int8(dir)",
    }
