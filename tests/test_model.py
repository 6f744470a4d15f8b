"""GPT against `transformers.GPT2LMHeadModel`, SDPA against the written-out attention, the KV cache against full
recomputation, sampling filters, and the import graph."""

import ast
import json
import os
import re
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import model as model_module
from gpt2repro.checkpoint import load_model, load_pretrained
from gpt2repro.generate import Decoder, sample_next
from gpt2repro.gpt2_sizes import GPT2Size
from model import GPT, BigramLanguageModel, GPTConfig, attention_reference

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def hf_model(n_layer: int, n_head: int, n_embd: int, vocab: int = 97, positions: int = 64,
             **options) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=vocab - 1,
                     eos_token_id=vocab - 1, **options)
    hf = GPT2LMHeadModel(cfg).eval()
    # random init leaves biases and LayerNorms at 0/1: perturb everything so every weight is checked
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return hf


@pytest.mark.parametrize("n_layer,n_head,n_embd", [(2, 2, 64), (3, 4, 96), (2, 5, 80), (1, 3, 30)])
def test_logits_and_loss_match_transformers(tmp_path, n_layer, n_head, n_embd):
    hf = hf_model(n_layer, n_head, n_embd)
    hf.save_pretrained(tmp_path)
    ours = load_pretrained(str(tmp_path)).eval()
    assert ours.config.n_embd == n_embd and ours.config.bias
    idx = torch.randint(0, 97, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(idx, labels=idx)
        logits, loss = ours(idx[:, :-1], idx[:, 1:])
        full_logits, _ = ours(idx)
    assert (full_logits - ref.logits).abs().max().item() <= 1e-4
    assert abs(loss.item() - ref.loss.item()) <= 1e-5


def test_from_pretrained_by_name_copies_openais_weights(monkeypatch):
    """GPT.from_pretrained(name): the name's shape from the table, the weights transposed from transformers'
    Conv1D (the download stubbed with a random GPT-2 of that shape, 1024 positions and 50257 tokens)."""
    hf = hf_model(1, 2, 32, vocab=50257, positions=1024)
    monkeypatch.setattr(model_module, "HF_MODELS", {"gpt2-tiny": GPT2Size(1, 2, 32, "tiny")})
    monkeypatch.setattr(GPT2LMHeadModel, "from_pretrained", lambda name: hf if name == "gpt2-tiny" else None)
    ours = GPT.from_pretrained("gpt2-tiny").eval()
    idx = torch.randint(0, 50257, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(idx)[0] - hf(idx).logits).abs().max().item() <= 1e-4


def test_from_pretrained_points_a_directory_to_load_pretrained(tmp_path):
    with pytest.raises(ValueError, match=r"not one of gpt2, .*gpt2repro\.checkpoint\.load_pretrained"):
        GPT.from_pretrained(str(tmp_path))


def run_attention(pos: str, reference: bool, monkeypatch) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Logits, loss and every gradient of a small GPT in fp32, its attention by SDPA or by attention_reference."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=61, n_layer=2, n_head=4, n_embd=64, pos=pos))
    with torch.no_grad():  # biases and LayerNorms off 0/1: their gradients are then not special
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    for block in model.transformer.h:
        block.attn.reference = reference
    idx = torch.randint(0, 61, (3, 32), generator=torch.Generator().manual_seed(1))
    with monkeypatch.context() as m:
        if reference:  # the written-out path really runs: SDPA is out of reach
            m.setattr(torch.nn.functional, "scaled_dot_product_attention", None)
        logits, loss = model(idx, idx.roll(-1, 1))
        loss.backward()
    return logits.detach(), loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_sdpa_equals_the_lectures_attention(pos, monkeypatch):
    """F.scaled_dot_product_attention computes the lecture's masked softmax(QKᵀ/√d)·V: the same logits, loss and
    gradients of every parameter in fp32, with learned and with rotary positions."""
    sdpa, ref = run_attention(pos, False, monkeypatch), run_attention(pos, True, monkeypatch)
    torch.testing.assert_close(sdpa[0], ref[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(sdpa[1], ref[1], atol=1e-6, rtol=0)
    assert sdpa[2].keys() == ref[2].keys()
    for name, g in sdpa[2].items():
        torch.testing.assert_close(g, ref[2][name], atol=1e-6, rtol=1e-4, msg=name)


def test_attention_reference_masks_as_sdpa_does():
    """A boolean mask (True = attend) and causal masking with more keys than queries (a cache) as SDPA reads them."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g) for n in (4, 6, 6))
    mask = torch.rand(2, 1, 4, 6, generator=g) < 0.6
    mask[..., 0] = True  # every query sees a key
    F = torch.nn.functional
    torch.testing.assert_close(attention_reference(q, k, v, mask, is_causal=False),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=1e-6, rtol=0)
    torch.testing.assert_close(attention_reference(q, k, v), F.scaled_dot_product_attention(q, k, v, is_causal=True),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(attention_reference(q[:, :, :1], k, v, is_causal=False),
                               F.scaled_dot_product_attention(q[:, :, :1], k, v), atol=1e-6, rtol=0)


def decode_logits(model: GPT, pad: torch.Tensor | None) -> torch.Tensor:
    """Logits of a prefill of left-padded prompts (padding hidden by a mask, or none) and of eight steps through
    the KV cache, each step one given token per row."""
    idx = torch.randint(0, 61, (3, 6), generator=torch.Generator().manual_seed(5))
    decoder = Decoder(model, 3, 32, torch.float32, "eager")
    decoder.start(pad)
    with torch.no_grad():
        out = [decoder.prefill(idx, pad)] + [decoder.step(idx[:, i % 6]) for i in range(8)]
    return torch.stack(out)


@pytest.mark.parametrize("padded", [False, True])
def test_decoding_with_the_lectures_attention_matches_sdpa(padded):
    """Through the KV cache (its masks, and one query with none), the attention written out gives SDPA's logits."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=61, n_layer=2, n_head=4, n_embd=64, pos="rope")).eval()
    pad = torch.tensor([2, 0, 5]) if padded else None
    want = decode_logits(model, pad)
    for block in model.transformer.h:
        block.attn.reference = True
    torch.testing.assert_close(decode_logits(model, pad), want, atol=1e-5, rtol=0)


def test_no_import_circle():
    """No module of the project imports another that imports it back, however indirectly: at module level, inside
    a function or under `if TYPE_CHECKING:` alike."""
    root = Path(__file__).resolve().parents[1]
    files = [p for p in root.rglob("*.py") if not ({"tests", ".venv", "build"} & set(p.relative_to(root).parts))]
    names = {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p for p in files}
    graph = {name: set() for name in names}
    for name, path in names.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                graph[name] |= {a.name for a in node.names} & names.keys()
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                graph[name] |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)} & names.keys()
    assert graph["model"] and "gpt2repro.generate" in graph["model"]  # the walk sees imports at all
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name] - {name}):
            assert state.get(dep) != 1, "import circle: " + " -> ".join([*path, name, dep])
            if dep not in state:
                visit(dep, [*path, name])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_param_count_gpt2_124m():
    model = GPT(GPTConfig())
    assert sum(p.numel() for p in model.parameters()) == 124_439_808
    assert model.lm_head.weight is model.transformer.wte.weight


def test_init_scales_residual_projections():
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=32, vocab_size=64, n_layer=8, n_head=4, n_embd=256)
    model = GPT(cfg)
    std_proj = model.transformer.h[0].attn.c_proj.weight.std().item()
    std_fc = model.transformer.h[0].mlp.c_fc.weight.std().item()
    assert abs(std_fc - 0.02) < 0.002
    assert abs(std_proj - 0.02 / (2 * 8) ** 0.5) < 0.001
    biases = [m.bias for m in model.modules() if isinstance(m, torch.nn.Linear) and m.bias is not None]
    assert biases and all(b.abs().sum() == 0 for b in biases)


def test_from_pretrained_refuses_mismatched_shapes(tmp_path):
    hf = hf_model(2, 2, 64)
    sd = hf.state_dict()
    sd["transformer.h.1.mlp.c_fc.weight"] = torch.zeros(64, 100)  # wrong inner width
    model = GPT(GPTConfig(block_size=64, vocab_size=97, n_layer=2, n_head=2, n_embd=64))
    with pytest.raises(ValueError, match=r"h\.1\.mlp\.c_fc\.weight has shape \(100, 64\)"):
        model.load_hf_state_dict(sd, source="x")


@pytest.mark.parametrize("field, value", [("activation_function", "gelu"), ("layer_norm_epsilon", 1e-6),
                                          ("scale_attn_by_inverse_layer_idx", True), ("scale_attn_weights", False),
                                          ("n_inner", 64), ("tie_word_embeddings", True)])
def test_from_pretrained_refuses_what_this_gpt_cannot_compute(tmp_path, field, value):
    """A GPT2Config option with no GPTConfig equivalent, or a tied config whose head differs from wte: one line
    naming the directory, never a model computing other logits than transformers does."""
    if field == "tie_word_embeddings":  # both weights saved apart, then the config claims they are one
        hf_model(1, 2, 32, tie_word_embeddings=False).save_pretrained(tmp_path)
        config = json.loads((tmp_path / "config.json").read_text(encoding="utf-8"))
        (tmp_path / "config.json").write_text(json.dumps({**config, field: value}), encoding="utf-8")
    else:
        hf_model(1, 2, 32, **{field: value}).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path))}: .*{field}") as e:
        load_model(str(tmp_path))
    assert "\n" not in str(e.value)


def test_from_pretrained_accepts_the_other_name_of_gelu_tanh(tmp_path):
    hf = hf_model(1, 2, 32, activation_function="gelu_pytorch_tanh")
    hf.save_pretrained(tmp_path)
    idx = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (load_pretrained(str(tmp_path)).eval()(idx)[0] - hf(idx).logits).abs().max().item() <= 1e-4


def test_load_model_unknown_spec_is_clear(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_model(str(tmp_path / "nope.pt"))


def tiny_gpt(seed: int = 0, block_size: int = 64) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=block_size, vocab_size=101, n_layer=2, n_head=4, n_embd=64)).eval()


def naive_greedy(model: GPT, idx: torch.Tensor, n: int) -> torch.Tensor:
    """Reference: recompute the whole (cropped) sequence every step, take the argmax."""
    for _ in range(n):
        logits, _ = model(idx[:, -model.config.block_size :])
        idx = torch.cat((idx, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    return idx


def test_kv_cache_greedy_equals_full_recompute():
    model = tiny_gpt()
    prompt = torch.randint(0, 101, (2, 7), generator=torch.Generator().manual_seed(3))
    with_cache = model.generate(prompt, 50, temperature=0, use_cache=True)
    without = model.generate(prompt, 50, temperature=0, use_cache=False)
    assert torch.equal(with_cache, without)
    assert torch.equal(with_cache, naive_greedy(model, prompt, 50))


def test_generation_past_block_size_crops_context():
    model = tiny_gpt(block_size=16)
    prompt = torch.randint(0, 101, (1, 10), generator=torch.Generator().manual_seed(4))
    out = model.generate(prompt, 30, temperature=0, use_cache=True)
    assert out.shape == (1, 40)
    assert torch.equal(out, naive_greedy(model, prompt, 30))


def test_sampling_is_seeded_and_stops_at_eot():
    model = tiny_gpt()
    prompt = torch.zeros(3, 1, dtype=torch.long)
    a = model.generate(prompt, 20, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(7))
    b = model.generate(prompt, 20, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_generation_stops_when_every_row_has_emitted_eot():
    model = BigramLanguageModel(GPTConfig(block_size=8, vocab_size=6))
    with torch.no_grad():  # a chain 0 -> 1 -> 2 -> 5 (eot) -> 5
        model.token_embedding_table.weight.fill_(0.0)
        for a, b in [(0, 1), (1, 2), (2, 5), (5, 5)]:
            model.token_embedding_table.weight[a, b] = 50.0
    out = model.generate(torch.tensor([[0], [1], [2]]), 20, temperature=0, eot=5)
    assert out.tolist() == [[0, 1, 2, 5], [1, 2, 5, 5], [2, 5, 5, 5]]


def test_vocab_size_limit_never_samples_padding():
    model = tiny_gpt()
    prompt = torch.zeros(4, 1, dtype=torch.long)
    out = model.generate(prompt, 30, temperature=2.0, vocab_size=50, generator=torch.Generator().manual_seed(1))
    assert out[:, 1:].max().item() < 50


@pytest.mark.parametrize("top_k,top_p", [(5, None), (None, 0.3), (8, 0.5)])
def test_top_k_top_p_stay_in_allowed_set(top_k, top_p):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 200, generator=g, dtype=torch.float64).float()
    probs = logits.double().softmax(-1)
    allowed = torch.ones_like(logits, dtype=torch.bool)
    if top_k is not None:
        kth = logits.topk(top_k, -1).values[:, -1:]
        allowed &= logits >= kth
    if top_p is not None:
        # naive reference: walk tokens from most to least likely until the mass reaches top_p
        for r in range(4):
            keep, mass = set(), 0.0
            for i in probs[r].argsort(descending=True).tolist():
                if mass >= top_p:
                    break
                keep.add(i)
                mass += probs[r, i].item()
            allowed[r] &= torch.tensor([i in keep for i in range(200)])
    for _ in range(300):
        tok = sample_next(logits, temperature=1.0, top_k=top_k, top_p=top_p, generator=g)
        assert allowed[torch.arange(4), tok].all()


def test_configure_optimizers_groups_and_fused():
    model = tiny_gpt()
    opt = model.configure_optimizers(0.1, 6e-4, device_type="cpu", verbose=False)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    n = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters())
    assert decay["fused"] is True


def test_flops_per_token_matches_hand_count():
    cfg = GPTConfig()
    model = GPT(cfg)
    n = 124_439_808 - 1024 * 768  # without position embeddings
    assert model.flops_per_token(1024) == 6 * n + 12 * 12 * 768 * 1024


def test_bigram_learns_and_generates():
    torch.manual_seed(0)
    model = BigramLanguageModel(GPTConfig(block_size=8, vocab_size=5))
    # a deterministic cycle 0->1->2->3->4->0: the bigram table can learn it exactly
    seq = torch.arange(40) % 5
    x, y = seq[:-1].view(1, -1), seq[1:].view(1, -1)
    opt = model.configure_optimizers(0.0, 0.1, device_type="cpu", verbose=False)
    for _ in range(200):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    out = model.generate(torch.tensor([[2]]), 6, temperature=0)
    assert out.tolist() == [[2, 3, 4, 0, 1, 2, 3]]
