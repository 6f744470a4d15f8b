"""GPT-2, exactly as OpenAI's, in one file, plus the lecture's bigram baseline.

References:
1) OpenAI's GPT-2 TensorFlow implementation and the Hugging Face `transformers` one (same parameter names).
2) "Language Models are Unsupervised Multitask Learners" (GPT-2) and "Attention Is All You Need".
"""

from __future__ import annotations

import inspect
import math
import pickle
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn import functional as F

from tokenizer import Tokenizer, get_tokenizer, tokenizer_from_dict

HF_MODELS = {
    # name: (n_layer, n_head, n_embd); all have vocab 50257 and 1024 positions
    "gpt2": (12, 12, 768),  # 124M
    "gpt2-medium": (24, 16, 1024),  # 350M
    "gpt2-large": (36, 20, 1280),  # 774M
    "gpt2-xl": (48, 25, 1600),  # 1558M
}


@dataclass
class GPTConfig:
    block_size: int = 1024  # context length
    vocab_size: int = 50257  # 50,000 BPE merges + 256 bytes + <|endoftext|>
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm, as GPT-2


class KVCache:
    """Keys and values of every layer, preallocated for `max_len` positions, filled left to right."""

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device, dtype) -> None:
        hd = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_head, max_len, hd)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.pos = 0  # positions filled so far (all layers)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys/values for `layer`; return all keys/values up to and including them."""
        end = self.pos + k.size(2)
        self.k[layer, :, :, self.pos : end] = k
        self.v[layer, :, :, self.pos : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        # query, key, value projections for all heads in one matmul, as GPT-2's c_attn
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout

    def forward(
        self, x: torch.Tensor, kv_cache: KVCache | None = None, layer: int = 0, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # (B, T, C) -> (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        mask, is_causal = None, T > 1
        if kv_cache is not None:
            past = kv_cache.pos
            k, v = kv_cache.update(layer, k, v)
            if past > 0 and T > 1:
                # new queries see the whole cached prefix plus the causal part of themselves
                mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
                is_causal = False
            elif past > 0:
                is_causal = False  # one new query attends to every cached key
        if attn_mask is not None:  # the caller's own pattern (e.g. several sequences packed in one row)
            mask, is_causal = attn_mask, False
        # flash attention where the backend has it
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=is_causal
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2 used the tanh approximation
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm Transformer block: the residual stream is never normalised, only its inputs."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, kv_cache: KVCache | None = None, layer: int = 0, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache, layer, attn_mask)
        return x + self.mlp(self.ln_2(x))


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
    logits = logits.float() / temperature
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


class LanguageModel(nn.Module):
    """What GPT and the bigram baseline share: sampling and the optimizer set-up."""

    config: GPTConfig

    def next_logits(self, idx: torch.Tensor, state: dict) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def generate_stream(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        eot: int | None = None,
        vocab_size: int | None = None,
        use_cache: bool = True,
    ) -> Iterator[torch.Tensor]:
        """Yield the next token of every row (B,), `max_new_tokens` times or until every row has hit `eot`.

        `vocab_size` restricts sampling to the tokenizer's ids when the model's vocab is padded.
        Rows that have finished keep yielding `eot`.
        """
        state: dict = {"use_cache": use_cache}
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            logits = self.next_logits(idx, state)
            if vocab_size is not None:
                logits = logits[:, :vocab_size]
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            if eot is not None:
                nxt = nxt.masked_fill(done, eot)
                done |= nxt == eot
            idx = torch.cat((idx, nxt[:, None]), dim=1)
            yield nxt
            if eot is not None and bool(done.all()):
                return

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
        """`idx` (B, T) extended by up to `max_new_tokens` sampled tokens; see `generate_stream`."""
        new = list(self.generate_stream(idx, max_new_tokens, **kwargs))
        return torch.cat([idx] + [t[:, None] for t in new], dim=1)

    def configure_optimizers(
        self,
        weight_decay: float,
        learning_rate: float,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        device_type: str = "cpu",
        verbose: bool = True,
    ) -> torch.optim.AdamW:
        """AdamW that decays matrices and embeddings (≥2-D) but not biases and LayerNorm gains."""
        params = [p for p in self.parameters() if p.requires_grad]  # tied weights appear once
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        # the fused kernel is one launch for all parameters: much faster on CUDA and on CPU
        fused = "fused" in inspect.signature(torch.optim.AdamW).parameters and device_type in ("cuda", "cpu")
        if verbose:
            print(
                f"decayed tensors: {len(decay)}, {sum(p.numel() for p in decay):,} parameters; "
                f"not decayed: {len(no_decay)}, {sum(p.numel() for p in no_decay):,} parameters; "
                f"fused AdamW: {fused}"
            )
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, fused=fused or None)


class GPT(LanguageModel):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying: the output projection is the token embedding (GPT-2 does this; saves 38M params)
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # residual projections add into the stream once per sublayer: scale so its variance stays ~1
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def hidden_states(
        self,
        idx: torch.Tensor,
        kv_cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-LayerNorm output (B, T, n_embd) for tokens `idx` at positions following the cache.

        `positions` (B, T) and a boolean `attn_mask` (B, 1, T, T; True = may attend) replace the default
        0, 1, ... positions and causal mask, e.g. for several sequences packed into one row; the caller keeps
        every position below block_size.
        """
        B, T = idx.size()
        start = kv_cache.pos if kv_cache is not None else 0
        if positions is None and start + T > self.config.block_size:
            raise ValueError(
                f"sequence of {start + T} tokens is longer than the model's block_size {self.config.block_size}"
            )
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device) if positions is None else positions
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for i, block in enumerate(self.transformer.h):
            x = block(x, kv_cache, i, attn_mask)
        if kv_cache is not None:
            kv_cache.pos += T
        return self.transformer.ln_f(x)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, vocab) and, given targets (B, T; -1 = ignore), the mean cross-entropy."""
        logits = self.lm_head(self.hidden_states(idx))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def next_logits(self, idx: torch.Tensor, state: dict) -> torch.Tensor:
        """Last-position logits; with the KV cache only the new token is run through the model."""
        T = idx.size(1)
        if state["use_cache"] and T <= self.config.block_size:
            cache = state.get("cache")
            if cache is None:  # first call: room for the prompt and all it can grow to
                cache = KVCache(self.config, idx.size(0), self.config.block_size, idx.device,
                                self.lm_head.weight.dtype)
                state["cache"] = cache
            x = self.hidden_states(idx[:, cache.pos :], cache)
        else:
            # past block_size the absolute positions of every token shift: recompute the cropped window
            x = self.hidden_states(idx[:, -self.config.block_size :])
        return self.lm_head(x[:, -1, :])

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (tied weights once); `non_embedding` leaves out the position embeddings."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6N for the matmuls plus 12·L·d·T for attention scores (PaLM app. B)."""
        cfg, T = self.config, seq_len or self.config.block_size
        return 6 * self.num_params(non_embedding=True) + 12 * cfg.n_layer * cfg.n_embd * T

    @classmethod
    def from_pretrained(cls, name_or_dir: str) -> GPT:
        """OpenAI's GPT-2 weights (`gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl`) or a local HF directory."""
        from transformers import GPT2LMHeadModel

        try:
            hf = GPT2LMHeadModel.from_pretrained(name_or_dir)
        except OSError as e:
            raise ValueError(f"could not load Hugging Face GPT-2 {name_or_dir!r}: {str(e).splitlines()[0]}") from None
        except pickle.UnpicklingError as e:  # a pytorch_model.bin refused by weights_only loading
            from checkpoint import refused_object

            raise ValueError(f"{name_or_dir}: refused, its weights file holds pickled objects other than tensors "
                             f"({refused_object(str(e))}); use safetensors weights from a source you trust") from None
        c = hf.config
        config = GPTConfig(block_size=c.n_positions, vocab_size=c.vocab_size, n_layer=c.n_layer,
                           n_head=c.n_head, n_embd=c.n_embd, bias=True)
        model = cls(config)
        model.load_hf_state_dict(hf.state_dict(), source=name_or_dir)
        return model

    def load_hf_state_dict(self, hf_sd: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Copy a `transformers` GPT2LMHeadModel state dict in, transposing its Conv1D weights."""
        # HF's Conv1D stores weights as (in, out); nn.Linear wants (out, in)
        transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        hf_sd = {k: v for k, v in hf_sd.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
        sd = self.state_dict()
        missing = sorted(set(sd) - set(hf_sd))
        if missing:
            raise ValueError(f"{source} has no {missing[0]} (and {len(missing) - 1} more); not a GPT-2 checkpoint")
        with torch.no_grad():
            for k, dst in sd.items():
                src = hf_sd[k].t() if k.endswith(transposed) else hf_sd[k]
                if src.shape != dst.shape:
                    raise ValueError(f"{source}: {k} has shape {tuple(src.shape)}, this model expects "
                                     f"{tuple(dst.shape)}")
                dst.copy_(src)

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str = "cpu") -> tuple[LanguageModel, Tokenizer]:
        """Rebuild the model saved by `train_gpt2.py` and the tokenizer it was trained with."""
        from checkpoint import load_checkpoint

        ckpt = load_checkpoint(path, map_location=map_location)
        return model_from_checkpoint(ckpt, str(path)), tokenizer_from_dict(ckpt["tokenizer"])


class BigramLanguageModel(LanguageModel):
    """The lecture's baseline: the next token depends only on the current one (a V×V table of logits)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding_table = nn.Embedding(config.vocab_size, config.vocab_size)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = self.token_embedding_table(idx)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def next_logits(self, idx: torch.Tensor, state: dict) -> torch.Tensor:
        return self.token_embedding_table(idx[:, -1])

    def flops_per_token(self, seq_len: int | None = None) -> float:
        return 6.0 * self.config.vocab_size  # one row lookup, a softmax over V: nominal


MODEL_TYPES = {"gpt": GPT, "bigram": BigramLanguageModel}


def model_type_of(model: LanguageModel) -> str:
    return next(k for k, v in MODEL_TYPES.items() if isinstance(model, v))


def clean_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same state dict without the `_orig_mod.` (torch.compile) and `module.` (DDP) prefixes."""
    return {k.replace("_orig_mod.", "").removeprefix("module."): v for k, v in sd.items()}


def clean_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict of a possibly compiled or DDP-wrapped model under the plain module's names."""
    return clean_keys(model.state_dict())


def model_from_checkpoint(ckpt: dict, source: str = "checkpoint") -> LanguageModel:
    """Build the model a checkpoint dict describes and load its weights, with a clear error on mismatch."""
    config = GPTConfig(**ckpt["model_config"])
    model = MODEL_TYPES[ckpt.get("model_type", "gpt")](config)
    sd = clean_keys(ckpt["model"])
    expected = model.state_dict()
    for k, v in expected.items():
        if k not in sd:
            raise ValueError(f"{source}: weights lack {k}; the file does not match its own model config")
        if sd[k].shape != v.shape:
            raise ValueError(f"{source}: {k} has shape {tuple(sd[k].shape)}, config says {tuple(v.shape)}")
    model.load_state_dict(sd, strict=False)
    return model


def model_checkpoint_fields(model: LanguageModel, tokenizer: Tokenizer) -> dict:
    """The part of a checkpoint that says what the model is: weights, config, type and tokenizer."""
    return {
        "model": clean_state_dict(model),
        "model_config": asdict(model.config),
        "model_type": model_type_of(model),
        "tokenizer": tokenizer.to_dict(),
    }


def load_model(spec: str, map_location: str = "cpu") -> tuple[LanguageModel, Tokenizer]:
    """`gpt2`-family name, a local Hugging Face directory, or one of our checkpoint files."""
    from checkpoint import latest_checkpoint

    path = Path(spec)
    # a run dir has a config.json too (the training config): its checkpoints decide
    is_run_dir = path.is_dir() and latest_checkpoint(path) is not None
    if spec in HF_MODELS or (path.is_dir() and (path / "config.json").exists() and not is_run_dir):
        return GPT.from_pretrained(spec), get_tokenizer("gpt2")
    if path.is_dir():
        newest = latest_checkpoint(path)
        if newest is None:
            raise ValueError(f"{spec}: neither a HF model dir (config.json) nor a run dir with ckpt_*.pt files")
        path = newest
    if path.exists():
        return GPT.from_checkpoint(path, map_location=map_location)
    raise ValueError(f"{spec}: no such file; use one of {', '.join(HF_MODELS)}, a HF model dir or a checkpoint")
