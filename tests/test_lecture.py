"""lecture.py: its attention against a naive loop and against model.py's batched attention (the lecture's EX1),
its stages as the lecture builds them, and every lecture-* preset trained, checkpointed, resumed and sampled."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import shakespeare

import train_gpt2
from gpt2repro import config
from gpt2repro.checkpoint import load_checkpoint, load_model
from gpt2repro.tokenizer import get_tokenizer
from lecture import Block, FeedForward, Head, LectureConfig, LectureLanguageModel, MultiHeadAttention
from model import BigramLanguageModel, CausalSelfAttention, GPTConfig


def naive_head(x: torch.Tensor, head: Head) -> torch.Tensor:
    """Each position's output, one at a time: softmax over the scaled dot products with the positions up to it."""
    q, k, v = head.query(x), head.key(x), head.value(x)
    out = torch.zeros_like(v)
    for t in range(x.size(1)):
        scores = torch.einsum("bd,bsd->bs", q[:, t], k[:, : t + 1]) / k.size(-1) ** 0.5
        out[:, t] = torch.einsum("bs,bsd->bd", scores.softmax(-1), v[:, : t + 1])
    return out


def test_head_matches_a_per_position_loop():
    torch.manual_seed(0)
    config = LectureConfig(block_size=8, n_embd=16)
    head = Head(config, head_size=4).double()
    x = torch.randn(3, 8, 16, dtype=torch.float64)
    torch.testing.assert_close(head(x), naive_head(x, head), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(head(x[:, :5]), naive_head(x[:, :5], head), rtol=1e-12, atol=1e-12)  # T < block


def batched_twin(mha: MultiHeadAttention, n_head: int) -> CausalSelfAttention:
    """model.py's attention holding `mha`'s weights: head h's query, key and value rows go to rows h·hs.. of
    c_attn's q, k and v thirds (the heads become a batch dimension), the projection to c_proj."""
    n_embd = mha.proj.in_features
    attn = CausalSelfAttention(GPTConfig(block_size=16, n_embd=n_embd, n_head=n_head, dropout=0.0))
    with torch.no_grad():
        for i, name in enumerate(("query", "key", "value")):
            attn.c_attn.weight[i * n_embd : (i + 1) * n_embd] = torch.cat([getattr(h, name).weight for h in mha.heads])
        attn.c_attn.bias.zero_()  # the lecture's heads have no biases
        attn.c_proj.weight.copy_(mha.proj.weight)
        attn.c_proj.bias.copy_(mha.proj.bias)
    return attn


@pytest.mark.parametrize("n_head", [1, 4, 6])
def test_ex1_separate_heads_equal_the_batched_attention(n_head):
    """EX1: MultiHeadAttention (a list of Heads, concatenated) is CausalSelfAttention with the same weights,
    forward and every gradient."""
    torch.manual_seed(n_head)
    config = LectureConfig(block_size=16, n_embd=48, n_head=n_head, residual=True, dropout=0.0)
    mha = MultiHeadAttention(config)
    attn = batched_twin(mha, n_head)
    x = torch.randn(4, 16, 48)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = mha(x1), attn(x2)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    grad_out = torch.randn_like(y1)
    y1.backward(grad_out)
    y2.backward(grad_out)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)
    hs = 48 // n_head
    for i, name in enumerate(("query", "key", "value")):
        for h, head in enumerate(mha.heads):
            rows = slice(i * 48 + h * hs, i * 48 + (h + 1) * hs)
            torch.testing.assert_close(getattr(head, name).weight.grad, attn.c_attn.weight.grad[rows],
                                       rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mha.proj.weight.grad, attn.c_proj.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mha.proj.bias.grad, attn.c_proj.bias.grad, rtol=1e-4, atol=1e-5)
    # a wrong head order is caught: swapping two heads' queries changes the output
    if n_head > 1:
        with torch.no_grad():
            attn.c_attn.weight[:hs], attn.c_attn.weight[hs : 2 * hs] = (attn.c_attn.weight[hs : 2 * hs].clone(),
                                                                      attn.c_attn.weight[:hs].clone())
        assert not torch.allclose(mha(x), attn(x), atol=1e-3)


def stage(**switches) -> LectureConfig:
    return LectureConfig(block_size=8, vocab_size=65, n_embd=32, **switches)


def test_stages_build_the_lecture_modules():
    head = LectureLanguageModel(stage(n_head=1))
    assert [h.key.out_features for h in head.blocks[0].sa.heads] == [32]  # one head of size n_embd
    heads = LectureLanguageModel(stage(n_head=4))
    assert [h.key.out_features for h in heads.blocks[0].sa.heads] == [8] * 4
    assert isinstance(heads.blocks[0].sa.proj, torch.nn.Identity) and heads.blocks[0].ffwd is None
    ffwd = FeedForward(stage(ffwd=True))
    assert [type(m).__name__ for m in ffwd.net] == ["Linear", "ReLU", "Dropout"] and ffwd.net[0].out_features == 32
    wide = FeedForward(stage(ffwd=True, residual=True))
    assert [type(m).__name__ for m in wide.net] == ["Linear", "ReLU", "Linear", "Dropout"]
    assert wide.net[0].out_features == 128
    deep = LectureLanguageModel(stage(n_head=4, n_layer=3, ffwd=True, residual=True, layernorm=True))
    assert len(deep.blocks) == 3 and isinstance(deep.ln_f, torch.nn.LayerNorm)
    assert isinstance(deep.blocks[0].sa.proj, torch.nn.Linear)


def test_block_forward_is_the_lectures_formula():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 32)
    plain = Block(stage(n_head=4, ffwd=True))
    torch.testing.assert_close(plain(x), plain.ffwd(plain.sa(x)))
    pre_norm = Block(stage(n_head=4, ffwd=True, residual=True, layernorm=True))
    h = x + pre_norm.sa(pre_norm.ln1(x))
    torch.testing.assert_close(pre_norm(x), h + pre_norm.ffwd(pre_norm.ln2(h)))


def test_initial_loss_is_near_uniform_and_logits_are_causal():
    torch.manual_seed(0)
    model = LectureLanguageModel(stage(n_head=4, n_layer=3, ffwd=True, residual=True, layernorm=True)).eval()
    idx = torch.randint(0, 65, (16, 8))
    logits, loss = model(idx, idx)
    assert logits.shape == (16, 8, 65)
    assert abs(loss.item() - torch.log(torch.tensor(65.0)).item()) < 0.3  # PyTorch's init: near -ln(1/65)
    changed = idx.clone()
    changed[:, 5:] = (changed[:, 5:] + 1) % 65  # the future changes; the past's logits must not
    torch.testing.assert_close(model(changed)[0][:, :5], logits[:, :5])
    torch.testing.assert_close(model.next_logits(torch.cat([idx, idx], 1)), model(idx)[0][:, -1])


def test_config_refuses_heads_that_do_not_divide():
    with pytest.raises(ValueError, match="n_embd 32 is not divisible by n_head 6"):
        LectureConfig(n_embd=32, n_head=6)


def test_dropout_is_off_in_eval_and_on_in_training():
    torch.manual_seed(0)
    model = LectureLanguageModel(stage(n_head=4, ffwd=True, residual=True, layernorm=True, dropout=0.5))
    idx = torch.randint(0, 65, (4, 8))
    model.eval()
    torch.testing.assert_close(model(idx)[0], model(idx)[0])
    model.train()
    assert not torch.allclose(model(idx)[0], model(idx)[0])
    assert F.softmax(model.eval()(idx)[0], -1).sum(-1).allclose(torch.ones(4, 8))


# ----------------------------------------------------------------------------- through the trainer

LECTURE_PRESETS = [name for name in config.PRESETS if name.startswith("lecture-") and name != "lecture-fast"]


@pytest.fixture(scope="module")
def small_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "small.txt"
    path.write_text(shakespeare().read_text()[:20000])
    return path


def short(preset: str, text: Path, out: Path, *extra: str) -> list[str]:
    """The preset at its own model and optimizer, on a small text, for a few steps; the scaled-up one smaller."""
    small = ["--n_embd", "48", "--n_layer", "2", "--block_size", "32", "--batch_size", "4", "--total_batch_size",
             "128"] if preset == "lecture-gpt" else []
    return ["--preset", preset, "--text_path", str(text), "--out_dir", str(out), "--device", "cpu", "--eval_iters",
            "2", "--eval_interval", "3", "--sample_tokens", "20", *small, *extra]


def test_the_presets_are_the_lectures_stages_in_order():
    assert LECTURE_PRESETS == ["lecture-bigram", "lecture-head", "lecture-heads", "lecture-ffwd", "lecture-blocks",
                               "lecture-residual", "lecture-layernorm", "lecture-dropout", "lecture-gpt"]
    for name in LECTURE_PRESETS:
        cfg = config.parse_config(["--preset", name])
        # the lecture's optimizer: AdamW at PyTorch's defaults but the LR, which is constant; no clipping
        assert (cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay, cfg.grad_clip) == (0.9, 0.999, 1e-8, 0.01, 0.0)
        assert cfg.min_lr == cfg.max_lr and cfg.warmup_steps == 0 and cfg.optimizer == "adamw"
        assert cfg.eval_iters == 200 and cfg.data == "char" and cfg.val_fraction == 0.1
        assert cfg.total_batch_size == cfg.batch_size * cfg.block_size  # one micro-batch per step
    gpt = config.parse_config(["--preset", "lecture-gpt"])
    assert (gpt.n_embd, gpt.n_head, gpt.n_layer, gpt.block_size, gpt.batch_size, gpt.dropout, gpt.max_lr,
            gpt.max_steps) == (384, 6, 6, 256, 64, 0.2, 3e-4, 5000)


@pytest.mark.parametrize("preset", LECTURE_PRESETS)
def test_every_stage_trains_checkpoints_and_samples(preset, small_text, tmp_path, capsys):
    out = tmp_path / "run"
    result = train_gpt2.main(short(preset, small_text, out, "--max_steps", "3"))
    assert math.isfinite(result["val_loss"]) and result["step"] == 3
    sample = capsys.readouterr().out.split("sample at step 3:\n")[1]
    assert len(sample) >= 20  # a newline, then 20 characters
    ckpt = load_checkpoint(out / "ckpt_0000003.pt")
    assert ckpt["model_type"] == ("bigram" if preset == "lecture-bigram" else "lecture")
    model, _ = load_model(str(out / "ckpt_0000003.pt"))
    assert type(model) is (BigramLanguageModel if preset == "lecture-bigram" else LectureLanguageModel)
    vocab_size = get_tokenizer("char", text=small_text.read_text()).vocab_size
    assert model.config == config.parse_config(short(preset, small_text, out)).model_config(vocab_size)


def test_a_resumed_stage_continues_exactly(small_text, tmp_path):
    """Six steps with dropout, stopped and resumed at 3, give the weights of six in one go (model, optimizer, data
    order and dropout's RNG restored)."""
    out, straight = tmp_path / "run", tmp_path / "straight"
    train_gpt2.main(short("lecture-dropout", small_text, out, "--max_steps", "3", "--num_samples", "0"))
    resumed = train_gpt2.main(short("lecture-dropout", small_text, out, "--max_steps", "6", "--resume", "auto",
                                    "--num_samples", "0"))
    train_gpt2.main(short("lecture-dropout", small_text, straight, "--max_steps", "6", "--num_samples", "0"))
    a, b = load_checkpoint(out / "ckpt_0000006.pt"), load_checkpoint(straight / "ckpt_0000006.pt")
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())
    assert resumed["val_loss"] == b["val_loss"]


@pytest.mark.parametrize("flags,message", [
    (["--preset", "lecture-heads", "--pos", "rope"], "--pos is for --model_type gpt or bigram, not lecture"),
    (["--preset", "shakespeare-char", "--residual", "true"], "--residual is for --model_type lecture, not gpt"),
])
def test_a_flag_the_model_type_has_no_use_for_is_refused(flags, message):
    with pytest.raises(config.ConfigError, match=message):
        config.parse_config(flags)


def test_a_resume_with_other_stage_switches_is_refused(small_text, tmp_path):
    out = tmp_path / "run"
    train_gpt2.main(short("lecture-ffwd", small_text, out, "--max_steps", "2", "--num_samples", "0"))
    with pytest.raises(SystemExit, match="residual=False"):
        train_gpt2.main(short("lecture-ffwd", small_text, out, "--max_steps", "4", "--resume", "auto",
                              "--residual", "true"))


def test_finetune_reads_the_text_with_the_pretrained_vocabulary(small_text, tmp_path):
    """EX3's mechanics: a character model pretrained on a text with more characters than Shakespeare finetunes on
    Shakespeare in its own vocabulary (and resumes so); a text with a character it never had is refused."""
    wider = tmp_path / "wider.txt"
    wider.write_text(small_text.read_text() + "{[#0123456789]}\n" * 50)
    pre = tmp_path / "pre"
    train_gpt2.main(short("lecture-layernorm", wider, pre, "--max_steps", "2", "--num_samples", "0"))
    pretrained = load_checkpoint(pre / "ckpt_0000002.pt")
    assert set(pretrained["tokenizer"]["chars"]) > set(small_text.read_text())
    fine = tmp_path / "fine"
    flags = ["--init", str(pre / "ckpt_0000002.pt"), "--max_lr", "3e-4", "--min_lr", "3e-4", "--num_samples", "0"]
    train_gpt2.main(short("lecture-layernorm", small_text, fine, "--max_steps", "2", *flags))
    finetuned = load_checkpoint(fine / "ckpt_0000002.pt")
    assert finetuned["tokenizer"] == pretrained["tokenizer"]
    assert not torch.equal(finetuned["model"]["lm_head.weight"], pretrained["model"]["lm_head.weight"])
    train_gpt2.main(short("lecture-layernorm", small_text, fine, "--max_steps", "4", "--resume", "auto", *flags))
    assert load_checkpoint(fine / "ckpt_0000004.pt")["tokenizer"] == pretrained["tokenizer"]
    other = tmp_path / "other.txt"
    other.write_text(small_text.read_text() + "\u00e9\n")
    with pytest.raises(SystemExit, match=r"other.txt has characters that --init .* lacks \('\xe9'\)"):
        train_gpt2.main(short("lecture-layernorm", other, tmp_path / "refused", "--max_steps", "2", *flags))


def test_ex3_corpus_pieces_cut_at_line_ends_and_keep_every_character():
    from bench.lecture import pieces, to_ascii

    text = "".join(f"line {i} {'x' * (i % 7)}\n" for i in range(500))
    parts = pieces(text, 10)
    assert len(parts) == 10 and "".join(parts) == text
    assert all(p.endswith("\n") for p in parts if p) and max(map(len, parts)) < 2 * len(text) / 10
    assert to_ascii("Caf\u00e9 \u2014 na\u00efve\tend\n") == "Cafe  naiveend\n"
