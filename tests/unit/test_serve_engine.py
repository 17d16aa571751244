"""Every CPU engine raylm starts makes AMX safe before vLLM's bfloat16 kernels run."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from raylm import engine


def fake_cpu(has_amx: bool, granted: bool) -> SimpleNamespace:
    calls: list[str] = []

    def init() -> bool:
        calls.append("init")
        return granted

    return SimpleNamespace(_is_amx_tile_supported=lambda: has_amx, _init_amx=init, calls=calls)


def test_without_amx_nothing_is_asked_or_changed() -> None:
    cpu = fake_cpu(has_amx=False, granted=False)
    assert engine.prepare_amx(cpu) is False
    assert cpu.calls == [] and cpu._is_amx_tile_supported() is False


def test_amx_is_requested_from_linux_before_vllm_uses_it() -> None:
    cpu = fake_cpu(has_amx=True, granted=True)
    assert engine.prepare_amx(cpu) is True
    assert cpu.calls == ["init"] and cpu._is_amx_tile_supported() is True


def test_refused_amx_is_hidden_from_vllm(caplog: pytest.LogCaptureFixture) -> None:
    """vLLM then picks its AVX-512 kernels instead of dying on the first tile instruction."""
    cpu = fake_cpu(has_amx=True, granted=False)
    assert engine.prepare_amx(cpu) is False
    assert cpu._is_amx_tile_supported() is False
    assert "refused" in caplog.text


def test_the_worker_class_resolves_by_the_name_vllm_is_given() -> None:
    pytest.importorskip("vllm")
    from vllm.utils.import_utils import resolve_obj_by_qualname
    from vllm.v1.worker.cpu_worker import CPUWorker

    cls = resolve_obj_by_qualname(engine.CPU_WORKER)
    assert issubclass(cls, CPUWorker) and cls.__name__ == "RaylmCPUWorker"
