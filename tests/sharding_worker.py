"""Run under torchrun by tests/test_sharding.py: FSDP next to DDP on the same model and data, and sharded
checkpoints written at one world size and read at another. Rank 0 writes what it measured to OUT for the test.

    torchrun --nproc_per_node=2 tests/sharding_worker.py compare OUT adamw|muon
    torchrun --nproc_per_node=2 tests/sharding_worker.py save OUT
    torchrun --nproc_per_node=1 tests/sharding_worker.py load OUT
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpt2repro.sharding import clip_grad_norm, load_sharded, save_sharded, set_gradient_sync, shard_model  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

CONFIG = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=67, dropout=0.0)  # 67: uneven shards
B, T, ACCUM, STEPS = 2, 16, 2, 10


def batch(step: int, micro: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10 * micro + rank)  # the same batches every step: the loss falls
    x = torch.randint(0, CONFIG.vocab_size, (B, T + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def optimizers(model: torch.nn.Module, kind: str):
    opt = model.configure_optimizers(0.1, 3e-3, verbose=False, optimizer=kind, muon_lr=0.02)
    return opt, getattr(opt, "optimizers", [opt])


def train_step(model, opt, step: int, rank: int, sharded: bool) -> float:
    opt.zero_grad(set_to_none=True)
    total = 0.0
    for micro in range(ACCUM):
        last = micro == ACCUM - 1
        if sharded:
            set_gradient_sync(model, last)
        x, y = batch(step, micro, rank)
        ctx = model.no_sync() if not sharded and not last else torch.enable_grad()
        with ctx:
            _, loss = model(x, y, return_logits=False)
            (loss / ACCUM).backward()
        total += loss.item() / ACCUM
    # small enough to clip: the norm of the whole gradient counts; DDP clips as the trainer does
    (clip_grad_norm if sharded else torch.nn.utils.clip_grad_norm_)(model.parameters(), 0.5)
    opt.step()
    t = torch.tensor([total])
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def full_state(model, opts) -> dict:
    msd, osd = get_state_dict(model, opts, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {"model": msd, "optim": osd}


def compare(out: Path, kind: str) -> None:
    rank = dist.get_rank()
    torch.manual_seed(0)
    base = GPT(CONFIG)
    # the trainer's DDP (gradients are views into its buckets: no second copy) and DDP's default
    ddp_model = DDP(copy.deepcopy(base), gradient_as_bucket_view=True)
    copied_model = DDP(copy.deepcopy(base), gradient_as_bucket_view=False)
    fsdp_model = shard_model(copy.deepcopy(base))
    ddp_opt, _ = optimizers(ddp_model.module, kind)
    copied_opt, _ = optimizers(copied_model.module, kind)
    fsdp_opt, _ = optimizers(fsdp_model, kind)
    losses = {"ddp": [], "ddp_copied_grads": [], "fsdp": []}
    for step in range(STEPS):
        losses["ddp"].append(train_step(ddp_model, ddp_opt, step, rank, sharded=False))
        losses["ddp_copied_grads"].append(train_step(copied_model, copied_opt, step, rank, sharded=False))
        losses["fsdp"].append(train_step(fsdp_model, fsdp_opt, step, rank, sharded=True))
    fsdp_full = full_state(fsdp_model, [])["model"]
    if rank == 0:
        torch.save({"losses": losses, "ddp": ddp_model.module.state_dict(), "fsdp": fsdp_full,
                    "ddp_copied_grads": copied_model.module.state_dict()}, out / "compare.pt")


def build(kind: str = "muon"):
    torch.manual_seed(0)
    model = shard_model(GPT(CONFIG))
    opt, opts = optimizers(model, kind)
    return model, opt, opts


def save(out: Path) -> None:
    rank = dist.get_rank()
    model, opt, opts = build()
    for step in range(3):
        train_step(model, opt, step, rank, sharded=True)
    state = {"step": 3, "rng": torch.get_rng_state(), "loader": {"position": 12, "epoch": 0}}
    save_sharded(out / "ckpt_0000003.dcp", model, opts, state, rank)
    full = full_state(model, opts)
    if rank == 0:
        torch.save(full, out / "saved_full.pt")


def load(out: Path) -> None:
    model, opt, opts = build()
    train = load_sharded(out / "ckpt_0000003.dcp", model, opts)
    full = full_state(model, opts)
    if dist.get_rank() == 0:
        torch.save({"train": train, **full}, out / f"loaded_full_{dist.get_world_size()}.pt")


if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        mode, out = sys.argv[1], Path(sys.argv[2])
        if mode == "compare":
            compare(out, sys.argv[3])
        elif mode == "save":
            save(out)
        else:
            load(out)
    finally:
        dist.destroy_process_group()
    os._exit(0)
