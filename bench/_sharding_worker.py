"""Run under torchrun by bench/sharding.py: one model trained with DDP and with FSDP on the same ranks; rank 0
prints one JSON line with each one's per-rank bytes of parameters, gradients and optimizer state and its step time.

    torchrun --standalone --nproc_per_node=2 bench/_sharding_worker.py N_LAYER N_EMBD STEPS
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpt2repro.muon import orthogonalize  # noqa: E402
from gpt2repro.sharding import clip_grad_norm, shard_model  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

B, T = 4, 128


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def state_bytes(model: torch.nn.Module, opt) -> dict:
    """Bytes this rank holds for parameters, gradients and optimizer state, each storage counted once (DDP's
    gradients are views into its all-reduce buckets: those buckets are what is counted)."""
    seen: set[int] = set()

    def count(tensors) -> int:
        total = 0
        for t in tensors:
            t = local(t)
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        return total

    params = list(model.parameters())
    opts = getattr(opt, "optimizers", [opt])
    states = [v for o in opts for s in o.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    return {"params": count(params), "grads": count(p.grad for p in params if p.grad is not None),
            "optimizer": count(states)}


def step_seconds(model, opt, steps: int, sharded: bool) -> tuple[float, dict]:
    g = torch.Generator().manual_seed(dist.get_rank())
    x = torch.randint(0, 50257, (B, T + 1), generator=g)
    times = []
    for _ in range(steps + 1):
        dist.barrier()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=False)  # gradients kept, as their memory is what is counted
        _, loss = model(x[:, :-1], x[:, 1:], return_logits=False)
        loss.backward()
        if sharded:
            clip_grad_norm(model.parameters(), 1.0)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        dist.barrier()
        times.append(time.perf_counter() - t0)
    return min(times[1:]), state_bytes(model, opt)


def newton_schulz_seconds(model: torch.nn.Module) -> float:
    """Orthogonalising every hidden matrix once, as Muon does per step (what each rank repeats under FSDP)."""
    mats = [p.detach() for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2]
    t0 = time.perf_counter()
    for m in mats:
        orthogonalize(m.view(3, -1, m.size(1)) if m.size(0) == 3 * m.size(1) else m)
    return time.perf_counter() - t0


def orthogonalise_seconds(model: torch.nn.Module, scheme: str, repeats: int = 3) -> float:
    """Orthogonalising every hidden matrix's update once when each rank holds half of its rows, as Muon must under
    FSDP: "gather" (every rank all-gathers every matrix, orthogonalises all, keeps its rows: what muon.py does) or
    "own" (rank i % world gathers matrix i alone, orthogonalises it and scatters the rows back)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mats = [p.detach() for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2]
    rows = [m.chunk(world)[rank].contiguous() for m in mats]  # this rank's rows (the bench's sizes split evenly)
    best = float("inf")
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        if scheme == "gather":
            for mine in rows:
                parts = [torch.empty_like(mine) for _ in range(world)]
                dist.all_gather(parts, mine)
                orthogonalize(torch.cat(parts)).chunk(world)[rank]
        else:  # gather to the owners, every owner orthogonalises its own at once, scatter the rows back
            owned = {}
            for i, mine in enumerate(rows):
                parts = [torch.empty_like(mine) for _ in range(world)] if rank == i % world else None
                dist.gather(mine, parts, dst=i % world)
                if parts is not None:
                    owned[i] = parts
            done = {i: list(orthogonalize(torch.cat(parts)).chunk(world)) for i, parts in owned.items()}
            for i, mine in enumerate(rows):
                dist.scatter(torch.empty_like(mine), done.get(i), src=i % world)
        dist.barrier()
        best = min(best, time.perf_counter() - t0)
    return best


def main(n_layer: int, n_embd: int, steps: int) -> None:
    torch.manual_seed(0)
    base = GPT(GPTConfig(n_layer=n_layer, n_head=max(1, n_embd // 64), n_embd=n_embd, block_size=T,
                         vocab_size=50304, dropout=0.0))
    result = {}
    for optimizer in ("adamw", "muon"):
        for kind in ("ddp", "fsdp"):
            m = copy.deepcopy(base)
            model = shard_model(m) if kind == "fsdp" else DDP(m, gradient_as_bucket_view=True)
            raw = model if kind == "fsdp" else model.module
            opt = raw.configure_optimizers(0.1, 6e-4, verbose=False, optimizer=optimizer)
            seconds, nbytes = step_seconds(model, opt, steps, kind == "fsdp")
            result[f"{kind} {optimizer}"] = {"seconds": seconds, **nbytes}
            del model, raw, opt, m
    result["newton_schulz_seconds"] = newton_schulz_seconds(base)
    result["gather_seconds"] = orthogonalise_seconds(base, "gather")
    result["own_seconds"] = orthogonalise_seconds(base, "own")
    result["params"] = sum(p.numel() for p in base.parameters())
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
    finally:
        dist.destroy_process_group()
