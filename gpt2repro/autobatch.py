"""`--batch_size auto`: the largest micro-batch that fits the accelerator, found by trying the real step.

A try runs forward, backward and an optimizer step at the run's real shapes and precision on random tokens, with a
learning rate of 0 and the RNG states forked, so the model is left exactly as it was. Candidates are the powers of
two up to the configured micro-batch that divide the rows each rank needs per step, so the total batch is kept by
gradient accumulation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from gpt2repro.devices import autocast


def candidates(upper: int, rows_per_rank: int) -> list[int]:
    """Micro-batches to try, largest first: `upper`, then halvings, each dividing `rows_per_rank`."""
    out, b = [], max(1, upper)
    while b >= 1:
        if rows_per_rank % b == 0:
            out.append(b)
        b //= 2
    return out or [1]


def largest_that_fits(fits: Callable[[int], bool], sizes: list[int]) -> int | None:
    """The first of `sizes` (largest first) for which `fits` is true; None when none does."""
    for b in sizes:
        if fits(b):
            return b
    return None


def free_memory(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def try_step(model: torch.nn.Module, make_optimizer: Callable[[], torch.optim.Optimizer], B: int, T: int,
             vocab_size: int, device: str, dtype: torch.dtype) -> bool:
    """One full training step at (B, T) with lr 0; False when it runs out of memory."""
    forks = [torch.device(device)] if device.startswith("cuda") else []
    optimizer = None
    try:
        with torch.random.fork_rng(devices=forks):
            optimizer = make_optimizer()
            for group in optimizer.param_groups:
                group["lr"] = 0.0
            x = torch.randint(0, vocab_size, (B, T), device=device)
            with autocast(device, dtype):
                _, loss = model(x, x, return_logits=False)
            loss.backward()
            optimizer.step()
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        with contextlib.suppress(Exception):
            model.zero_grad(set_to_none=True)
        del optimizer
        free_memory(device)
