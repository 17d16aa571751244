"""The RL stages' rollout engines: vLLM ``LLM``s in Ray actors that rank 0 owns.

One engine, or a group of ``engines`` (data parallel: each gets a contiguous slice of the
step's requests, every one the same weights). Each request carries its own seed, so
which engine samples it does not change what it samples, and a resumed run (or a run
with another group size) draws the same completions. The group ends with rank 0.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from raylm.train.config import TrainJobConfig


class RolloutEngine:
    """vLLM's offline ``LLM`` in its own process, in-process engine core (no extra
    busy-polling process on a small node); weights and adapters arrive by method call."""

    def __init__(self, model_dir: str, kwargs: dict[str, Any]) -> None:
        from vllm import LLM

        self.llm = LLM(model=model_dir, **kwargs)
        self.lora: Any = None
        self.adapters = Path(tempfile.mkdtemp(prefix="raylm-grpo-adapters-"))

    def generate(self, prompts: list[list[int]], params: list[dict[str, Any]]) -> list[Any]:
        """(token ids, sampled-token log-probs, finished by a stop token) per request."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        reqs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
        sps = [SamplingParams(**kw) for kw in params]
        outs = self.llm.generate(reqs, sps, use_tqdm=False, lora_request=self.lora)
        result = []
        for o in outs:
            c = o.outputs[0]
            pairs = zip(c.token_ids, c.logprobs or [], strict=False)
            lps = [d[t].logprob if d and t in d else float("nan") for t, d in pairs]
            result.append((list(c.token_ids), lps, c.finish_reason == "stop"))
        return result

    def load_weights(self, items: list[tuple[str, Any]]) -> float:
        """Replace the weights in place; returns the seconds it took here."""
        start = time.perf_counter()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": items})
        return time.perf_counter() - start

    def load_adapter(self, files: dict[str, bytes], step: int) -> float:
        """The policy's adapter at ``step`` under a new LoRA id (vLLM caches by id)."""
        import shutil

        from vllm.lora.request import LoRARequest

        start = time.perf_counter()
        path = self.adapters / f"step-{step}"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        for name, data in files.items():
            (path / name).write_bytes(data)
        old = self.lora
        self.lora = LoRARequest(f"policy-{step}", step + 1, str(path))
        if old is not None and old.lora_path != str(path):
            self.llm.llm_engine.remove_lora(old.lora_int_id)
            shutil.rmtree(old.lora_path, ignore_errors=True)
        return time.perf_counter() - start


def start_engines(cfg: TrainJobConfig, name: str) -> list[Any]:
    """``engines`` named actors, owned by the calling process (rank 0): they end with it."""
    import ray

    from raylm.engine import LoraSlots, engine_env, engine_kwargs
    from raylm.train.config_rl import rollout_config

    g, model_dir = rollout_config(cfg), cfg.model.name_or_path
    lora = None
    if cfg.finetuning_type == "lora":
        lora = LoraSlots(max(8, 1 << (cfg.lora.rank - 1).bit_length()), 1)
    kwargs = engine_kwargs(g.engine, model_dir, use_gpu=cfg.scaling.use_gpu, lora=lora)
    kwargs = {"seed": cfg.train.seed, "logprobs_mode": "processed_logprobs"} | kwargs
    env = engine_env(g.engine, use_gpu=cfg.scaling.use_gpu) | {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0"
    }
    options = {"num_cpus": g.engine_cpus, "num_gpus": 1 if cfg.scaling.use_gpu else 0,
               "runtime_env": {"env_vars": env}, "max_concurrency": 1}  # fmt: skip
    actor = ray.remote(RolloutEngine)
    return [
        actor.options(name=f"{name}-{i}", **options).remote(model_dir, kwargs)
        for i in range(g.engines)
    ]


class EngineGroup:
    """The engines as one: weights to all of them, requests split among them."""

    def __init__(self, cfg: TrainJobConfig, name: str) -> None:
        import ray

        self.actors = start_engines(cfg, name)
        ray.get([a.__ray_ready__.remote() for a in self.actors])  # vLLM's start-up

    def generate(self, prompts: list[list[int]], params: list[dict[str, Any]]) -> list[Any]:
        """Contiguous slices, one per engine, answered in the order asked."""
        import ray

        n = len(self.actors)
        size = -(-len(prompts) // n) if prompts else 0
        parts = [
            a.generate.remote(prompts[i * size : (i + 1) * size], params[i * size : (i + 1) * size])
            for i, a in enumerate(self.actors)
            if prompts[i * size : (i + 1) * size]
        ]
        return [out for part in ray.get(parts) for out in part]

    def load_weights(self, items: list[tuple[str, Any]]) -> None:
        """One copy in the object store, read by every engine."""
        import ray

        ref = ray.put(items)
        ray.get([a.load_weights.remote(ref) for a in self.actors])

    def load_adapter(self, files: dict[str, bytes], step: int) -> None:
        import ray

        ref = ray.put(files)
        ray.get([a.load_adapter.remote(ref, step) for a in self.actors])

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []
