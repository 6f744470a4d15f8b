"""GPT-2, exactly as OpenAI's, in one file, plus the lecture's bigram baseline.

GPTConfig also offers later practice, each option off by default: rotary positions, RMSNorm, relu², QK-norm,
an untied head, logit soft-capping and zero-initialised projections (the Muon optimizer is in muon.py).

References:
1) OpenAI's GPT-2 TensorFlow implementation and the Hugging Face `transformers` one (same parameter names).
2) "Language Models are Unsupervised Multitask Learners" (GPT-2) and "Attention Is All You Need".
3) RoFormer (rotary embeddings); nanochat and the modded-nanogpt speedrun for the other options.
"""

from __future__ import annotations

import inspect
import json
import math
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from torch.nn import functional as F

from gpt2repro.fileio import refused_object
from gpt2repro.loss import linear_cross_entropy
from gpt2repro.muon import CombinedOptimizer, Muon

if TYPE_CHECKING:  # imported where used: transformers is slow to import
    from transformers import GPT2Config

# GPT-2's checkpoints store these weights as Conv1D (in, out); nn.Linear wants (out, in)
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


@dataclass
class GPTConfig:
    block_size: int = 1024  # context length
    vocab_size: int = 50257  # 50,000 BPE merges + 256 bytes + <|endoftext|>
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm, as GPT-2
    # later practice (nanochat, the modded-nanogpt speedrun); each default is GPT-2's
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
ROPE_BASE = 10000.0  # RoFormer's θ base: frequencies θ_i = base^(-2i/head_size)
RMSNORM_EPS = 1e-5  # as nn.LayerNorm's default


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) over the last dimension, without a gain: nothing to learn, nothing to decay."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.size(-1),), eps=RMSNORM_EPS)


def make_norm(config: GPTConfig) -> nn.Module:
    return nn.LayerNorm(config.n_embd, bias=config.bias) if config.norm == "layernorm" else RMSNorm()


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


# cos, sin of the positions being run: (T, head_size/2) shared by every row, or (B, 1, T, head_size/2) per row
RopeAngles = tuple[torch.Tensor, torch.Tensor]
# what a cache gives attention: all keys, all values, the boolean mask (True = attend) or None, and is_causal
CachedKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool]


@dataclass
class StaticKVCache:
    """Keys and values in tensors of fixed shape (B, n_head, max_len, head_size), one per layer, written at the
    given columns, with the mask saying which columns each query sees: the shapes never change, so a decode step
    can be one CUDA graph (generate.py). Rows may be left-padded; the mask hides the padding."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    cols: torch.Tensor  # (T,) the columns this step's keys/values go to
    mask: torch.Tensor | None  # (B, 1, T, width), True = attend; None: T > 1 queries fill [0, T) causally, one sees all
    width: int  # attention reads columns [0, width)

    @staticmethod
    def allocate(config: GPTConfig, batch_size: int, max_len: int, device, dtype) -> tuple[list, list]:
        """Zeroed key and value tensors per layer: never-written columns are masked, but must not be NaN
        (attention weight 0 times NaN is NaN)."""
        shape = (batch_size, config.n_head, max_len, config.n_embd // config.n_head)
        new = lambda: [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        return new(), new()

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> CachedKV:
        k_all, v_all = self.k[layer], self.v[layer]
        k_all[:, :, self.cols] = k.to(k_all.dtype)
        v_all[:, :, self.cols] = v.to(v_all.dtype)
        # without a mask, T > 1 new queries fill columns [0, T) causally; one new query sees every column
        return k_all[:, :, : self.width], v_all[:, :, : self.width], self.mask, self.mask is None and k.size(2) > 1


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
        self.qk_norm = config.qk_norm

    def forward(
        self,
        x: torch.Tensor,
        kv_cache: StaticKVCache | None = None,
        layer: int = 0,
        rope: RopeAngles | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # (B, T, C) -> (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if rope is not None:  # before caching: cached keys keep the rotation of their own position
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if self.qk_norm:  # a rotation keeps the norm, so the order with rope does not matter
            q, k = F.rms_norm(q, (q.size(-1),), eps=RMSNORM_EPS), F.rms_norm(k, (k.size(-1),), eps=RMSNORM_EPS)
        mask, is_causal = None, T > 1
        if kv_cache is not None:
            k, v, mask, is_causal = kv_cache.update(layer, k, v)
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
        # GPT-2 used GELU's tanh approximation; relu² (Primer, So et al. 2021) is cheaper and sparser
        self.act = nn.GELU(approximate="tanh") if config.mlp == "gelu" else ReLU2()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class ReLU2(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).square()


class Block(nn.Module):
    """Pre-LayerNorm Transformer block: the residual stream is never normalised, only its inputs."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        kv_cache: StaticKVCache | None = None,
        layer: int = 0,
        rope: RopeAngles | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache, layer, rope, attn_mask)
        return x + self.mlp(self.ln_2(x))


class LanguageModel(nn.Module):
    """What GPT and the bigram baseline share: sampling and the optimizer set-up."""

    config: GPTConfig

    def next_logits(self, idx: torch.Tensor) -> torch.Tensor:
        """Last-position logits (B, vocab) of `idx` (B, T), computed from the tokens alone (no cache)."""
        raise NotImplementedError

    # Generation lives in generate.py (it imports this module, hence the imports inside): these are its entry points

    @torch.no_grad()
    def generate_stream(self, idx: torch.Tensor, max_new_tokens: int, **kwargs) -> Iterator[torch.Tensor]:
        """Yield the next token of every row (B,), `max_new_tokens` times or until every row has hit `eot`;
        see `generate.generate_stream` for the sampling settings."""
        from gpt2repro.generate import generate_stream

        yield from generate_stream(self, idx, max_new_tokens, **kwargs)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
        """`idx` (B, T) extended by up to `max_new_tokens` sampled tokens; see `generate.generate_stream`."""
        from gpt2repro.generate import generate

        return generate(self, idx, max_new_tokens, **kwargs)

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
    ) -> torch.optim.AdamW | CombinedOptimizer:
        """AdamW that decays matrices and embeddings (≥2-D) but not biases and LayerNorm gains; with `optimizer`
        "muon", Muon (`muon_*` settings) takes the blocks' matrices and that AdamW keeps the rest.

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
        muon = Muon(muon_groups, lr=muon_lr, momentum=muon_momentum, weight_decay=muon_weight_decay)
        return CombinedOptimizer([adamw, muon])


OPTIMIZERS = ("adamw", "muon")


def is_hidden_matrix(name: str, p: torch.Tensor) -> bool:
    """A 2-D weight inside the Transformer blocks (c_attn, c_proj, c_fc): Muon's; embeddings and the head are not."""
    return name.startswith("transformer.h.") and p.dim() == 2


class GPT(LanguageModel):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        modules = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.pos == "learned":
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        modules |= dict(
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
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
        kv_cache: StaticKVCache | None = None,
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
        for i, block in enumerate(self.transformer.h):
            x = block(x, kv_cache, i, rope, attn_mask)
        return self.transformer.ln_f(x)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, return_logits: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits (B, T, vocab) and, given targets (B, T; -1 = ignore), the mean cross-entropy.

        The loss never materialises the fp32 logits of all rows (see loss.py); callers that need only the loss
        (training, evaluation) pass `return_logits=False` and get None for the logits.
        """
        x = self.hidden_states(idx)
        loss = None
        if targets is not None:
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
    def from_pretrained(cls, name_or_dir: str) -> GPT:
        """OpenAI's GPT-2 weights (`gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl`) or a local HF directory."""
        from transformers import GPT2LMHeadModel

        if Path(name_or_dir).is_dir():
            check_hf_config(Path(name_or_dir) / "config.json")
        try:
            hf = GPT2LMHeadModel.from_pretrained(name_or_dir)
        except Exception as e:
            raise hf_load_error(name_or_dir, e) from None
        model = cls(config_from_hf(hf.config, name_or_dir))
        model.load_hf_state_dict(hf.state_dict(), source=name_or_dir)
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


HF_CONFIG_SIZES = ("n_positions", "vocab_size", "n_layer", "n_head", "n_embd")  # the fields GPTConfig takes
# GPTConfig.mlp as GPT2Config.activation_function: export_hf.py writes the first name, any of them loads
HF_ACTIVATIONS = {"gelu": ("gelu_new", "gelu_pytorch_tanh"), "relu2": ("relu2",)}
# GPT2Config fields every GPT of ours has these values of: another value computes something this GPT cannot
HF_FIXED = {"layer_norm_epsilon": 1e-5, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False}


def hf_config_fields(config: GPTConfig) -> dict:
    """The GPT2Config fields that describe `config`'s shape and options (vocab, dropout and token ids aside)."""
    return dict(n_positions=config.block_size, n_embd=config.n_embd, n_layer=config.n_layer, n_head=config.n_head,
                activation_function=HF_ACTIVATIONS[config.mlp][0], tie_word_embeddings=config.tie_embeddings,
                **HF_FIXED)


def config_from_hf(c: GPT2Config, source: str) -> GPTConfig:
    """The GPTConfig of a `transformers` GPT2Config; a field this GPT cannot reproduce is a ValueError naming
    `source` (reorder_and_upcast_attn only changes rounding, so it is accepted)."""
    mlp = next((ours for ours, names in HF_ACTIVATIONS.items() if c.activation_function in names), None)
    need = {k: (getattr(c, k, v) == v, json.dumps(v)) for k, v in HF_FIXED.items()}  # field: (ok, what it needs)
    need["activation_function"] = (mlp is not None, " or ".join(n for ns in HF_ACTIVATIONS.values() for n in ns))
    need["n_inner"] = (getattr(c, "n_inner", None) in (None, 4 * c.n_embd), f"null or {4 * c.n_embd}")
    for field, (ok, want) in need.items():
        if not ok:
            raise ValueError(f"{source}: config.json sets {field} to {getattr(c, field)!r}, which this GPT cannot "
                             f"compute (it needs {want}); only GPT-2's architecture loads")
    return GPTConfig(block_size=c.n_positions, vocab_size=c.vocab_size, n_layer=c.n_layer, n_head=c.n_head,
                     n_embd=c.n_embd, bias=True, mlp=mlp, tie_embeddings=bool(c.tie_word_embeddings))


def check_hf_config(path: Path) -> None:
    """A Hugging Face config.json that is JSON with positive integer sizes, before `transformers` trips on it."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return  # transformers says what is missing
    except (OSError, ValueError) as e:  # ValueError: bad JSON or not UTF-8
        raise ValueError(f"{path}: not a readable JSON config ({str(e).splitlines()[0]}); fix or re-download it") \
            from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: holds a {type(config).__name__}, not a JSON object; fix or re-download it")
    for key in HF_CONFIG_SIZES:
        value = config.get(key, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{path}: {key} is {value!r}, expected a positive integer; fix or re-download it")


def hf_load_error(name_or_dir: str, e: Exception) -> ValueError:
    """One line for what `GPT2LMHeadModel.from_pretrained` raised, naming the file at fault where known."""
    from safetensors import SafetensorError

    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if isinstance(e, pickle.UnpicklingError):  # a pytorch_model.bin refused by weights_only loading
        return ValueError(f"{name_or_dir}: refused, its weights file holds pickled objects other than tensors "
                          f"({refused_object(str(e))}); use safetensors weights from a source you trust")
    if isinstance(e, SafetensorError):
        weights = Path(name_or_dir) / "model.safetensors"
        where = weights if weights.is_file() else name_or_dir
        return ValueError(f"{where}: not a readable safetensors file ({first}); it is corrupt or truncated, "
                          "download or export it again")
    if isinstance(e, OSError):
        return ValueError(f"could not load Hugging Face GPT-2 {name_or_dir!r}: {first}")
    detail = " ".join(line.strip() for line in str(e).strip().splitlines()[:2])  # strict-dataclass errors: 2 lines
    return ValueError(f"{name_or_dir}: transformers cannot load it ({type(e).__name__}: {detail}); check its "
                      "config.json and weights, or re-download it")


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

