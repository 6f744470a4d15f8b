"""Devices, precision, processes and speed facts shared by training, sampling, evaluation and the benchmarks."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from gpt2repro.cpu_caps import cpu_has_native_bf16, matmul_peak_flops
from gpt2repro.errors import check_writable
from gpt2repro.tokenizer import cache_dir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FP8_MIN_WIDTH = 1024  # narrower matmuls lose more to FP8's scaling and casts than they gain
# dense bf16 peak of one GPU, for MFU; matched against torch.cuda.get_device_name (H200 before H100)
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


def quiet_library_logs() -> None:
    """Stage scripts call this first. Where torchao is installed, importing it (as `transformers` does) logs a
    warning per CUDA extension it cannot load (all of them on a CPU-only torch) and torch logs a deprecation per
    Enum it registers: lines before ours that no user can act on. Errors stay on."""
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


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
    # bf16 autocast pays on CPUs with bf16 instructions (AVX512-BF16, AMX); elsewhere it is emulated and slow
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def autocast(device: str, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed-precision context for `dtype`; a no-op for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


# ----------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class Dist:
    """This process's place among torchrun's: rank, local rank, world size and its device."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: str = "cpu"

    @property
    def ddp(self) -> bool:
        return self.world_size > 1

    @property
    def master(self) -> bool:
        return self.rank == 0


def setup_distributed(device_flag: str = "auto") -> Dist:
    """One process, or one of torchrun's (RANK/LOCAL_RANK/WORLD_SIZE): NCCL on CUDA, gloo on CPU."""
    device = pick_device(device_flag)
    if "RANK" not in os.environ:
        return Dist(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return Dist(rank, local_rank, world_size, device)


def teardown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_mean(value: torch.Tensor, d: Dist) -> torch.Tensor:
    """Mean over ranks as SUM / world_size (gloo has no AVG)."""
    if d.ddp:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value = value / d.world_size
    return value


def min_over_ranks(value: int, d: Dist) -> int:
    """The smallest of every rank's `value` (the same on all ranks)."""
    if not d.ddp:
        return value
    t = torch.tensor([value], device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def any_rank(flag: bool, d: Dist) -> bool:
    """True on every rank when `flag` is true on any rank."""
    if not d.ddp:
        return flag
    t = torch.tensor([float(flag)], device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


# ----------------------------------------------------------------------------- speed


def peak_flops(device: str, override: float = 0.0, dtype: torch.dtype = torch.bfloat16) -> float:
    """Per-device peak for MFU: `override` when given; on a GPU its dense bf16 peak from the table (0 = unknown);
    on CPU the matmul rate measured once for the precision the matmuls run in."""
    if override > 0:
        return override
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in PEAK_FLOPS.items() if k in name), 0.0)
    if device == "cpu":
        return matmul_peak_flops(dtype)
    return 0.0


def compile_unsupported(device_type: str) -> str:
    """Why torch.compile cannot work here ("" when it can): inductor builds C++ on CPU, MPS is experimental."""
    if device_type == "cpu" and not any(shutil.which(c) for c in ("cc", "gcc", "g++", "clang")):
        return "no C/C++ compiler on PATH for inductor's CPU kernels (install gcc, or pass --compile false)"
    if device_type == "mps":
        return "torch.compile on MPS is experimental"
    return ""


def use_compile_cache() -> str:
    """Keep inductor's on-disk caches (compiled graphs, AOTAutograd) in the project's cache dir, so that a
    restarted run compiles from them even after a reboot cleared /tmp; a TORCHINDUCTOR_CACHE_DIR set by the user
    wins. The cache is never read from a run directory: its entries are code that gets executed."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"))
    path = os.environ["TORCHINDUCTOR_CACHE_DIR"]
    check_writable(Path(path), "TORCHINDUCTOR_CACHE_DIR")  # else inductor fails deep inside, naming some subpath
    return path


def compile_cached(fn, **kwargs):
    """`torch.compile(fn, **kwargs)` with its caches where `use_compile_cache` keeps them: every compile of the
    project (training step, decode step, HellaSwag forward) goes through here."""
    use_compile_cache()
    return torch.compile(fn, **kwargs)


# ----------------------------------------------------------------------------- FP8


def fp8_unsupported(device: str) -> str:
    """Why `--fp8` cannot run here ("" when it can): it needs FP8 tensor cores (compute capability 8.9+:
    Ada, Hopper, Blackwell) and torchao."""
    if not device.startswith("cuda"):
        return f"--fp8 needs an NVIDIA GPU with FP8 tensor cores (Ada, Hopper or later); this run is on {device}"
    if torch.cuda.get_device_capability(device) < (8, 9):
        return (f"--fp8 needs FP8 tensor cores (compute capability 8.9+); {torch.cuda.get_device_name(device)} "
                f"has {'.'.join(map(str, torch.cuda.get_device_capability(device)))}; drop --fp8")
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        return "--fp8 needs torchao: pip install torchao (or pip install -e '.[fp8]')"
    return ""


def fp8_layers(model: torch.nn.Module, min_width: int = FP8_MIN_WIDTH) -> list[str]:
    """The linear layers FP8 pays for: both widths >= min_width and multiples of 16 (FP8 GEMMs need it), the
    output layer excluded (the chunked loss multiplies by its weight directly, and its logits want precision)."""
    return [name for name, m in model.named_modules() if type(m) is torch.nn.Linear and name != "lm_head"
            and min(m.in_features, m.out_features) >= min_width and m.in_features % 16 == m.out_features % 16 == 0]


def convert_to_fp8(model: torch.nn.Module, min_width: int = FP8_MIN_WIDTH) -> list[str]:
    """Swap `fp8_layers` for torchao's Float8Linear in place (dynamic tensorwise scaling; weights, names and
    checkpoints unchanged) and return their names; ValueError when none is wide enough."""
    names = fp8_layers(model, min_width)
    if not names:
        raise ValueError(f"--fp8: no linear layer is {min_width} or more wide in both dimensions; FP8 pays from "
                         f"gpt2-350m (n_embd 1024) up: drop --fp8")
    from torchao.float8 import convert_to_float8_training
    chosen = set(names)
    convert_to_float8_training(model, module_filter_fn=lambda _, fqn: fqn in chosen)
    return names
