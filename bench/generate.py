"""Greedy generation speed for the GPT-2 124M config (random weights): ours with and without the KV cache,
and `transformers` `generate` on the same weights, in one run.

    python -m bench.generate [--quick]
"""

from __future__ import annotations

import sys
import tempfile
import time

import torch

from bench.common import Row, format_table
from model import GPT


def run(quick: bool = False) -> list[Row]:
    from transformers import GPT2Config, GPT2LMHeadModel

    new_tokens = 64 if quick else 256
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config()).eval()  # the 124M config
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = GPT.from_pretrained(tmp).eval()
    prompt = torch.randint(0, 50257, (1, 16), generator=torch.Generator().manual_seed(1))

    def timed(fn) -> tuple[torch.Tensor, float]:
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = fn()
        return out, new_tokens / (time.perf_counter() - t0)

    def hf_generate() -> torch.Tensor:
        return hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0)

    timed(lambda: ours.generate(prompt, 8, temperature=0))  # warm-up: first-call allocations
    out_cache, tps_cache = timed(lambda: ours.generate(prompt, new_tokens, temperature=0, use_cache=True))
    out_hf, tps_hf = timed(hf_generate)
    out_nocache, tps_nocache = timed(lambda: ours.generate(prompt, new_tokens, temperature=0, use_cache=False))
    assert torch.equal(out_cache, out_nocache), "KV-cache output differs from full recomputation"
    assert torch.equal(out_cache, out_hf), "our greedy output differs from transformers'"
    case = f"124M, 16-token prompt, {new_tokens} new, greedy"
    return [
        Row("generate", f"ours, KV cache ({case})", tps_cache, "tok/s", "transformers generate", tps_cache / tps_hf,
            ">= 1.0"),
        Row("generate", "ours, no cache", tps_nocache, "tok/s", "ours, KV cache", tps_cache / tps_nocache, ">= 5"),
        Row("generate", "transformers generate, KV cache", tps_hf, "tok/s"),
    ]


if __name__ == "__main__":
    print(format_table(run(quick="--quick" in sys.argv)))
