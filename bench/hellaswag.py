"""HellaSwag scoring speed for the GPT-2 124M config (random weights): `hellaswag.evaluate` (examples packed
several to a row, each context computed once) against build-nanogpt's way (one example per forward: 4 padded
rows of context + ending, full logits), on the same examples, with the same results.

    python -m bench.hellaswag [--quick]

Runs on CUDA when there is a GPU, else on the CPU, both scorers in the precision `--dtype auto` picks for
training there (bf16 autocast on a GPU and on a CPU with native bf16, fp32 elsewhere; build-nanogpt scores
HellaSwag under bf16 autocast during training on any device); on CPU the full run adds the fp32 pair. Both
scorers are GEMM-bound on CPU, so their ratio is close to the ratio of their FLOPs: the packed scorer runs the
body once per context and the output layer only where an ending token is predicted. The examples are
synthetic, in the dataset's format: a context of 2-6 consecutive lines of `input.txt` and endings of 1-3 lines
each (about 42 and 21 tokens; the real val split averages about 40 and 25), so nothing is downloaded.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from bench.common import Row, format_table
from gpt2repro.devices import autocast, pick_dtype
from gpt2repro.tokenizer import get_tokenizer
from hellaswag import DEFAULT_BATCH_TOKENS, encode_example, evaluate, render_example
from model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parent.parent


def synthetic_examples(n: int, seed: int = 0) -> list[dict]:
    """HellaSwag-format examples whose contexts and endings are runs of consecutive Shakespeare lines."""
    path = ROOT / "input.txt"
    if not path.is_file():
        sys.exit(f"error: {path} is missing; run `python prepare.py` first")
    lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.rstrip().endswith(":")]
    rng = random.Random(seed)

    def run_of_lines(lo: int, hi: int) -> str:
        start = rng.randrange(len(lines) - hi)
        return " ".join(lines[start : start + rng.randint(lo, hi)])

    return [{"ind": i, "activity_label": "Shakespeare", "ctx_a": (ctx := run_of_lines(2, 6)), "ctx_b": "", "ctx": ctx,
             "endings": [run_of_lines(1, 3) for _ in range(4)], "label": rng.randrange(4), "split": "val",
             "split_type": "indomain", "source_id": f"input.txt~{i}"} for i in range(n)]


@torch.no_grad()
def one_example_per_forward(model: GPT, examples: list[dict], tokenizer, device: str = "cpu",
                            dtype: torch.dtype = torch.float32) -> list[tuple[list[float], list[float]]]:
    """build-nanogpt's scorer: the 4 rows of one example, full logits, cross-entropy at every position, masked."""
    out = []
    for ex in examples:
        tokens, mask, _ = render_example(ex, tokenizer)
        tokens, mask = tokens.to(device), mask.to(device)
        with autocast(device, dtype):
            logits, _ = model(tokens)
        losses = F.cross_entropy(logits[:, :-1, : tokenizer.vocab_size].flatten(0, 1).float(),
                                 tokens[:, 1:].flatten(), reduction="none").view(tokens.size(0), -1)
        m = mask[:, 1:].float()
        sums = (losses * m).sum(1)
        out.append((sums.tolist(), (sums / m.sum(1)).tolist()))
    return out


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def side_by_side(model: GPT, examples: list[dict], tokenizer, chunk: int, device: str, dtype: torch.dtype,
                 **kwargs) -> tuple[float, float, list[dict], list]:
    """Seconds of `evaluate` and of the one-example scorer, timed turn about on chunks of `chunk` examples
    (the order flipped each turn: on a shared machine the load changes by the minute); and their results."""
    t_new = t_ref = 0.0
    new: list[dict] = []
    ref: list = []
    for k, start in enumerate(range(0, len(examples), chunk)):
        part = examples[start : start + chunk]
        for scorer in ("new", "ref")[:: 1 if k % 2 == 0 else -1]:
            _sync(device)
            t0 = time.perf_counter()
            if scorer == "new":
                new += evaluate(model, part, tokenizer, device=device, dtype=dtype, **kwargs)["predictions"]
                _sync(device)
                t_new += time.perf_counter() - t0
            else:
                ref += one_example_per_forward(model, part, tokenizer, device, dtype)
                _sync(device)
                t_ref += time.perf_counter() - t0
    return t_new, t_ref, new, ref


def check_same(new: list[dict], ref: list, tol: float) -> int:
    """The summed losses agree within `tol` (relative), and so do the predictions but for near-ties: an ending
    whose reference loss is within `tol` of the best one's. Returns the number of such tied predictions."""
    ties = 0
    for i, (p, (sums, means)) in enumerate(zip(new, ref, strict=True)):
        gap = max(abs(a - b) / abs(b) for a, b in zip(p["sum_loss"], sums, strict=True))
        assert gap < tol, f"example {i}: summed losses differ by {gap:.2g} (relative)"
        for pred, losses in ((p["pred"], sums), (p["pred_norm"], means)):
            best = min(losses)
            assert losses[pred] - best <= tol * best, f"example {i}: prediction differs from the one-example one"
            ties += losses[pred] != best
    return ties


def packed_vs_one_per_forward(model: GPT, examples: list[dict], tokenizer, device: str, dtype: torch.dtype,
                              chunk: int, batch_tokens: int, goal: str) -> list[Row]:
    """The two rows of one side-by-side timing in one precision, the results checked against each other."""
    n = len(examples)
    where = f"cuda ({torch.cuda.get_device_name(0)})" if device == "cuda" else "cpu"
    where += ", " + str(dtype).removeprefix("torch.").replace("bfloat16", "bf16").replace("float32", "fp32")
    evaluate(model, examples[:4], tokenizer, device=device, dtype=dtype)  # warm-up: first-call allocations
    one_example_per_forward(model, examples[:2], tokenizer, device, dtype)
    t_new, t_ref, new, ref = side_by_side(model, examples, tokenizer, chunk, device, dtype,
                                          batch_tokens=batch_tokens)
    ties = check_same(new, ref, tol=1e-6 if dtype == torch.float32 else 2e-2)
    encoded = [encode_example(ex, tokenizer) for ex in examples]
    ctx_len = sum(len(ctx) for ctx, _ in encoded) / n
    ending_len = sum(len(e) for _, ends in encoded for e in ends) / (4 * n)
    case = f"124M {where}, {n} examples, context {ctx_len:.0f} + ending {ending_len:.0f} tokens"
    note = f"; {ties} of {2 * n} predictions differ, at near-ties" if ties else ""
    return [
        Row("hellaswag", f"evaluate, packed, batch_tokens {batch_tokens} ({case}){note}", n / t_new, "examples/s",
            "one example per forward", t_ref / t_new, goal),
        Row("hellaswag", f"one example per forward, full logits ({where})", n / t_ref, "examples/s"),
    ]


def compiled_row(model: GPT, examples: list[dict], tokenizer, device: str, dtype: torch.dtype,
                 batch_tokens: int, reference: Row) -> Row:
    kwargs = dict(device=device, dtype=dtype, batch_tokens=batch_tokens, compile=True)
    evaluate(model, examples, tokenizer, **kwargs)  # compiles (for every batch shape)
    _sync(device)
    t0 = time.perf_counter()
    evaluate(model, examples, tokenizer, **kwargs)
    _sync(device)
    rate = len(examples) / (time.perf_counter() - t0)
    return Row("hellaswag", "evaluate, packed, compiled (same device and precision)", rate, "examples/s",
               "one example per forward", rate / reference.figure)


def run(quick: bool = False) -> list[Row]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = pick_dtype(device)
    n = (32 if quick else 192) * (16 if device == "cuda" else 1)
    tokenizer = get_tokenizer("gpt2")
    examples = synthetic_examples(n)
    torch.manual_seed(0)
    model = GPT(GPTConfig()).to(device).eval()  # the 124M config
    batch_tokens = DEFAULT_BATCH_TOKENS * (8 if device == "cuda" else 1)
    chunk = n if quick else n // 4
    goal = ">= 3" if device == "cpu" else ">= 1,000 examples/s"
    rows = packed_vs_one_per_forward(model, examples, tokenizer, device, dtype, chunk, batch_tokens, goal)
    if device == "cuda" and not quick:  # compiling pays on a GPU over a long run; on 2 CPU cores it does not
        rows.insert(1, compiled_row(model, examples, tokenizer, device, dtype, batch_tokens, rows[1]))
    if device == "cpu" and dtype != torch.float32 and not quick:
        rows += packed_vs_one_per_forward(model, examples, tokenizer, device, torch.float32, chunk, batch_tokens, "")
    return rows


if __name__ == "__main__":
    print(format_table(run(quick="--quick" in sys.argv)))
