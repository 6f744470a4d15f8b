"""The lecture's stages trained on CPU through our own trainer, against the figures the lecture states.

- every small stage (`lecture-bigram` .. `lecture-dropout`) at its preset's full recipe, 3 seeds: the mean final
  val loss against the lecture's figure (goal: within 0.05), the range over seeds, parameters and wall time;
- the scaled-up `lecture-gpt` (~9 h at its full 5,000 steps here) for `GPT_STEPS` steps only, its val loss at
  each evaluation against the lecture's own gpt.py run with the same shortened settings, when the environment
  variable LECTURE_GPT_PY names a copy of it (karpathy/ng-video-lecture; it reads input.txt from its folder);
- `lecture-fast`, the project's own recipe for val <= 1.48 on CPU: its val loss and wall time.

    python -m bench.lecture [--quick]      # --quick: one seed, 300 steps per stage, 4 scaled-up steps, no fast
"""

from __future__ import annotations

import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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
GPT_STEPS, GPT_EVAL_INTERVAL, GPT_EVAL_ITERS = 100, 25, 20  # the shortened scaled-up comparison


def train(preset: str, out: Path, *flags: str) -> tuple[dict, float]:
    """Final metrics and wall seconds of one run of `preset` through train_gpt2.main."""
    t0 = time.time()
    result = train_gpt2.main(["--preset", preset, "--out_dir", str(out), "--device", "cpu", "--num_samples", "0",
                              "--ckpt_interval", "0", *flags])
    return result, time.time() - t0


def count_params(preset: str) -> int:
    from gpt2repro.config import parse_config
    from gpt2repro.tokenizer import get_tokenizer

    cfg = parse_config(["--preset", preset])
    tokenizer = get_tokenizer("char", text=(ROOT / "input.txt").read_text())
    return sum(p.numel() for p in train_gpt2.build_model(cfg, tokenizer).parameters())


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
    for name, value in (("max_iters", steps + 1), ("eval_interval", eval_interval), ("eval_iters", eval_iters)):
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

    steps, interval, iters = (4, 2, 2) if quick else (GPT_STEPS, GPT_EVAL_INTERVAL, GPT_EVAL_ITERS)
    with tempfile.TemporaryDirectory() as tmp:
        result, wall = train("lecture-gpt", Path(tmp) / "run", "--max_steps", str(steps), "--eval_interval",
                                str(interval), "--eval_iters", str(iters))
        ours = {e["step"]: e["val_loss"] for e in read_metrics(Path(tmp) / "run") if "val_loss" in e}
    rows = [Row("lecture", f"lecture-gpt, first {steps} of 5000 steps: val loss at step {steps}", result["val_loss"],
                "nats", "lecture 1.48 after 5000 steps"),
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


def read_metrics(out: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def run(quick: bool = False) -> list[Row]:
    return small_stage_rows(quick) + scaled_up_rows(quick)


if __name__ == "__main__":
    print(format_table(run(quick="--quick" in sys.argv)))
