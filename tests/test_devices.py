"""devices.py: `--fp8` (refusal where it cannot run, which layers it converts, training close to bf16 through
torchao's CPU emulation of FP8 matmuls) and where the compile caches live."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from conftest import shakespeare

import train_gpt2
from gpt2repro.devices import FP8_MIN_WIDTH, convert_to_fp8, fp8_layers, fp8_unsupported, use_compile_cache
from model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[1]


def test_fp8_is_refused_on_cpu_in_one_line_before_anything_is_written(tmp_path):
    text = tmp_path / "small.txt"
    text.write_text(shakespeare().read_text()[:5000])
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train_gpt2.main(["--preset", "shakespeare-char", "--text_path", str(text), "--out_dir", str(out),
                         "--device", "cpu", "--fp8", "true", "--max_steps", "2"])
    message = str(e.value)
    assert "--fp8" in message and "cpu" in message and "\n" not in message.strip()
    assert not out.exists()
    assert "GPU" in fp8_unsupported("cpu")


def block_linears(n_layer: int) -> list[str]:
    return [f"transformer.h.{i}.{name}" for i in range(n_layer)
            for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


def test_fp8_takes_the_blocks_matrices_from_1024_wide_and_never_the_head():
    with torch.device("meta"):  # shapes only: nothing is allocated
        wide = GPT(GPTConfig(n_layer=2, n_head=16, n_embd=1024))
        gpt2 = GPT(GPTConfig(n_layer=2))  # 124M's width, 768
    assert FP8_MIN_WIDTH == 1024
    assert fp8_layers(wide) == block_linears(2)
    assert fp8_layers(gpt2) == []
    assert "lm_head" not in fp8_layers(gpt2, min_width=16)
    with pytest.raises(ValueError, match="--fp8: no linear layer"):
        convert_to_fp8(copy.deepcopy(gpt2).to_empty(device="cpu"))


def test_fp8_training_step_stays_close_to_bf16_and_keeps_the_checkpoint_format():
    pytest.importorskip("torchao.float8")
    torch.manual_seed(0)
    ref = GPT(GPTConfig(block_size=32, vocab_size=256, n_layer=2, n_head=4, n_embd=64))
    model = copy.deepcopy(ref)
    params = {name: id(p) for name, p in model.named_parameters()}
    keys = list(model.state_dict())
    assert convert_to_fp8(model, min_width=64) == block_linears(2)
    assert {name: id(p) for name, p in model.named_parameters()} == params  # the optimizer keeps its tensors
    assert list(model.state_dict()) == keys  # checkpoints and exports do not change
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "Float8Linear"
    x = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
    losses = []
    for m in (ref, model):
        with torch.autocast("cpu", torch.bfloat16):
            _, loss = m(x, x)
        loss.backward()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=2e-2)
    for (name, p), q in zip(ref.named_parameters(), model.parameters(), strict=True):
        cos = torch.nn.functional.cosine_similarity(p.grad.flatten(), q.grad.flatten(), dim=0)
        assert cos > 0.98, name  # e4m3 activations and weights, e5m2 gradients: a few % per element


def test_compile_caches_go_to_the_project_cache_unless_the_user_chose(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("GPT2_REPRO_CACHE", str(tmp_path / "cache"))
    assert use_compile_cache() == str(tmp_path / "cache" / "inductor") == os.environ["TORCHINDUCTOR_CACHE_DIR"]
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert use_compile_cache() == str(tmp_path / "mine")
