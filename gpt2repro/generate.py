"""Generation: picking the next token from logits, and decoding batches of prompts with a static KV cache.

Prompts of different lengths share a batch left-padded: row b's tokens start at column pad[b], its positions count
from there (learned and rotary positions alike) and a key mask hides the padding. The prompts run once (prefill,
eager), then each step feeds one token of every row. A step has fixed shapes (the cache is preallocated, the mask
covers all of it, the column to write is a tensor), so on CUDA it is compiled into one CUDA graph: a replay per token
instead of hundreds of kernel launches and their Python. Sampling runs on the step's logits outside the graph,
exactly as without the cache.

Decode paths (`decode=`): "cudagraphs" (torch.compile mode "reduce-overhead"), "compile" (torch.compile's default
mode: fused kernels, no graphs; how CPU tests exercise the compiled step), "eager" (the same step, not compiled), and
"auto": cudagraphs on CUDA, eager elsewhere (on CPU the compiled step is no faster and costs a long compile; see
bench/generate.py). When torch.compile cannot build the step, decoding goes on eagerly after a one-line note.

Under bf16/fp16 autocast, decoding reads a half-precision copy of the linear layers' weights (`half_twin`) instead
of letting autocast cast every fp32 matrix at every token: the same products bit for bit (autocast rounds them to
the same values), a third of the bytes read per token and, in a CUDA graph, no cast kernels (bench/generate.py
measures it).

model.py imports this module (for `GPT.generate`), never the other way round: here a model is any module with
GPT's `hidden_states`, `logits` and `next_logits` (or the bigram's `next_logits` alone).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from gpt2repro.devices import compile_cached, compile_unsupported
from gpt2repro.errors import first_line

DECODE_PATHS = ("auto", "eager", "compile", "cudagraphs")
COMPILE_MODES = {"compile": "default", "cudagraphs": "reduce-overhead"}
MIN_CACHE_LEN = 64  # cache lengths are powers of two from here to block_size: few shapes, so few graphs
POOL_SIZE = 4  # decoders (caches and compiled steps) kept per model for the next call of the same shape
_notes: set[str] = set()  # notes already printed
_compile_failure = ""  # why torch.compile failed on the decode step; from then on every decoder is eager


class Sizes(Protocol):
    """What a cache needs of a GPTConfig."""

    n_layer: int
    n_head: int
    n_embd: int


# what a cache gives attention: all keys, all values, the boolean mask (True = attend) or None, and is_causal
CachedKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool]


@dataclass
class StaticKVCache:
    """Keys and values in tensors of fixed shape (B, n_head, max_len, head_size), one per layer, written at the
    given columns, with the mask saying which columns each query sees: the shapes never change, so a decode step
    can be one CUDA graph. Rows may be left-padded; the mask hides the padding."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    cols: torch.Tensor  # (T,) the columns this step's keys/values go to
    mask: torch.Tensor | None  # (B, 1, T, width), True = attend; None: T > 1 queries fill [0, T) causally, one sees all
    width: int  # attention reads columns [0, width)

    @staticmethod
    def allocate(config: Sizes, batch_size: int, max_len: int, device, dtype) -> tuple[list, list]:
        """Zeroed key and value tensors per layer: never-written columns are masked, but must not be NaN
        (attention weight 0 times NaN is NaN)."""
        shape = (batch_size, config.n_head, max_len, config.n_embd // config.n_head)
        new = lambda: [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        return new(), new()

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> CachedKV:
        """Write layer `layer`'s new keys and values (B, n_head, T, head_size); what its attention reads."""
        k_all, v_all = self.k[layer], self.v[layer]
        k_all[:, :, self.cols] = k.to(k_all.dtype)
        v_all[:, :, self.cols] = v.to(v_all.dtype)
        # without a mask, T > 1 new queries fill columns [0, T) causally; one new query sees every column
        return k_all[:, :, : self.width], v_all[:, :, : self.width], self.mask, self.mask is None and k.size(2) > 1


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick the next token (B,) from last-position logits (B, V); temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    # the largest logit shifted to 0 first (softmax does the same): a tiny temperature then sends the others to
    # -inf instead of inf - inf = NaN; below fp32's smallest normal it would round to 0, and 0/0 is NaN again
    logits = logits.float()
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / max(temperature, torch.finfo(torch.float32).tiny)
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the tokens before it already cover top_p; the first always stays
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def note_once(text: str) -> None:
    if text not in _notes:
        _notes.add(text)
        print(f"note: {text}", file=sys.stderr, flush=True)


def decode_path(decode: str, device: torch.device) -> str:
    """The path `decode` (one of DECODE_PATHS) means on `device`: "auto" resolved, and "eager" where torch.compile
    cannot work."""
    if decode == "auto":
        decode = "cudagraphs" if device.type == "cuda" else "eager"
    if decode == "eager" or _compile_failure:  # a failure has had its note
        return "eager"
    why = compile_unsupported(device.type)
    if why:
        note_once(f"the decode step is not compiled ({why}); decoding eagerly")
        return "eager"
    return decode


def cache_len(needed: int, block_size: int) -> int:
    """Columns to preallocate for `needed`: the next power of two (at least MIN_CACHE_LEN), at most block_size."""
    return min(block_size, max(MIN_CACHE_LEN, 1 << (needed - 1).bit_length()))


def last_logits(model: nn.Module, idx: torch.Tensor, pos: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
    """Logits (B, vocab) at the last column of `idx` (B, T) at positions `pos` (B, T), keys and values going
    through `cache`."""
    return model.logits(model.hidden_states(idx, cache, pos)[:, -1])


class Decoder:
    """One batch shape's static KV cache and the steps that fill it: the prompts (prefill), then a token per row.

    Reused from call to call (`checkout`): a compiled step and its CUDA graph belong to these very tensors.
    """

    def __init__(self, model: nn.Module, batch_size: int, max_len: int, dtype: torch.dtype, path: str) -> None:
        device = model.lm_head.weight.device
        self.model, self.max_len, self.path = model, max_len, path
        self.key = pool_key(batch_size, max_len, dtype, path, device)
        with torch.inference_mode(False):  # plain tensors: written in and out of inference mode alike
            self.k, self.v = StaticKVCache.allocate(model.config, batch_size, max_len, device, dtype)
            self.pad = torch.zeros(batch_size, dtype=torch.long, device=device)  # padding columns of each row
            self.col_t = torch.zeros(1, dtype=torch.long, device=device)  # the column the next step writes
            self.tok = torch.zeros(batch_size, dtype=torch.long, device=device)  # the token the next step feeds
        for t in (*self.k, *self.v, self.pad, self.col_t, self.tok):
            torch._dynamo.mark_static_address(t)  # a CUDA graph reads and writes them where they are, no copies
        self.col = 0  # col_t in Python
        self.prompt_pad: torch.Tensor | None = None  # this call's padding (None: none)
        self.compiled = None
        if path != "eager":
            self.compiled = compile_cached(self._step, mode=COMPILE_MODES[path], fullgraph=True, dynamic=False)

    def start(self, pad: torch.Tensor | None) -> None:
        """Begin a new batch of prompts, row b's first pad[b] columns being padding."""
        self.col, self.prompt_pad = 0, pad

    def next_logits(self, idx: torch.Tensor, use_cache: bool = True) -> torch.Tensor:
        """Logits after `idx` (B, T): this call's prompts followed by every token generated since."""
        T, block_size = idx.size(1), self.model.config.block_size
        if use_cache and T <= block_size:
            return self.prefill(idx, self.prompt_pad) if self.col == 0 else self.step(idx[:, -1])
        # without the cache, or past block_size (positions shift): recompute the last block_size columns
        cut = max(T - block_size, 0)
        pad = None if self.prompt_pad is None else (self.prompt_pad - cut).clamp(min=0)
        return self.prefill(idx[:, cut:], pad)

    def prefill(self, idx: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
        """Run the left-padded prompts `idx` (B, T) into the cache's first T columns; their last logits."""
        T, device = idx.size(1), idx.device
        cols = torch.arange(T, device=device)
        pos, mask = cols, None  # no padding: causal attention over columns 0..T-1
        if pad is not None:
            real = (cols >= pad[:, None])[:, None, :]  # (B, 1, T): which keys are tokens
            causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
            # a padding query sees only itself: its output is never used, but must stay finite
            mask = (causal & (real | torch.eye(T, dtype=torch.bool, device=device))).unsqueeze(1)
            pos = (cols - pad[:, None]).clamp(min=0)
        logits = last_logits(self.model, idx, pos, StaticKVCache(self.k, self.v, cols, mask, T))
        if pad is None:
            self.pad.zero_()
        else:
            self.pad.copy_(pad)
        self.col = T
        self.col_t.fill_(T)
        return logits

    def step(self, tok: torch.Tensor) -> torch.Tensor:
        """Logits after one more token of every row (B,), written at the next column."""
        self.tok.copy_(tok)  # the step's input lives at a fixed address, whatever the layout of `tok`
        if self.compiled is not None:
            try:
                if self.path == "cudagraphs":
                    torch.compiler.cudagraph_mark_step_begin()  # each call is a new iteration: no pending outputs
                # the graph rewrites its output buffer at the next replay: keep a copy
                logits = self.compiled(self.max_len, True).clone()
                self.col += 1
                return logits
            except Exception as e:  # compilation (or a graph) failed: the eager step computes the same
                global _compile_failure
                _compile_failure = f"torch.compile failed: {type(e).__name__}: {first_line(e)}"
                note_once(f"{_compile_failure}; decoding eagerly")
                self.compiled = None
                self.col_t.fill_(self.col)
        # eager, shapes need not be fixed: read only the columns written so far, and mask only padding
        logits = self._step(self.col + 1, self.prompt_pad is not None)
        self.col += 1
        return logits

    def _step(self, width: int, masked: bool) -> torch.Tensor:
        """The decode step proper, reading the first `width` columns, `masked` if some of them are padding or not
        yet written. Compiled (and captured as a CUDA graph) with width max_len, every input at a fixed address."""
        mask = None
        if masked:  # row b sees its own tokens, from column pad[b] up to and including the one written now
            keys = torch.arange(width, device=self.tok.device)
            mask = ((keys >= self.pad[:, None]) & (keys <= self.col_t))[:, None, None, :]
        pos = (self.col_t - self.pad)[:, None]  # (B, 1): each row counts positions from its first token
        cache = StaticKVCache(self.k, self.v, self.col_t, mask, width)
        logits = last_logits(self.model, self.tok[:, None], pos, cache)
        self.col_t.add_(1)
        return logits


def pool_key(batch_size: int, max_len: int, dtype: torch.dtype, path: str, device: torch.device) -> tuple:
    return batch_size, max_len, dtype, path, device


def checkout(model: nn.Module, batch_size: int, needed: int, dtype: torch.dtype, path: str) -> Decoder:
    """A decoder for `batch_size` rows of up to `needed` columns: a kept one of the same shape, else a new one.
    It is taken out of the pool while in use, so two generations at once never share a cache."""
    max_len = cache_len(needed, model.config.block_size)
    pool: dict = model.__dict__.setdefault("_decoders", {})
    decoder = pool.pop(pool_key(batch_size, max_len, dtype, path, model.lm_head.weight.device), None)
    return decoder if decoder is not None else Decoder(model, batch_size, max_len, dtype, path)


def checkin(model: nn.Module, decoder: Decoder) -> None:
    pool: dict = model.__dict__.setdefault("_decoders", {})
    pool[decoder.key] = decoder
    while len(pool) > POOL_SIZE:
        pool.pop(next(iter(pool)))  # the oldest


def cache_dtype(model: nn.Module, device: torch.device) -> torch.dtype:
    """What keys and values come out as: autocast's precision when it is on, else the weights'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return model.lm_head.weight.dtype


def build_half_twin(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A GPT sharing `model`'s embeddings, norms and buffers, with its own `dtype` copy of every linear layer's
    weights (the tied head gets its own copy; the embedding stays the model's). Not a submodule of `model`."""
    with torch.device("meta"):  # the structure only: every tensor is replaced below
        twin = type(model)(model.config)
    for name, module in twin.named_modules():
        source = model.get_submodule(name)
        for key, w in source._parameters.items():
            if w is not None and isinstance(module, nn.Linear):
                w = nn.Parameter(w.detach().to(dtype), requires_grad=False)
            module._parameters[key] = w
        module._buffers.update(source._buffers)
    return twin.eval()


def half_twin(model: nn.Module, device: torch.device) -> nn.Module:
    """What decodes `model` on `device`: under half-precision autocast, its half-precision twin (kept with the
    model, refreshed when its weights changed in place, as training does); otherwise the model itself."""
    if not torch.is_autocast_enabled(device.type) or model.lm_head.weight.dtype != torch.float32:
        return model
    dtype = torch.get_autocast_dtype(device.type)
    if dtype == torch.float32:
        return model
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    # in-place updates bump _version; a moved or reassigned tensor has another address
    version = tuple((w._version, w.data_ptr()) for _, m in linears for w in (m.weight, m.bias) if w is not None)
    twins: dict = model.__dict__.setdefault("_half_twins", {})
    kept = twins.get(dtype)
    if kept is None:
        twins[dtype] = kept = (build_half_twin(model, dtype), version)
    elif kept[1] != version:  # copied in place: a compiled step keeps reading the same tensors
        with torch.no_grad():
            for name, m in linears:
                twin_linear = kept[0].get_submodule(name)
                twin_linear.weight.copy_(m.weight)
                if m.bias is not None:
                    twin_linear.bias.copy_(m.bias)
        twins[dtype] = kept = (kept[0], version)
    return kept[0]


def check_pad(pad: torch.Tensor, idx: torch.Tensor) -> None:
    if pad.shape != (idx.size(0),) or pad.dtype != torch.long or pad.device != idx.device:
        raise ValueError(f"pad must be a long tensor of shape ({idx.size(0)},) on {idx.device}, one count per row; "
                         f"got {pad.dtype} {tuple(pad.shape)} on {pad.device}")
    if pad.numel() and not bool(((pad >= 0) & (pad < idx.size(1))).all()):
        raise ValueError(f"pad counts must be in [0, {idx.size(1) - 1}]: every row needs at least one token")


@torch.no_grad()
def generate_stream(
    model: nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    eot: int | None = None,
    vocab_size: int | None = None,
    use_cache: bool = True,
    pad: torch.Tensor | None = None,
    decode: str = "auto",
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row (B,), `max_new_tokens` times or until every row has hit `eot`.

    `vocab_size` restricts sampling to the tokenizer's ids when the model's vocab is padded. Rows that have finished
    keep yielding `eot`. `pad` (B,) says how many columns at the start of each row of `idx` are padding (prompts of
    different lengths, right-aligned); `decode` picks the path (see the module's doc). `use_cache=False` recomputes
    the whole context at every token.
    """
    decoder = None
    if decode not in DECODE_PATHS:
        raise ValueError(f"decode must be one of {', '.join(DECODE_PATHS)}; got {decode!r}")
    # a GPT (its class has hidden states to cache); the bigram model looks at the last token only
    if hasattr(type(model), "hidden_states"):
        model = half_twin(model, idx.device)
        if pad is not None:
            check_pad(pad, idx)
        if (use_cache or pad is not None) and max_new_tokens > 0:
            needed = idx.size(1) + max_new_tokens - 1  # the last token is never fed back
            path = decode_path(decode, idx.device) if use_cache else "eager"
            decoder = checkout(model, idx.size(0), needed, cache_dtype(model, idx.device), path)
            decoder.start(pad)
    done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    try:
        for i in range(max_new_tokens):
            logits = model.next_logits(idx) if decoder is None else decoder.next_logits(idx, use_cache)
            # did the last token end every row? Asked only now, with the next step queued: on an asynchronous
            # device (CUDA) the host waits for the answer while the device works, never the other way round
            if i and eot is not None and bool(done.all()):
                return
            if vocab_size is not None:
                logits = logits[:, :vocab_size]
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            if eot is not None:
                nxt = nxt.masked_fill(done, eot)
                done |= nxt == eot
            idx = torch.cat((idx, nxt[:, None]), dim=1)
            yield nxt
    finally:
        if decoder is not None:
            checkin(model, decoder)


@torch.no_grad()
def generate(model: nn.Module, idx: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
    """`idx` (B, T) extended by up to `max_new_tokens` sampled tokens; see `generate_stream`."""
    new = list(generate_stream(model, idx, max_new_tokens, **kwargs))
    return torch.cat([idx] + [t[:, None] for t in new], dim=1)


def generate_batch(model: nn.Module, prompts: list[list[int]], max_new_tokens: int, **kwargs) -> list[list[int]]:
    """The new tokens of each prompt (token lists of any lengths, each at least one token), generated as one
    left-padded batch; a row ends before its first `eot` when `eot` is given."""
    if not prompts or not all(prompts):
        raise ValueError("generate_batch needs at least one prompt, and at least one token in each")
    T, device = max(len(p) for p in prompts), next(model.parameters()).device
    # right-aligned; the padding id (0) is never seen: it is masked
    idx = torch.tensor([[0] * (T - len(p)) + list(p) for p in prompts], dtype=torch.long, device=device)
    pad = torch.tensor([T - len(p) for p in prompts], dtype=torch.long, device=device)
    out = generate(model, idx, max_new_tokens, pad=pad, **kwargs)[:, T:].tolist()
    eot = kwargs.get("eot")
    return [row[: row.index(eot)] if eot in row else row for row in out]
