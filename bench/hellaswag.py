"""HellaSwag scoring speed on CPU for the GPT-2 124M config (random weights): `hellaswag.evaluate` (batched,
context run once per example) against the reference way (one example per forward, full logits), same results.

    python -m bench.hellaswag [--quick]

The examples are synthetic, in the dataset's format: a context of 2-6 consecutive lines of `input.txt` and
endings of 1-3 lines each (about 42 and 21 tokens), so nothing is downloaded. The saving grows with the
context's share of each row and with the number of examples (batches of closer context lengths).
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from bench.common import Row, format_table
from hellaswag import encode_example, evaluate, render_example
from model import GPT, GPTConfig
from tokenizer import get_tokenizer

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
def one_example_per_forward(model: GPT, examples: list[dict], tokenizer) -> list[tuple[list[float], list[float]]]:
    """The reference scorer: the 4 rows of one example, full logits, cross-entropy at every position, masked."""
    out = []
    for ex in examples:
        tokens, mask, _ = render_example(ex, tokenizer)
        logits, _ = model(tokens)
        losses = F.cross_entropy(logits[:, :-1, : tokenizer.vocab_size].flatten(0, 1), tokens[:, 1:].flatten(),
                                 reduction="none").view(tokens.size(0), -1)
        m = mask[:, 1:].float()
        sums = (losses * m).sum(1)
        out.append((sums.tolist(), (sums / m.sum(1)).tolist()))
    return out


def run(quick: bool = False) -> list[Row]:
    n = 48 if quick else 200
    tokenizer = get_tokenizer("gpt2")
    examples = synthetic_examples(n)
    torch.manual_seed(0)
    model = GPT(GPTConfig()).eval()  # the 124M config
    encoded = [encode_example(ex, tokenizer) for ex in examples]
    ctx_len = sum(len(ctx) for ctx, _ in encoded) / n
    ending_len = sum(len(e) for _, ends in encoded for e in ends) / (4 * n)

    evaluate(model, examples[:4], tokenizer, batch_size=4)  # warm-up: first-call allocations
    one_example_per_forward(model, examples[:1], tokenizer)

    # On a shared machine the load changes by the minute: time the two scorers turn about, one batch of 16
    # examples at a time (the batched scorer's own batches: it sorts by the same key), order flipped each time.
    order = sorted(range(n), key=lambda i: (len(encoded[i][0]), max(len(e) for e in encoded[i][1])))
    t_batched = t_reference = 0.0
    batched: dict[int, dict] = {}
    reference: dict[int, tuple[list[float], list[float]]] = {}
    for k, start in enumerate(range(0, n, 16)):
        ids = order[start : start + 16]
        part = [examples[i] for i in ids]
        for scorer in ("batched", "reference")[:: 1 if k % 2 == 0 else -1]:
            t0 = time.perf_counter()
            if scorer == "batched":
                preds = evaluate(model, part, tokenizer, batch_size=16)["predictions"]
                t_batched += time.perf_counter() - t0
                batched |= {ids[p["index"]]: p for p in preds}
            else:
                scores = one_example_per_forward(model, part, tokenizer)
                t_reference += time.perf_counter() - t0
                reference |= dict(zip(ids, scores, strict=True))

    for i in range(n):
        p, (sums, means) = batched[i], reference[i]
        assert p["pred"] == min(range(4), key=sums.__getitem__), f"example {i}: prediction differs"
        assert p["pred_norm"] == min(range(4), key=means.__getitem__), f"example {i}: acc_norm prediction differs"
        assert max(abs(a - b) for a, b in zip(p["sum_loss"], sums, strict=True)) < 1e-3, "summed losses differ"

    case = f"124M fp32, {n} examples, context {ctx_len:.0f} + ending {ending_len:.0f} tokens"
    return [
        Row("hellaswag", f"evaluate, batch_size 16 ({case})", n / t_batched, "examples/s",
            "one example per forward", t_reference / t_batched, ">= 3"),
        Row("hellaswag", "one example per forward, full logits", n / t_reference, "examples/s"),
    ]


if __name__ == "__main__":
    print(format_table(run(quick="--quick" in sys.argv)))
