"""OpenAI's GPT-2 checkpoints: names, shapes and sizes, written once for the model loader, the configs and the plots
(it needs no torch, so `plot.py` stays light)."""

from __future__ import annotations

from typing import NamedTuple


class GPT2Size(NamedTuple):
    n_layer: int
    n_head: int
    n_embd: int
    size: str  # the name the papers give it


# all have vocab 50257 and 1024 positions
HF_MODELS = {
    "gpt2": GPT2Size(12, 12, 768, "124M"),
    "gpt2-medium": GPT2Size(24, 16, 1024, "350M"),
    "gpt2-large": GPT2Size(36, 20, 1280, "774M"),
    "gpt2-xl": GPT2Size(48, 25, 1600, "1558M"),
}


def size_of_shape(n_layer: int, n_head: int, n_embd: int) -> str | None:
    """The size label of the GPT-2 with this shape, or None."""
    return next((s.size for s in HF_MODELS.values() if s[:3] == (n_layer, n_head, n_embd)), None)
