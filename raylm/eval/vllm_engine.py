"""Greedy generation with vLLM's offline ``LLM``, in a child process.

A child process because vLLM's engine spawns its own processes (it needs a ``__main__``
guard) and a live engine slows everything else in its process; the parent passes token
ids, so both engines see exactly the same prompts. vLLM's arguments come from the job's
``engine`` group through ``raylm.engine``, as for serve and generate.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from raylm import storage
from raylm.engine import EngineConfig, engine_env, engine_kwargs
from raylm.eval.model import ModelInfo


def merged_dir(info: ModelInfo, model: object, tokenizer: object, workdir: Path) -> str:
    """vLLM loads a local directory: an adapter is served from its merged weights, a
    full model in a bucket from this node's copy (already made by ``load_model``)."""
    if info.kind == "full":
        return storage.local_dir(info.path, key="model")
    out = workdir / "merged"
    model.save_pretrained(out, safe_serialization=True)  # type: ignore[attr-defined]
    tokenizer.save_pretrained(out)  # type: ignore[attr-defined]
    return str(out)


def generate_vllm(
    model_dir: str, prompts: Sequence[list[int]], max_new_tokens: int, engine: EngineConfig
) -> list[list[int]]:
    """Generated token ids per prompt (the caller decodes, as for the hf engine)."""
    return generate_vllm_timed(model_dir, prompts, max_new_tokens, engine)[0]


def generate_vllm_timed(
    model_dir: str, prompts: Sequence[list[int]], max_new_tokens: int, engine: EngineConfig
) -> tuple[list[list[int]], float]:
    """``generate_vllm``'s token ids and the seconds ``LLM.generate`` took (the engine's
    start-up excluded), for benchmarks of the engine that serves a model."""
    with tempfile.TemporaryDirectory(prefix="raylm-vllm-") as tmp:
        request, result = Path(tmp) / "request.json", Path(tmp) / "result.json"
        request.write_text(
            json.dumps(
                {
                    "model": model_dir,
                    "engine_kwargs": engine_kwargs(engine, model_dir),
                    "prompts": list(map(list, prompts)),
                    "max_new_tokens": max_new_tokens,
                }
            )
        )
        env = dict(os.environ) | engine_env(engine)
        cmd = [sys.executable, "-m", "raylm.eval.vllm_engine", str(request), str(result)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(
                f"vLLM generation failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
            )
        out = json.loads(result.read_text())
        return out["ids"], out["seconds"]


def _main(request_path: str, result_path: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    req = json.loads(Path(request_path).read_text())
    llm = LLM(model=req["model"], **req["engine_kwargs"])
    params = SamplingParams(temperature=0.0, max_tokens=req["max_new_tokens"])
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in req["prompts"]]
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    ids = [list(o.outputs[0].token_ids) for o in outs]
    Path(result_path).write_text(json.dumps({"ids": ids, "seconds": seconds}))


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2])
