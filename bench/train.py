"""Training speed on CPU, side by side in one run, all through our own trainer (`train_gpt2.main`):

- tokens/s of the shakespeare-char model and of the GPT-2 124M config at B=4, T=256: ours eager fp32,
  ours with the fast path (torch.compile, bf16 autocast, fused AdamW), the same in fp32 (the fast path on
  CPUs without native bf16), and a `transformers` `GPT2LMHeadModel` step with the same shapes and AdamW;
- MFU of each 124M step against this CPU's measured matmul peak in the precision the step uses (bf16 rows
  against the bf16 peak, fp32 rows against the fp32 peak);
- a Muon step on the `lecture-fast` model's matrices (6 layers x 384) with Newton–Schulz in fp32 and in bf16
  (what a bf16 run uses);
- (full run only) wall-clock time of the `shakespeare-char` preset to val loss 1.88, against nanoGPT's CPU
  recipe (4 layers x 128, batch 12 x 64, lr 1e-3, 2000 steps) run by the same trainer.

    python -m bench.train [--quick]
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

import train_gpt2
from bench.ablate import GPT2_FLAGS
from bench.common import Row, format_table
from gpt2repro.cpu_caps import best_seconds, cpu_has_native_bf16, matmul_peak_flops
from model import GPT, GPTConfig

CHAR_MODEL = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=32)  # the preset's shapes
GPT2_124M = dict(n_layer=12, n_head=12, n_embd=768, block_size=256, batch_size=4)
# nanoGPT's shakespeare_char config with its documented CPU overrides: GPT-2's architecture and AdamW, whatever
# the shakespeare-char preset turns on
NANOGPT_CPU_RECIPE = ["--n_layer", "4", "--n_head", "4", "--n_embd", "128", "--block_size", "64", "--batch_size", "12",
                      "--total_batch_size", "768", "--max_steps", "2000", "--max_lr", "1e-3", "--min_lr", "1e-4",
                      "--warmup_steps", "100", "--beta2", "0.99", "--dropout", "0.0", "--shuffle", "true", *GPT2_FLAGS]


def flag_list(shape: dict) -> list[str]:
    return [x for k, v in shape.items() for x in (f"--{k}", str(v))]


def trainer_tok_per_s(preset: str, shape: dict, steps: int, compile: bool, dtype: str = "float32") -> float:
    """Tokens/s of the fastest of `steps` optimizer steps of our trainer (the least disturbed by other work),
    leaving out the first two (compile, warm-up)."""
    with tempfile.TemporaryDirectory() as out:
        total = shape["batch_size"] * shape["block_size"]
        # GPT-2's architecture and AdamW, like the transformers model it is compared with
        train_gpt2.main(["--preset", preset, *flag_list(shape), *GPT2_FLAGS, "--total_batch_size", str(total),
                         "--max_steps", str(steps + 2), "--out_dir", out, "--device", "cpu", "--eval_interval",
                         "1000000", "--eval_iters", "1", "--ckpt_interval", "0", "--num_samples", "0", "--log_interval",
                         "1000000", "--compile", str(compile), "--dtype", dtype, "--dropout", "0.0"])
        events = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return max(e["tok_per_s"] for e in events if "tok_per_s" in e and e["step"] >= 2)


def transformers_tok_per_s(shape: dict, vocab_size: int, steps: int) -> float:
    """The same step with `transformers`' GPT-2: forward, backward, clip, fused AdamW, fp32."""
    from transformers import GPT2Config, GPT2LMHeadModel

    B, T = shape["batch_size"], shape["block_size"]
    config = GPT2Config(vocab_size=vocab_size, n_positions=T, n_layer=shape["n_layer"], n_head=shape["n_head"],
                        n_embd=shape["n_embd"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=6e-4, betas=(0.9, 0.95), eps=1e-8, fused=True)
    x = torch.randint(0, vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        model(input_ids=x[:, :-1], labels=x[:, :-1]).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    step()
    step()
    return B * T / best_seconds(step, repeats=steps)


def muon_step_ms(ns_dtype: torch.dtype, repeats: int) -> float:
    """Milliseconds of the fastest Muon step over the blocks' matrices of lecture-fast's 6 x 384 model."""
    model = GPT(GPTConfig(block_size=256, vocab_size=65, n_layer=6, n_head=6, n_embd=384))
    opt = model.configure_optimizers(0.1, 3e-3, verbose=False, optimizer="muon", muon_ns_dtype=ns_dtype)
    muon = opt.optimizers[1]
    gen = torch.Generator().manual_seed(0)
    for group in muon.param_groups:
        for p in group["params"]:
            p.grad = torch.randn(p.shape, generator=gen)
    with torch.no_grad():
        return 1000 * best_seconds(muon.step, repeats)


def time_to_val(args: list[str], target: float) -> tuple[float | None, float, float]:
    """(seconds to the first val loss <= target or None, total seconds, final val loss) of one trainer run."""
    with tempfile.TemporaryDirectory() as out:
        train_gpt2.main(["--preset", "shakespeare-char", *args, "--out_dir", out, "--device", "cpu",
                         "--eval_interval", "100", "--eval_iters", "20", "--ckpt_interval", "0", "--num_samples", "0",
                         "--compile", "false", "--dtype", "float32"])
        events = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    vals = [(e["time"], e["val_loss"]) for e in events if "val_loss" in e]
    reached = next((t for t, v in vals if v <= target), None)
    return reached, events[-1]["time"], vals[-1][1]


def run(quick: bool = False) -> list[Row]:
    rows: list[Row] = []
    for name, preset, shape, vocab, steps in [
        ("shakespeare-char model (4L/128, 32x64)", "shakespeare-char", CHAR_MODEL, 65, 10 if quick else 30),
        ("124M (B=4, T=256)", "shakespeare-gpt2", GPT2_124M, 50304, 2 if quick else 5),
    ]:
        eager = trainer_tok_per_s(preset, shape, steps, compile=False)
        fast = trainer_tok_per_s(preset, shape, steps, compile=True, dtype="bfloat16")
        # without native bf16 (AVX512-BF16/AMX) CPU autocast emulates it: compile in fp32 is the fast path there
        fast32 = trainer_tok_per_s(preset, shape, steps, compile=True)
        hf = transformers_tok_per_s(shape, vocab, steps)
        # the goals: the default (compile, `--dtype auto`) >= 1.5x where auto picks bf16 (native bf16),
        # >= 1.3x where it picks fp32; eager >= 1.0x
        native = cpu_has_native_bf16()
        big = "124M" in name
        rows += [
            Row("train", f"{name}: ours, eager fp32", eager, "tok/s", "transformers", eager / hf, ">= 1.0" * big),
            Row("train", f"{name}: ours, compile+bf16+fused AdamW" + " (the default here)" * native, fast, "tok/s",
                "transformers", fast / hf, ">= 1.5" * (big and native)),
            Row("train", f"{name}: ours, compile+fp32+fused AdamW" + " (the default here)" * (not native), fast32,
                "tok/s", "transformers", fast32 / hf, ">= 1.3" * (big and not native)),
            Row("train", f"{name}: transformers GPT2LMHeadModel fp32", hf, "tok/s"),
        ]
        if big:
            peak32, peak16 = matmul_peak_flops(torch.float32), matmul_peak_flops(torch.bfloat16)
            flops_per_token = GPT(GPTConfig(block_size=256, vocab_size=50304)).flops_per_token(256)
            rows += [
                Row("train", "CPU matmul peak, fp32 (2048^3)", peak32 / 1e9, "GFLOP/s"),
                Row("train", "CPU matmul peak, bf16 (2048^3)", peak16 / 1e9, "GFLOP/s", "fp32 peak", peak16 / peak32),
                Row("train", "124M: ours, eager fp32, MFU (fp32 peak)", 100 * flops_per_token * eager / peak32,
                    "% of peak"),
                Row("train", "124M: ours, compile+bf16, MFU (bf16 peak)", 100 * flops_per_token * fast / peak16,
                    "% of peak"),
                Row("train", "124M: ours, compile+fp32, MFU (fp32 peak)", 100 * flops_per_token * fast32 / peak32,
                    "% of peak"),
            ]
    repeats = 2 if quick else 5
    ns32, ns16 = muon_step_ms(torch.float32, repeats), muon_step_ms(torch.bfloat16, repeats)
    rows += [
        Row("train", "Muon step, lecture-fast's 24 matrices (6L/384), Newton-Schulz fp32", ns32, "ms"),
        Row("train", "Muon step, lecture-fast's 24 matrices (6L/384), Newton-Schulz bf16 (bf16 runs)", ns16, "ms",
            "fp32 Newton-Schulz", ns16 / ns32, "lower is better"),
    ]
    if not quick:
        ours, ours_total, ours_final = time_to_val([], 1.88)
        _, ref_total, ref_final = time_to_val(NANOGPT_CPU_RECIPE, 1.88)
        rows += [
            Row("train", f"shakespeare-char preset: seconds to val 1.88 (final {ours_final:.4f} at "
                f"{ours_total:.0f} s)", ours if ours is not None else float("nan"), "s",
                "nanoGPT CPU recipe, 2000 steps", (ours or float("nan")) / ref_total, "<= 0.5 (lower is better)"),
            Row("train", f"nanoGPT CPU recipe via our trainer: 2000 steps (final val {ref_final:.4f})", ref_total, "s"),
        ]
    return rows


if __name__ == "__main__":
    print(format_table(run(quick="--quick" in sys.argv)))
