"""The chunked head + cross-entropy against `F.cross_entropy` over the full fp32 logits."""

import shutil

import pytest
import torch
from torch.nn import functional as F

from gpt2repro.loss import default_chunk_rows, linear_cross_entropy
from model import GPT, GPTConfig

N, C, V = 37, 16, 50


def reference_loss(h, weight, targets, softcap=0.0):
    """What the chunked loss must equal: the full logits in fp32 (fp64 for fp64), then F.cross_entropy."""
    logits = F.linear(h, weight).to(torch.promote_types(h.dtype, torch.float32))
    if softcap > 0:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, targets, ignore_index=-1)


def inputs(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, C, generator=g, dtype=dtype) * 2).requires_grad_()
    weight = torch.randn(V, C, generator=g, dtype=dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g)
    targets[:9] = -1  # the first chunks (chunk_rows <= 9) are entirely ignored
    targets[[12, 20, 36]] = -1  # and scattered ignored rows, one in the last (partial) chunk
    return h, weight, targets


def loss_and_grads(fn, h, weight, targets, **kw):
    h.grad = weight.grad = None
    loss = fn(h, weight, targets, **kw)
    (2.5 * loss).backward()  # an upstream gradient other than 1: the backward must scale by it
    return loss.detach(), h.grad.clone(), weight.grad.clone()


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("softcap", [0.0, 3.0])
@pytest.mark.parametrize("chunk_rows", [1, 4, 7, 36, 37, 64, None])
def test_matches_cross_entropy(dtype, atol, softcap, chunk_rows):
    h, weight, targets = inputs(dtype)
    ref = loss_and_grads(reference_loss, h, weight, targets, softcap=softcap)
    ours = loss_and_grads(linear_cross_entropy, h, weight, targets, softcap=softcap, chunk_rows=chunk_rows)
    for name, a, b in zip(("loss", "grad h", "grad weight"), ours, ref, strict=True):
        assert a.dtype == b.dtype, name
        assert torch.allclose(a.double(), b.double(), rtol=0, atol=atol), f"{name}: {(a - b).abs().max().item()}"


def test_softcap_changes_the_loss():
    h, weight, targets = inputs()
    assert abs(linear_cross_entropy(h, weight, targets).item() - linear_cross_entropy(
        h, weight, targets, softcap=3.0).item()) > 0.1


def test_only_the_wanted_gradient():
    h, weight, targets = inputs()
    frozen = weight.detach()
    loss = linear_cross_entropy(h, frozen, targets, chunk_rows=5)
    loss.backward()
    ref_h = h.grad.clone()
    h.grad = None
    reference_loss(h, frozen, targets).backward()
    assert frozen.grad is None and torch.allclose(ref_h, h.grad, atol=1e-6)


def test_no_grad_and_eval_give_the_same_loss():
    h, weight, targets = inputs()
    ref = reference_loss(h, weight, targets).item()
    with torch.no_grad():
        assert abs(linear_cross_entropy(h, weight, targets, chunk_rows=6).item() - ref) < 1e-5
        assert abs(linear_cross_entropy(h, weight, targets, chunk_rows=6, softcap=2.0).item()
                   - reference_loss(h, weight, targets, softcap=2.0).item()) < 1e-5


def test_every_row_ignored_is_nan_like_cross_entropy():
    h, weight, targets = inputs()
    targets = torch.full_like(targets, -1)
    assert linear_cross_entropy(h, weight, targets, chunk_rows=8).isnan()
    assert reference_loss(h, weight, targets).isnan()


def test_bf16_autocast_close_to_fp32_and_matmuls_in_bf16():
    h, weight, targets = inputs()
    ref = loss_and_grads(reference_loss, h, weight, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = loss_and_grads(linear_cross_entropy, h, weight, targets, chunk_rows=8)
        amp_ref = loss_and_grads(reference_loss, h, weight, targets)
    for name, a, b, c in zip(("loss", "grad h", "grad weight"), ours, ref, amp_ref, strict=True):
        assert a.dtype == torch.float32, name  # grads come back in the parameters' dtype
        scale = b.abs().max().item()
        assert (a - b).abs().max().item() <= 0.02 * scale, name  # bf16 has 8 mantissa bits
        # the same matmul precision as autocast's F.linear: much closer to it than to fp32
        assert (a - c).abs().max().item() <= 0.01 * scale, name
    # and the loss really saw bf16 logits (a fp32 matmul would match the fp32 reference to 1e-6)
    assert abs(ours[0].item() - ref[0].item()) > 1e-6


def test_default_chunk_rows():
    assert default_chunk_rows(50304, "cpu") % 8 == 0
    assert default_chunk_rows(50304, "cuda") * 50304 * 4 <= 1024 * 2**20
    assert default_chunk_rows(10**9, "cpu") == 8


def test_bad_shapes_are_one_line_errors():
    h, weight, targets = inputs()
    with pytest.raises(ValueError, match="want h"):
        linear_cross_entropy(h, weight.t(), targets)
    with pytest.raises(ValueError, match="chunk_rows"):
        linear_cross_entropy(h, weight, targets, chunk_rows=0)


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=16, vocab_size=61, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():  # move biases/LayerNorms off 0/1 so their gradients are not special
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    idx = torch.randint(0, 61, (3, 16), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 61, (3, 16), generator=torch.Generator().manual_seed(2))
    targets[1, 5:] = -1
    return model, idx, targets


def model_grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_gpt_loss_and_every_gradient_match_full_logits():
    model, idx, targets = tiny_gpt()
    logits, loss = model(idx, targets)
    grads = model_grads(model, loss)
    ref_logits = model.lm_head(model.hidden_states(idx))
    ref_loss = F.cross_entropy(ref_logits.reshape(-1, 61).float(), targets.reshape(-1), ignore_index=-1)
    ref_grads = model_grads(model, ref_loss)
    assert torch.allclose(logits, ref_logits) and abs(loss.item() - ref_loss.item()) < 1e-6
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert torch.allclose(g, ref_grads[name], rtol=0, atol=1e-5), f"{name}: {(g - ref_grads[name]).abs().max()}"
    no_logits, loss2 = model(idx, targets, return_logits=False)
    assert no_logits is None and loss2.item() == loss.item()
    assert model(idx)[1] is None and torch.equal(model(idx)[0], ref_logits)


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="inductor needs a C compiler")
def test_compiled_gpt_matches_eager():
    model, idx, targets = tiny_gpt()
    _, loss = model(idx, targets, return_logits=False)
    eager = model_grads(model, loss)
    # fullgraph: the loss's autograd.Function is traced into the graph, no break
    compiled = torch.compile(model, fullgraph=True)
    _, closs = compiled(idx, targets, return_logits=False)
    grads = model_grads(model, closs)
    assert abs(closs.item() - loss.item()) < 1e-5
    for name, g in grads.items():
        assert torch.allclose(g, eager[name], rtol=0, atol=1e-5), f"{name}: {(g - eager[name]).abs().max()}"
