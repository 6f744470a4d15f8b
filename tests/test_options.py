"""The GPTConfig options (rope, rmsnorm, relu2, qk_norm, untied head, logit soft-cap, zero init) against
independent references, and every representative combination trained, checkpointed and sampled with the KV cache."""

import math

import pytest
import torch
import torch.nn.functional as F

from gpt2repro.checkpoint import model_checkpoint_fields, model_from_checkpoint
from gpt2repro.generate import Decoder, StaticKVCache
from gpt2repro.tokenizer import get_tokenizer
from model import (
    GPT,
    RMSNORM_EPS,
    ROPE_BASE,
    CausalSelfAttention,
    GPTConfig,
    RMSNorm,
    apply_rotary,
    rotary_tables,
)

SMALL = dict(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32)


def tiny(seed: int = 0, **options) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**(SMALL | options)))


def test_default_state_dict_keys_are_gpt2s():
    keys = list(tiny(n_layer=1).state_dict())
    block = [f"transformer.h.0.{m}.{w}" for m in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc",
                                                  "mlp.c_proj") for w in ("weight", "bias")]
    assert keys == ["transformer.wte.weight", "transformer.wpe.weight", *block, "transformer.ln_f.weight",
                    "transformer.ln_f.bias", "lm_head.weight"]
    assert GPTConfig() == GPTConfig(pos="learned", norm="layernorm", mlp="gelu", qk_norm=False, tie_embeddings=True,
                                    logit_softcap=0.0, zero_init=False, bias=True)


def test_option_state_dict_keys():
    default = set(tiny().state_dict())
    assert set(tiny(pos="rope").state_dict()) == default - {"transformer.wpe.weight"}  # rotary tables not saved
    assert set(tiny(norm="rmsnorm").state_dict()) == {k for k in default if ".ln_" not in k and "ln_f" not in k}
    for options in (dict(mlp="relu2"), dict(qk_norm=True), dict(logit_softcap=10.0), dict(zero_init=True)):
        assert set(tiny(**options).state_dict()) == default, options


@pytest.mark.parametrize("field,value,allowed", [("pos", "alibi", "learned, rope"),
                                                 ("norm", "batchnorm", "layernorm, rmsnorm"),
                                                 ("mlp", "swiglu", "gelu, relu2")])
def test_config_refuses_unknown_choices(field, value, allowed):
    with pytest.raises(ValueError, match=f"^GPTConfig.{field} must be one of {allowed}; got '{value}'$"):
        GPTConfig(**{field: value})


def test_config_refuses_bad_softcap_and_odd_rope_head():
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="GPTConfig.logit_softcap must be >= 0"):
            GPTConfig(logit_softcap=bad)
    with pytest.raises(ValueError, match="GPTConfig.pos 'rope' needs an even head size; n_embd/n_head is 5"):
        GPTConfig(n_embd=15, n_head=3, pos="rope")


def complex_rotation(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Reference: (x[i], x[i + hs/2]) as the complex number x[i] + i·x[i + hs/2], times e^{i·p·θ_i}."""
    hs = x.size(-1)
    theta = 1.0 / ROPE_BASE ** (torch.arange(hs // 2, dtype=torch.float64) * 2 / hs)
    angle = positions.double()[:, None] * theta[None, :]
    z = torch.complex(*x.double().chunk(2, dim=-1)) * torch.polar(torch.ones_like(angle), angle)
    return torch.cat((z.real, z.imag), dim=-1)


def test_rotary_matches_complex_rotation():
    x = torch.randn(2, 3, 40, 16, generator=torch.Generator().manual_seed(0))
    cos, sin = rotary_tables(16, 40)
    ours = apply_rotary(x, cos, sin)
    torch.testing.assert_close(ours.double(), complex_rotation(x, torch.arange(40)), atol=1e-5, rtol=0)
    # what rotary is for: q·k depends on the positions' offset only
    q, k = x[0, 0, :1], x[0, 1, :1]

    def dot(pq: int, pk: int) -> torch.Tensor:
        rq = apply_rotary(q, cos[pq : pq + 1], sin[pq : pq + 1])
        return (rq * apply_rotary(k, cos[pk : pk + 1], sin[pk : pk + 1])).sum()

    assert torch.allclose(dot(3, 1), dot(30, 28), atol=1e-4) and not torch.allclose(dot(3, 1), dot(3, 2), atol=1e-2)


def test_rmsnorm_matches_formula_and_has_no_parameters():
    x = torch.randn(4, 7, 32, generator=torch.Generator().manual_seed(1)) * 3
    ref = x.double() / torch.sqrt(x.double().pow(2).mean(-1, keepdim=True) + RMSNORM_EPS)
    torch.testing.assert_close(RMSNorm()(x).double(), ref, atol=1e-5, rtol=1e-5)
    model = tiny(norm="rmsnorm")
    assert not any(".ln_" in n or "ln_f" in n for n, _ in model.named_parameters())
    assert isinstance(model.transformer.h[0].ln_1, RMSNorm) and isinstance(model.transformer.ln_f, RMSNorm)


def test_relu2_mlp_matches_formula():
    mlp = tiny(mlp="relu2").transformer.h[0].mlp
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(2))
    h = F.relu(x @ mlp.c_fc.weight.T + mlp.c_fc.bias) ** 2
    torch.testing.assert_close(mlp(x), h @ mlp.c_proj.weight.T + mlp.c_proj.bias, atol=1e-5, rtol=1e-5)


def naive_attention(x: torch.Tensor, attn: CausalSelfAttention, qk_norm: bool) -> torch.Tensor:
    """Reference attention, one head and one query at a time in float64."""
    B, T, C = x.shape
    nh, hs = attn.n_head, C // attn.n_head
    q, k, v = (x.double() @ attn.c_attn.weight.double().T + attn.c_attn.bias.double()).split(C, dim=-1)
    out = torch.zeros(B, T, C, dtype=torch.float64)
    for b in range(B):
        for h in range(nh):
            cols = slice(h * hs, (h + 1) * hs)
            qh, kh, vh = q[b, :, cols], k[b, :, cols], v[b, :, cols]
            if qk_norm:
                qh = qh / torch.sqrt(qh.pow(2).mean(-1, keepdim=True) + RMSNORM_EPS)
                kh = kh / torch.sqrt(kh.pow(2).mean(-1, keepdim=True) + RMSNORM_EPS)
            for t in range(T):
                w = torch.softmax(kh[: t + 1] @ qh[t] / math.sqrt(hs), dim=0)
                out[b, t, cols] = w @ vh[: t + 1]
    return out @ attn.c_proj.weight.double().T + attn.c_proj.bias.double()


@pytest.mark.parametrize("qk_norm", [False, True])
def test_attention_matches_naive(qk_norm):
    attn = tiny(qk_norm=qk_norm).transformer.h[0].attn
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(attn(x).double(), naive_attention(x, attn, qk_norm), atol=1e-5, rtol=1e-5)


def test_softcap_bounds_logits_and_the_loss_uses_them():
    capped, plain = tiny(logit_softcap=0.05), tiny()
    idx = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits, loss = capped(idx[:, :-1], idx[:, 1:])
        raw, _ = plain(idx[:, :-1])
    torch.testing.assert_close(logits, 0.05 * torch.tanh(raw / 0.05))
    assert logits.abs().max() <= 0.05 and raw.abs().max() > 0.1  # tanh rounds to 1 in float32
    torch.testing.assert_close(loss, F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten()))
    # sampling sees the capped logits too (greedy decoding could not tell: tanh keeps the order)
    decoder = Decoder(capped, 2, 16, torch.float32, "eager")
    with torch.no_grad():
        for last in (capped.next_logits(idx[:, :-1]), decoder.prefill(idx[:, :-1], None)):
            torch.testing.assert_close(last, logits[:, -1], atol=1e-6, rtol=0)


def test_zero_init_starts_every_block_as_identity():
    model = tiny(zero_init=True).eval()
    projections = [p for n, p in model.named_parameters() if n.endswith("c_proj.weight")]
    assert len(projections) == 4 and all(p.abs().sum() == 0 for p in projections)
    assert model.transformer.h[0].mlp.c_fc.weight.std() > 0.01
    idx = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(5))
    t = model.transformer
    with torch.no_grad():  # c_proj biases start at zero too: the stream is the embeddings alone
        torch.testing.assert_close(model.hidden_states(idx), t.ln_f(t.wte(idx) + t.wpe(torch.arange(10))))


def test_untied_head_has_its_own_weight_and_counts():
    tied, untied = tiny(), tiny(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    V, C, T = 64, 32, 16
    assert untied.num_params() == tied.num_params() + V * C
    # FLOPs count matmuls: the untied embedding is a lookup, the head a matmul; rope drops wpe
    assert untied.num_params(non_embedding=True) == tied.num_params(non_embedding=True) == tied.num_params() - T * C
    assert tiny(pos="rope").num_params(non_embedding=True) == tiny(pos="rope").num_params() == tied.num_params() - T * C
    assert untied.flops_per_token(T) == tied.flops_per_token(T)
    opt = untied.configure_optimizers(0.0, 1e-2, device_type="cpu", verbose=False)
    idx = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(6))
    untied(idx[:, :-1], idx[:, 1:])[1].backward()
    opt.step()
    assert not torch.equal(untied.lm_head.weight, untied.transformer.wte.weight)


COMBOS = {
    "gpt2": {},
    "rope": dict(pos="rope"),
    "rope+qk_norm+softcap": dict(pos="rope", qk_norm=True, logit_softcap=15.0),
    "rmsnorm+relu2+nobias": dict(norm="rmsnorm", mlp="relu2", bias=False),
    "untied+zero_init": dict(tie_embeddings=False, zero_init=True),
    "all": dict(pos="rope", norm="rmsnorm", mlp="relu2", qk_norm=True, tie_embeddings=False, logit_softcap=15.0,
                zero_init=True, bias=False),
}


def naive_greedy(model: GPT, idx: torch.Tensor, n: int) -> torch.Tensor:
    """Reference: recompute the whole (cropped) sequence every step, take the argmax."""
    for _ in range(n):
        logits, _ = model(idx[:, -model.config.block_size :])
        idx = torch.cat((idx, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    return idx


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
@pytest.mark.parametrize("combo", list(COMBOS))
def test_combo_trains_checkpoints_and_generates(combo, optimizer):
    model = tiny(**COMBOS[combo])
    opt = model.configure_optimizers(0.1, 1e-2, device_type="cpu", verbose=False, optimizer=optimizer)
    data = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(7))
    losses = []
    for _ in range(8):  # one batch, again and again: the loss must fall
        opt.zero_grad(set_to_none=True)
        _, loss = model(data[:, :-1], data[:, 1:])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0] - 0.1, losses

    # the checkpoint records the options and rebuilds the same model (rotary tables included)
    model.eval()
    fields = model_checkpoint_fields(model, get_tokenizer("gpt2"))
    assert all(fields["model_config"][k] == v for k, v in COMBOS[combo].items())
    again = model_from_checkpoint(fields).eval()
    with torch.no_grad():
        assert torch.equal(again(data[:, :-1])[0], model(data[:, :-1])[0])

    # greedy decoding with the KV cache = without it = recomputing everything; 6 + 20 tokens run past block_size 16
    prompt = data[:2, :6]
    cached = model.generate(prompt, 20, temperature=0, use_cache=True)
    assert torch.equal(cached, model.generate(prompt, 20, temperature=0, use_cache=False))
    assert torch.equal(cached, naive_greedy(model, prompt, 20))


@pytest.mark.parametrize("options", [{}, dict(pos="rope", qk_norm=True)], ids=["learned", "rope+qk_norm"])
def test_static_cache_prefill_in_chunks_matches_full_forward(options):
    """Chunks of a sequence through a StaticKVCache, each seeing the cached columns before it and itself causally,
    give the hidden states of one forward over the whole sequence."""
    model = tiny(**options).eval()
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(8))
    k, v = StaticKVCache.allocate(model.config, 2, 16, "cpu", torch.float32)
    parts = []
    with torch.no_grad():
        for a, b in ((0, 5), (5, 6), (6, 16)):
            cols = torch.arange(a, b)
            mask = torch.ones(b - a, b, dtype=torch.bool).tril(diagonal=a).expand(2, 1, b - a, b)
            parts.append(model.hidden_states(idx[:, a:b], StaticKVCache(k, v, cols, mask, b), cols))
        full = model.hidden_states(idx)
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=0)
