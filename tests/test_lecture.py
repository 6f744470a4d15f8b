"""lecture.py: its attention against a naive loop and against model.py's batched attention (the lecture's EX1),
its stages as the lecture builds them, and every lecture-* preset trained, checkpointed, resumed and sampled."""

import pytest
import torch
import torch.nn.functional as F

from lecture import Block, FeedForward, Head, LectureConfig, LectureLanguageModel, MultiHeadAttention
from model import CausalSelfAttention, GPTConfig


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
