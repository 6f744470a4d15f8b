"""Greedy generation speed for the GPT-2 124M config (random weights, fp32) on CUDA when present, else CPU: ours
against `transformers` `generate` on the same weights, with tokens asserted identical.

Rows: ours with the KV cache (on CUDA the static cache with the decode step as a CUDA graph; on CPU the same static
cache, eager: the fastest path there), on CUDA also that step eager, ours without the cache, `transformers`, and on
CUDA a batch of 32 prompts of mixed lengths (tok/s in all rows together), each row checked against its batch-1 output;
where `--dtype auto` picks bf16 (sample.py's default on CUDA and on CPUs with native bf16), ours and
`transformers` under that autocast.

    python -m bench generate [--quick]
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable

import torch

from bench.common import Row, format_table
from gpt2repro.checkpoint import load_pretrained
from gpt2repro.devices import pick_dtype
from gpt2repro.generate import generate_batch
from model import GPT

BATCH = 32  # rows of the batched case (CUDA only: on this CPU it would take minutes)
TIE = 1e-3  # logits closer than this are a tie that float rounding may break either way


def device_label(device: str) -> str:
    return f"cuda: {torch.cuda.get_device_name(device)}" if device.startswith("cuda") else "cpu"


def timed(fn: Callable[[], object], device: str, tokens: int) -> tuple[object, float]:
    """fn's result and `tokens` per second of its wall-clock time (the GPU's queue drained before and after)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = fn()
    sync()
    return out, tokens / (time.perf_counter() - t0)


def warm_up(model: GPT, idx: torch.Tensor, new_tokens: int, steps: int = 8, **kwargs) -> None:
    """A few steps on the decoder the timed call will use (same batch and cache length): the first steps compile
    the decode step and capture its CUDA graph, and are not timed."""
    with torch.inference_mode():
        for _, _ in zip(range(steps), model.generate_stream(idx, new_tokens, temperature=0, **kwargs), strict=False):
            pass


def check_rows(model: GPT, prompts: list[list[int]], got: list[list[int]], ref: list[list[int]]) -> int:
    """How many rows are identical to their reference; a row that is not must first differ at a tie of the
    reference's logits (computed again without the cache), or the check fails."""
    device = next(model.parameters()).device
    same = 0
    for prompt, g, r in zip(prompts, got, ref, strict=True):
        if g == r:
            same += 1
            continue
        j = next(i for i, (a, b) in enumerate(zip(g, r, strict=True)) if a != b)
        with torch.inference_mode():
            logits = model.next_logits(torch.tensor([prompt + r[:j]], device=device))[0].float()
        gap = (logits[r[j]] - logits[g[j]]).abs().item()
        assert gap < TIE, f"batched row differs from batch 1 at token {j}, logits {gap:.3g} apart: not a tie"
    return same


def batch_row(model: GPT, device: str, new_tokens: int, tps_single: float, label: str) -> Row:
    """BATCH prompts of 8 to 24 tokens as one left-padded batch, against each prompt alone."""
    g = torch.Generator().manual_seed(2)
    lengths = torch.randint(8, 25, (BATCH,), generator=g).tolist()
    prompts = [torch.randint(0, 50257, (n,), generator=g).tolist() for n in lengths]
    T = max(lengths)
    warm_up(model, torch.zeros(BATCH, T, dtype=torch.long, device=device), new_tokens,
            pad=torch.tensor([T - n for n in lengths], device=device))
    got, tps = timed(lambda: generate_batch(model, prompts, new_tokens, temperature=0), device, BATCH * new_tokens)
    with torch.inference_mode():
        ref = [generate_batch(model, [p], new_tokens, temperature=0)[0] for p in prompts]
    same = check_rows(model, prompts, got, ref)
    case = f"[{label}] ours, batch {BATCH}, prompts of 8-24 tokens, fast path ({same}/{BATCH} rows = batch 1)"
    return Row("generate", case, tps, "tok/s", "ours, batch 1", tps / tps_single)


def agreement(got: torch.Tensor, ref: torch.Tensor) -> str:
    """How far two greedy outputs (1, T) agree: "all N" or "the first j of N" new tokens."""
    same = (got == ref)[0].tolist()
    return f"all {len(same)}" if all(same) else f"the first {same.index(False)} of {len(same)}"


def half_precision_rows(ours: GPT, hf: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, device: str,
                        dtype: torch.dtype) -> list[Row]:
    """Where `--dtype auto` (sample.py's default) picks a half precision: ours under that autocast (decoding reads
    half-precision copies of the weights) against `transformers` under the same autocast, and how many tokens match
    our uncached decode under that autocast (bf16 rounding differs between the two shapes, so near-ties may flip)."""
    name, label = str(dtype).removeprefix("torch."), device_label(device)
    with torch.autocast(torch.device(device).type, dtype):
        warm_up(ours, prompt, new_tokens)
        out, tps = timed(lambda: ours.generate(prompt, new_tokens, temperature=0), device, new_tokens)
        _, tps_hf = timed(lambda: hf.generate(prompt, attention_mask=torch.ones_like(prompt),
                                              max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                              use_cache=True, pad_token_id=0), device, new_tokens)
        with torch.inference_mode():
            ref = ours.generate(prompt, new_tokens, temperature=0, use_cache=False)
    same = agreement(out[:, prompt.size(1):], ref[:, prompt.size(1):])
    goal = ">= 8 (and >= 1,500 tok/s)" if device.startswith("cuda") else ">= 1.0"
    return [Row("generate", f"[{label}] ours, KV cache, {name} autocast (sample.py's default; {same} tokens as "
                f"uncached)", tps, "tok/s", f"transformers generate, {name} autocast", tps / tps_hf, goal),
            Row("generate", f"[{label}] transformers generate, {name} autocast", tps_hf, "tok/s")]


def run(quick: bool = False) -> list[Row]:
    from transformers import GPT2Config, GPT2LMHeadModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda, label = device == "cuda", device_label(device)
    new_tokens = 64 if quick else 256
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config()).eval()  # the 124M config
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = load_pretrained(tmp).eval().to(device)
    hf.to(device)
    prompt = torch.randint(0, 50257, (1, 16), generator=torch.Generator().manual_seed(1)).to(device)

    def hf_generate() -> torch.Tensor:
        return hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0)

    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # fp32 matmuls, not TF32: tokens must come out identical
    try:
        warm_up(ours, prompt, new_tokens)
        out_fast, tps_fast = timed(lambda: ours.generate(prompt, new_tokens, temperature=0), device, new_tokens)
        if cuda:
            warm_up(ours, prompt, new_tokens, decode="eager")
            out_eager, tps_eager = timed(lambda: ours.generate(prompt, new_tokens, temperature=0, decode="eager"),
                                         device, new_tokens)
            assert torch.equal(out_fast, out_eager), "the CUDA-graph decode step differs from the eager one"
        out_hf, tps_hf = timed(hf_generate, device, new_tokens)
        out_nocache, tps_nocache = timed(lambda: ours.generate(prompt, new_tokens, temperature=0, use_cache=False),
                                         device, new_tokens)
        assert torch.equal(out_fast, out_nocache), "KV-cache output differs from full recomputation"
        assert torch.equal(out_fast, out_hf), "our greedy output differs from transformers'"
        batch = [batch_row(ours, device, new_tokens, tps_fast, label)] if cuda else []
    finally:
        torch.set_float32_matmul_precision(precision)
    case = f"124M fp32, 16-token prompt, {new_tokens} new, greedy"
    fast = "static KV cache, decode step as a CUDA graph" if cuda else "KV cache"
    rows = [Row("generate", f"[{label}] ours, {fast} ({case})", tps_fast, "tok/s", "transformers generate",
                tps_fast / tps_hf, ">= 8 (and >= 1,500 tok/s)" if cuda else ">= 1.0")]
    if cuda:
        rows.append(Row("generate", f"[{label}] ours, static KV cache, eager step", tps_eager, "tok/s",
                        "transformers generate", tps_eager / tps_hf))
    rows += [
        Row("generate", f"[{label}] ours, no cache", tps_nocache, "tok/s", f"ours, {fast}", tps_fast / tps_nocache,
            ">= 5"),
        Row("generate", f"[{label}] transformers generate, KV cache", tps_hf, "tok/s"),
    ]
    half = pick_dtype(device)
    if half != torch.float32:
        rows += half_precision_rows(ours, hf, prompt, new_tokens, device, half)
    return rows + batch


if __name__ == "__main__":
    print(format_table(run(quick="--quick" in sys.argv)))
