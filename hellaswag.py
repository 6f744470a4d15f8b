"""HellaSwag: pick the right ending of a sentence, scored by the model's loss on each of the 4 endings.

    python hellaswag.py --model gpt2 [--split val] [--limit N] [--batch_tokens 8192] [--device cuda] [--dtype bfloat16]
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
import bisect
import json
import math
import sys
import urllib.request
from dataclasses import dataclass
from itertools import chain, pairwise
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from gpt2repro.devices import DTYPES, autocast, compile_cached, pick_device, quiet_library_logs
from gpt2repro.errors import STDOUT, check_writable, one_line_errors
from gpt2repro.eval_mode import eval_mode
from gpt2repro.fileio import MiB, atomic_create_bytes, atomic_write_bytes, limited_lines, parse_json
from gpt2repro.tokenizer import Tokenizer, cache_dir, get_tokenizer
from model import GPT

SPLITS = ("train", "val", "test")
DATA_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"
NUM_ENDINGS = 4
MAX_JSONL_BYTES = 512 * MiB  # the train split is 47 MB; a file past this is not HellaSwag
MAX_LINE_BYTES = 1 * MiB  # an example is about 1 KB
LM_HEAD_CHUNK = 256  # rows of logits materialised at a time: ~50 MB for a 50k vocab
PACK_ROW_TOKENS = 256  # our GPT: examples (~130 tokens) packed into rows this long, or the longest example
DEFAULT_BATCH_TOKENS = 8192  # tokens per forward: a GPU wants more (the trainer passes its micro-batch's)

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
    if not path.exists():
        raise HellaSwagError(f"{path}: no such file")
    examples = []
    with open(path, "rb") as f:  # bytes, decoded line by line, so that bad UTF-8 is named by its line
        for lineno, raw in limited_lines(f, str(path), MAX_JSONL_BYTES, MAX_LINE_BYTES):
            if limit is not None and len(examples) >= limit:
                break
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise HellaSwagError(f"{path}:{lineno}: not UTF-8 text (byte {e.start + 1} of the line); the file may "
                                     "be corrupt, delete it to download it again") from None
            if not line.strip():
                continue
            try:
                ex = parse_json(line)
            except json.JSONDecodeError as e:
                raise HellaSwagError(f"{path}:{lineno}: not valid JSON ({e.msg}); the file may be truncated or "
                                     "corrupt, delete it to download it again") from None
            except ValueError as e:  # nested too deeply, a number of hundreds of digits
                raise HellaSwagError(f"{path}:{lineno}: not a HellaSwag example ({e}); is this the right file?") \
                    from None
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
# tokens


def encode_example(example: dict, tokenizer: Tokenizer) -> tuple[list[int], list[list[int]]]:
    """Context tokens and the tokens of each ending with its leading space (GPT-2 BPE marks word starts)."""
    ctx = tokenizer.encode(example["ctx"])
    return ctx, [tokenizer.encode(" " + ending) for ending in example["endings"]]


def render_example(example: dict, tokenizer: Tokenizer) -> tuple[torch.Tensor, torch.Tensor, int | None]:
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


Encoded = list[tuple[list[int], list[list[int]]]]  # (context tokens, the 4 endings' tokens) per example


def _encode_all(examples: list[dict], ids: list[int], tokenizer, block_size: int | None) -> Encoded:
    """Context and ending tokens of `examples[i]` for i in `ids`, the context cropped to `block_size`."""
    encoded = []
    for i in ids:
        ctx, ends = encode_example(examples[i], tokenizer)
        if block_size is not None:
            ctx = _fit_context(ctx, ends, block_size, f"example {i} (ind {examples[i].get('ind')})")
        encoded.append((ctx, ends))
    return encoded


# -----------------------------------------------------------------------------
# layout: where every token of every example goes, computed once with numpy before any forward pass


def _units(encoded: Encoded, share_context: bool) -> tuple[list[list[int]], np.ndarray, np.ndarray]:
    """Each unit's tokens, its segment lengths (units, segments) and the slot of its first ending.

    With `share_context` a unit is one example: its context once, then its 4 endings. Otherwise a unit is one
    `context + ending` row. Slot 4 × example + j collects the losses of ending j of the example.
    """
    if share_context:
        tokens = [ctx + [t for end in ends for t in end] for ctx, ends in encoded]
        lens = [[len(ctx)] + [len(end) for end in ends] for ctx, ends in encoded]
        first_slot = np.arange(len(encoded)) * NUM_ENDINGS
    else:
        tokens = [ctx + end for ctx, ends in encoded for end in ends]
        lens = [[len(ctx), len(end)] for ctx, ends in encoded for end in ends]
        first_slot = np.arange(len(tokens))
    segments = 1 + NUM_ENDINGS if share_context else 2
    return tokens, np.array(lens, dtype=np.int64).reshape(len(tokens), segments), first_slot


def _flatten(lens: np.ndarray, first_slot: np.ndarray) -> dict[str, np.ndarray]:
    """Per flat token: its unit, segment (0 = context, j + 1 = ending j), position and column in the unit;
    per scored token: its flat index, the unit column that predicts it, and its ending slot."""
    n_units, n_segments = lens.shape
    unit_len, seg_len = lens.sum(1), lens.ravel()
    unit = np.repeat(np.arange(n_units), unit_len)
    segment = np.repeat(np.tile(np.arange(n_segments), n_units), seg_len)
    t = np.arange(int(unit_len.sum()))
    in_segment = t - np.repeat(np.cumsum(seg_len) - seg_len, seg_len)
    column = t - (np.cumsum(unit_len) - unit_len)[unit]
    ctx_len = lens[unit, 0]
    position = in_segment + np.where(segment > 0, ctx_len, 0)  # every ending continues right after the context
    # the token at position p is predicted at p - 1: an ending's first token by the context's last one;
    # position 0 (an empty context) has nothing before it and is not scored, as in the reference
    scored = np.flatnonzero((segment > 0) & (position >= 1))
    pred_col = np.where(in_segment == 0, ctx_len - 1, column - 1)[scored]
    return {"unit": unit, "segment": segment, "position": position, "column": column, "scored": scored,
            "pred_col": pred_col, "slot": first_slot[unit[scored]] + segment[scored] - 1}


def pack_rows(
    unit_len: np.ndarray, batch_tokens: int, row_tokens: int, per_row: int, max_units: int | None = None
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Place units in rows of `max(row_tokens, longest unit left)` tokens, at most `per_row` to a row, and rows
    in batches of at most `batch_tokens` tokens and `max_units` units; returns each unit's row and column, and
    the first row of every batch (plus the end).

    Longest unit first; each row is then topped up with the longest units that still fit (first-fit
    decreasing), so rows are nearly full. With `per_row` 1 this is sorting by length: a batch's rows are as
    long as its longest unit.
    """
    left = sorted(range(len(unit_len)), key=lambda u: unit_len[u])  # ascending: the longest at the end
    left_len = [int(unit_len[u]) for u in left]
    row_of, col_of = np.zeros(len(unit_len), dtype=np.int64), np.zeros(len(unit_len), dtype=np.int64)
    batch_start, row = [0], 0
    while left:
        width = max(row_tokens, left_len[-1])
        rows_left, units_left = max(1, batch_tokens // width), max_units or len(left)
        while left and rows_left and units_left:
            col = 0
            for _ in range(min(per_row, units_left)):
                k = bisect.bisect_right(left_len, width - col) - 1  # the longest unit that fits
                if k < 0:
                    break
                u, n = left.pop(k), left_len.pop(k)
                row_of[u], col_of[u], col, units_left = row, col, col + n, units_left - 1
            row, rows_left = row + 1, rows_left - 1
        batch_start.append(row)
    return row_of, col_of, batch_start


@dataclass
class Layout:
    """The batches of one evaluation, each a slice of the same device tensors.

    Batch b is rows `batch_start[b] : batch_start[b + 1]` of `grid`, `width[b]` columns; `grid` holds the flat
    index of the token at each place (-1 = padding) into `tokens`, `positions`, `segments` and `units` (which
    example / row each token belongs to). Its scored tokens are `scored_start[b] : scored_start[b + 1]`:
    `target[k]` is predicted at (`scored_row[k]`, `scored_col[k]`) of the batch and its loss adds to `slot[k]`.
    """

    tokens: torch.Tensor
    positions: torch.Tensor
    segments: torch.Tensor
    units: torch.Tensor
    grid: torch.Tensor
    batch_start: list[int]
    width: list[int]
    scored_row: torch.Tensor
    scored_col: torch.Tensor
    target: torch.Tensor
    slot: torch.Tensor  # on the CPU: the losses are summed there, in float64
    scored_start: list[int]


def make_layout(
    encoded: Encoded, share_context: bool, batch_tokens: int, max_examples: int | None = None,
    device: str | torch.device = "cpu",
) -> Layout:
    """Lay out `encoded` examples in batches: with `share_context` (our GPT) whole examples packed several to a
    row (PACK_ROW_TOKENS), else one `context + ending` row per ending, similar lengths side by side."""
    units, lens, first_slot = _units(encoded, share_context)
    f = _flatten(lens, first_slot)
    tokens = np.fromiter(chain.from_iterable(units), dtype=np.int64, count=len(f["unit"]))
    per_row, row_tokens = (len(units) or 1, PACK_ROW_TOKENS) if share_context else (1, 0)
    max_units = None if max_examples is None else max_examples * (1 if share_context else NUM_ENDINGS)
    row_of, col_of, batch_start = pack_rows(lens.sum(1), batch_tokens, row_tokens, per_row, max_units)
    grid_col = col_of[f["unit"]] + f["column"]
    grid = np.full((batch_start[-1], int(grid_col.max(initial=0)) + 1), -1, dtype=np.int64)
    grid[row_of[f["unit"]], grid_col] = np.arange(len(tokens))
    batch_of_row = np.repeat(np.arange(len(batch_start) - 1), np.diff(batch_start))
    width = [int((grid[a:b] >= 0).any(0).nonzero()[0].max(initial=0)) + 1 for a, b in pairwise(batch_start)]
    scored_unit = f["unit"][f["scored"]]
    scored_batch = batch_of_row[row_of[scored_unit]]
    order = np.argsort(scored_batch, kind="stable")  # the scored tokens batch by batch
    scored_unit, scored_batch = scored_unit[order], scored_batch[order]
    as_tensor = lambda x: torch.as_tensor(x, dtype=torch.long).to(device)  # noqa: E731
    return Layout(
        tokens=as_tensor(tokens), positions=as_tensor(f["position"]), segments=as_tensor(f["segment"]),
        units=as_tensor(f["unit"]), grid=as_tensor(grid), batch_start=batch_start, width=width,
        scored_row=as_tensor(row_of[scored_unit] - np.asarray(batch_start)[scored_batch]),
        scored_col=as_tensor(col_of[scored_unit] + f["pred_col"][order]),
        target=as_tensor(tokens[f["scored"][order]]), slot=torch.as_tensor(f["slot"][order]),
        scored_start=np.searchsorted(scored_batch, np.arange(len(batch_start))).tolist(),
    )


def batch_rows(lay: Layout, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens, positions, segments and units (rows, width) of batch `b`; padding is unit -1, segment -1."""
    idx = lay.grid[lay.batch_start[b] : lay.batch_start[b + 1], : lay.width[b]]
    pad = idx < 0
    idx = idx.clamp(min=0)
    return (lay.tokens[idx].masked_fill_(pad, 0), lay.positions[idx].masked_fill_(pad, 0),
            lay.segments[idx].masked_fill_(pad, -1), lay.units[idx].masked_fill_(pad, -1))


def tree_mask(segments: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    """Boolean attention mask (B, 1, T, T): causal, within a unit, and an ending sees the context (segment 0)
    and itself only. Padding (unit -1) sees the padding before it: every query keeps a key (no NaN rows)."""
    T = segments.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    same_unit = units[:, None, :] == units[:, :, None]
    key, query = segments[:, None, :], segments[:, :, None]
    return (causal & same_unit & ((key == 0) | (key == query)))[:, None]


# -----------------------------------------------------------------------------
# scoring


def _ending_losses(logits_of, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Float32 loss of each scored token from the hidden states (or logits) that predict it, a chunk at a time."""
    return torch.cat([F.cross_entropy(logits_of(h).float(), t, reduction="none")
                      for h, t in zip(hidden.split(LM_HEAD_CHUNK), target.split(LM_HEAD_CHUNK), strict=True)])


def _scored(lay: Layout, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, column, target) of the scored tokens of batch `b`."""
    k = slice(lay.scored_start[b], lay.scored_start[b + 1])
    return lay.scored_row[k], lay.scored_col[k], lay.target[k]


def _packed_hidden(model: GPT, tokens, positions, segments, units) -> torch.Tensor:
    return model.hidden_states(tokens, positions=positions, attn_mask=tree_mask(segments, units))


def _gpt_losses(model: GPT, hidden_of, lay: Layout, b: int, vocab_size: int) -> torch.Tensor:
    """Our GPT: packed examples, the output layer only where an ending token is predicted."""
    hidden = hidden_of(model, *batch_rows(lay, b))
    rows, cols, target = _scored(lay, b)
    return _ending_losses(lambda h: model.logits(h)[:, :vocab_size], hidden[rows, cols], target)


def _any_losses(model: torch.nn.Module, lay: Layout, b: int, vocab_size: int) -> torch.Tensor:
    """Any model whose forward gives logits (`transformers` returns an object with `.logits`): a row per ending."""
    out = model(batch_rows(lay, b)[0])
    logits = out[0] if isinstance(out, tuple) else out.logits
    rows, cols, target = _scored(lay, b)
    return _ending_losses(lambda x: x[:, :vocab_size], logits[rows, cols], target)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        inner = getattr(model, "module", None)
        inner = inner if isinstance(inner, torch.nn.Module) else getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def score(
    model: torch.nn.Module,
    encoded: Encoded,
    vocab_size: int,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    batch_size: int | None = None,
    device: str | torch.device = "cpu",
    compile: bool = False,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed loss and scored-token count (examples, 4), float64 on the CPU, of each ending of `encoded`.

    A forward holds about `batch_tokens` tokens (more only for one long example) and at most `batch_size`
    examples. The model must be in eval mode, under the autocast wanted, with no autograd.
    """
    ours = isinstance(model, GPT)
    lay = make_layout(encoded, ours, batch_tokens, batch_size, device)
    hidden_of = compile_cached(_packed_hidden, dynamic=True) if compile and ours else _packed_hidden
    losses = []
    for b in tqdm(range(len(lay.width)), unit="batch", desc="hellaswag", disable=not progress):
        losses.append(_gpt_losses(model, hidden_of, lay, b, vocab_size) if ours
                      else _any_losses(model, lay, b, vocab_size))
    # float64 sums: adding up ~10-30 float32 losses of ~10 each would otherwise cost about 1e-5 in the total
    loss = torch.cat(losses).cpu().double() if losses else torch.zeros(0, dtype=torch.float64)
    n = NUM_ENDINGS * len(encoded)
    sums = torch.zeros(n, dtype=torch.float64).index_add_(0, lay.slot, loss)
    counts = torch.bincount(lay.slot, minlength=n).double()
    return sums.view(-1, NUM_ENDINGS), counts.view(-1, NUM_ENDINGS)


def _predictions(examples: list[dict], ids: list[int], sums: torch.Tensor, counts: torch.Tensor) -> list[dict]:
    means = sums / counts
    preds, preds_norm = sums.argmin(1).tolist(), means.argmin(1).tolist()
    return [{"index": i, "ind": examples[i].get("ind"), "label": examples[i].get("label"), "pred": p,
             "pred_norm": pn, "sum_loss": s, "mean_loss": m}
            for i, p, pn, s, m in zip(ids, preds, preds_norm, sums.tolist(), means.tolist(), strict=True)]


def _tally(predictions: list[dict], device, distributed: bool) -> tuple[int, int, int]:
    """(correct, correct by acc_norm, labelled) over `predictions`, summed over ranks when `distributed`."""
    labelled = [p for p in predictions if p["label"] is not None]
    counts = [sum(p["pred"] == p["label"] for p in labelled), sum(p["pred_norm"] == p["label"] for p in labelled),
              len(labelled)]
    if distributed:
        t = torch.tensor(counts, dtype=torch.long, device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        counts = t.tolist()
    return counts[0], counts[1], counts[2]


def _check_args(tokenizer, batch_size: int | None, batch_tokens: int, rank: int, world_size: int) -> None:
    _check_tokenizer(tokenizer)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if batch_tokens < 1:
        raise ValueError(f"batch_tokens must be at least 1, got {batch_tokens}")
    if world_size > 1 and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise ValueError(f"world_size {world_size} needs an initialised torch.distributed process group")


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    examples: list[dict],
    tokenizer: Tokenizer | None = None,
    batch_size: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    compile: bool = False,
) -> dict:
    """Score `examples` with `model` (already on `device`): up to `batch_tokens` tokens (and at most `batch_size`
    examples, if given) per forward.

    Rank `rank` of `world_size` scores examples rank, rank + world_size, ...; when torch.distributed is
    initialised the counts are summed over ranks, so every rank returns the global `acc`, `acc_norm`,
    `num_correct`, `num_correct_norm` and `num_total` (labelled examples), plus its own `predictions`.
    `dtype` other than float32 runs the model under autocast, as in training; the loss of each token is
    taken in float32 over the tokenizer's ids only (a padded vocab's extra logits are ignored).
    Each prediction holds the example's `index` in `examples`, `ind`, `label`, `pred`, `pred_norm`, and the
    4 endings' `sum_loss` and `mean_loss`. `compile` compiles our GPT's forward (worth it for long runs).
    """
    tokenizer = tokenizer or get_tokenizer("gpt2")
    _check_args(tokenizer, batch_size, batch_tokens, rank, world_size)
    model = _unwrap(model)
    config = getattr(model, "config", None)
    block_size = getattr(config, "block_size", None) or getattr(config, "n_positions", None)
    mine = list(range(rank, len(examples), world_size))
    encoded = _encode_all(examples, mine, tokenizer, block_size)
    with eval_mode(model), autocast(str(device), dtype):
        # a padded model vocab has unused logits past the tokenizer's ids
        sums, counts = score(model, encoded, tokenizer.vocab_size, batch_tokens, batch_size, device, compile,
                             progress and rank == 0)
    predictions = _predictions(examples, mine, sums, counts)
    n_correct, n_correct_norm, n_total = _tally(predictions, device, world_size > 1)
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


def check_predictions_path(path: Path) -> None:
    """--predictions must be a new file in a writable directory: an earlier run's predictions are never replaced."""
    if path.exists() or path.is_symlink():
        raise HellaSwagError(f"--predictions {path} already exists; delete it or pick another path")
    check_writable(path, "--predictions")


def main(argv: list[str] | None = None) -> None:
    from gpt2repro.checkpoint import load_model

    quiet_library_logs()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2", help="gpt2-family name, Hugging Face model dir, checkpoint or run dir")
    p.add_argument("--split", default="val", choices=SPLITS)
    p.add_argument("--jsonl", default=None, help="read examples from this file instead of --split")
    p.add_argument("--data_dir", default=None, help=f"where the splits are cached (default {default_data_dir()})")
    p.add_argument("--limit", type=int, default=None, help="score only the first N examples")
    p.add_argument("--batch_tokens", type=int, default=DEFAULT_BATCH_TOKENS,
                   help="tokens per forward pass, padding included (an example is its context + 4 endings)")
    p.add_argument("--batch_size", type=int, default=None,
                   help="at most this many examples per forward pass (default: as many as --batch_tokens holds)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="anything but float32 runs under autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile the forward pass (pays off on the full split)")
    p.add_argument("--predictions", default=None, help="write one JSON line per example here")
    args = p.parse_args(argv)
    for flag in ("limit", "batch_size", "batch_tokens"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            sys.exit(f"error: --{flag} must be at least 1")
    # HellaSwagError, CheckpointError, load_model's errors, OSError, OOM: one line each; every file written names
    # itself in its OSError, so one without a name is from printing the scores
    with one_line_errors(path=STDOUT):
        if args.predictions:
            check_predictions_path(Path(args.predictions))  # before the evaluation, not after it
        device = pick_device(args.device)
        examples = load_examples(args.split, args.data_dir, args.jsonl, args.limit)
        model, tokenizer = load_model(args.model, map_location="cpu")
        _check_tokenizer(tokenizer)
        model.to(device)
        result = evaluate(model, examples, tokenizer, batch_size=args.batch_size, device=device,
                          dtype=DTYPES[args.dtype], progress=True, batch_tokens=args.batch_tokens,
                          compile=args.compile)
        source = args.jsonl or f"{args.split} split"
        print(format_result(result, args.model, source), flush=True)  # the scores first: a failed write keeps them
        if args.predictions:
            lines = "".join(json.dumps(p) + "\n" for p in result["predictions"])
            atomic_create_bytes(Path(args.predictions), lines.encode())  # never replaces one made meanwhile


if __name__ == "__main__":
    main()
