"""What this CPU computes fast: native bf16, and the measured matmul peak per dtype (the denominator of CPU MFU)."""

from __future__ import annotations

import functools
import platform
import time

import torch

# CPU flags (Linux /proc/cpuinfo names) that mean bf16 matmuls run in hardware, not emulated through fp32
BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 AVX512-BF16, x86 AMX, Arm FEAT_BF16


def cpu_flags() -> set[str]:
    """The feature flags the kernel reports for this CPU (empty where /proc/cpuinfo is missing)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):  # x86, Arm
                    return set(value.split())
    except OSError:
        pass
    return set()


def bf16_in_hardware() -> bool:
    """Whether the CPU has bf16 instructions: PyTorch's own probe where it has one, else the kernel's flags."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if platform.machine().lower() in ("x86_64", "amd64") and all(probes):
        return any(probe() for probe in probes)
    return bool(BF16_FLAGS & cpu_flags())


def best_seconds(fn, repeats: int) -> float:
    """Fastest wall-clock time of `repeats` calls (the least disturbed by other work)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@functools.cache
def cpu_has_native_bf16() -> bool:
    """bf16 instructions present and confirmed: a bf16 matmul beats the same fp32 one (a few small matmuls, once).

    Without native bf16, PyTorch emulates it through fp32 and bf16 autocast only slows training down.
    """
    if not bf16_in_hardware():
        return False
    n = 512
    g = torch.Generator().manual_seed(0)  # a generator of its own: training's RNG stream stays untouched
    a32, b32 = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    fp32 = best_seconds(lambda: a32 @ b32, 1)  # warm-up of both kernels
    bf16 = best_seconds(lambda: a16 @ b16, 1)
    # interleaved so that other work on the machine slows both alike
    for _ in range(5):
        fp32 = min(fp32, best_seconds(lambda: a32 @ b32, 1))
        bf16 = min(bf16, best_seconds(lambda: a16 @ b16, 1))
    return bf16 < fp32


@functools.cache
def matmul_peak_flops(dtype: torch.dtype = torch.float32, n: int = 2048, budget_s: float = 0.5) -> float:
    """FLOP/s of the fastest n x n CPU matmul in `dtype` on all threads, best of those that fit in `budget_s`.

    The denominator of MFU on CPU, for the precision the matmuls actually run in; measured once per dtype.
    Other work on the machine only lowers it (so MFU reads high then).
    """
    g = torch.Generator().manual_seed(0)  # a generator of its own: training's RNG stream stays untouched
    a, b = torch.randn(n, n, generator=g).to(dtype), torch.randn(n, n, generator=g).to(dtype)
    start = time.perf_counter()
    a @ b  # warm-up: thread pool, kernel selection
    best = best_seconds(lambda: a @ b, 1)
    while time.perf_counter() - start < budget_s:
        best = min(best, best_seconds(lambda: a @ b, 1))
    return 2 * n**3 / best
