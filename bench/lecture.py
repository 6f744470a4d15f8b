"""The lecture's stages trained on CPU through our own trainer, against the figures the lecture states.

- every small stage (`lecture-bigram` .. `lecture-dropout`) at its preset's full recipe, 3 seeds: the mean final
  val loss against the lecture's figure (goal: within 0.05), the range over seeds, parameters and wall time;
- the scaled-up `lecture-gpt` (far too long at its full 5,000 steps of batch 64 on a CPU) for `GPT_STEPS` steps
  at batch `GPT_BATCH` only, its val loss at each evaluation against the lecture's own gpt.py run with the same
  shortened settings, when the environment variable LECTURE_GPT_PY names a copy of it (karpathy/ng-video-lecture's
  gpt.py; it is run in a temporary folder with tiny Shakespeare);
- EX3, when LECTURE_CORPUS names the English corpus built below: pretraining on it (train and
  val split loss), then finetuning on Shakespeare, against training from scratch for the same steps.

    python -m bench.lecture [--quick]   # --quick: one seed, 300 steps per stage, 2 steps of the rest

EX3's corpus is built from three Debian packages (nothing of them is in this repository):

    apt-get install -y dict-gcide wordnet-base bible-kjv bible-kjv-text
    python -m bench.lecture --corpus english.txt

- dict-gcide: the Collaborative International Dictionary of English (Webster's 1913 and WordNet), the dictd
  file /usr/share/dictd/gcide.dict.dz (gzip), lines stripped of their indentation, blank runs squeezed;
- bible-kjv-text: the King James Bible, as `bible Gen1:1-Rev22:21` (bible-kjv's reader) prints it;
- wordnet-base: every gloss (definition and examples: the text after " | ") of /usr/share/wordnet/data.{noun,
  verb,adj,adv}, one a line.

Each is turned into printable ASCII (NFKD, accents dropped; other characters removed): 96 characters, which
hold all 65 of tiny Shakespeare. Each is cut at line ends into `PIECES` pieces of equal size and the file
interleaves them (piece 1 of each, then piece 2 of each, ...), so the last 10%, the validation split
train_gpt2.py takes, is the end of all three: the same kinds of text as the training split.
"""

from __future__ import annotations

import gzip
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import unicodedata
from pathlib import Path

import numpy as np
import torch

import train_gpt2
from bench.common import Row, format_table
from gpt2repro.config import PRESETS

ROOT = Path(__file__).resolve().parents[1]
# the lecture's stated val losses; blocks without residuals it calls "not a very good result", with no figure
LECTURE_FIGURES = {"lecture-bigram": 2.5, "lecture-head": 2.4, "lecture-heads": 2.28, "lecture-ffwd": 2.24,
                   "lecture-blocks": None, "lecture-residual": 2.08, "lecture-layernorm": 2.06,
                   "lecture-dropout": 2.07, "lecture-gpt": 1.48}
SMALL_STAGES = [name for name in LECTURE_FIGURES if name != "lecture-gpt"]
SEEDS = (1337, 1, 2)
GPT_STEPS, GPT_EVAL_INTERVAL, GPT_EVAL_ITERS, GPT_BATCH = 12, 4, 4, 8  # the shortened scaled-up comparison
# EX3: the lecture's model with every stage on, 4 x 128 at context 64 (no dropout: the corpus is not repeated)
EX3_BATCH, EX3_BLOCK = 32, 64
EX3_MODEL = ["--n_embd", "128", "--n_head", "4", "--n_layer", "4", "--block_size", str(EX3_BLOCK), "--batch_size",
             str(EX3_BATCH), "--total_batch_size", str(EX3_BATCH * EX3_BLOCK), "--dropout", "0"]
EX3_PRETRAIN_STEPS, EX3_SHAKESPEARE_STEPS, EX3_EVAL_ITERS, EX3_LR, EX3_FINETUNE_LR = 300, 150, 30, 1e-3, 3e-4


def train(preset: str, out: Path, *flags: str) -> tuple[dict, float]:
    """Final metrics and wall seconds of one run of `preset` through train_gpt2.main."""
    t0 = time.time()
    result = train_gpt2.main(["--preset", preset, "--out_dir", str(out), "--device", "cpu", "--num_samples", "0",
                              "--ckpt_interval", "0", *flags])
    return result, time.time() - t0


def count_params(preset: str) -> int:
    from gpt2repro.build import build_model
    from gpt2repro.config import parse_config
    from gpt2repro.tokenizer import get_tokenizer

    cfg = parse_config(["--preset", preset])
    tokenizer = get_tokenizer("char", text=(ROOT / "input.txt").read_text())
    return sum(p.numel() for p in build_model(cfg, tokenizer).parameters())


def small_stage_rows(quick: bool) -> list[Row]:
    """Models of 4k-43k parameters on batches of 256 tokens: one thread is faster than two fighting over them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return [row for name in SMALL_STAGES for row in stage_rows(name, quick)]
    finally:
        torch.set_num_threads(threads)


def stage_rows(name: str, quick: bool) -> list[Row]:
    rows = []
    seeds = SEEDS[:1] if quick else SEEDS
    flags = ["--max_steps", "300", "--eval_interval", "300", "--eval_iters", "20"] if quick else []
    losses, walls = [], []
    for seed in seeds:
        with tempfile.TemporaryDirectory() as tmp:
            result, wall = train(name, Path(tmp) / "run", "--seed", str(seed), *flags)
        losses.append(result["val_loss"])
        walls.append(wall)
        print(f"{name} seed {seed}: val {result['val_loss']:.4f} in {wall:.0f} s", file=sys.stderr, flush=True)
    mean, figure = statistics.mean(losses), LECTURE_FIGURES[name]
    steps = 300 if quick else PRESETS[name]["max_steps"]
    case = (f"{name} val loss, mean of {len(seeds)} seed(s) (range {min(losses):.3f}-{max(losses):.3f}), "
            f"{count_params(name):,} params, {steps} steps")
    goal = f"{figure - 0.05:.2f}-{figure + 0.05:.2f}" if figure and not quick else ""
    rows.append(Row("lecture", case, mean, "nats", f"lecture {figure}" if figure else "lecture: no figure",
                    mean / figure if figure else None, goal))
    rows.append(Row("lecture", f"{name} wall time per run", statistics.mean(walls), "s"))
    return rows


def reference_curve(gpt_py: Path, steps: int, eval_interval: int, eval_iters: int) -> dict[int, float]:
    """Val loss by step of the lecture's gpt.py with its step counts shortened (run in a copy of its folder)."""
    source = gpt_py.read_text()
    shortened = (("max_iters", steps + 1), ("eval_interval", eval_interval), ("eval_iters", eval_iters),
                 ("batch_size", GPT_BATCH))
    for name, value in shortened:
        source, n = re.subn(rf"^{name} = .*$", f"{name} = {value}", source, flags=re.M)
        if n != 1:
            raise ValueError(f"{gpt_py}: no line `{name} = ...` to shorten; is it the lecture's gpt.py?")
    source = source.replace("max_new_tokens=500", "max_new_tokens=1")  # the sample is not compared
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "gpt.py").write_text(source)
        (Path(tmp) / "input.txt").write_bytes((ROOT / "input.txt").read_bytes())
        out = subprocess.run([sys.executable, "gpt.py"], cwd=tmp, capture_output=True, text=True, check=True).stdout
    return {int(m[1]): float(m[2]) for m in re.finditer(r"step (\d+): train loss [\d.]+, val loss ([\d.]+)", out)}


def scaled_up_rows(quick: bool) -> list[Row]:
    import os

    steps, interval, iters = (2, 1, 2) if quick else (GPT_STEPS, GPT_EVAL_INTERVAL, GPT_EVAL_ITERS)
    with tempfile.TemporaryDirectory() as tmp:
        result, wall = train("lecture-gpt", Path(tmp) / "run", "--max_steps", str(steps), "--eval_interval",
                             str(interval), "--eval_iters", str(iters), "--batch_size", str(GPT_BATCH),
                             "--total_batch_size", str(GPT_BATCH * 256))
        ours = {e["step"]: e["val_loss"] for e in read_metrics(Path(tmp) / "run") if "val_loss" in e}
    rows = [Row("lecture", f"lecture-gpt at batch {GPT_BATCH}, first {steps} of 5000 steps: val loss at step {steps}",
                result["val_loss"], "nats", "lecture 1.48 after 5000 steps"),
            Row("lecture", f"lecture-gpt wall time of {steps} steps", wall, "s")]
    gpt_py = os.environ.get("LECTURE_GPT_PY")
    if not gpt_py:
        print("LECTURE_GPT_PY not set: the lecture's gpt.py is not run side by side", file=sys.stderr)
        return rows
    t0 = time.time()
    theirs = reference_curve(Path(gpt_py), steps, interval, iters)
    ref_wall = time.time() - t0
    for step in sorted(ours):
        ref_step = min(theirs, key=lambda s: abs(s - step))  # gpt.py's last evaluation is at max_iters - 1
        rows.append(Row("lecture", f"lecture-gpt val loss at step {step} (gpt.py: step {ref_step})", ours[step],
                        "nats", f"gpt.py {theirs[ref_step]:.4f}", ours[step] / theirs[ref_step], "~1.00x"))
    rows.append(Row("lecture", f"gpt.py wall time of {steps} steps", ref_wall, "s", "ours", ref_wall / wall))
    return rows


def split_losses(ckpt: Path, text_path: str, batches: int) -> tuple[float, float]:
    """Mean loss of a checkpoint's model on `batches` random batches of each split of a text (train, val)."""
    from gpt2repro.checkpoint import load_model
    from gpt2repro.data import TokenLoader, split_tokens

    model, tokenizer = load_model(str(ckpt))
    model.eval()
    tokens = np.array(tokenizer.encode(Path(text_path).read_text(encoding="utf-8")), dtype=np.uint16)
    losses = []
    for part in split_tokens(tokens, 0.1):
        loader = TokenLoader([part], EX3_BATCH, EX3_BLOCK, shuffle=True, seed=0, eot=None)
        with torch.no_grad():
            losses.append(statistics.mean(model(*loader.next_batch())[1].item() for _ in range(batches)))
    return losses[0], losses[1]


def ex3_rows(quick: bool) -> list[Row]:
    """EX3: pretrain on the English corpus (LECTURE_CORPUS, from bench/lecture_corpus.py), check that train and
    val loss agree, finetune on tiny Shakespeare; against the same model trained from scratch on Shakespeare for
    the same steps."""
    corpus = os.environ.get("LECTURE_CORPUS")
    if not corpus:
        print("LECTURE_CORPUS not set: EX3 (pretraining on English) is not run", file=sys.stderr)
        return []
    pre_steps, steps, iters = (2, 2, 2) if quick else (EX3_PRETRAIN_STEPS, EX3_SHAKESPEARE_STEPS, EX3_EVAL_ITERS)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        pre, wall = train("lecture-gpt", Path(tmp) / "pre", "--text_path", corpus, *EX3_MODEL, *lr(EX3_LR),
                          "--max_steps", str(pre_steps), "--eval_interval", str(pre_steps), "--eval_iters", str(iters),
                          "--ckpt_interval", str(pre_steps))
        ckpt = Path(tmp) / "pre" / f"ckpt_{pre_steps:07d}.pt"
        train_loss, val_loss = split_losses(ckpt, corpus, iters)
        rows += [Row("lecture", f"EX3 pretraining, {pre_steps} steps on English: train split loss", train_loss, "nats",
                     "val split", train_loss / val_loss, "~1.00x (no gap)"),
                 Row("lecture", f"EX3 pretraining: val split loss ({wall:.0f} s)", val_loss, "nats")]
        fine, _ = train("lecture-gpt", Path(tmp) / "fine", "--init", str(ckpt), *EX3_MODEL, *lr(EX3_FINETUNE_LR),
                        "--max_steps", str(steps), "--eval_interval", str(steps), "--eval_iters", str(iters))
        scratch, _ = train("lecture-gpt", Path(tmp) / "scratch", *EX3_MODEL, *lr(EX3_LR), "--max_steps", str(steps),
                           "--eval_interval", str(steps), "--eval_iters", str(iters))
    rows += [Row("lecture", f"EX3 finetuned on Shakespeare, {steps} steps at lr {EX3_FINETUNE_LR:g}: val loss",
                 fine["val_loss"], "nats", "from scratch", fine["val_loss"] / scratch["val_loss"], "< 1.00x"),
             Row("lecture", f"EX3 from scratch on Shakespeare, {steps} steps at lr {EX3_LR:g}: val loss",
                 scratch["val_loss"], "nats")]
    return rows


def lr(value: float) -> list[str]:
    return ["--max_lr", str(value), "--min_lr", str(value)]


def read_metrics(out: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- EX3's English corpus

GCIDE = Path("/usr/share/dictd/gcide.dict.dz")
WORDNET = [Path(f"/usr/share/wordnet/data.{pos}") for pos in ("noun", "verb", "adj", "adv")]
ASCII_TEXT = re.compile(r"[^\n\x20-\x7e]")
PIECES = 1000


def to_ascii(text: str) -> str:
    return ASCII_TEXT.sub("", unicodedata.normalize("NFKD", text))


def gcide() -> str:
    lines = [line.strip() for line in gzip.open(GCIDE, "rt", encoding="utf-8", errors="replace")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines))


def bible() -> str:
    return subprocess.run(["bible", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True).stdout


def wordnet_glosses() -> str:
    glosses = []
    for path in WORDNET:
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.startswith("  ") and " | " in line:  # the licence header lines start with two spaces
                glosses.append(line.split(" | ", 1)[1].strip())
    return "\n".join(glosses) + "\n"


def pieces(text: str, n: int) -> list[str]:
    """`text` cut into `n` pieces of about equal size, each ending at a line end (the last may be empty)."""
    cuts = [0]
    for i in range(1, n):
        end = text.find("\n", max(cuts[-1], len(text) * i // n))
        cuts.append(len(text) if end < 0 else end + 1)
    cuts.append(len(text))
    return [text[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]


def build(out: Path) -> str:
    if out.exists():
        raise SystemExit(f"error: {out} exists; remove it or pass another path")
    missing = [str(p) for p in (GCIDE, *WORDNET) if not p.exists()]
    if missing:
        raise SystemExit(f"error: {missing[0]} is missing; apt-get install -y dict-gcide wordnet-base bible-kjv "
                         "bible-kjv-text")
    sources = [pieces(to_ascii(text), PIECES) for text in (gcide(), bible(), wordnet_glosses())]
    text = "".join(piece for group in zip(*sources, strict=True) for piece in group)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
    return text


def run(quick: bool = False) -> list[Row]:
    return small_stage_rows(quick) + scaled_up_rows(quick) + ex3_rows(quick)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--corpus"] and len(sys.argv) == 3:
        corpus = build(Path(sys.argv[2]))
        print(f"{sys.argv[2]}: {len(corpus):,} characters, vocabulary of {len(set(corpus))}")
    else:
        print(format_table(run(quick="--quick" in sys.argv)))
