"""Muon against independent references: Newton–Schulz against an SVD's U·Vᵀ, momentum against torch.optim.SGD;
the combined Muon + AdamW optimizer resumes exactly and works with gradient accumulation and GradScaler."""

import io

import pytest
import torch
import torch.nn.functional as F

from gpt2repro.muon import CombinedOptimizer, Muon, orthogonalize
from model import GPT, BigramLanguageModel, GPTConfig


def svd_parts(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(g.double(), full_matrices=False)
    return u, s, vh


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum((-2, -1)) / (a.norm(dim=(-2, -1)) * b.norm(dim=(-2, -1)))


@pytest.mark.parametrize("shape", [(32, 64), (64, 32), (48, 48), (3, 16, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_newton_schulz_is_u_vt_up_to_singular_values_near_one(shape, dtype):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
    out = orthogonalize(g, dtype=dtype).double()
    u, s, vh = svd_parts(g)
    # an odd matrix polynomial in G: the same singular vectors, each σ mapped by the same scalar polynomial
    core = u.mT @ out @ vh.mT
    diag = torch.diagonal(core, dim1=-2, dim2=-1)
    off_diag = (core - torch.diag_embed(diag)).abs().max().item()
    assert off_diag < (1e-5 if dtype == torch.float32 else 0.06)
    # σ not negligible next to the Frobenius norm come out in [0.5, 1.5] (about [0.68, 1.14]), not at exactly 1
    sizable = s / s.norm(dim=-1, keepdim=True) > 3e-3
    assert sizable.any()
    assert diag[sizable].min() > 0.5 and diag[sizable].max() < 1.5
    assert cosine(out, u @ vh).min() > 0.97
    assert out.shape == g.shape


def test_newton_schulz_leaves_tiny_directions_small_and_zero_at_zero():
    gen = torch.Generator().manual_seed(1)
    u, _ = torch.linalg.qr(torch.randn(20, 20, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(20, 20, generator=gen, dtype=torch.float64))
    s = torch.logspace(-5, 0, 20, dtype=torch.float64)
    out = orthogonalize(((u * s) @ v.T).float()).double()
    mapped = torch.diagonal(u.T @ out @ v)
    # 5 steps grow a tiny σ by at most a⁵ ≈ 490: σ far below 1/490 of the norm is not brought to 1
    assert mapped[0] < 0.01 and mapped[-1] > 0.5
    assert mapped.diff().abs().max() < 0.6  # a smooth function of σ
    zero = orthogonalize(torch.zeros(8, 16))
    assert torch.equal(zero, torch.zeros(8, 16))


def test_muon_momentum_matches_sgd_nesterov_and_update_is_orthogonal():
    gen = torch.Generator().manual_seed(2)
    w = torch.nn.Parameter(torch.randn(24, 8, generator=gen))
    ref = torch.nn.Parameter(w.detach().clone())
    lr, mu = 0.05, 0.9
    opt = Muon([w], lr=lr, momentum=mu)
    sgd = torch.optim.SGD([ref], lr=1.0, momentum=mu, nesterov=True)
    for _ in range(4):
        g = torch.randn(24, 8, generator=gen)
        before = w.detach().clone()
        w.grad, ref.grad = g.clone(), g.clone()
        ref_before = ref.detach().clone()
        opt.step()
        sgd.step()  # with lr 1 SGD's step is exactly its Nesterov update g + μ·buf
        nesterov = ref_before - ref.detach()
        assert torch.allclose(opt.state[w]["momentum_buffer"], sgd.state[ref]["momentum_buffer"], atol=1e-6)
        step = (before - w.detach()).double() / (lr * (24 / 8) ** 0.5)  # tall matrix: scaled by sqrt(rows/cols)
        u, _, vh = svd_parts(nesterov)
        assert cosine(step, u @ vh) > 0.97
        sv = torch.linalg.svdvals(step)
        assert sv.min() > 0.5 and sv.max() < 1.5


def test_muon_split_orthogonalises_each_block_and_decays_decoupled():
    gen = torch.Generator().manual_seed(3)
    w = torch.nn.Parameter(torch.randn(3 * 16, 16, generator=gen))
    g = torch.randn(3 * 16, 16, generator=gen) * torch.tensor([1.0, 10.0, 100.0]).repeat_interleave(16)[:, None]
    lr, wd = 0.1, 0.5
    opt = Muon([w], lr=lr, momentum=0.0, weight_decay=wd, split=3)
    before = w.detach().clone()
    w.grad = g
    opt.step()
    step = (before * (1 - lr * wd) - w.detach()) / lr  # weight decay first, as AdamW: p *= 1 - lr·wd
    for block in step.view(3, 16, 16).double():  # every block orthogonal, whatever its gradient's scale
        sv = torch.linalg.svdvals(block)
        assert sv.min() > 0.5 and sv.max() < 1.5
    with pytest.raises(ValueError, match="split in 3"):
        Muon([torch.nn.Parameter(torch.zeros(10, 4))], split=3)
    with pytest.raises(ValueError, match="not a 2-D matrix"):
        Muon([torch.nn.Parameter(torch.zeros(10))])


def tiny(seed: int = 0, **options) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32, **options))


def muon_opt(model: GPT) -> CombinedOptimizer:
    return model.configure_optimizers(0.1, 3e-3, device_type="cpu", verbose=False, optimizer="muon", muon_lr=0.02,
                                      muon_momentum=0.9, muon_weight_decay=0.01)


def batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(9)
    data = [torch.randint(0, 64, (4, 17), generator=gen) for _ in range(n)]
    return [(d[:, :-1], d[:, 1:]) for d in data]


def train_steps(model: GPT, opt, data: list, first_step: int, accum: int = 2) -> None:
    """The trainer's step: accumulate over micro-batches, clip, scale every group's lr by one schedule."""
    for step in range(first_step, first_step + len(data) // accum):
        opt.zero_grad(set_to_none=True)
        for x, y in data[(step - first_step) * accum : (step - first_step + 1) * accum]:
            _, loss = model(x, y)
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        lr = 3e-3 * (0.5 + 0.5 / (1 + step))  # any schedule in units of learning_rate
        for group in opt.param_groups:
            group["lr"] = lr * group["lr_scale"]
        opt.step()


def test_muon_resume_is_exact():
    options = dict(pos="rope", norm="rmsnorm", mlp="relu2", tie_embeddings=False, bias=False)
    data = batches(12)
    straight = tiny(**options)
    opt = muon_opt(straight)
    train_steps(straight, opt, data, 0)

    first = tiny(**options)
    opt1 = muon_opt(first)
    train_steps(first, opt1, data[:6], 0)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": opt1.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)  # as checkpoint.py loads: plain tensors and data only
    resumed = tiny(seed=1, **options)
    resumed.load_state_dict(ckpt["model"])
    opt2 = muon_opt(resumed)
    opt2.load_state_dict(ckpt["optimizer"])
    train_steps(resumed, opt2, data[6:], 3)

    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert straight.state_dict()["lm_head.weight"].ne(tiny(**options).state_dict()["lm_head.weight"]).any()


def test_muon_state_refuses_adamw_state():
    model = tiny()
    adamw = model.configure_optimizers(0.1, 1e-3, device_type="cpu", verbose=False)
    with pytest.raises(ValueError, match="resume with the --optimizer"):
        muon_opt(model).load_state_dict(adamw.state_dict())


def test_gradient_accumulation_equals_one_batch():
    (x, y), (x2, y2) = batches(2)
    whole, parts = tiny(), tiny()
    opt_whole, opt_parts = muon_opt(whole), muon_opt(parts)
    _, loss = whole(torch.cat([x, x2]), torch.cat([y, y2]))
    loss.backward()
    opt_whole.step()
    for xb, yb in ((x, y), (x2, y2)):
        _, loss = parts(xb, yb)
        (loss / 2).backward()
    opt_parts.step()
    for (name, a), b in zip(whole.state_dict().items(), parts.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=name)


def test_grad_scaler_steps_the_combined_optimizer_like_unscaled():
    (x, y), = batches(1)
    plain, scaled = tiny(), tiny()
    opt_plain, opt_scaled = muon_opt(plain), muon_opt(scaled)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    F.cross_entropy(plain(x)[0].flatten(0, 1), y.flatten()).backward()
    opt_plain.step()
    scaler.scale(F.cross_entropy(scaled(x)[0].flatten(0, 1), y.flatten())).backward()
    scaler.unscale_(opt_scaled)  # a power of two: unscaling is exact
    scaler.step(opt_scaled)
    scaler.update()
    for (name, a), b in zip(plain.state_dict().items(), scaled.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_configure_optimizers_muon_groups():
    model = tiny(tie_embeddings=False)
    opt = muon_opt(model)
    adamw, muon = opt.optimizers
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, Muon)
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    assert muon_names == {n for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2}
    adamw_names = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert {"transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight"} <= adamw_names
    assert not muon_names & adamw_names and len(muon_names | adamw_names) == len(names)
    c_attn = [g for g in muon.param_groups if g["split"] == 3]
    assert len(c_attn) == 1 and all(names[id(p)].endswith("attn.c_attn.weight") for p in c_attn[0]["params"])
    assert all(g["lr_scale"] == 1.0 for g in adamw.param_groups)
    assert all(g["lr_scale"] == pytest.approx(0.02 / 3e-3) and g["lr"] == 0.02 for g in muon.param_groups)
    assert len(opt.param_groups) == len(adamw.param_groups) + len(muon.param_groups)


def test_configure_optimizers_refuses_bad_choices():
    with pytest.raises(ValueError, match="optimizer must be one of adamw, muon; got 'sgd'"):
        tiny().configure_optimizers(0.1, 1e-3, verbose=False, optimizer="sgd")
    with pytest.raises(ValueError, match="no hidden matrices; use adamw"):
        BigramLanguageModel(GPTConfig(vocab_size=5)).configure_optimizers(0.0, 0.1, verbose=False, optimizer="muon")


def test_bf16_newton_schulz_is_applied_close_to_fp32_and_not_saved():
    """A bf16 run orthogonalises in bf16 (make_optimizer's choice): the update stays U·Vᵀ-like, within bf16 of
    the fp32 one, and the choice is not part of the saved state (a checkpoint resumes under either dtype)."""
    from gpt2repro.build import make_optimizer
    from gpt2repro.config import TrainConfig

    cfg = TrainConfig(optimizer="muon", max_lr=3e-3, muon_lr=0.02)
    updates = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny(seed=4)
        opt = make_optimizer(model, cfg, "cpu", dtype=dtype)
        muon = opt.optimizers[1]
        assert muon.ns_dtype == (torch.bfloat16 if dtype == torch.bfloat16 else None)
        assert "ns_dtype" not in repr(opt.state_dict())
        w = model.transformer.h[0].mlp.c_fc.weight
        before = w.detach().clone()
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()))
        opt.step()
        updates[dtype] = (before - w.detach()).double()
        u, _, vh = svd_parts(w.grad)
        assert cosine(updates[dtype], u @ vh) > 0.97
    fp32, bf16 = updates[torch.float32], updates[torch.bfloat16]
    assert not torch.equal(fp32, bf16)  # the dtype was applied
    assert cosine(fp32, bf16) > 0.99
