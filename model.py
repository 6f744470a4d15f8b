"""GPT-2, exactly as OpenAI's, in one file, and the lecture's bigram baseline.

Read from the top: GPTConfig, the attention, the MLP, the Block and the GPT built from them. After GPT, a section of
later practice (rotary positions, RMSNorm, relu², QK-norm, logit soft-capping; GPTConfig also offers an untied head
and zero-initialised projections), each option off by default; the bigram baseline comes last. Decoding with a KV
cache lives in gpt2repro/generate.py, the chunked loss in gpt2repro/loss.py, the checks for loading a Hugging Face
directory in gpt2repro/checkpoint.py.

References:
1) OpenAI's GPT-2 TensorFlow implementation and the Hugging Face `transformers` one (same parameter names).
2) "Language Models are Unsupervised Multitask Learners" (GPT-2) and "Attention Is All You Need".
3) RoFormer (rotary embeddings); nanochat and the modded-nanogpt speedrun for the other options.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

import gpt2repro.generate as generation
from gpt2repro.gpt2_sizes import HF_MODELS
from gpt2repro.loss import linear_cross_entropy
from gpt2repro.muon import CombinedOptimizer, Muon


@dataclass
class GPTConfig:
    block_size: int = 1024  # context length
    vocab_size: int = 50257  # 50,000 BPE merges + 256 bytes + <|endoftext|>
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm, as GPT-2
    # later practice (its section below); each default is GPT-2's
    # learned: absolute position table wpe; rope: rotary q/k, no wpe. Either way a forward pass covers at most
    # block_size positions; generation past it slides a window over the last block_size tokens (see next_logits)
    pos: str = "learned"
    norm: str = "layernorm"  # layernorm (with gain, and bias if `bias`); rmsnorm: parameter-free RMSNorm
    mlp: str = "gelu"  # gelu (tanh approximation); relu2: relu(x)**2
    qk_norm: bool = False  # parameter-free RMSNorm of each head's queries and keys
    tie_embeddings: bool = True  # lm_head shares wte's weight
    logit_softcap: float = 0.0  # > 0: logits = c * tanh(logits / c); 0 = off
    zero_init: bool = False  # residual output projections (c_proj) start at zero

    def __post_init__(self) -> None:
        for field, allowed in CONFIG_CHOICES.items():
            if getattr(self, field) not in allowed:
                raise ValueError(f"GPTConfig.{field} must be one of {', '.join(allowed)}; got {getattr(self, field)!r}")
        if not self.logit_softcap >= 0:  # also refuses NaN
            raise ValueError(f"GPTConfig.logit_softcap must be >= 0 (0 = off); got {self.logit_softcap}")
        if self.pos == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"GPTConfig.pos 'rope' needs an even head size; n_embd/n_head is "
                             f"{self.n_embd // self.n_head}, change n_embd or n_head")


# the allowed values of GPTConfig's string options, first the GPT-2 default
CONFIG_CHOICES = {"pos": ("learned", "rope"), "norm": ("layernorm", "rmsnorm"), "mlp": ("gelu", "relu2")}


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, is_causal: bool = True,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """The lecture's attention written out, softmax(q·kᵀ/√d)·v for q (B, nh, T, hs) and k, v (B, nh, S, hs):
    `is_causal`, query t sees keys 0..t; else `mask` (True = attend) says which keys, None all of them.
    CausalSelfAttention computes the same with F.scaled_dot_product_attention (one fused kernel)."""
    att = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, nh, T, S): how much query t attends to key s
    if is_causal:  # no token sees the future
        mask = torch.ones(att.shape[-2:], dtype=torch.bool, device=att.device).tril()
    if mask is not None:
        att = att.masked_fill(~mask, float("-inf"))
    att = att.softmax(dim=-1)
    if dropout_p > 0:
        att = F.dropout(att, dropout_p)
    return att @ v  # each query's weighted average of the values


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int = 0) -> None:
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        # query, key, value projections for all heads in one matmul, as GPT-2's c_attn
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.qk_norm = config.qk_norm
        self.layer_idx = layer_idx  # which layer of a KV cache holds this one's keys and values
        self.reference = False  # True: attention_reference instead of SDPA (tests hold the two equal)

    def forward(
        self,
        x: torch.Tensor,
        rope: RopeAngles | None = None,
        kv_cache: generation.StaticKVCache | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`rope`: the positions' rotary angles (later practice); `kv_cache`: earlier positions' keys and values
        (decoding, generate.py); `attn_mask` (True = may attend): another pattern than causal."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # (B, T, C) -> (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if rope is not None:  # before caching: cached keys keep the rotation of their own position
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if self.qk_norm:  # a rotation keeps the norm, so the order with rope does not matter
            q, k = rms_norm(q), rms_norm(k)
        mask, is_causal = None, T > 1
        if kv_cache is not None:
            k, v, mask, is_causal = kv_cache.update(self.layer_idx, k, v)
        if attn_mask is not None:  # the caller's own pattern (e.g. several sequences packed in one row)
            mask, is_causal = attn_mask, False
        dropout_p = self.dropout if self.training else 0.0
        if self.reference:
            y = attention_reference(q, k, v, mask, is_causal, dropout_p)
        else:  # the same in one fused kernel: flash attention where the backend has it
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        # GPT-2 used GELU's tanh approximation; relu² (later practice) is cheaper and sparser
        self.act = nn.GELU(approximate="tanh") if config.mlp == "gelu" else ReLU2()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm Transformer block: the residual stream is never normalised, only its inputs."""

    def __init__(self, config: GPTConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rope: RopeAngles | None = None, kv_cache: generation.StaticKVCache | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope, kv_cache, attn_mask)  # tokens exchange information
        return x + self.mlp(self.ln_2(x))  # then each token computes on its own


class LanguageModel(nn.Module):
    """What GPT and the bigram baseline share: sampling and the optimizer set-up."""

    config: GPTConfig

    def next_logits(self, idx: torch.Tensor) -> torch.Tensor:
        """Last-position logits (B, vocab) of `idx` (B, T), computed from the tokens alone (no cache)."""
        raise NotImplementedError

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
        """`idx` (B, T) extended by up to `max_new_tokens` sampled tokens, one at a time: the logits of the last
        position (next_logits), a token sampled from their softmax, appended. The loop, its settings and the KV cache
        that saves recomputing earlier positions are in gpt2repro/generate.py (`generate_stream`)."""
        return generation.generate(self, idx, max_new_tokens, **kwargs)

    @torch.no_grad()
    def generate_stream(self, idx: torch.Tensor, max_new_tokens: int, **kwargs) -> Iterator[torch.Tensor]:
        """Yield the next token of every row (B,), `max_new_tokens` times or until every row has hit `eot`;
        see `gpt2repro.generate.generate_stream` for the sampling settings."""
        yield from generation.generate_stream(self, idx, max_new_tokens, **kwargs)

    def configure_optimizers(
        self,
        weight_decay: float,
        learning_rate: float,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        device_type: str = "cpu",
        verbose: bool = True,
        optimizer: str = "adamw",
        muon_lr: float = 0.02,
        muon_momentum: float = 0.95,
        muon_weight_decay: float = 0.0,
        muon_ns_dtype: torch.dtype | None = None,
    ) -> torch.optim.AdamW | CombinedOptimizer:
        """AdamW that decays matrices and embeddings (≥2-D) but not biases and LayerNorm gains; with `optimizer`
        "muon", Muon (`muon_*` settings; `muon_ns_dtype` the dtype of its Newton–Schulz iteration) takes the
        blocks' matrices and that AdamW keeps the rest.

        Every group carries "lr_scale", its peak LR over `learning_rate` (1 for AdamW's groups): a schedule
        computed for `learning_rate` sets each group["lr"] = lr * group["lr_scale"].
        """
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {optimizer!r}")
        if not learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0 (the LR schedule scales from it); got {learning_rate}")
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]  # tied weights appear once
        hidden = [(n, p) for n, p in named if optimizer == "muon" and is_hidden_matrix(n, p)]
        if optimizer == "muon" and not hidden:
            raise ValueError(f"optimizer 'muon': a {type(self).__name__} has no hidden matrices; use adamw")
        hidden_ids = {id(p) for _, p in hidden}
        params = [p for _, p in named if id(p) not in hidden_ids]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [
            {"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
            {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0},
        ]
        # the fused kernel is one launch for all parameters: much faster on CUDA and on CPU
        fused = "fused" in inspect.signature(torch.optim.AdamW).parameters and device_type in ("cuda", "cpu")
        adamw = torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, fused=fused or None)
        muon_text = f"Muon: {len(hidden)}, {sum(p.numel() for _, p in hidden):,} parameters; " if hidden else ""
        if verbose:
            print(
                f"{muon_text}decayed tensors: {len(decay)}, {sum(p.numel() for p in decay):,} parameters; "
                f"not decayed: {len(no_decay)}, {sum(p.numel() for p in no_decay):,} parameters; "
                f"fused AdamW: {fused}"
            )
        if optimizer == "adamw":
            return adamw
        # c_attn is the query, key and value maps side by side: Muon orthogonalises each on its own
        muon_groups = [
            {"params": [p for n, p in hidden if n.endswith("attn.c_attn.weight")], "split": 3},
            {"params": [p for n, p in hidden if not n.endswith("attn.c_attn.weight")], "split": 1},
        ]
        muon_groups = [g | {"lr_scale": muon_lr / learning_rate} for g in muon_groups if g["params"]]
        muon = Muon(muon_groups, lr=muon_lr, momentum=muon_momentum, weight_decay=muon_weight_decay,
                    ns_dtype=muon_ns_dtype)
        return CombinedOptimizer([adamw, muon])


class GPT(LanguageModel):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        modules = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))  # token embeddings
        if config.pos == "learned":
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)  # position embeddings
        modules |= dict(
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=make_norm(config),
        )
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            # weight tying: the output projection is the token embedding (GPT-2 does this; saves 38M params)
            self.transformer.wte.weight = self.lm_head.weight
        if config.pos == "rope":
            # not saved: recomputed from the config, and the state dict keeps GPT-2's keys
            cos, sin = rotary_tables(config.n_embd // config.n_head, config.block_size)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # residual projections add into the stream once per sublayer: scale so its variance stays ~1
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
                if config.zero_init:  # each block starts as the identity; the stream is the embedding alone
                    nn.init.zeros_(p)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def embed(self, idx: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, RopeAngles | None]:
        """Token embeddings of `idx` (B, T) and what the positions `pos` add: learned position embeddings to them,
        or the rotary angles for attention. `pos` is (T,) for every row alike, or (B, T) for rows of their own."""
        x = self.transformer.wte(idx)
        if self.config.pos == "learned":
            return x + self.transformer.wpe(pos), None
        cos, sin = self.rope_cos[pos], self.rope_sin[pos]
        if pos.dim() == 2:  # (B, T, hs/2) -> (B, 1, T, hs/2): the same angles for every head
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return x, (cos, sin)

    def hidden_states(
        self,
        idx: torch.Tensor,
        kv_cache: generation.StaticKVCache | None = None,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-LayerNorm output (B, T, n_embd) for tokens `idx`.

        `positions` ((T,) or (B, T)) and a boolean `attn_mask` (B, 1, T, T; True = may attend) replace the default
        0, 1, ... positions and causal mask, e.g. for several sequences packed into one row; the caller keeps
        every position below block_size. With `kv_cache` the keys and values go through the cache, which says
        what each query sees (decoding, generate.py).
        """
        T = idx.size(1)
        if positions is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of {T} tokens is longer than the model's block_size "
                                 f"{self.config.block_size}")
            positions = torch.arange(T, dtype=torch.long, device=idx.device)
        x, rope = self.embed(idx, positions)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, rope, kv_cache, attn_mask)
        return self.transformer.ln_f(x)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, return_logits: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits (B, T, vocab) and, given targets (B, T; -1 = ignore), the mean cross-entropy.

        Callers that need only the loss (training, evaluation) pass `return_logits=False` and get None for the
        logits: then no logits of all rows are ever held.
        """
        x = self.hidden_states(idx)
        loss = None
        if targets is not None:
            # F.cross_entropy(self.logits(x).float().view(-1, V), targets.view(-1), ignore_index=-1), computed over
            # chunks of rows so the fp32 logits of all rows never exist at once (gpt2repro/loss.py; tests hold the
            # two equal, loss and gradients)
            loss = linear_cross_entropy(x.reshape(-1, x.size(-1)), self.lm_head.weight, targets.reshape(-1),
                                        softcap=self.config.logit_softcap)
        if return_logits or targets is None:
            return self.logits(x), loss
        return None, loss

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The output layer on hidden states (..., n_embd): lm_head, then the soft-cap when the config has one."""
        return soft_cap(self.lm_head(x), self.config.logit_softcap)

    def next_logits(self, idx: torch.Tensor) -> torch.Tensor:
        """Last-position logits of the last block_size tokens. Past block_size the absolute positions of every
        token shift, so the cropped window is recomputed; with rope the window restarts at position 0, which changes
        nothing (attention sees only offsets): a sliding window of the last block_size tokens either way."""
        x = self.hidden_states(idx[:, -self.config.block_size :])
        return self.logits(x[:, -1, :])

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (tied weights once); `non_embedding` leaves out the table lookups that are no matmul:
        the position embeddings, and the token embeddings when the head has its own weight."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel() if "wpe" in self.transformer else 0
            n -= 0 if self.config.tie_embeddings else self.transformer.wte.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6N for the matmuls plus 12·L·d·T for attention scores (PaLM app. B)."""
        cfg, T = self.config, seq_len or self.config.block_size
        return 6 * self.num_params(non_embedding=True) + 12 * cfg.n_layer * cfg.n_embd * T

    @classmethod
    def from_pretrained(cls, name: str) -> GPT:
        """OpenAI's GPT-2 weights (`gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl`), through `transformers`.
        A local Hugging Face directory loads with `gpt2repro.checkpoint.load_pretrained`, which checks its config."""
        from transformers import GPT2LMHeadModel  # slow to import: only when needed

        if name not in HF_MODELS:
            raise ValueError(f"{name!r} is not one of {', '.join(HF_MODELS)}; load a Hugging Face directory with "
                             "gpt2repro.checkpoint.load_pretrained")
        n_layer, n_head, n_embd, _ = HF_MODELS[name]
        model = cls(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd))  # 1024 positions, 50257 tokens
        model.load_hf_state_dict(GPT2LMHeadModel.from_pretrained(name).state_dict(), source=name)
        return model

    def load_hf_state_dict(self, hf_sd: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Copy a `transformers` GPT2LMHeadModel state dict in, transposing its Conv1D weights."""
        hf_sd = {k: v for k, v in hf_sd.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
        sd = self.state_dict()
        missing = sorted(set(sd) - set(hf_sd))
        if missing:
            raise ValueError(f"{source} has no {missing[0]} (and {len(missing) - 1} more); not a GPT-2 checkpoint")
        head, wte = hf_sd.get("lm_head.weight"), hf_sd["transformer.wte.weight"]
        if self.config.tie_embeddings and head is not None and not torch.equal(head, wte):
            # one tensor here: copying both would silently keep whichever comes last
            raise ValueError(f"{source}: tie_word_embeddings is true but its lm_head.weight differs from "
                             "transformer.wte.weight; set tie_word_embeddings to false in its config.json")
        with torch.no_grad():
            for k, dst in sd.items():
                src = hf_sd[k].t() if k.endswith(CONV1D_WEIGHTS) else hf_sd[k]
                if src.shape != dst.shape:
                    raise ValueError(f"{source}: {k} has shape {tuple(src.shape)}, this model expects "
                                     f"{tuple(dst.shape)}")
                dst.copy_(src)


# GPT-2's checkpoints store these weights as Conv1D (in, out); nn.Linear wants (out, in)
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


# ----------------------------------------------------------------------------- later practice
# Options GPT-2 did not have, each off by default (GPTConfig): nanochat and the modded-nanogpt speedrun use them.
# The Muon optimizer itself is in gpt2repro/muon.py.

ROPE_BASE = 10000.0  # RoFormer's θ base: frequencies θ_i = base^(-2i/head_size)
RMSNORM_EPS = 1e-5  # as nn.LayerNorm's default
# cos, sin of the positions being run: (T, head_size/2) shared by every row, or (B, 1, T, head_size/2) per row
RopeAngles = tuple[torch.Tensor, torch.Tensor]


def make_norm(config: GPTConfig) -> nn.Module:
    """GPT-2's LayerNorm, or RMSNorm with `norm="rmsnorm"`."""
    return nn.LayerNorm(config.n_embd, bias=config.bias) if config.norm == "layernorm" else RMSNorm()


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """x / sqrt(mean(x²) + eps) over the last dimension, without a gain."""
    return F.rms_norm(x, (x.size(-1),), eps=RMSNORM_EPS)


class RMSNorm(nn.Module):
    """`rms_norm` as a module: nothing to learn, nothing to decay."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x)


def rotary_tables(head_size: int, n_pos: int, base: float = ROPE_BASE) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (n_pos, head_size/2) of the angle p·θ_i for position p and frequency θ_i, in float32."""
    inv_freq = base ** -(torch.arange(0, head_size, 2, dtype=torch.float64) / head_size)
    angle = torch.outer(torch.arange(n_pos, dtype=torch.float64), inv_freq)
    return angle.cos().float(), angle.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, nh, T, hs) by its position's angles (T, hs/2): the pair (x[i], x[i + hs/2]) is a complex number
    multiplied by e^{i p θ_i} (the half-split layout of GPT-NeoX/Llama), so q·k depends only on the offset."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def soft_cap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """cap·tanh(logits/cap), in float32: logits stay in (-cap, cap), smoothly; cap 0 returns them unchanged."""
    return cap * torch.tanh(logits.float() / cap) if cap > 0 else logits


class ReLU2(nn.Module):
    """relu(x)² (Primer, So et al. 2021)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).square()


OPTIMIZERS = ("adamw", "muon")


def is_hidden_matrix(name: str, p: torch.Tensor) -> bool:
    """A 2-D weight inside the Transformer blocks (c_attn, c_proj, c_fc): Muon's; embeddings and the head are not."""
    return name.startswith("transformer.h.") and p.dim() == 2


# ----------------------------------------------------------------------------- the lecture's baseline


class BigramLanguageModel(LanguageModel):
    """The lecture's baseline: the next token depends only on the current one (a V×V table of logits)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding_table = nn.Embedding(config.vocab_size, config.vocab_size)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, return_logits: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = self.token_embedding_table(idx)  # the table is the logits: `return_logits` changes nothing
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def next_logits(self, idx: torch.Tensor) -> torch.Tensor:
        return self.token_embedding_table(idx[:, -1])

    def flops_per_token(self, seq_len: int | None = None) -> float:
        return 6.0 * self.config.vocab_size  # one row lookup, a softmax over V: nominal

