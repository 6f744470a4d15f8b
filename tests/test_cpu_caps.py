"""CPU capability detection: PyTorch's probe against the kernel's flags, and the emulation guard."""

import platform

import pytest
import torch

from gpt2repro import cpu_caps


@pytest.mark.skipif(platform.machine() != "x86_64" or not cpu_caps.cpu_flags(), reason="needs Linux x86 flags")
def test_torch_probe_agrees_with_kernel_flags():
    flags = cpu_caps.cpu_flags()
    assert "fpu" in flags  # the parser read the flags line
    assert cpu_caps.bf16_in_hardware() == bool({"avx512_bf16", "amx_bf16"} & flags)


def test_no_bf16_instructions_means_no_native_bf16(monkeypatch):
    cpu_caps.cpu_has_native_bf16.cache_clear()
    monkeypatch.setattr(cpu_caps, "bf16_in_hardware", lambda: False)
    assert cpu_caps.cpu_has_native_bf16() is False
    cpu_caps.cpu_has_native_bf16.cache_clear()


def test_emulated_bf16_is_refused(monkeypatch):
    """Flags claim bf16, but the bf16 matmul is the slower one: the timing check says no."""
    cpu_caps.cpu_has_native_bf16.cache_clear()
    monkeypatch.setattr(cpu_caps, "bf16_in_hardware", lambda: True)
    calls = []

    def fake_best(fn, repeats):
        calls.append(fn)
        return 2.0 if len(calls) % 2 == 0 else 1.0  # every second timing (the bf16 one) is slower

    monkeypatch.setattr(cpu_caps, "best_seconds", fake_best)
    assert cpu_caps.cpu_has_native_bf16() is False
    cpu_caps.cpu_has_native_bf16.cache_clear()


def test_matmul_peak_is_a_rate_and_cached():
    peak = cpu_caps.matmul_peak_flops(torch.float32, n=128)
    assert 1e6 < peak < 1e15
    assert cpu_caps.matmul_peak_flops(torch.float32, n=128) == peak  # measured once


def test_measurements_leave_the_global_rng_alone():
    from gpt2repro import cpu_caps

    state = torch.get_rng_state()
    cpu_caps.matmul_peak_flops.__wrapped__(torch.float32, 64, 0.0)
    cpu_caps.cpu_has_native_bf16.__wrapped__()
    assert torch.equal(torch.get_rng_state(), state)  # training's dropout stream must not depend on them
