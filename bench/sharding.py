"""Sharded training on CPU, 2 gloo ranks side by side in one torchrun: per-rank bytes of parameters, gradients and
optimizer state, and step time, of DDP (gradients as bucket views) and FSDP (`--fsdp true`), with AdamW and with
Muon; the share of a Muon step that each FSDP rank spends repeating Newton–Schulz on every whole matrix; and the
two ways of orthogonalising whole matrices from row shards (every rank gathers all, or each matrix's owner).

    python -m bench sharding [--quick]

Model: GPT-2's vocabulary (50,304) with 4 layers x 256 (2 x 128 with --quick), micro-batch 4 x 128, fp32.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench.common import Row, format_table

ROOT = Path(__file__).resolve().parents[1]


def measure(n_layer: int, n_embd: int, steps: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "bench" / "_sharding_worker.py"), str(n_layer), str(n_embd), str(steps)]
    r = subprocess.run(cmd, cwd=ROOT, env=os.environ | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                       timeout=1800)
    line = next((s for s in r.stdout.splitlines() if s.startswith("RESULT ")), None)
    if r.returncode or line is None:
        raise RuntimeError(f"bench sharding: the torchrun workers failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    return json.loads(line.removeprefix("RESULT "))


def run(quick: bool = False) -> list[Row]:
    n_layer, n_embd, steps = (2, 128, 3) if quick else (4, 256, 5)
    r = measure(n_layer, n_embd, steps)
    tag = f"{n_layer}x{n_embd}, {r['params'] / 1e6:.1f}M params, 2 gloo ranks"
    rows = []
    for opt in ("adamw", "muon"):
        ddp, fsdp = r[f"ddp {opt}"], r[f"fsdp {opt}"]
        total = {k: v["params"] + v["grads"] + v["optimizer"] for k, v in (("ddp", ddp), ("fsdp", fsdp))}
        rows.append(Row("sharding", f"DDP {opt}: params+grads+optimizer per rank, {tag}", total["ddp"] / 2**20,
                        "MiB"))
        rows.append(Row("sharding", f"FSDP {opt}: params+grads+optimizer per rank, {tag}", total["fsdp"] / 2**20,
                        "MiB", "DDP", total["fsdp"] / total["ddp"], "<= 0.55"))
        rows.append(Row("sharding", f"DDP {opt}: step time, {tag}", ddp["seconds"] * 1000, "ms"))
        rows.append(Row("sharding", f"FSDP {opt}: step time, {tag}", fsdp["seconds"] * 1000, "ms", "DDP",
                        fsdp["seconds"] / ddp["seconds"]))
    rows.append(Row("sharding", f"Newton-Schulz on every hidden matrix, one rank, {tag}",
                    r["newton_schulz_seconds"] * 1000, "ms", "FSDP Muon step",
                    r["newton_schulz_seconds"] / r["fsdp muon"]["seconds"]))
    rows.append(Row("sharding", f"Muon's whole matrices: all-gather each, orthogonalise all, keep own rows, {tag}",
                    r["gather_seconds"] * 1000, "ms"))
    rows.append(Row("sharding", f"Muon's whole matrices: each to its owner rank and back, {tag}",
                    r["own_seconds"] * 1000, "ms", "gather, keep rows", r["own_seconds"] / r["gather_seconds"]))
    return rows


if __name__ == "__main__":
    print(format_table(run(quick="--quick" in sys.argv)))
