"""GGUF files for llama.cpp and ollama (``quantize.method=gguf``), one per
``quantize.gguf_types`` entry, plus an ollama ``Modelfile``.

The conversion follows llama.cpp's ``convert_hf_to_gguf.py`` for the Llama architecture
(its ``LlamaModel`` and ``TextModel`` classes), written with the ``gguf`` package that
script itself uses: gguf's tensor-name map (``MODEL_ARCH.LLAMA``), its quantizers
(``gguf.quants``) and its ``SpecialVocab`` (merges, special tokens, chat template). The
converter is not on PyPI as such: the one repackaging of it there bundles its own copy of
the ``gguf`` package (file clashes with the real one, which transformers' GGUF loader
needs), so raylm carries this one, for Llama only; other architectures are refused by
name (convert them with llama.cpp's script).

Types: ``f32``, ``f16``, ``bf16`` and the block quants gguf can *quantize* in Python
(``q8_0``, ``q5_1``, ``q5_0``, ``q4_1``, ``q4_0``) are written here. The k-quants
(``q4_k_m`` ...) are dequantize-only in gguf: llama.cpp's ``llama-quantize`` writes them
from the f16 file (``raylm.export.llamacpp``). As in ``convert_hf_to_gguf.py``, 1-D
tensors and norms stay f32 and a tensor whose rows do not split into the type's blocks
falls back to f16; as ``llama-quantize`` does for its 4/5-bit types, ``output.weight`` is
kept at a higher precision (q8_0 here). Every file is then run by llama.cpp itself
(``llama-bench``): its tokens/s are in the figures, and a file llama.cpp cannot load
fails the job.

Tensors are read one at a time from the safetensors shards and written one at a time
(the tensor infos first, from the shapes alone), so memory stays about one tensor.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from raylm.config import ConfigError
from raylm.export import llamacpp
from raylm.export.config import GGUF_WRITTEN, ExportJobConfig, check_gguf_types
from raylm.export.ollama import modelfile

ARCHITECTURES = ("LlamaForCausalLM",)
"""HF architectures this converter handles (llama.cpp's ``MODEL_ARCH.LLAMA``)."""

LLAMA3_SPLIT = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}|"
    " ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
"""Llama 3's pre-tokenizer regex (llama.cpp's ``llama-bpe``)."""


# --- the model's tensors --------------------------------------------------------------


def _shards(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = dict.fromkeys(json.loads(index.read_text())["weight_map"].values())
        return [model_dir / f for f in files]
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise ConfigError(f"{model_dir}: no model.safetensors(.index.json) to convert to GGUF")
    return [single]


def _permute(w: Any, n_head: int, n_head_kv: int | None) -> Any:
    """llama.cpp's ``LlamaModel.permute``: HF's rotary halves to GGML's interleaved pairs."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


class _Tensors:
    """The HF tensors under their GGUF names, with the GGML type each is written in."""

    def __init__(self, model_dir: Path, hparams: dict, gtype: str) -> None:
        import gguf
        from safetensors import safe_open

        self.hp, self.shards = hparams, _shards(model_dir)
        self.names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, hparams["num_hidden_layers"])
        self.qtype = gguf.GGMLQuantizationType[gtype.upper()]
        self.plan: list[tuple[Path, str, str, tuple[int, ...], Any]] = []
        for shard in self.shards:
            with safe_open(str(shard), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    if name.endswith(".rotary_emb.inv_freq"):
                        continue
                    new = self.names.get_name(name, try_suffixes=(".weight", ".bias"))
                    if new is None:
                        raise ConfigError(f"GGUF: no llama.cpp name for tensor {name!r}")
                    shape = tuple(f.get_slice(name).get_shape())
                    self.plan.append((shard, name, new, shape, self._type(new, shape)))

    def _type(self, new: str, shape: tuple[int, ...]) -> Any:
        import gguf

        q = gguf.GGMLQuantizationType
        if len(shape) <= 1 or new.endswith("_norm.weight") or not new.endswith(".weight"):
            return q.F32
        qtype = self.qtype
        if new == "output.weight" and qtype in (q.Q4_0, q.Q4_1, q.Q5_0, q.Q5_1):
            qtype = q.Q8_0
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        return q.F16 if shape[-1] % block else qtype  # convert_hf_to_gguf's QuantError fallback

    def infos(self) -> Iterator[tuple[str, tuple[int, ...], Any, int, Any]]:
        import gguf
        import numpy as np

        for _, _, new, shape, qtype in self.plan:
            if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                dtype = np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16
                nbytes = math.prod(shape) * np.dtype(dtype).itemsize
                yield new, shape, np.dtype(dtype), nbytes, qtype
            else:
                byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
                yield new, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), qtype

    def data(self) -> Iterator[Any]:
        import gguf
        import torch
        from safetensors import safe_open

        n_head, n_kv = self.hp["num_attention_heads"], self.hp.get("num_key_value_heads")
        handles: dict[Path, Any] = {}
        try:
            for shard, name, _, _, qtype in self.plan:
                if shard not in handles:
                    handles.clear()  # one shard open at a time
                    handles[shard] = safe_open(str(shard), framework="pt")
                t = handles[shard].get_tensor(name).to(torch.float32)
                if name.endswith("q_proj.weight"):
                    t = _permute(t, n_head, n_head)
                elif name.endswith("k_proj.weight"):
                    t = _permute(t, n_head, n_kv)
                yield gguf.quants.quantize(t.numpy(), qtype)
        finally:
            handles.clear()


# --- the tokenizer --------------------------------------------------------------------


def _pre_tokenizer(tok_json: dict) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a byte-level BPE, read from its pre-tokenizer
    (convert_hf_to_gguf hashes the encoding of a probe text instead; the two supported
    shapes are the ones those hashes name ``gpt-2`` and ``llama-bpe``)."""
    pre = tok_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if (
        len(steps) == 2
        and steps[0].get("type") == "Split"
        and steps[0].get("pattern", {}).get("Regex") == LLAMA3_SPLIT
        and steps[1].get("type") == "ByteLevel"
        and not steps[1].get("use_regex", True)
    ):
        return "llama-bpe"
    raise ConfigError(
        f"GGUF: pre-tokenizer {json.dumps(pre)[:200]} is neither GPT-2's byte-level nor "
        "Llama 3's; convert this model with llama.cpp's convert_hf_to_gguf.py"
    )


def _add_vocab(writer: Any, model_dir: Path, vocab_size: int) -> None:
    """``TextModel._set_vocab_gpt2``: tokens with their types, merges, special tokens,
    add_bos/eos and the chat template."""
    import gguf
    from transformers import AutoTokenizer

    tok_file = model_dir / "tokenizer.json"
    if not tok_file.is_file():
        raise ConfigError(f"GGUF: {model_dir} has no tokenizer.json (a byte-level BPE is needed)")
    tok_json = json.loads(tok_file.read_text())
    if tok_json.get("model", {}).get("type") != "BPE":
        raise ConfigError("GGUF: only BPE tokenizers convert here (SentencePiece: use llama.cpp)")
    pre = _pre_tokenizer(tok_json)
    tok = AutoTokenizer.from_pretrained(model_dir)
    reverse = {i: t for t, i in tok.get_vocab().items()}
    added, decoder = tok.get_added_vocab(), tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            if not decoder[i].normalized:
                token = tok.decode(tok.encode(token, add_special_tokens=False))
            special = decoder[i].special or (token.startswith("<|") and token.endswith("|>"))
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, True)


# --- the file -------------------------------------------------------------------------


def _hparams(model_dir: Path) -> dict:
    hp = json.loads((model_dir / "config.json").read_text())
    arch = (hp.get("architectures") or ["?"])[0]
    if arch not in ARCHITECTURES:
        raise ConfigError(
            f"GGUF export converts the Llama architecture only ({', '.join(ARCHITECTURES)}); "
            f"this model is {arch}: convert it with llama.cpp's convert_hf_to_gguf.py"
        )
    rope = hp.get("rope_parameters") or hp.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ConfigError(
            f"GGUF: RoPE scaling {rope.get('rope_type') or rope.get('type')} is not converted "
            "here (llama.cpp's convert_hf_to_gguf.py writes its rope_freqs)"
        )
    return hp


def convert(model_dir: str | Path, out_file: str | Path, gtype: str) -> Path:
    """Write ``model_dir`` (a HF Llama in safetensors) as one GGUF file of type ``gtype``."""
    import gguf

    model_dir, out_file = Path(model_dir), Path(out_file)
    (gtype,) = check_gguf_types([gtype])
    if gtype not in GGUF_WRITTEN:
        raise ConfigError(f"{gtype}: llama.cpp's llama-quantize writes it from the f16 file "
                          "(raylm.export.llamacpp.quantize); convert writes " + ", ".join(GGUF_WRITTEN))  # fmt: skip
    hp = _hparams(model_dir)
    tensors = _Tensors(model_dir, hp, gtype)
    writer = gguf.GGUFWriter(out_file, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(model_dir.name)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    # TextModel.set_gguf_parameters + LlamaModel.set_gguf_parameters
    head_dim = hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"]
    rope = hp.get("rope_parameters") or {}
    writer.add_block_count(hp["num_hidden_layers"])
    writer.add_context_length(hp["max_position_embeddings"])
    writer.add_embedding_length(hp["hidden_size"])
    writer.add_feed_forward_length(hp["intermediate_size"])
    writer.add_head_count(hp["num_attention_heads"])
    writer.add_head_count_kv(hp.get("num_key_value_heads", hp["num_attention_heads"]))
    writer.add_rope_freq_base(float(rope.get("rope_theta", hp.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    if hp.get("head_dim") is not None:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(gguf.LlamaFileType[_FILE_TYPES[gtype]])
    writer.add_vocab_size(hp["vocab_size"])
    writer.add_rope_dimension_count(head_dim)
    _add_vocab(writer, model_dir, hp["vocab_size"])
    for name, shape, dtype, nbytes, qtype in tensors.infos():
        writer.add_tensor_info(name, shape, dtype, nbytes, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for data in tensors.data():
        writer.write_tensor_data(data)
    writer.close()
    return out_file


_FILE_TYPES = {
    "f32": "ALL_F32",
    "f16": "MOSTLY_F16",
    "bf16": "MOSTLY_BF16",
    "q8_0": "MOSTLY_Q8_0",
    "q5_1": "MOSTLY_Q5_1",
    "q5_0": "MOSTLY_Q5_0",
    "q4_1": "MOSTLY_Q4_1",
    "q4_0": "MOSTLY_Q4_0",
}


# --- figures --------------------------------------------------------------------------

DEFAULT_EVAL_TEXT = Path(__file__).resolve().parent.parent / "eval" / "sample" / "heldout.jsonl"


def held_out_docs(path: str | None) -> list[str]:
    """``quantize.eval_text`` (``raylm.export.quantize.read_docs``); unset: raylm's sample
    held-out text."""
    from raylm.export.quantize import read_docs

    return read_docs(path or str(DEFAULT_EVAL_TEXT), "quantize.eval_text")


def perplexity(model: Any, tokenizer: Any, docs: list[str], max_length: int = 512) -> float:
    """Token-level perplexity over ``docs`` (raylm.eval.model's per-document NLL)."""
    from raylm.eval.model import perplexity_stats

    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    stats = perplexity_stats(model, tokenizer, docs, max_length=max_length)
    return float(math.exp(stats[:, 0].sum() / max(stats[:, 1].sum(), 1)))


def model_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in _shards(model_dir))


def load_gguf(out_dir: Path, name: str) -> Any:
    """The GGUF file as transformers loads it (weights dequantized to float32)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out_dir, gguf_file=name, dtype=torch.float32)
    return model.eval()


def quantize(cfg: ExportJobConfig, merged: Path, out: Path) -> dict[str, Any]:
    """The ``gguf`` quantizer: a file per type, the Modelfile, and each file's size,
    conversion time and perplexity (as transformers runs it) against the merged model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    types = check_gguf_types(list(cfg.quantize.gguf_types))
    _hparams(merged)  # refuse before any work
    out.mkdir(parents=True, exist_ok=True)
    docs = held_out_docs(cfg.quantize.eval_text)
    tok = AutoTokenizer.from_pretrained(merged)
    source = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    base_ppl = perplexity(source, tok, docs, cfg.quantize.max_length)
    del source
    files = [_gguf_file(merged, out, t, tok, docs, cfg.quantize.max_length, base_ppl)
             for t in types]  # fmt: skip
    f16 = out / "model-f16.gguf"
    if "f16" not in types and f16.exists():
        f16.unlink()  # the k-quants' source, not asked for
    served = min(files, key=lambda f: f["bytes"])["file"]
    (out / "Modelfile").write_text(modelfile(merged, served))
    return {
        "method": "gguf",
        "hf_model_dir": False,  # llama.cpp / ollama run it; vLLM, eval and serve cannot
        "files": files,
        "modelfile": "Modelfile",
        "modelfile_from": served,
        "merged_bytes": model_bytes(merged),
        "merged_perplexity": base_ppl,
        "eval_docs": len(docs),
        "eval_text": cfg.quantize.eval_text or str(DEFAULT_EVAL_TEXT),
        "perplexity_by": "transformers, GGUF weights dequantized to float32",
        "speed_by": f"llama-bench ({llamacpp.SOURCE}), prompt 64 and 32 generated tokens",
    }


def _gguf_file(merged: Path, out: Path, t: str, tok: Any, docs: list[str], max_length: int,
               base_ppl: float) -> dict[str, Any]:  # fmt: skip
    """One file: written (k-quants by llama-quantize from the f16 file), then scored by
    transformers and run by llama.cpp (which proves llama.cpp loads it)."""
    start = time.perf_counter()
    path = out / f"model-{t}.gguf"
    if t in GGUF_WRITTEN:
        convert(merged, path, t)
    else:
        f16 = out / "model-f16.gguf"
        if not f16.exists():
            convert(merged, f16, "f16")
        llamacpp.quantize(f16, path, t)
    seconds = time.perf_counter() - start
    ppl = perplexity(load_gguf(out, path.name), tok, docs, max_length)
    return {
        "type": t,
        "file": path.name,
        "bytes": path.stat().st_size,
        "seconds": round(seconds, 3),
        "perplexity": ppl,
        "perplexity_ratio": ppl / base_ppl,
        "llama_cpp": llamacpp.bench(path),
    }
