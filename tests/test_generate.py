"""Batched decoding with the static KV cache against per-prompt full recomputation; seeds, top-k, EOT; the compiled
step on CPU; the compile fallback."""

import pytest
import torch

from gpt2repro import generate
from gpt2repro.generate import Decoder, cache_len, generate_batch
from model import GPT, BigramLanguageModel, GPTConfig

# prompts of mixed lengths; the longest + NEW runs past block_size (32), so the sliding window is covered too
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17], [18], [19, 20, 21, 22, 23]]
OTHER = [[30, 31], [32], [33, 34, 35, 36, 37, 38, 39, 40, 41], [42, 43, 44, 45]]
NEW = 24
OPTIONS = {
    "learned": {},
    "rope": dict(pos="rope"),
    "rope+qk_norm+softcap": dict(pos="rope", qk_norm=True, logit_softcap=2.0),
    "learned+softcap+untied": dict(logit_softcap=2.0, tie_embeddings=False),
}


def tiny(seed: int = 0, **options) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=32, vocab_size=101, n_layer=2, n_head=2, n_embd=32, **options)).eval()


def naive_greedy(model: GPT, prompt: list[int], n: int) -> list[int]:
    """Reference: one prompt alone, no padding, the whole (cropped) sequence recomputed by forward at every token."""
    idx = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(idx[:, -model.config.block_size :])
            idx = torch.cat((idx, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    return idx[0, len(prompt) :].tolist()


@pytest.mark.parametrize("options", list(OPTIONS))
def test_static_cache_greedy_equals_recomputing_each_prompt_alone(options):
    model = tiny(**OPTIONS[options])
    for prompts in (PROMPTS, OTHER):  # the second batch reuses the first one's cache: stale columns stay hidden
        ref = [naive_greedy(model, p, NEW) for p in prompts]
        assert generate_batch(model, prompts, NEW, temperature=0, decode="eager") == ref
        assert generate_batch(model, prompts, NEW, temperature=0, use_cache=False) == ref
    assert len(model.__dict__["_decoders"]) == 1  # both batches ran on one kept decoder
    # rows of one length, no padding, as model.generate is called for samples during training
    p = PROMPTS[1]
    out = model.generate(torch.tensor([p, p[::-1]]), NEW, temperature=0)
    assert out[:, len(p) :].tolist() == [naive_greedy(model, p, NEW), naive_greedy(model, p[::-1], NEW)]


def left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(p) for p in prompts)
    return torch.tensor([[0] * (T - len(p)) + p for p in prompts]), torch.tensor([T - len(p) for p in prompts])


def test_prefill_logits_are_forwards_last_logits_per_row():
    model = tiny(**OPTIONS["rope+qk_norm+softcap"])
    idx, pad = left_padded(PROMPTS)
    decoder = Decoder(model, len(PROMPTS), 64, torch.float32, "eager")
    with torch.no_grad():
        got = decoder.prefill(idx, pad)
        want = torch.cat([model(torch.tensor([p]))[0][:, -1] for p in PROMPTS])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert got.abs().max() <= 2.0  # the soft-cap is applied


@pytest.mark.parametrize("options", ["learned", "rope"])
def test_fixed_shape_step_uncompiled_equals_recomputation(options):
    """The step as compiled (all max_len columns, masked), run eagerly: unwritten and stale columns stay hidden."""
    model = tiny(**OPTIONS[options])
    decoder = Decoder(model, len(PROMPTS), 32, torch.float32, "eager")
    for prompts in (OTHER, PROMPTS):  # the second batch finds the first one's keys in the cache
        idx, pad = left_padded(prompts)
        decoder.start(pad)
        with torch.no_grad():
            logits = decoder.prefill(idx, pad)
            for _ in range(32 - idx.size(1)):
                idx = torch.cat((idx, logits.argmax(-1, keepdim=True)), dim=1)
                decoder.tok.copy_(idx[:, -1])
                logits = decoder._step(decoder.max_len, True)
                decoder.col += 1
        T = max(len(p) for p in prompts)
        assert idx[:, T:].tolist() == [naive_greedy(model, p, 32 - T) for p in prompts]


def sampled(model, seed: int, **kwargs) -> list[list[int]]:
    return generate_batch(model, PROMPTS, 20, temperature=1.0, top_k=20, top_p=0.9,
                          generator=torch.Generator().manual_seed(seed), **kwargs)


def test_seeded_sampling_reproduces_and_does_not_depend_on_the_cache():
    model = tiny(pos="rope")
    a = sampled(model, 7)
    assert sampled(model, 7) == a
    assert sampled(model, 8) != a
    assert sampled(model, 7, use_cache=False) == a  # same logits, same draws


def test_top_k_1_is_greedy():
    model = tiny()
    greedy = generate_batch(model, PROMPTS, 20, temperature=0)
    for seed in (0, 1):
        g = torch.Generator().manual_seed(seed)
        assert generate_batch(model, PROMPTS, 20, temperature=1.5, top_k=1, generator=g) == greedy


def test_eot_stops_each_row_on_its_own():
    model = tiny()
    free = generate_batch(model, PROMPTS, NEW, temperature=0)
    eot = free[0][3]  # a token row 0 emits at step 3; other rows may emit it at other steps or never
    ends = [row.index(eot) if eot in row else None for row in free]
    idx, pad = left_padded(PROMPTS)
    T = idx.size(1)
    out = model.generate(idx, NEW, temperature=0, eot=eot, pad=pad)[:, T:].tolist()
    steps = NEW if None in ends else max(ends) + 1  # generation stops once every row has emitted eot
    assert all(len(row) == steps for row in out)
    for row, ref, end in zip(out, free, ends, strict=True):
        if end is None:
            assert row == ref[:steps]
        else:  # the row as without eot up to its first eot, then eot only
            assert row == ref[:end] + [eot] * (steps - end)
    assert generate_batch(model, PROMPTS, NEW, temperature=0, eot=eot) == [
        ref[:end] if end is not None else ref for ref, end in zip(free, ends, strict=True)]


def test_bigram_ignores_padding():
    model = BigramLanguageModel(GPTConfig(block_size=8, vocab_size=6))
    with torch.no_grad():  # a chain 0 -> 1 -> 2 -> 3 -> 0
        model.token_embedding_table.weight.fill_(0.0)
        for a, b in [(0, 1), (1, 2), (2, 3), (3, 0)]:
            model.token_embedding_table.weight[a, b] = 50.0
    assert generate_batch(model, [[5, 0], [2]], 3, temperature=0) == [[1, 2, 3], [3, 0, 1]]


def test_cache_reused_across_inference_mode_and_no_grad():
    model = tiny()
    with torch.inference_mode():
        a = generate_batch(model, PROMPTS, 8, temperature=0)
    with torch.no_grad():  # the kept cache was made outside inference mode: writable here too
        assert generate_batch(model, PROMPTS, 8, temperature=0) == a


def test_cache_length_is_a_power_of_two_within_block_size():
    assert [cache_len(n, 1024) for n in (1, 64, 65, 271, 600, 1024, 5000)] == [64, 64, 128, 512, 1024, 1024, 1024]
    assert cache_len(40, 32) == 32


def test_bad_arguments_are_value_errors():
    model = tiny()
    idx = torch.tensor([[0, 1, 2], [0, 0, 3]])
    for pad, message in [(torch.tensor([0, 3]), "pad counts"), (torch.tensor([0]), r"shape \(2,\)"),
                         (torch.tensor([0.0, 1.0]), "long tensor")]:
        with pytest.raises(ValueError, match=message):
            model.generate(idx, 2, pad=pad)
    with pytest.raises(ValueError, match="decode must be one of"):
        model.generate(idx, 2, decode="fast")
    with pytest.raises(ValueError, match="at least one token"):
        generate_batch(model, [[1], []], 2)


def test_compile_failure_falls_back_to_eager_with_one_note(monkeypatch, capsys):
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no backend here\nsecond line")
        return run

    monkeypatch.setattr(generate, "_compile_failure", "")
    monkeypatch.setattr(generate, "_notes", set())
    monkeypatch.setattr(torch, "compile", broken_compile)
    model = tiny(pos="rope")
    ref = [naive_greedy(model, p, 10) for p in PROMPTS]
    assert generate_batch(model, PROMPTS, 10, temperature=0, decode="compile") == ref
    assert generate_batch(model, PROMPTS[:2], 10, temperature=0, decode="cudagraphs") == ref[:2]
    err = capsys.readouterr().err.splitlines()
    assert err == ["note: torch.compile failed: RuntimeError: no backend here; decoding eagerly"]


@pytest.mark.skipif(generate.compile_unsupported("cpu") != "", reason="torch.compile needs a C++ compiler on CPU")
def test_compiled_step_equals_recomputation(monkeypatch):
    """The decode step compiled (inductor's default mode, as on CUDA less the graphs), mixed prompt lengths, rope
    and soft-cap; a second batch of the same shape reuses the compiled step."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(generate, "_compile_failure", "")
    torch._dynamo.reset()
    counters.clear()
    model = tiny(**OPTIONS["rope+qk_norm+softcap"])
    for prompts in (PROMPTS, OTHER):
        ref = [naive_greedy(model, p, NEW) for p in prompts]
        assert generate_batch(model, prompts, NEW, temperature=0, decode="compile") == ref
    assert generate._compile_failure == ""
    (decoder,) = model.__dict__["_decoders"].values()
    assert decoder.compiled is not None and counters["stats"]["unique_graphs"] == 1


def naive_greedy_autocast(model: GPT, prompt: list[int], n: int) -> list[int]:
    with torch.autocast("cpu", torch.bfloat16):
        return naive_greedy(model, prompt, n)


# no soft-cap here: capped to +-2, bf16 logits tie too often for greedy paths of other shapes to agree
@pytest.mark.parametrize("options", [{}, dict(pos="rope", tie_embeddings=False, bias=False)], ids=["gpt2", "untied"])
def test_half_twin_computes_autocast_bit_for_bit_and_follows_weight_updates(options):
    model = tiny(**options)
    keys = list(model.state_dict())
    idx = torch.tensor([PROMPTS[1]])
    twin = generate.build_half_twin(model, torch.bfloat16)
    assert twin.lm_head.weight.dtype == torch.bfloat16 and twin.transformer.wte.weight is model.transformer.wte.weight
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        assert torch.equal(twin(idx)[0], model(idx)[0])  # autocast rounds fp32 weights to these very values
    for _ in range(2):  # the second round after an optimizer-like in-place update of every weight
        ref = [naive_greedy_autocast(model, p, NEW) for p in PROMPTS]
        with torch.autocast("cpu", torch.bfloat16):
            assert generate_batch(model, PROMPTS, NEW, temperature=0, decode="eager") == ref
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p), alpha=0.05)
    assert list(model.state_dict()) == keys  # the twin is not part of the model
    assert len(model.__dict__["_half_twins"]) == 1
    with torch.autocast("cpu", enabled=False):  # fp32: the model decodes itself
        assert generate.half_twin(model, torch.device("cpu")) is model
    with torch.autocast("cpu", torch.bfloat16):  # the decoding device's own autocast decides, on any device
        assert generate.half_twin(model, torch.device("cpu")) is not model
        assert generate.half_twin(model, torch.device("cuda")) is model


@pytest.mark.parametrize("temperature", [1e-40, 1e-50, 5e-324])
def test_tiny_temperature_is_greedy_not_nan(temperature):
    """logits / 1e-40 overflowed to inf, and softmax(inf - inf) is NaN: multinomial refused it."""
    logits = torch.randn(8, 101, generator=torch.Generator().manual_seed(0)) * 5
    for top_k, top_p in ((None, None), (5, None), (None, 0.9)):
        got = generate.sample_next(logits, temperature, top_k, top_p, torch.Generator().manual_seed(1))
        assert torch.equal(got, logits.argmax(dim=-1))


def probs_before_the_shift(logits: torch.Tensor, temperature: float, top_k, top_p) -> torch.Tensor:
    """Reference: sample_next's probabilities as computed before the max was subtracted (logits / temperature)."""
    logits = logits.float() / temperature
    if top_k is not None:
        logits = logits.masked_fill(logits < torch.topk(logits, top_k, dim=-1).values[:, [-1]], float("-inf"))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        p = sorted_logits.softmax(dim=-1)
        drop = (p.cumsum(dim=-1) - p) >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits.softmax(dim=-1)


@pytest.mark.parametrize("temperature", [1.0, 0.8])
@pytest.mark.parametrize("top_k, top_p", [(None, None), (50, None), (None, 0.9), (50, 0.9)])
def test_shift_keeps_probabilities_and_seeded_tokens(monkeypatch, temperature, top_k, top_p):
    logits = torch.randn(64, 1000, generator=torch.Generator().manual_seed(2)) * 4
    seen, multinomial = [], torch.multinomial  # the probabilities sample_next draws from, recorded

    def recording(probs, *args, **kwargs):
        seen.append(probs)
        return multinomial(probs, *args, **kwargs)

    monkeypatch.setattr(torch, "multinomial", recording)
    got = generate.sample_next(logits, temperature, top_k, top_p, torch.Generator().manual_seed(3))
    want = probs_before_the_shift(logits, temperature, top_k, top_p)
    torch.testing.assert_close(seen[0], want, rtol=1e-5, atol=1e-7)
    assert torch.equal(got, multinomial(want, 1, generator=torch.Generator().manual_seed(3)).squeeze(-1))
