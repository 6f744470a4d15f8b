"""Device and precision choices shared by training, sampling and evaluation."""

from __future__ import annotations

import contextlib

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str = "auto") -> str:
    """`auto` picks cuda, then mps, then cpu; anything else is checked and returned as is."""
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    kind = name.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here; use --device cpu or auto")
    if kind == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"--device {name}: MPS is not available here; use --device cpu or auto")
    if kind not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name}: unknown device; use auto, cpu, cuda, cuda:N or mps")
    return name


def pick_dtype(device: str, name: str = "auto") -> torch.dtype:
    """Autocast precision: bf16 where the hardware has it, fp16 on older GPUs, fp32 otherwise."""
    if name != "auto":
        if name not in DTYPES:
            raise ValueError(f"--dtype {name}: unknown; use auto, bfloat16, float16 or float32")
        return DTYPES[name]
    kind = device.split(":")[0]
    if kind == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if kind == "mps":
        return torch.float16
    # on CPU bf16 only pays off for large matmuls and changes results: keep fp32 unless asked
    return torch.float32


def autocast(device: str, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed-precision context for `dtype`; a no-op for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)
