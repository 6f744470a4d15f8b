"""The GPT of Karpathy's lecture "Let's build GPT: from scratch, in code, spelled out", as the lecture writes it.

One self-attention head at a time (`Head`), several side by side (`MultiHeadAttention`), a per-token MLP
(`FeedForward`), communication then computation (`Block`), and the language model on top. Each stage of the
lecture is a `LectureConfig` switch, so every stage it trains is one preset of train_gpt2.py (`lecture-*`):

    stage       n_head  n_layer  ffwd  residual  layernorm  dropout
    head             1        1     -         -          -        0   one head of size n_embd
    heads            4        1     -         -          -        0   4 heads of n_embd/4, concatenated
    ffwd             4        1     x         -          -        0   + Linear and ReLU after attention
    blocks           4        3     x         -          -        0   3 blocks, stacked plainly
    residual         4        3     x         x          -        0   x + sublayer(x), projections, 4x MLP
    layernorm        4        3     x         x          x        0   pre-norm, and a final LayerNorm
    dropout          4        3     x         x          x      0.2   dropout on attention weights and outputs
    gpt              6        6     x         x          x      0.2   scaled up: n_embd 384, context 256

The bigram the lecture starts from is `model.BigramLanguageModel`. model.py's `CausalSelfAttention` computes
the same attention as `MultiHeadAttention` with the heads as a batch dimension (tests/test_lecture.py).
The weights keep PyTorch's default initialisation, as in the lecture.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from model import LanguageModel


@dataclass
class LectureConfig:
    """Defaults are the lecture's first attention model: one head of size 32 over context 8 (`lecture-head`)."""

    block_size: int = 8  # context length
    vocab_size: int = 65  # tiny Shakespeare's characters
    n_embd: int = 32
    n_head: int = 1  # heads of size n_embd // n_head, concatenated back to n_embd
    n_layer: int = 1
    ffwd: bool = False  # a feed-forward layer after attention in every block
    residual: bool = False  # x + sublayer(x); each sublayer ends in a projection, the feed-forward is 4x wide
    layernorm: bool = False  # pre-norm LayerNorm before each sublayer and before the head
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"LectureConfig: n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LectureConfig.dropout must be in [0, 1); got {self.dropout}")


class Head(nn.Module):
    """One head of self-attention: every token asks (query) and offers (key, value); it reads only the past."""

    def __init__(self, config: LectureConfig, head_size: int) -> None:
        super().__init__()
        self.key = nn.Linear(config.n_embd, head_size, bias=False)
        self.query = nn.Linear(config.n_embd, head_size, bias=False)
        self.value = nn.Linear(config.n_embd, head_size, bias=False)
        # not a parameter: the mask of which earlier positions each position may look at
        self.register_buffer("tril", torch.tril(torch.ones(config.block_size, config.block_size)), persistent=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        k = self.key(x)  # (B, T, hs)
        q = self.query(x)  # (B, T, hs)
        head_size = k.size(-1)
        # affinities, scaled so that they keep unit variance and the softmax stays diffuse at initialisation
        wei = q @ k.transpose(-2, -1) * head_size**-0.5  # (B, T, hs) @ (B, hs, T) -> (B, T, T)
        wei = wei.masked_fill(self.tril[:T, :T] == 0, float("-inf"))  # the future cannot be seen
        wei = F.softmax(wei, dim=-1)
        wei = self.dropout(wei)
        v = self.value(x)  # (B, T, hs)
        return wei @ v  # (B, T, T) @ (B, T, hs) -> (B, T, hs)


class MultiHeadAttention(nn.Module):
    """Several heads in parallel, their outputs concatenated (then projected, once blocks are residual)."""

    def __init__(self, config: LectureConfig) -> None:
        super().__init__()
        head_size = config.n_embd // config.n_head
        self.heads = nn.ModuleList([Head(config, head_size) for _ in range(config.n_head)])
        # back into the residual stream; without residuals the lecture has no projection yet
        self.proj = nn.Linear(head_size * config.n_head, config.n_embd) if config.residual else nn.Identity()
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.cat([h(x) for h in self.heads], dim=-1)
        return self.dropout(self.proj(out))


class FeedForward(nn.Module):
    """A linear layer and a ReLU, per token: the tokens think about what attention gathered for them."""

    def __init__(self, config: LectureConfig) -> None:
        super().__init__()
        if config.residual:  # the paper's 4x inner width, projected back into the residual stream
            inner = 4 * config.n_embd
            layers = [nn.Linear(config.n_embd, inner), nn.ReLU(), nn.Linear(inner, config.n_embd)]
        else:
            layers = [nn.Linear(config.n_embd, config.n_embd), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Dropout(config.dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Block(nn.Module):
    """Communication (attention) then computation (feed-forward), each optionally residual and pre-normed."""

    def __init__(self, config: LectureConfig) -> None:
        super().__init__()
        self.sa = MultiHeadAttention(config)
        self.ffwd = FeedForward(config) if config.ffwd else None
        self.ln1 = nn.LayerNorm(config.n_embd) if config.layernorm else nn.Identity()
        self.ln2 = nn.LayerNorm(config.n_embd) if config.layernorm and config.ffwd else nn.Identity()
        self.residual = config.residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.sa(self.ln1(x)) if self.residual else self.sa(self.ln1(x))
        if self.ffwd is not None:
            x = x + self.ffwd(self.ln2(x)) if self.residual else self.ffwd(self.ln2(x))
        return x


class LectureLanguageModel(LanguageModel):
    """Token and position embeddings, `n_layer` blocks, (a final LayerNorm,) a linear head to the vocabulary."""

    def __init__(self, config: LectureConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding_table = nn.Embedding(config.vocab_size, config.n_embd)
        self.position_embedding_table = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.Sequential(*[Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd) if config.layernorm else nn.Identity()
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, return_logits: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, vocab) and, given targets (B, T; -1 = ignore), the mean cross-entropy; the logits are
        small here, so they are always returned."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than the model's block_size {self.config.block_size}")
        tok_emb = self.token_embedding_table(idx)  # (B, T, C)
        pos_emb = self.position_embedding_table(torch.arange(T, device=idx.device))  # (T, C)
        x = self.blocks(tok_emb + pos_emb)
        logits = self.lm_head(self.ln_f(x))  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def next_logits(self, idx: torch.Tensor) -> torch.Tensor:
        """Last-position logits of the last block_size tokens (the position table has only that many rows)."""
        logits, _ = self(idx[:, -self.config.block_size :])
        return logits[:, -1, :]

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6N for the matmuls plus 12·L·d·T for attention scores (as model.GPT)."""
        c, T = self.config, seq_len or self.config.block_size
        tables = self.token_embedding_table.weight.numel() + self.position_embedding_table.weight.numel()
        n = sum(p.numel() for p in self.parameters()) - tables  # lookups are no matmul
        return 6 * n + 12 * c.n_layer * c.n_embd * T
