"""What every benchmark shares: one row format and one table printer.

Each `bench/NAME.py` has `run(quick: bool = False) -> list[Row]` and, under `__main__`, prints
`format_table(run())`. `python -m bench` runs them all and prints one table.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

import torch


@dataclass
class Row:
    bench: str  # e.g. "generate"
    case: str  # what was measured, e.g. "ours, KV cache"
    figure: float  # the measurement
    unit: str  # e.g. "tok/s"
    vs: str = ""  # what the ratio compares against
    ratio: float | None = None  # figure / the compared figure (higher is better unless the goal says otherwise)
    goal: str = ""  # e.g. ">= 1.0"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}"


def format_table(rows: list[Row]) -> str:
    head = ["bench", "case", "figure", "unit", "vs", "ratio", "goal"]
    body = [
        [r.bench, r.case, f"{r.figure:,.4g}" if abs(r.figure) < 1000 else f"{r.figure:,.0f}", r.unit, r.vs,
         "" if r.ratio is None else f"{r.ratio:.2f}x", r.goal]
        for r in rows
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return f"machine: {machine()}\n\n" + "\n".join(lines)
