"""Loss and HellaSwag curves of training runs, next to OpenAI's GPT-2 and GPT-3 numbers, as one PNG.

    python plot.py out/gpt2-124m                          # writes loss.png
    python plot.py out/run-a out/run-b --out compare.png  # several runs on one figure
    python plot.py out/gpt2-350m --baseline 350M          # or none; auto picks it from the run's config

An existing --out is never replaced without --overwrite.

Left: train loss (thin) and val loss (thick) per step, with the val loss of OpenAI's GPT-2 124M checkpoint on
the FineWeb-EDU val shard. Right: HellaSwag accuracy (acc_norm) with GPT-2's and GPT-3's for the same size.
`play.ipynb` draws the same figure with these functions.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gpt2repro.fileio import MAX_JSON_FILE, MiB, atomic_write_bytes, parse_json, read_limited
from gpt2repro.gpt2_sizes import HF_MODELS, size_of_shape

if TYPE_CHECKING:  # imported where used: matplotlib is slow to import
    from matplotlib.figure import Figure


@dataclass(frozen=True)
class Baseline:
    size: str
    gpt2_val_loss: float | None  # OpenAI's checkpoint on the FineWeb-EDU val shard (measured for 124M only)
    gpt2_hellaswag: float  # acc_norm of OpenAI's GPT-2 checkpoint
    gpt3_hellaswag: float  # the GPT-3 paper's zero-shot HellaSwag for the model of that size


MAX_METRICS_BYTES = 256 * MiB  # a long run logs a few MB; a file past this is not a metrics.jsonl

BASELINES = {
    "124M": Baseline("124M", 3.2924, 0.2945, 0.337),
    "350M": Baseline("350M", None, 0.3752, 0.436),
    "774M": Baseline("774M", None, 0.4320, 0.510),
    "1558M": Baseline("1558M", None, 0.4889, 0.547),
}


@dataclass
class Run:
    name: str
    path: Path
    records: list[dict]
    config: dict  # the run's config.json ({} when absent)


def read_metrics(path: str | Path) -> list[dict]:
    """The events of a `metrics.jsonl`.

    A line that is not JSON is skipped with one warning counting them: a crash tears the line being written and
    the resumed trainer ends it with a newline and carries on below it. A file with no parsable line, or with a
    JSON line that is not an event, is a ValueError naming the line.
    """
    path = Path(path)
    try:
        content = read_limited(path, MAX_METRICS_BYTES).decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
        raise ValueError(f"{path}: cannot read it ({reason}); is this a run directory of train_gpt2.py?") from None
    lines = content.splitlines()
    records, torn = [], []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            event = parse_json(line)
        except json.JSONDecodeError as e:
            if not (n == len(lines) and not content.endswith("\n")):  # else a live run is writing it right now
                torn.append((n, e.msg))
            continue
        except ValueError as e:  # nested too deeply, a number of hundreds of digits: no line train_gpt2.py writes
            raise ValueError(f"{path}:{n}: not an event of train_gpt2.py ({e}); fix or delete that line") from None
        if not isinstance(event, dict) or not isinstance(event.get("step"), int):
            raise ValueError(f"{path}:{n}: expected a JSON object with an integer 'step'; fix or delete that line")
        records.append(event)
    if not records and torn:
        raise ValueError(f"{path}: no parsable line ({len(torn)} lines are not valid JSON, e.g. line {torn[0][0]}: "
                         f"{torn[0][1]}); is this a metrics.jsonl of train_gpt2.py?")
    if not records:
        raise ValueError(f"{path}: no metrics in it yet; train for a few steps first")
    if torn:
        print(f"warning: {path}: skipped {len(torn)} unparsable line{'s' if len(torn) > 1 else ''} (the first "
              f"{path}:{torn[0][0]}), e.g. torn by a crash", file=sys.stderr)
    return records


def load_run(run_dir: str | Path) -> Run:
    """A run directory (or its metrics.jsonl directly) with its config."""
    path = Path(run_dir)
    metrics = path if path.is_file() else path / "metrics.jsonl"
    if not metrics.exists():
        raise ValueError(f"{metrics}: no such file; pass a run directory written by train_gpt2.py --out_dir")
    return Run(metrics.parent.name or str(metrics.parent), metrics.parent, read_metrics(metrics),
               read_config(metrics.parent / "config.json"))


def read_config(path: Path) -> dict:
    """A run's config.json as a dict ({} when there is none); anything but a JSON object is a ValueError naming it."""
    if not path.exists():
        return {}
    fix = "fix it, or move it away to plot without it"
    try:
        config = parse_json(read_limited(path, MAX_JSON_FILE).decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text; {fix}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); {fix}") from None
    except ValueError as e:  # too large, nested too deeply, a number of hundreds of digits
        raise ValueError(f"{path}: not a config of train_gpt2.py ({e}); {fix}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: holds a JSON {type(config).__name__}, not the object train_gpt2.py writes; {fix}")
    return config


def load_runs(run_dirs: list[str | Path]) -> list[Run]:
    """Several runs; when two share a directory name they are labelled by their full paths."""
    runs = [load_run(r) for r in run_dirs]
    names = [r.name for r in runs]
    for run in runs:
        if names.count(run.name) > 1:
            run.name = str(run.path)
    return runs


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """Steps and values of every event carrying `key` (a step logged twice, e.g. after a resume, keeps the last)."""
    by_step = {r["step"]: float(r[key]) for r in records if isinstance(r.get(key), (int, float))}
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def summarize(run: Run) -> dict:
    """Best values of a run: min train and val loss, max HellaSwag (acc_norm), each with its step."""
    out = {}
    for key, best, name in (("train_loss", min, "min_train_loss"), ("val_loss", min, "min_val_loss"),
                            ("hellaswag_acc_norm", max, "max_hellaswag")):
        steps, values = series(run.records, key)
        if values:
            i = values.index(best(values))
            out[name], out[name + "_step"] = values[i], steps[i]
    return out


def baseline_for(config: dict) -> Baseline | None:
    """The GPT-2 size a run reproduces, when it trains GPT-2's shape on FineWeb-EDU shards; else None."""
    if config.get("data") != "shards" or config.get("model_type", "gpt") != "gpt":
        return None  # another dataset: OpenAI's numbers are not comparable
    init = config.get("init") or ""
    if init in HF_MODELS:
        return BASELINES[HF_MODELS[init].size]
    size = size_of_shape(config.get("n_layer"), config.get("n_head"), config.get("n_embd"))
    return BASELINES[size] if size and not init else None


def pick_baseline(runs: list[Run], choice: str = "auto") -> Baseline | None:
    """`auto` (from the first run's config), `none`, or a size such as `124M`."""
    if choice == "none":
        return None
    if choice == "auto":
        return baseline_for(runs[0].config) if runs else None
    if choice not in BASELINES:
        raise ValueError(f"unknown baseline {choice!r}; use auto, none or one of {', '.join(BASELINES)}")
    return BASELINES[choice]


def _loss_ylim(values: list[float], baseline: float | None) -> tuple[float, float] | None:
    """Keep the first steps' loss (~11 for GPT-2) from flattening the part of the curve that matters."""
    values = sorted(v for v in values if math.isfinite(v))
    if not values:
        return None
    lo = min(values[0], baseline if baseline is not None else values[0])
    hi = values[int(0.98 * (len(values) - 1))] if len(values) >= 50 else values[-1]
    hi = max(hi, baseline if baseline is not None else hi)
    pad = 0.05 * (hi - lo) or 0.1
    return lo - pad, hi + pad


def plot_runs(runs: list[Run], baseline: Baseline | None = None) -> Figure:
    """The two-panel figure (a matplotlib Figure, no pyplot state) for one or more runs."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 5), layout="constrained")
    ax_loss, ax_hs = fig.subplots(1, 2)
    colors = [f"C{i % 10}" for i in range(len(runs))]
    multi = len(runs) > 1
    losses = []
    for run, color in zip(runs, colors, strict=True):
        label = f"{run.name}: " if multi else ""
        steps, values = series(run.records, "train_loss")
        if steps:
            ax_loss.plot(steps, values, color=color, alpha=0.5 if multi else 1.0, lw=0.8, label=f"{label}train loss")
        losses += values
        steps, values = series(run.records, "val_loss")
        if steps:
            ax_loss.plot(steps, values, color=color if multi else "C3", lw=2.0, marker="." if len(steps) < 30 else "",
                         label=f"{label}val loss")
        losses += values
        steps, values = series(run.records, "hellaswag_acc_norm")
        if steps:
            ax_hs.plot(steps, values, color=color, lw=2.0, marker="." if len(steps) < 30 else "",
                       label=f"{label}HellaSwag (acc_norm)" if multi else "HellaSwag (acc_norm)")
    if baseline is not None and baseline.gpt2_val_loss is not None:
        ax_loss.axhline(baseline.gpt2_val_loss, color="k", ls="--",
                        label=f"OpenAI GPT-2 ({baseline.size}) checkpoint val loss")
    ylim = _loss_ylim(losses, baseline.gpt2_val_loss if baseline else None)
    if ylim:
        ax_loss.set_ylim(*ylim)
    ax_loss.set(xlabel="step", ylabel="loss (nats/token)", title="Loss")
    ax_loss.legend()
    if baseline is not None:
        ax_hs.axhline(baseline.gpt2_hellaswag, color="k", ls="--", label=f"OpenAI GPT-2 ({baseline.size})")
        ax_hs.axhline(baseline.gpt3_hellaswag, color="tab:green", ls="--", label=f"OpenAI GPT-3 ({baseline.size})")
    if not any(series(r.records, "hellaswag_acc_norm")[0] for r in runs):
        ax_hs.text(0.5, 0.5, "no HellaSwag evaluations in this run", ha="center", va="center",
                   transform=ax_hs.transAxes, color="0.4")
    ax_hs.set(xlabel="step", ylabel="accuracy", title="HellaSwag eval")
    if ax_hs.get_legend_handles_labels()[0]:
        ax_hs.legend()
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """PNG written whole or not at all."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


def format_summary(run: Run) -> str:
    s = summarize(run)
    parts = [f"{name} {s[name]:.4f} (step {s[name + '_step']})"
             for name in ("min_train_loss", "min_val_loss", "max_hellaswag") if name in s]
    return f"{run.name}: " + (", ".join(parts) or "no losses logged yet")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Plot loss and HellaSwag of train_gpt2.py runs against OpenAI's.")
    p.add_argument("runs", nargs="+", help="run directories (or their metrics.jsonl)")
    p.add_argument("--out", default="loss.png", help="PNG to write (default: loss.png)")
    p.add_argument("--baseline", default="auto", help=f"auto, none or a size: {', '.join(BASELINES)}")
    p.add_argument("--overwrite", action="store_true", help="replace --out when it exists")
    args = p.parse_args(argv)
    if not args.overwrite and (Path(args.out).exists() or Path(args.out).is_symlink()):  # an earlier figure is kept
        sys.exit(f"error: --out {args.out}: exists; pass --overwrite to replace it, or choose another --out")
    try:
        runs = load_runs(args.runs)
        baseline = pick_baseline(runs, args.baseline)
        fig = plot_runs(runs, baseline)
        out = save_figure(fig, args.out)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    for run in runs:
        print(format_summary(run))
    print(f"wrote {out}" + (f" (baselines: OpenAI {baseline.size})" if baseline else ""))


if __name__ == "__main__":
    main()
