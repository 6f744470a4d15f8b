"""`--batch_size auto`: candidates keep the total batch, a trial step leaves the model untouched, the choice is
the largest that fits, and running out of memory anywhere is one line of advice."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import train_gpt2
from gpt2repro import autobatch
from gpt2repro.autobatch import candidates, largest_that_fits, try_step
from gpt2repro.config import ConfigError, parse_config
from gpt2repro.devices import Dist
from model import GPT, GPTConfig


def test_candidates_divide_the_rows_of_a_step():
    assert candidates(64, 512) == [64, 32, 16, 8, 4, 2, 1]
    assert candidates(64, 24) == [8, 4, 2, 1]
    assert candidates(48, 96) == [48, 24, 12, 6, 3, 1]
    assert all(24 % b == 0 for b in candidates(64, 24))


def test_largest_that_fits_is_the_first_fitting_from_the_top():
    tried = []
    assert largest_that_fits(lambda b: tried.append(b) or b <= 8, [64, 32, 16, 8, 4]) == 8
    assert tried == [64, 32, 16, 8]
    assert largest_that_fits(lambda b: False, [2, 1]) is None


def test_a_trial_step_leaves_weights_and_rng_untouched():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=32, n_layer=1, n_head=2, n_embd=16, dropout=0.1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    make = lambda: model.configure_optimizers(0.1, 1e-3, verbose=False)  # noqa: E731
    assert try_step(model, make, 4, 16, 32, "cpu", torch.float32)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_a_trial_that_runs_out_of_memory_says_so(monkeypatch):
    model = GPT(GPTConfig(block_size=16, vocab_size=32, n_layer=1, n_head=2, n_embd=16))

    def forward(idx, targets=None, **kwargs):
        if idx.size(0) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.3 GiB")
        return GPT.forward(model, idx, targets, **kwargs)

    monkeypatch.setattr(model, "forward", forward)
    make = lambda: model.configure_optimizers(0.1, 1e-3, verbose=False)  # noqa: E731
    assert try_step(model, make, 2, 16, 32, "cpu", torch.float32)
    assert not try_step(model, make, 4, 16, 32, "cpu", torch.float32)


def test_choose_batch_size_on_cuda_takes_the_largest_fitting(monkeypatch):
    cfg = parse_config(["--preset", "gpt2-124m", "--n_layer", "1", "--n_embd", "16", "--n_head", "2"])
    model = GPT(GPTConfig(block_size=1024, vocab_size=64, n_layer=1, n_head=2, n_embd=16))
    tried = []
    monkeypatch.setattr(autobatch, "try_step", lambda m, make, b, *a: tried.append(b) or b <= 16)
    chosen = autobatch.choose_batch_size(cfg, Dist(device="cuda"), model, torch.bfloat16)
    assert chosen.batch_size == 16 and tried == [64, 32, 16]
    assert chosen.total_batch_size == cfg.total_batch_size  # accumulation makes up the rest
    monkeypatch.setattr(autobatch, "try_step", lambda *a: False)
    with pytest.raises(ConfigError, match="not even 1 row of --block_size 1024"):
        autobatch.choose_batch_size(cfg, Dist(device="cuda"), model, torch.bfloat16)
    cpu = autobatch.choose_batch_size(dataclasses.replace(cfg, batch_size=0), Dist(device="cpu"), model,
                                      torch.float32)
    assert cpu.batch_size == 64  # no probing off CUDA: the preset's micro-batch


def test_batch_size_auto_flag_and_out_of_memory_anywhere_is_one_line(tmp_path, monkeypatch):
    text = tmp_path / "t.txt"
    text.write_text("to be or not to be, that is the question. " * 200)
    flags = ["--preset", "shakespeare-char", "--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--block_size",
             "16", "--total_batch_size", "64", "--batch_size", "auto", "--device", "cpu", "--max_steps", "2",
             "--eval_iters", "1", "--num_samples", "0", "--text_path", str(text)]
    result = train_gpt2.main(flags + ["--out_dir", str(tmp_path / "a")])
    assert result["step"] == 2
    assert json.loads((tmp_path / "a" / "config.json").read_text())["batch_size"] == 4  # 64 tokens / 16 per row

    def oom(self, step):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.3 GiB (GPU 0; 79.1 GiB total)")

    monkeypatch.setattr(train_gpt2.Trainer, "optimizer_step", oom)
    with pytest.raises(SystemExit) as e:
        train_gpt2.main(flags + ["--out_dir", str(tmp_path / "b")])
    msg = str(e.value.code)
    assert msg.startswith("error: out of memory") and "--batch_size" in msg and "\n" not in msg
