"""The micro-batch: what each rank feeds per forward, and how many accumulation steps make the total batch.

`--batch_size N` is taken as given; the total batch (`--total_batch_size` tokens per optimizer step) must then be
a multiple of N x block_size x world_size. Under more ranks than a preset's batch was sized for, the preset's own
micro-batch is lowered to keep the total. `--batch_size auto` (0), and on CUDA the preset's own micro-batch, is the
largest that fits the accelerator, found by trying the real step.

A try runs forward, backward and an optimizer step at the run's real shapes and precision on random tokens, with a
learning rate of 0 and the RNG states forked, so the model is left exactly as it was. Candidates are the powers of
two up to the configured micro-batch that divide the rows each rank needs per step, so the total batch is kept by
gradient accumulation.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable

import torch

from gpt2repro.build import make_optimizer
from gpt2repro.config import PRESETS, ConfigError, TrainConfig
from gpt2repro.devices import Dist, autocast, min_over_ranks


def preset_batch_size(preset: str) -> int:
    return PRESETS.get(preset, {}).get("batch_size", TrainConfig.batch_size)


def fit_to_world(cfg: TrainConfig, world_size: int) -> TrainConfig:
    """Under more ranks than a preset's batch was sized for, a smaller micro-batch keeps the total batch exact.

    Only the preset's own micro-batch is lowered; a different `--batch_size` is kept as given.
    """
    preset_batch = preset_batch_size(cfg.preset)
    per_rank = cfg.batch_size * cfg.block_size * world_size
    if cfg.batch_size != preset_batch or per_rank <= cfg.total_batch_size:
        return cfg
    if cfg.total_batch_size % (cfg.block_size * world_size):
        return cfg
    return dataclasses.replace(cfg, batch_size=cfg.total_batch_size // (cfg.block_size * world_size))


def auto_batch(cfg: TrainConfig, device: str) -> bool:
    """Whether to probe the micro-batch: asked for (`auto`), or on CUDA with the preset's own value."""
    return cfg.batch_size == 0 or (device.startswith("cuda") and cfg.batch_size == preset_batch_size(cfg.preset))


def grad_accum_steps(cfg: TrainConfig, world_size: int) -> int:
    """Micro-steps per optimizer step; `ConfigError` when the micro-batches cannot make the total batch exactly."""
    per_step = cfg.batch_size * cfg.block_size * world_size
    if cfg.total_batch_size % per_step:
        raise ConfigError(
            f"--total_batch_size {cfg.total_batch_size} is not a multiple of batch_size x block_size x "
            f"world_size = {cfg.batch_size} x {cfg.block_size} x {world_size} = {per_step}; "
            f"use e.g. --total_batch_size {max(1, round(cfg.total_batch_size / per_step)) * per_step}"
        )
    return cfg.total_batch_size // per_step


def check_batch(cfg: TrainConfig, dist: Dist) -> None:
    """A micro-batch given by hand that cannot make the total is refused before anything runs."""
    if not auto_batch(cfg, dist.device):
        grad_accum_steps(cfg, dist.world_size)


def upper_batch_size(cfg: TrainConfig, trained: int | None = None) -> int:
    """The micro-batch to build the loaders at before probing: the resumed run's, the flag's or the preset's."""
    return trained or cfg.batch_size or preset_batch_size(cfg.preset)


def choose_batch_size(cfg: TrainConfig, dist: Dist, model: torch.nn.Module, dtype: torch.dtype) -> TrainConfig:
    """`--batch_size auto` (and the presets' own micro-batch on CUDA): the largest that fits, up to the preset's,
    dividing the rows each rank needs per step so accumulation keeps the total batch; the same on every rank."""
    upper = cfg.batch_size or preset_batch_size(cfg.preset)
    rows = max(1, cfg.total_batch_size // (cfg.block_size * dist.world_size))
    sizes = candidates(min(upper, rows), rows)
    if not dist.device.startswith("cuda"):  # nothing to probe: the largest that keeps the total batch
        return dataclasses.replace(cfg, batch_size=sizes[0])
    device_type = dist.device.split(":")[0]
    fits = lambda b: try_step(model, lambda: make_optimizer(model, cfg, device_type), b,  # noqa: E731
                              cfg.block_size, model.config.vocab_size, dist.device, dtype)
    chosen = min_over_ranks(largest_that_fits(fits, sizes) or 0, dist)
    if not chosen:
        raise ConfigError(f"not even 1 row of --block_size {cfg.block_size} fits in GPU memory for this model; lower "
                          "--block_size or the model size (--n_layer, --n_embd), or use --dtype bfloat16")
    if dist.master:
        print(f"batch_size auto: {chosen} (the largest of {sizes} that fits a full training step)")
    return dataclasses.replace(cfg, batch_size=chosen)


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
