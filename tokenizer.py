"""Tokenizers with one small interface: GPT-2 BPE (tiktoken) and the lecture's character vocabulary.

Both have `encode(str) -> list[int]`, `decode(list[int]) -> str`, `vocab_size`, `eot` (None for chars),
`name`, and `to_dict()` so a checkpoint can say which tokenizer it was trained with.

The GPT-2 encoding is built from the ranks file `gpt2.tiktoken` in the cache directory
(`$GPT2_REPRO_CACHE`, default `~/.cache/gpt2-repro`), so it works offline once `python prepare.py`
has put the file there; with no cached file it falls back to `tiktoken.get_encoding("gpt2")`.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import tiktoken
import tiktoken.load

GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_EOT = 50256
# GPT-2's pre-tokenizer split pattern (the same one tiktoken's "gpt2" encoding uses)
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def cache_dir() -> Path:
    """Where downloaded assets (the GPT-2 ranks file, HellaSwag) are kept."""
    return Path(os.environ.get("GPT2_REPRO_CACHE", Path.home() / ".cache" / "gpt2-repro"))


def gpt2_ranks_path() -> Path:
    return cache_dir() / "gpt2.tiktoken"


@lru_cache(maxsize=1)
def gpt2_encoding() -> tiktoken.Encoding:
    """The tiktoken GPT-2 encoding, built from the cached ranks file when it is there."""
    path = gpt2_ranks_path()
    if path.exists():
        ranks = tiktoken.load.load_tiktoken_bpe(str(path), expected_hash=GPT2_RANKS_SHA256)
        return tiktoken.Encoding(
            name="gpt2",
            pat_str=GPT2_PATTERN,
            mergeable_ranks=ranks,
            special_tokens={"<|endoftext|>": GPT2_EOT},
            explicit_n_vocab=GPT2_EOT + 1,
        )
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # offline and no cached ranks file
        raise RuntimeError(
            f"GPT-2 BPE ranks not found at {path} and tiktoken could not download them ({type(e).__name__}); "
            "run `python prepare.py` (or `make demo`) to cache them"
        ) from None


class GPT2Tokenizer:
    """GPT-2 BPE via tiktoken; `<|endoftext|>` (50256) is the document separator."""

    name = "gpt2"

    def __init__(self) -> None:
        self.enc = gpt2_encoding()
        self.vocab_size = self.enc.n_vocab
        self.eot = GPT2_EOT

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(list(ids))

    def to_dict(self) -> dict:
        return {"name": "gpt2"}


class CharTokenizer:
    """The lecture's character-level vocabulary: every distinct character of the training text."""

    name = "char"
    eot = None

    def __init__(self, chars: str) -> None:
        self.chars = "".join(sorted(set(chars)))
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.vocab_size = len(self.chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise ValueError(
                f"character {e.args[0]!r} is not in this model's {self.vocab_size}-character vocabulary; "
                "remove it from the prompt"
            ) from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def to_dict(self) -> dict:
        return {"name": "char", "chars": self.chars}


Tokenizer = GPT2Tokenizer | CharTokenizer


def get_tokenizer(name: str, text: str | None = None) -> Tokenizer:
    """`get_tokenizer("gpt2")` or `get_tokenizer("char", text=...)`."""
    if name == "gpt2":
        return GPT2Tokenizer()
    if name == "char":
        if not text:
            raise ValueError("the char tokenizer needs the training text: get_tokenizer('char', text=...)")
        return CharTokenizer(text)
    raise ValueError(f"unknown tokenizer {name!r}; use 'gpt2' or 'char'")


def tokenizer_from_dict(d: dict) -> Tokenizer:
    """Rebuild the tokenizer a checkpoint recorded with `to_dict()`."""
    if d.get("name") == "char":
        return CharTokenizer(d["chars"])
    return get_tokenizer(d.get("name", "gpt2"))
