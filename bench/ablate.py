"""EX4, "does it improve?": later practice against the GPT-2 baseline on tiny Shakespeare, on this CPU.

For the character model (the shakespeare-char shape) and for GPT-2 tokens (a smaller shakespeare-gpt2 shape),
every run has the same token budget, schedule and AdamW learning rate: the GPT-2 baseline (learned positions,
LayerNorm, GELU, tied head, biases, AdamW), each GPTConfig option alone, Muon alone, then all the winners together
(every option whose mean final val loss beat the baseline's by more than the standard error of the difference,
in this same run), each over three seeds (initialisation and data order). Per row: the mean final val loss with
its min-max over seeds; the tokens at which the seeds' mean val curve first reaches the baseline's mean final val
loss (evaluated every budget/evals tokens, always on the same val batches); and the CPU time of a run with its
wall time (on a shared machine the wall time measures the neighbours as much as the run).

Learning rates: AdamW's peak LR is the same for every row, the options included (nanochat trains with them at
unchanged AdamW rates). Muon takes the blocks' matrices at MUON_LR (0.02-0.05 in the speedrun and nanochat);
the embeddings, the head and any gains stay with AdamW at that peak LR. Warmup then cosine decay to a tenth over
the budget, the same for every row.

The full run takes minutes on a 2-core CPU (its measured cost is in docs/benchmarks.md); `--quick` is a smoke
run of the mechanics (one seed, a few steps). `--gpu` runs the same comparison at GPT-2 124M on a CUDA GPU instead.

    python -m bench.ablate [--quick] [--gpu]        (or: python -m bench ablate)
"""
from __future__ import annotations

import contextlib
import io
import math
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import train_gpt2
from bench.common import Row, format_table
from gpt2repro.config import FINEWEB_DIR, TrainConfig
from plot import load_run, series

MUON_LR = 0.04  # the best of 0.02, 0.04 and 0.08 for both models on these budgets (one seed each)
BASELINE = "GPT-2 baseline"
WINNERS = "all winners"
# each later-practice choice against GPT-2's, as training flags
OPTIONS: dict[str, tuple[str, ...]] = {
    "rope": ("--pos", "rope"),
    "rmsnorm": ("--norm", "rmsnorm"),
    "relu2": ("--mlp", "relu2"),
    "qk_norm": ("--qk_norm", "true"),
    "untied head": ("--tie_embeddings", "false"),
    "logit soft-cap 15": ("--logit_softcap", "15"),
    "zero-init projections": ("--zero_init", "true"),
    "no biases": ("--bias", "false"),
    f"muon (lr {MUON_LR})": ("--optimizer", "muon", "--muon_lr", str(MUON_LR)),
}


@dataclass(frozen=True)
class Budget:
    """One model and its token budget: `steps` optimizer steps of `batch_size` x `block_size` tokens."""

    name: str
    flags: tuple[str, ...]  # preset, data and model shape
    batch_size: int
    block_size: int
    steps: int
    warmup_steps: int
    max_lr: float
    evals: int  # evaluations per run besides the one at step 0: the resolution of "tokens to the baseline's"
    eval_iters: int
    device: str = "cpu"
    dtype: str = "float32"

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.block_size

    @property
    def eval_interval(self) -> int:
        return max(1, self.steps // self.evals)


SMALL = ("--n_layer", "4", "--n_head", "4", "--n_embd", "128")  # the shakespeare-char and shakespeare-gpt2 shape
CHAR = ("--preset", "shakespeare-char", *SMALL)
GPT2_TOKENS = ("--preset", "shakespeare-gpt2", *SMALL)


def budgets(quick: bool) -> list[Budget]:
    """Minutes in all on a 2-core CPU; GPT-2 tokens get the smaller budget because the 50,304-token head makes
    their steps far dearer. Both evaluate every 1/16 of the budget, the resolution of "tokens to the baseline's"."""
    if quick:
        return [Budget("char", CHAR, 16, 64, 12, 2, 4e-3, 4, 2),
                Budget("gpt2 tokens", GPT2_TOKENS, 4, 64, 6, 1, 3e-3, 2, 1)]
    return [Budget("char", CHAR, 16, 64, 160, 16, 4e-3, 16, 4),
            Budget("gpt2 tokens", GPT2_TOKENS, 8, 64, 32, 3, 3e-3, 16, 2)]


def gpu_budgets(quick: bool) -> list[Budget]:
    """GPT-2 124M for a short budget (2M tokens a run), on FineWeb-EDU when its shards are here, else on tiny
    Shakespeare (where 2M tokens are ~6 epochs)."""
    shards = Path(FINEWEB_DIR).is_dir() and any(Path(FINEWEB_DIR).glob("*_train_*.npy"))
    data = ("--preset", "gpt2-124m") if shards else ("--preset", "shakespeare-gpt2", "--n_layer", "12",
                                                     "--n_head", "12", "--n_embd", "768")
    name = f"124M on {torch.cuda.get_device_name(0)}, {'FineWeb-EDU' if shards else 'tiny Shakespeare'}"
    steps = 10 if quick else 128
    return [Budget(name, (*data, "--hellaswag", "false"), 16, 1024, steps, steps // 10, 1.5e-3, 8, 8,
                   device="cuda", dtype="bfloat16")]


@dataclass
class Result:
    curve: list[tuple[int, float]]  # (tokens trained, val loss) at every evaluation
    seconds: float  # wall time of the run, set-up and evaluations included
    cpu_seconds: float  # CPU time of the same (all threads): what the run costs, whatever else the machine runs

    @property
    def final(self) -> float:
        return self.curve[-1][1]


# GPT-2's choice for every option, whatever a preset turns on: the baseline is GPT-2 trained by AdamW
GPT2_FLAGS = tuple(x for name in ("pos", "norm", "mlp", "qk_norm", "tie_embeddings", "logit_softcap", "zero_init",
                                  "bias", "optimizer") for x in (f"--{name}", str(getattr(TrainConfig, name))))


def budget_flags(b: Budget) -> list[str]:
    values = dict(batch_size=b.batch_size, block_size=b.block_size, total_batch_size=b.tokens_per_step,
                  max_steps=b.steps, warmup_steps=b.warmup_steps, max_lr=b.max_lr, min_lr=b.max_lr / 10,
                  eval_interval=b.eval_interval, eval_iters=b.eval_iters, device=b.device, compile="false",
                  dtype=b.dtype, dropout=0.0, ckpt_interval=0, num_samples=0, sample_interval=0,
                  log_interval=10**9, target_val_loss=0)
    return [*b.flags, *GPT2_FLAGS, *[x for k, v in values.items() for x in (f"--{k}", str(v))]]


def train_once(b: Budget, flags: tuple[str, ...], seed: int, out: Path) -> Result:
    """One run through our trainer, its console output swallowed; the curve comes from its metrics.jsonl."""
    wall, cpu = time.perf_counter(), time.process_time()
    with contextlib.redirect_stdout(io.StringIO()):
        train_gpt2.main([*budget_flags(b), *flags, "--seed", str(seed), "--out_dir", str(out)])
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    steps, losses = series(load_run(out).records, "val_loss")
    return Result([(step * b.tokens_per_step, loss) for step, loss in zip(steps, losses, strict=True)], wall, cpu)


def mean_curve(results: list[Result]) -> list[tuple[int, float]]:
    """The seeds' mean val loss at every evaluation (all runs of a budget evaluate at the same steps)."""
    return [(tokens, statistics.fmean(r.curve[i][1] for r in results)) for i, (tokens, _) in
            enumerate(results[0].curve)]


def tokens_to(curve: list[tuple[int, float]], target: float) -> int | None:
    """Tokens at the first evaluation at or below `target`; None if the curve never gets there."""
    return next((tokens for tokens, loss in curve if loss <= target), None)


def run_configs(b: Budget, configs: dict[str, tuple[str, ...]], seeds: list[int], root: Path
                ) -> dict[str, list[Result]]:
    """Every config under every seed, seeds outermost so slow drift of the machine's load hits all alike."""
    results: dict[str, list[Result]] = {name: [] for name in configs}
    for seed in seeds:
        for name, flags in configs.items():
            out = root / re.sub(r"\W+", "_", f"{b.name}-{name}-{seed}")
            r = train_once(b, flags, seed, out)
            results[name].append(r)
            print(f"ablate: {b.name}, {name}, seed {seed}: final val {r.final:.4f}, wall {r.seconds:.1f} s, "
                  f"CPU {r.cpu_seconds:.1f} s", file=sys.stderr, flush=True)
    return results


def beats(runs: list[Result], baseline: list[Result]) -> bool:
    """Whether the mean final val loss is below the baseline's by more than the standard error of the difference
    of the two means (seed noise); with a single seed each, whether it is below at all."""
    a, b = [r.final for r in runs], [r.final for r in baseline]
    se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b)) if min(len(a), len(b)) > 1 else 0
    return statistics.fmean(b) - statistics.fmean(a) > se


def winners(results: dict[str, list[Result]]) -> list[str]:
    """The options that beat the baseline, in OPTIONS' order."""
    return [name for name in OPTIONS if beats(results[name], results[BASELINE])]


def rows_for(b: Budget, name: str, runs: list[Result], baseline: list[Result]) -> list[Row]:
    finals = [r.final for r in runs]
    mean, base = statistics.fmean(finals), statistics.fmean(r.final for r in baseline)
    cpu, base_cpu = statistics.fmean(r.cpu_seconds for r in runs), statistics.fmean(r.cpu_seconds for r in baseline)
    budget = b.steps * b.tokens_per_step
    reached = tokens_to(mean_curve(runs), base)
    combined = name.startswith(WINNERS)
    prefix = f"{b.name}, {name}"
    seeds = f"{len(runs)} seed{'s' * (len(runs) > 1)}"
    return [
        Row("ablate", f"{prefix}: final val loss (mean; {seeds} {min(finals):.3f}-{max(finals):.3f})", mean,
            "val loss", BASELINE, mean / base, "< 1.0" if combined else ""),
        Row("ablate", f"{prefix}: tokens to the baseline's {base:.3f}" + ("" if reached else " (not reached)"),
            float("nan") if reached is None else reached, "tokens", f"budget {budget:,}",
            None if reached is None else reached / budget, "<= 0.6" if combined else ""),
        Row("ablate", f"{prefix}: CPU seconds per run (wall {statistics.fmean(r.seconds for r in runs):.1f} s)", cpu,
            "CPU s", BASELINE, cpu / base_cpu),
    ]


def ablate(b: Budget, seeds: list[int], root: Path) -> list[Row]:
    results = run_configs(b, {BASELINE: ()} | OPTIONS, seeds, root)
    won = winners(results)
    if won:
        label = f"{WINNERS} ({' + '.join(won)})"
        flags = tuple(x for name in won for x in OPTIONS[name])
        results |= run_configs(b, {label: flags}, seeds, root)
    rows = [row for name, runs in results.items() for row in rows_for(b, name, runs, results[BASELINE])]
    return rows if won else rows + [Row("ablate", f"{b.name}: no option beat the baseline", float("nan"), "")]


def run(quick: bool = False, gpu: bool = False) -> list[Row]:
    """Every budget (`gpu`: the 124M one on CUDA instead), three seeds each (`quick`: one, tiny budgets)."""
    seeds = [1] if quick else [1, 2, 3]
    with tempfile.TemporaryDirectory(prefix="ablate-") as tmp:
        return [row for b in (gpu_budgets if gpu else budgets)(quick) for row in ablate(b, seeds, Path(tmp))]


if __name__ == "__main__":
    gpu = "--gpu" in sys.argv
    if gpu and not torch.cuda.is_available():
        sys.exit("error: --gpu needs a CUDA GPU; run without it for the CPU ablation")
    print(format_table(run(quick="--quick" in sys.argv, gpu=gpu)))
