"""DDP on CPU (gloo): 2 ranks with accumulation train exactly like 1 process with the same total batch, for
GPT-2 trained by AdamW and for rotary positions trained by Muon (the shakespeare-char preset's choice)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import shakespeare

import train_gpt2
from gpt2repro.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def train_losses(out: Path) -> dict[int, float]:
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    return {e["step"]: e["train_loss"] for e in lines if "train_loss" in e}


def assert_same_weights(a: Path, b: Path, tol: float = 1e-5) -> None:
    wa, wb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=tol, rtol=0, msg=k)


@pytest.mark.parametrize("options", [("--pos", "learned", "--optimizer", "adamw"),
                                     ("--pos", "rope", "--optimizer", "muon")], ids=["gpt2-adamw", "rope-muon"])
def test_two_ranks_equal_one_process(tmp_path, options):
    text = tmp_path / "small.txt"
    text.write_text(shakespeare().read_text()[:30000])
    # total batch 512 = 2 ranks x 2 micro-steps x 4 x 32 = 1 process x 4 micro-steps x 4 x 32
    args = ["--preset", "shakespeare-char", "--text_path", str(text), "--n_layer", "2", "--n_head", "2",
            "--n_embd", "32", "--block_size", "32", "--batch_size", "4", "--total_batch_size", "512",
            "--max_steps", "4", "--eval_interval", "2", "--eval_iters", "2", "--ckpt_interval", "2", "--keep_last",
            "0", "--dtype", "float32", "--compile", "false", "--device", "cpu", "--dropout", "0.0",
            "--num_samples", "0", "--log_interval", "1", *options]
    ddp_out, single_out = tmp_path / "ddp", tmp_path / "single"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train_gpt2.py"), *args, "--out_dir", str(ddp_out)]
    env = os.environ | {"OMP_NUM_THREADS": "1"}  # 2 ranks on 2 cores
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "2 rank(s) x 2 micro-step(s)" in r.stdout
    train_gpt2.main(args + ["--out_dir", str(single_out)])

    ddp, single = train_losses(ddp_out), train_losses(single_out)
    assert sorted(ddp) == sorted(single) == [0, 1, 2, 3]
    for step in single:
        assert ddp[step] == pytest.approx(single[step], abs=1e-5)
    assert_same_weights(ddp_out / "ckpt_0000004.pt", single_out / "ckpt_0000004.pt")

    # a DDP checkpoint resumed by one process continues at the same global data position
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(ddp_out / "ckpt_0000002.pt", resumed)
    train_gpt2.main(args + ["--out_dir", str(resumed), "--resume", "auto"])
    assert_same_weights(resumed / "ckpt_0000004.pt", single_out / "ckpt_0000004.pt")
