"""llama.cpp's own tools for the GGUF export: its k-quants, and the engine that runs GGUF.

The ``gguf`` package writes f16 and the simple block quants, but only *dequantizes* the
k-quants (``q4_k_m`` ...) that llama.cpp and ollama users pick; those come from
llama.cpp's ``llama-quantize``. And a GGUF file is only known to work once llama.cpp
itself has loaded and run it, which ``llama-bench`` does while measuring tokens/s.

**Where the binaries come from.** ``$RAYLM_LLAMA_CPP_BIN`` may name a directory holding
``llama-quantize`` and ``llama-bench`` (a llama.cpp release, a distro package). Otherwise
raylm builds them once per node: llama.cpp ships no wheel of its tools, but the
``llama-cpp-python`` sdist on PyPI vendors llama.cpp's source at a pinned commit, so pip
fetches it through the same index (or proxy) as every other package, and cmake builds the
two targets, statically linked. ``GGML_NATIVE`` is off (ggml's portable x86-64 build:
AVX2, FMA, F16C): built natively on this Xeon (AVX512, AMX), llama-bench segfaulted on
every quantized file (q8_0, q4_0, q4_k_m, raylm's or llama-quantize's alike, the tiny and
the 30M model) while repacking weights for the CPU, and ran them with ``--repack 0``; the
portable build runs them with repacking on. That takes about 4 minutes on 2 cores (``make setup`` does it up front); the result lives under
``raylm.export.toolcache`` with a marker written last, behind a lock.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from raylm.config import ConfigError
from raylm.export.toolcache import cache_root, locked, run

SOURCE = "llama-cpp-python==0.3.36"
"""The sdist whose ``vendor/llama.cpp`` is built (llama.cpp at that release's commit)."""

TARGETS = ("llama-quantize", "llama-bench")
BIN_ENV = "RAYLM_LLAMA_CPP_BIN"
MARKER = "raylm-build.json"
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_NATIVE=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
)

K_QUANTS = {
    "q2_k": "Q2_K",
    "q3_k_s": "Q3_K_S",
    "q3_k_m": "Q3_K_M",
    "q3_k_l": "Q3_K_L",
    "q4_k_s": "Q4_K_S",
    "q4_k_m": "Q4_K_M",
    "q5_k_s": "Q5_K_S",
    "q5_k_m": "Q5_K_M",
    "q6_k": "Q6_K",
}
"""``quantize.gguf_types`` name -> ``llama-quantize``'s type name. The _s/_m/_l mixes
keep some tensors (attention v, ffn down, the output) at a higher type, as llama.cpp
chooses."""


def build_dir() -> Path:
    version = SOURCE.split("==")[1]
    return cache_root() / f"llama.cpp-{version}"


def tools(build: bool = True) -> Path:
    """The directory holding the tools; built when missing (or a clear error when
    ``build`` is false, naming how to get them)."""
    given = os.environ.get(BIN_ENV)
    if given:
        missing = [t for t in TARGETS if not (Path(given) / t).is_file()]
        if missing:
            raise ConfigError(f"{BIN_ENV}={given}: no {', '.join(missing)} there")
        return Path(given)
    dest = build_dir()
    if (dest / MARKER).is_file():
        return dest / "bin"
    if not build:
        raise ConfigError(
            f"llama.cpp's tools are not built on this node ({dest}): run "
            f"`python -m raylm.export.llamacpp build`, or set {BIN_ENV}"
        )
    with locked(dest.with_name(dest.name + ".lock")):
        if not (dest / MARKER).is_file():
            _build(dest)
    return dest / "bin"


def _build(dest: Path) -> None:
    start = time.perf_counter()
    shutil.rmtree(dest, ignore_errors=True)  # a build that died half way
    with tempfile.TemporaryDirectory(prefix="raylm-llama.cpp-") as tmp:
        run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--no-binary", ":all:", "-d", tmp, SOURCE], "llama.cpp", f"download {SOURCE}")  # fmt: skip
        (sdist,) = Path(tmp).glob("*.tar.gz")
        src = _extract_llama_cpp(sdist, Path(tmp))
        build = Path(tmp) / "build"
        run(["cmake", "-S", str(src), "-B", str(build), *CMAKE_FLAGS], "llama.cpp", "configure")
        jobs = str(os.cpu_count() or 1)
        run(["cmake", "--build", str(build), "--target", *TARGETS, "-j", jobs],
            "llama.cpp", "build llama-quantize and llama-bench")  # fmt: skip
        (dest / "bin").mkdir(parents=True)
        for t in TARGETS:
            shutil.copy2(build / "bin" / t, dest / "bin" / t)
    meta = {"source": SOURCE, "targets": list(TARGETS), "build_s": time.perf_counter() - start}
    (dest / MARKER).write_text(json.dumps(meta))


def _extract_llama_cpp(sdist: Path, into: Path) -> Path:
    """Only the vendored llama.cpp tree (the Python binding is not needed)."""
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name]
        tar.extractall(into, members=members, filter="data")
    (src,) = into.glob("*/vendor/llama.cpp")
    return src


def quantize(source: Path, out_file: Path, gtype: str) -> Path:
    """``out_file``: ``source`` (an f16 or f32 GGUF) in the k-quant ``gtype``."""
    bin_dir = tools()
    threads = str(os.cpu_count() or 1)
    run([str(bin_dir / "llama-quantize"), str(source), str(out_file), K_QUANTS[gtype], threads],
        "llama-quantize", f"write {gtype}")  # fmt: skip
    return out_file


def bench(gguf_file: Path, prompt: int = 64, generate: int = 32) -> dict[str, float]:
    """llama.cpp loading and running the file: prompt and generation tokens/s (CPU,
    every core, mean of 2 repetitions)."""
    threads = str(os.cpu_count() or 1)
    out = run([str(tools() / "llama-bench"), "-m", str(gguf_file), "-p", str(prompt),
               "-n", str(generate), "-t", threads, "-r", "2", "-o", "json"],
              "llama-bench", f"run {gguf_file.name}")  # fmt: skip
    rows = json.loads(out)
    speed = {}
    for r in rows:
        key = "prompt_tokens_per_s" if r["n_prompt"] else "generate_tokens_per_s"
        speed[key] = round(float(r["avg_ts"]), 1)
    return speed


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Build llama.cpp's tools for the GGUF export.")
    p.add_argument("command", choices=["build", "where"])
    args = p.parse_args(argv)
    print(tools(build=args.command == "build"))


if __name__ == "__main__":
    main()
