"""Tiny offline models: a random Llama plus a BPE tokenizer trained on a bundled corpus.

Nothing can be downloaded here, yet every stage must load a real Hugging Face
directory. ``build`` writes one (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json with a chat template, generation_config.json) that the rest of
raylm loads exactly like a hub model: nothing downstream knows it is tiny.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

CORPUS_DIR = Path(__file__).parent / "corpus"

# ChatML-style: simple, unambiguous, and the assistant turns are easy to mask for SFT.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|im_end|>", "<|im_start|>", "<|unk|>"]


@dataclass(frozen=True)
class TinySpec:
    """Shape of the tiny model; the default has about 1.3M parameters."""

    vocab_size: int = 2048
    """BPE vocabulary learnt from the corpus (special tokens included)."""

    hidden_size: int = 128
    """Width of the residual stream."""

    intermediate_size: int = 384
    """Width of the MLP."""

    num_layers: int = 4
    """Decoder layers."""

    num_heads: int = 2
    """Attention heads (head_dim 64: a size every vLLM attention backend supports)."""

    num_kv_heads: int = 1
    """Key/value heads (grouped-query attention, like current Llamas)."""

    max_position_embeddings: int = 1024
    """Longest sequence the model (and vLLM's max_model_len) accepts."""

    seed: int = 0
    """Seed of the random initialisation: the same seed gives the same weights."""


def train_tokenizer(spec: TinySpec, corpus_dir: Path = CORPUS_DIR):  # -> PreTrainedTokenizerFast
    """Byte-level BPE, so any UTF-8 text (CJK, emoji) tokenizes without unknowns."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    files = sorted(str(p) for p in corpus_dir.glob("*.txt"))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train(files, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token="<|unk|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=spec.max_position_embeddings,
    )


def build(out_dir: str | Path, spec: TinySpec | None = None) -> Path:
    """Write a complete HF model directory; cheap to call again (it is deterministic)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    spec = spec or TinySpec()
    out = Path(out_dir)
    marker = out / "raylm_tiny.json"
    if marker.exists() and json.loads(marker.read_text()) == asdict(spec):
        return out
    tokenizer = train_tokenizer(spec)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=32,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    marker.write_text(json.dumps(asdict(spec), indent=2))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the tiny offline Llama model.")
    parser.add_argument("out_dir", help="directory to write the Hugging Face model to")
    parser.add_argument("--hidden-size", type=int, default=TinySpec.hidden_size)
    parser.add_argument("--num-layers", type=int, default=TinySpec.num_layers)
    parser.add_argument("--seed", type=int, default=TinySpec.seed)
    args = parser.parse_args(argv)
    spec = TinySpec(hidden_size=args.hidden_size, num_layers=args.num_layers, seed=args.seed)
    print(build(args.out_dir, spec))


if __name__ == "__main__":
    main()
