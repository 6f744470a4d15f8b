"""HellaSwag: pick the right ending of a sentence, scored by the model's loss on each of the 4 endings.

    python hellaswag.py --model gpt2 [--split val] [--limit N] [--batch_size 16] [--device cuda] [--dtype bfloat16]
    python hellaswag.py --model out/run/ckpt_0019000.pt --jsonl hellaswag_val.jsonl --limit 100

Protocol ("completion style", as in the dataset authors' and nanoGPT's evaluations): each ending is appended to
the context as `ctx + " " + ending`; the model's cross-entropy is summed over the ending's tokens only. `acc`
picks the ending with the lowest summed loss, `acc_norm` the one with the lowest mean loss per ending token.
The LM Evaluation Harness scores differently (cleaned-up text, the activity label as a prefix, and acc_norm
normalised by the ending's length in characters), hence its higher numbers for the same model.

The data are `hellaswag_{train,val,test}.jsonl` from the dataset's GitHub repository, downloaded on first use
into `--data_dir` (default `<cache_dir>/hellaswag`), or any local file given with `--jsonl`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import urllib.request
from pathlib import Path

import torch
from torch.nn import functional as F
from tqdm import tqdm

from fileio import atomic_write_bytes
from model import GPT, KVCache
from tokenizer import cache_dir, get_tokenizer

SPLITS = ("train", "val", "test")
DATA_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"
NUM_ENDINGS = 4
LM_HEAD_CHUNK = 256  # rows of logits materialised at a time: ~50 MB for a 50k vocab

# OpenAI's checkpoints on the val split (10,042 examples): (acc, acc_norm) per protocol
REFERENCE = {
    "completion style (this script), fraction": {"gpt2": (0.2859, 0.2955), "gpt2-xl": (0.3842, 0.4893)},
    "LM Eval Harness multiple choice, percent": {"gpt2": (28.92, 31.14), "gpt2-xl": (40.04, 50.89)},
}


class HellaSwagError(ValueError):
    """Missing or malformed data, or a model that cannot be scored; the message says what to do."""


# -----------------------------------------------------------------------------
# data


def default_data_dir() -> Path:
    return cache_dir() / "hellaswag"


def cached_path(split: str, data_dir: str | Path | None = None) -> Path:
    """Where `hellaswag_{split}.jsonl` is kept (it may not be there yet)."""
    if split not in SPLITS:
        raise HellaSwagError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    return Path(data_dir or default_data_dir()) / f"hellaswag_{split}.jsonl"


def download(split: str, dest: Path) -> Path:
    """Fetch `hellaswag_{split}.jsonl` to `dest` (atomically), with a progress bar."""
    url = DATA_URL.format(split=split)
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            total = int(r.headers.get("Content-Length") or 0) or None
            chunks = []
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {dest.name}") as bar:
                while chunk := r.read(1 << 16):
                    chunks.append(chunk)
                    bar.update(len(chunk))
    except Exception as e:  # any network failure means the same thing to the user
        raise HellaSwagError(
            f"{dest} is not there and {url} could not be downloaded ({type(e).__name__}: {str(e)[:100]}); "
            f"put hellaswag_{split}.jsonl at {dest} (or pass --jsonl PATH / --data_dir DIR)"
        ) from None
    atomic_write_bytes(dest, b"".join(chunks))
    return dest


def _check_example(ex: object, where: str) -> dict:
    """The fields scoring needs, with a message naming `where` (file:line) when one is wrong."""
    if not isinstance(ex, dict):
        raise HellaSwagError(f"{where}: expected a JSON object, got {type(ex).__name__}")
    if not isinstance(ex.get("ctx"), str):
        raise HellaSwagError(f"{where}: field 'ctx' is missing or not a string")
    endings = ex.get("endings")
    if not (isinstance(endings, list) and len(endings) == NUM_ENDINGS and all(isinstance(e, str) for e in endings)):
        raise HellaSwagError(f"{where}: field 'endings' must be a list of {NUM_ENDINGS} strings")
    label = ex.get("label")  # the test split has no labels
    if label is not None and not (isinstance(label, int) and not isinstance(label, bool) and 0 <= label < 4):
        raise HellaSwagError(f"{where}: field 'label' must be an integer 0-3, got {label!r}")
    return ex


def read_jsonl(path: str | Path, limit: int | None = None) -> list[dict]:
    """Examples from a HellaSwag jsonl file, checked line by line."""
    path = Path(path)
    if not path.is_file():
        raise HellaSwagError(f"{path}: no such file")
    examples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if limit is not None and len(examples) >= limit:
                break
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
            except json.JSONDecodeError as e:
                raise HellaSwagError(f"{path}:{lineno}: not valid JSON ({e.msg}); the file may be truncated or "
                                     "corrupt, delete it to download it again") from None
            examples.append(_check_example(ex, f"{path}:{lineno}"))
    if not examples:
        raise HellaSwagError(f"{path}: no examples in the file")
    return examples


def load_examples(
    split: str = "val", data_dir: str | Path | None = None, jsonl: str | Path | None = None, limit: int | None = None
) -> list[dict]:
    """The first `limit` examples of `jsonl`, or of `split` from `data_dir` (downloaded there if absent)."""
    if jsonl is not None:
        return read_jsonl(jsonl, limit)
    path = cached_path(split, data_dir)
    if not path.is_file():
        download(split, path)
    return read_jsonl(path, limit)


# -----------------------------------------------------------------------------
# scoring


def encode_example(example: dict, tokenizer) -> tuple[list[int], list[list[int]]]:
    """Context tokens and the tokens of each ending with its leading space (GPT-2 BPE marks word starts)."""
    ctx = tokenizer.encode(example["ctx"])
    return ctx, [tokenizer.encode(" " + ending) for ending in example["endings"]]


def render_example(example: dict, tokenizer) -> tuple[torch.Tensor, torch.Tensor, int | None]:
    """Token rows (4, T) of `ctx + " " + ending`, zero-padded; a mask (4, T) that is 1 on ending tokens; the label."""
    ctx, endings = encode_example(example, tokenizer)
    T = len(ctx) + max(len(e) for e in endings)
    tokens = torch.zeros((NUM_ENDINGS, T), dtype=torch.long)
    mask = torch.zeros((NUM_ENDINGS, T), dtype=torch.long)
    for i, end in enumerate(endings):
        row = ctx + end
        tokens[i, : len(row)] = torch.tensor(row)
        mask[i, len(ctx) : len(row)] = 1
    return tokens, mask, example.get("label")


def _check_tokenizer(tokenizer) -> None:
    if getattr(tokenizer, "name", "gpt2") != "gpt2":
        raise HellaSwagError(
            f"HellaSwag needs a model trained with the GPT-2 tokenizer; this one uses {tokenizer.name!r} "
            "(a character-level model cannot read the dataset's text)"
        )


def _fit_context(ctx: list[int], endings: list[list[int]], block_size: int, where: str) -> list[int]:
    """Drop the oldest context tokens so the longest row fits the model's context window."""
    longest = max(len(e) for e in endings)
    if longest >= block_size:
        raise HellaSwagError(f"{where}: an ending of {longest} tokens does not fit block_size {block_size}")
    return ctx[max(0, len(ctx) + longest - block_size) :]


def _sum_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


def _ending_losses(
    logits_of, hidden: torch.Tensor, pred_at: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor, n_rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed loss and token count per row, from the hidden states (or logits) that predict each ending token.

    `hidden` is (R, P, ·); ending token k of row `rows[k]` is `targets[k]`, predicted at position `pred_at[k]`.
    """
    h = hidden[rows, pred_at]  # (N, ·): only these positions go through the output layer
    losses = torch.cat([F.cross_entropy(logits_of(c).float(), t, reduction="none")
                        for c, t in zip(h.split(LM_HEAD_CHUNK), targets.split(LM_HEAD_CHUNK), strict=True)])
    # float64 sums: adding up ~10-30 float32 losses of ~10 each would otherwise cost about 1e-5 in the total
    losses = losses.to(_sum_dtype(hidden.device))
    sums = torch.zeros(n_rows, dtype=losses.dtype, device=hidden.device).index_add_(0, rows, losses)
    counts = torch.zeros(n_rows, dtype=losses.dtype, device=hidden.device).index_add_(0, rows, torch.ones_like(losses))
    return sums, counts


def _ending_targets(
    starts: list[int], endings: list[list[int]], device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, predicting positions, target tokens) for every scored ending token.

    Ending `endings[r]` starts at position `starts[r]` of row r; the token at position p is predicted at
    p - 1, so the first token of a row with nothing before it is not scored (as in the reference).
    """
    rows, pred_at, targets = [], [], []
    for r, (start, end) in enumerate(zip(starts, endings, strict=True)):
        for j, tok in enumerate(end):
            if start + j >= 1:
                rows.append(r)
                pred_at.append(start + j - 1)
                targets.append(tok)
    as_tensor = lambda x: torch.tensor(x, dtype=torch.long, device=device)
    return as_tensor(rows), as_tensor(pred_at), as_tensor(targets)


def _pad(rows: list[list[int]], device) -> torch.Tensor:
    out = torch.zeros((len(rows), max(len(r) for r in rows)), dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out.to(device)


Batch = list[tuple[list[int], list[list[int]]]]  # (context tokens, the 4 endings' tokens) per example


def _score_gpt(model: GPT, batch: Batch, vocab_size: int, device, cache_dtype: torch.dtype) -> tuple[
        torch.Tensor, torch.Tensor]:
    """Our GPT: the context prefix common to the batch runs once per example, not once per ending.

    With S the shortest context in the batch, every example's first S context tokens go through the model as
    one row (B, S), filling a KV cache. Each ending row then continues from its example's cache with the rest
    of its context and the ending; these rows run shortest first, `B` at a time, so little is padding.
    The results are those of the full rows.
    """
    B = len(batch)
    S = min(len(ctx) for ctx, _ in batch)
    if S == 0:  # an empty context: nothing to share
        return _score_any(model, batch, vocab_size, device)
    prefix = torch.tensor([ctx[:S] for ctx, _ in batch], dtype=torch.long, device=device)
    prefix_cache = KVCache(model.config, B, S, device, cache_dtype)
    last = model.hidden_states(prefix, prefix_cache)[:, -1:]  # predicts each row's first suffix token
    suffixes = [ctx[S:] + end for ctx, ends in batch for end in ends]
    starts = [len(ctx) - S + 1 for ctx, ends in batch for _ in ends]  # +1: the prefix's last position comes first
    endings = [end for _, ends in batch for end in ends]
    sums = torch.zeros(len(suffixes), dtype=_sum_dtype(device), device=device)
    counts = torch.zeros_like(sums)
    for chunk in _batches(sorted(range(len(suffixes)), key=lambda r: len(suffixes[r])), max(B, NUM_ENDINGS)):
        example = torch.tensor([r // NUM_ENDINGS for r in chunk], dtype=torch.long, device=device)
        idx = _pad([suffixes[r] for r in chunk], device)
        cache = KVCache(model.config, len(chunk), S + idx.size(1), device, cache_dtype)
        cache.k[:, :, :, :S] = prefix_cache.k[:, example]
        cache.v[:, :, :, :S] = prefix_cache.v[:, example]
        cache.pos = S
        h = model.hidden_states(idx, cache)
        hidden = torch.cat([last[example].to(h.dtype), h], dim=1)
        rows, pred_at, targets = _ending_targets([starts[r] for r in chunk], [endings[r] for r in chunk], device)
        s, c = _ending_losses(lambda x: model.lm_head(x)[:, :vocab_size], hidden, pred_at, targets, rows, len(chunk))
        where = torch.tensor(chunk, dtype=torch.long, device=device)
        sums[where], counts[where] = s.to(sums.dtype), c.to(counts.dtype)
    return sums, counts


def _score_any(model: torch.nn.Module, batch: Batch, vocab_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Any model whose forward gives logits (ours returns a tuple, `transformers` an object with `.logits`)."""
    rows_tokens = [ctx + end for ctx, ends in batch for end in ends]
    starts = [len(ctx) for ctx, ends in batch for _ in ends]
    rows, pred_at, targets = _ending_targets(starts, [end for _, ends in batch for end in ends], device)
    out = model(_pad(rows_tokens, device))
    logits = out[0] if isinstance(out, tuple) else out.logits
    return _ending_losses(lambda x: x[:, :vocab_size], logits, pred_at, targets, rows, len(rows_tokens))


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        inner = getattr(model, "module", None)
        inner = inner if isinstance(inner, torch.nn.Module) else getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def _batches(order: list[int], batch_size: int) -> list[list[int]]:
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    examples: list[dict],
    tokenizer=None,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
) -> dict:
    """Score `examples` with `model` (already on `device`), `batch_size` examples (4 rows each) per forward.

    Rank `rank` of `world_size` scores examples rank, rank + world_size, ...; when torch.distributed is
    initialised the counts are summed over ranks, so every rank returns the global `acc`, `acc_norm`,
    `num_correct`, `num_correct_norm` and `num_total` (labelled examples), plus its own `predictions`.
    `dtype` other than float32 runs the model under autocast, as in training; the loss of each token is
    taken in float32 over the tokenizer's ids only (a padded vocab's extra logits are ignored).
    Each prediction holds the example's `index` in `examples`, `ind`, `label`, `pred`, `pred_norm`, and the
    4 endings' `sum_loss` and `mean_loss`.
    """
    tokenizer = tokenizer or get_tokenizer("gpt2")
    _check_tokenizer(tokenizer)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    distributed = world_size > 1
    if distributed and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise ValueError(f"world_size {world_size} needs an initialised torch.distributed process group")
    device = torch.device(device)
    model = _unwrap(model)
    vocab_size = tokenizer.vocab_size  # a padded model vocab has unused logits past the tokenizer's ids
    block_size = getattr(getattr(model, "config", None), "block_size", None) or getattr(
        getattr(model, "config", None), "n_positions", None)

    mine = list(range(rank, len(examples), world_size))
    encoded = {}
    for i in mine:
        ctx, ends = encode_example(examples[i], tokenizer)
        if block_size is not None:
            ctx = _fit_context(ctx, ends, block_size, f"example {i} (ind {examples[i].get('ind')})")
        encoded[i] = (ctx, ends)
    # similar lengths side by side: little padding, and a long common context prefix in each batch
    order = sorted(mine, key=lambda i: (len(encoded[i][0]), max(len(e) for e in encoded[i][1])))

    use_cache = isinstance(model, GPT)
    autocast = (torch.autocast(device_type=device.type, dtype=dtype) if dtype != torch.float32
                else contextlib.nullcontext())
    cache_dtype = dtype if dtype != torch.float32 else next(model.parameters()).dtype
    was_training = model.training
    model.eval()
    predictions = []
    n_correct = n_correct_norm = n_total = 0
    try:
        bar = tqdm(total=len(mine), unit="ex", desc="hellaswag", disable=not progress or rank != 0)
        for ids in _batches(order, batch_size):
            batch = [encoded[i] for i in ids]
            with autocast:
                if use_cache:
                    sums, counts = _score_gpt(model, batch, vocab_size, device, cache_dtype)
                else:
                    sums, counts = _score_any(model, batch, vocab_size, device)
            sums, means = sums.view(-1, NUM_ENDINGS).cpu(), (sums / counts).view(-1, NUM_ENDINGS).cpu()
            for i, s, m in zip(ids, sums, means, strict=True):
                label = examples[i].get("label")
                pred, pred_norm = int(s.argmin()), int(m.argmin())
                predictions.append({"index": i, "ind": examples[i].get("ind"), "label": label, "pred": pred,
                                    "pred_norm": pred_norm, "sum_loss": s.tolist(), "mean_loss": m.tolist()})
                if label is not None:
                    n_total += 1
                    n_correct += int(pred == label)
                    n_correct_norm += int(pred_norm == label)
            bar.update(len(ids))
            bar.set_postfix(acc_norm=f"{n_correct_norm / max(n_total, 1):.4f}")
        bar.close()
    finally:
        model.train(was_training)

    if distributed:
        counts = torch.tensor([n_correct, n_correct_norm, n_total], dtype=torch.long, device=device)
        torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.SUM)
        n_correct, n_correct_norm, n_total = (int(c) for c in counts.tolist())
    predictions.sort(key=lambda p: p["index"])
    return {
        "acc": n_correct / n_total if n_total else math.nan,
        "acc_norm": n_correct_norm / n_total if n_total else math.nan,
        "num_correct": n_correct,
        "num_correct_norm": n_correct_norm,
        "num_total": n_total,
        "predictions": predictions,
    }


# -----------------------------------------------------------------------------
# command line


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def format_result(result: dict, model_name: str, source: str) -> str:
    n = result["num_total"]
    lines = [
        f"HellaSwag {source}: {n:,} labelled examples, model {model_name}, completion style",
        f"  acc      {result['acc']:.4f}  ({result['num_correct']:,}/{n:,})  lowest summed ending loss",
        f"  acc_norm {result['acc_norm']:.4f}  ({result['num_correct_norm']:,}/{n:,})  lowest mean loss per token",
        "OpenAI checkpoints on the full val split (acc / acc_norm), by protocol:",
    ]
    for protocol, by_model in REFERENCE.items():
        cells = "   ".join(f"{name} {a:g} / {b:g}" for name, (a, b) in by_model.items())
        lines.append(f"  {protocol:<44} {cells}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from checkpoint import load_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2", help="gpt2-family name, Hugging Face model dir, checkpoint or run dir")
    p.add_argument("--split", default="val", choices=SPLITS)
    p.add_argument("--jsonl", default=None, help="read examples from this file instead of --split")
    p.add_argument("--data_dir", default=None, help=f"where the splits are cached (default {default_data_dir()})")
    p.add_argument("--limit", type=int, default=None, help="score only the first N examples")
    p.add_argument("--batch_size", type=int, default=16, help="examples per forward pass (4 rows each)")
    p.add_argument("--device", default=default_device())
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="anything but float32 runs under autocast")
    p.add_argument("--predictions", default=None, help="write one JSON line per example here")
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        sys.exit("error: --limit must be at least 1")
    try:
        examples = load_examples(args.split, args.data_dir, args.jsonl, args.limit)
        model, tokenizer = load_model(args.model, map_location="cpu")
        _check_tokenizer(tokenizer)
        model.to(args.device)
        result = evaluate(model, examples, tokenizer, batch_size=args.batch_size, device=args.device,
                          dtype=getattr(torch, args.dtype), progress=True)
    except ValueError as e:  # HellaSwagError, CheckpointError and load_model's errors: one line each
        sys.exit(f"error: {e}")
    if args.predictions:
        lines = "".join(json.dumps(p) + "\n" for p in result["predictions"])
        atomic_write_bytes(Path(args.predictions), lines.encode())
    source = args.jsonl or f"{args.split} split"
    print(format_result(result, args.model, source))


if __name__ == "__main__":
    main()
