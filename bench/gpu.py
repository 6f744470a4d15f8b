"""Training speed on one CUDA GPU, side by side in one run: `train_gpt2.py`'s own step against a reference step
written the way build-nanogpt does it (compiled GPT-2, bf16 autocast, fp32 logits + `F.cross_entropy`, fused
AdamW, micro-batch 64 x 1024), then the larger presets at their default micro-batch. On a machine without
CUDA it prints one "skipped" row.

    python -m bench gpu [--quick]

Every case runs full optimizer steps of 524,288 tokens on random uint16 shards (so losses mean nothing; speed is
real) and reports tokens/s, MFU (of the GPU's dense bf16 peak), peak memory, and the first step's time (compile).
Where the GPU has FP8 tensor cores and torchao is installed, each larger preset runs again with `--fp8`; each
larger preset also runs with `--fsdp true` on its one GPU (the wrapping's cost; sharding saves memory only over
several ranks: `python -m bench sharding` measures that on CPU).
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.common import Row, format_table
from gpt2repro.devices import fp8_unsupported, peak_flops

STEP_TOKENS = 524288


def write_shards(root: Path, n_tokens: int = 20_000_000) -> Path:
    """Random GPT-2 token ids in the shard format, a train and a val shard."""
    rng = np.random.default_rng(0)
    for name, n in (("bench_val_000000.npy", 2_000_000), ("bench_train_000001.npy", n_tokens)):
        np.save(root / name, rng.integers(0, 50257, n, dtype=np.uint16))
    return root


def reset_memory() -> None:
    import torch._dynamo

    torch._dynamo.reset()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def ours(preset: str, data_dir: Path, steps: int, extra: list[str]) -> dict:
    """Our trainer in this process: tokens/s of the fastest step after the first two, the training peak memory
    (the trainer's own figure, which leaves out the `--batch_size auto` probe), the first step's time."""
    import train_gpt2

    reset_memory()
    with tempfile.TemporaryDirectory() as out:
        train_gpt2.main(["--preset", preset, "--data_dir", str(data_dir), "--out_dir", out, "--max_steps",
                         str(steps), "--eval_interval", "1000000", "--eval_iters", "1", "--ckpt_interval", "0",
                         "--num_samples", "0", "--hellaswag", "false", "--log_interval", "1", *extra])
        events = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        config = json.loads((Path(out) / "config.json").read_text())
    steps_seen = [e for e in events if "dt_ms" in e]
    best = min(steps_seen[2:] or steps_seen, key=lambda e: e["dt_ms"])
    return {"tok_per_s": best["tok_per_s"], "mfu": best["mfu"], "first_s": steps_seen[0]["dt_ms"] / 1000,
            "peak_gib": max(e["peak_mem_gib"] for e in steps_seen), "batch_size": config["batch_size"]}


def reference(steps: int, B: int, compile: bool) -> dict:
    """build-nanogpt's step: our GPT-2 module, but full fp32 logits and F.cross_entropy, fused AdamW."""
    from model import GPT, GPTConfig

    reset_memory()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50304)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), eps=1e-8, fused=True)

    def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = model.lm_head(model.transformer.ln_f(blocks(x)))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))

    def blocks(x: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(x.size(1), device=x.device)
        h = model.transformer.wte(x) + model.transformer.wpe(pos)
        for block in model.transformer.h:
            h = block(h)
        return h

    fwd = torch.compile(loss_of) if compile else loss_of
    accum = STEP_TOKENS // (B * 1024)
    data = torch.randint(0, 50257, (accum, B, 1025), device="cuda")

    def step() -> float:
        t0 = time.time()
        opt.zero_grad(set_to_none=True)
        for i in range(accum):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = fwd(data[i, :, :-1], data[i, :, 1:]) / accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        torch.cuda.synchronize()
        return time.time() - t0

    times = [step() for _ in range(steps)]
    best = min(times[2:] or times)
    tok_per_s = STEP_TOKENS / best
    peak = peak_flops("cuda")
    mfu = model.flops_per_token(1024) * tok_per_s / peak if peak else None
    result = {"tok_per_s": tok_per_s, "mfu": mfu, "first_s": times[0], "batch_size": B,
              "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    return result


def rows_for(name: str, r: dict, vs: dict | None, goal: str = "", vs_name: str = "reference") -> list[Row]:
    ratio = r["tok_per_s"] / vs["tok_per_s"] if vs else None
    mem_ratio = r["peak_gib"] / vs["peak_gib"] if vs else None
    mfu = 100 * r["mfu"] if r.get("mfu") else math.nan
    return [
        Row("gpu", f"{name} (B={r['batch_size']}): tokens/s", r["tok_per_s"], "tok/s", vs_name if vs else "",
            ratio, goal),
        Row("gpu", f"{name}: MFU", mfu, "%"),
        Row("gpu", f"{name}: peak memory", r["peak_gib"], "GiB", vs_name if vs else "", mem_ratio,
            "<= 0.7" if goal else ""),
        Row("gpu", f"{name}: first step (compile)", r["first_s"], "s"),
    ]


def guarded(fn, *args) -> dict | None:
    try:
        return fn(*args)
    except (torch.OutOfMemoryError, SystemExit) as e:
        print(f"bench gpu: {fn.__name__}{args[:1]}: {str(e)[:120]}", file=sys.stderr)
        reset_memory()
        return None


def run(quick: bool = False, sizes: bool = True) -> list[Row]:
    if not torch.cuda.is_available():
        return [Row("gpu", "skipped: no CUDA", math.nan, "")]
    name = torch.cuda.get_device_name(0)
    steps = 4 if quick else 8
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        data = write_shards(Path(tmp))
        for compiled in (True, False):
            tag = f"124M {'compiled' if compiled else 'eager'}, {name}"
            ref = guarded(reference, steps, 64, compiled)
            mine = guarded(ours, "gpt2-124m", data, steps, ["--compile", str(compiled).lower()])
            if ref is None:
                rows.append(Row("gpu", f"reference {tag} (B=64): out of memory", math.nan, ""))
            else:
                rows += rows_for(f"reference {tag}", ref, None)
            if mine is not None:
                rows += rows_for(f"ours {tag}", mine, ref, ">= 1.3" if compiled else "")
        for preset in ("gpt2-350m", "gpt2-774m", "gpt2-1558m") if sizes and not quick else ():
            mine = guarded(ours, preset, data, 4, [])
            if mine is not None:
                rows += rows_for(f"ours {preset} compiled, {name}", mine, None, "")
            # FP8 matmuls for the blocks' matrices (>= 1024 wide), where the GPU and torchao allow
            fp8 = None if fp8_unsupported("cuda") else guarded(ours, preset, data, 4, ["--fp8", "true"])
            if fp8 is not None:
                rows += rows_for(f"ours {preset} compiled --fp8, {name}", fp8, mine, "", "same, bf16")
            # FSDP on one GPU: what the wrapping costs (each block gathered, bf16 compute from fp32 shards); the
            # memory it saves needs more ranks (docs/sharding.md)
            fsdp = guarded(ours, preset, data, 4, ["--fsdp", "true"])
            if fsdp is not None:
                rows += rows_for(f"ours {preset} compiled --fsdp true (1 rank), {name}", fsdp, mine, "",
                                 "same, no FSDP")
    return rows


if __name__ == "__main__":
    print(format_table(run(quick="--quick" in sys.argv, sizes="--no-sizes" not in sys.argv)))
