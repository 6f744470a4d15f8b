"""Tokenizers with one small interface: GPT-2 BPE (tiktoken), the lecture's character vocabulary, and the
digits of `a+b=` problems (the addition task of addition.py).

All have `encode(str) -> list[int]`, `decode(list[int]) -> str`, `vocab_size`, `eot` (None for chars),
`name`, and `to_dict()` so a checkpoint can say which tokenizer it was trained with.

The GPT-2 encoding is built from the ranks file `gpt2.tiktoken` in the cache directory
(`$GPT2_REPRO_CACHE`, default `~/.cache/gpt2-repro`), so it works offline once `python prepare.py`
has put the file there; with no cached file it falls back to `tiktoken.get_encoding("gpt2")`.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path

import numpy as np
import tiktoken
import tiktoken.load

from gpt2repro.fileio import sha256_of

GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_EOT = 50256
# GPT-2's pre-tokenizer split pattern (the same one tiktoken's "gpt2" encoding uses)
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def cache_dir() -> Path:
    """Where downloaded assets (the GPT-2 ranks file, HellaSwag) are kept."""
    return Path(os.environ.get("GPT2_REPRO_CACHE", Path.home() / ".cache" / "gpt2-repro"))


def gpt2_ranks_path() -> Path:
    """Where `python prepare.py` caches GPT-2's BPE ranks file."""
    return cache_dir() / "gpt2.tiktoken"


@lru_cache(maxsize=1)
def gpt2_encoding() -> tiktoken.Encoding:
    """The tiktoken GPT-2 encoding, built from the cached ranks file when it is there.

    A missing (offline) or damaged ranks file is a ValueError naming it and the fix, so every stage shows it as
    one line.
    """
    path = gpt2_ranks_path()
    if path.exists():
        # checked here, not by tiktoken, whose hash mismatch says "please try again": retrying never fixes a file
        if sha256_of(path) != GPT2_RANKS_SHA256:
            raise ValueError(f"{path}: not GPT-2's BPE ranks file (its sha256 differs: truncated or corrupt); "
                             "delete it and run `python prepare.py` to fetch it again")
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
        raise ValueError(
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


ADDITION_OPS = "+-"  # the operators an addition-task vocabulary may hold
ANSWER_END = "."  # ends every answer; the addition tokenizer's eot, so generation stops there


class AdditionTokenizer:
    """The vocabulary of `a+b=` problems with operands of up to `digits` digits: 0-9, `ops`, '=' and '.'.

    Every problem has one fixed-width layout, so position alone tells the model which digit it is looking at:
    both operands zero-padded to `digits` digits in normal order, then the answer's `digits + 1` digits least
    significant first (the order a carry moves, so each digit depends only on what came before), then '.'.
    "123+456=" is laid out as "123+456=9750.". Subtraction keeps a >= b: every answer is non-negative.
    """

    name = "addition"

    def __init__(self, digits: int = 3, ops: str = "+") -> None:
        if not 1 <= digits <= 9:  # keys of (op, a, b) must fit in 64 bits (addition.py hashes them)
            raise ValueError(f"--digits {digits} is out of range; use 1 to 9")
        if not ops or len(set(ops)) != len(ops) or not set(ops) <= set(ADDITION_OPS):
            raise ValueError(f"--ops {ops!r} is not valid; use distinct operators out of {ADDITION_OPS!r}, e.g. '+'")
        self.digits, self.ops = digits, ops
        self.chars = "0123456789" + ops + "=" + ANSWER_END  # digit d has id d
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.vocab_size = len(self.chars)
        self.eot = self.stoi[ANSWER_END]
        self.prompt_len = 2 * digits + 2  # "aaa+bbb="
        self.answer_len = digits + 2  # the reversed digits of the answer and '.'
        self.seq_len = self.prompt_len + self.answer_len
        self.pattern = re.compile(rf"([0-9]{{1,{digits}}})([{re.escape(ops)}])([0-9]{{1,{digits}}})=")

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the addition vocabulary {self.chars!r}") from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def to_dict(self) -> dict:
        return {"name": "addition", "digits": self.digits, "ops": self.ops}

    def sequences(self, a: np.ndarray, b: np.ndarray, op: np.ndarray) -> np.ndarray:
        """Token ids (n, seq_len) of problems a[i] ops[op[i]] b[i] with their answers, in the layout above."""
        a, b, op = (np.asarray(v, dtype=np.int64) for v in (a, b, op))
        minus = np.array([o == "-" for o in self.ops])[op]
        assert not (minus & (a < b)).any(), "subtraction problems must have a >= b"
        answer = np.where(minus, a - b, a + b)
        place = 10 ** np.arange(self.digits + 1, dtype=np.int64)  # 1, 10, 100, ...: least significant first
        n = len(a)
        return np.concatenate([
            a[:, None] // place[::-1][1:] % 10,
            (self.stoi[self.ops[0]] + op)[:, None],
            b[:, None] // place[::-1][1:] % 10,
            np.full((n, 1), self.stoi["="]),
            answer[:, None] // place % 10,
            np.full((n, 1), self.eot),
        ], axis=1)

    def parse_problem(self, text: str) -> tuple[int, int, int]:
        """(a, b, op index) of a prompt like "123+456="; a ValueError saying what a valid prompt looks like."""
        m = self.pattern.fullmatch(text.strip())
        example = "9" * self.digits + self.ops[0] + "1" * min(self.digits, 2) + "="  # valid for + and -
        if m is None:
            raise ValueError(f"prompt {text!r} is not a problem of this {self.digits}-digit model; write two numbers "
                             f"of 1 to {self.digits} digits joined by one of {' '.join(self.ops)} and ending in '=', "
                             f"like {example!r}")
        a, op, b = int(m[1]), m[2], int(m[3])
        if op == "-" and a < b:
            raise ValueError(f"prompt {text!r}: this model only subtracts a smaller number from a larger one; "
                             f"write it as '{b}-{a}='")
        return a, b, self.ops.index(op)

    def encode_problem(self, text: str) -> list[int]:
        """Prompt ids of a problem string, operands zero-padded to the model's fixed width: "7+45=" -> 007+045=."""
        a, b, op = self.parse_problem(text)
        return self.sequences(np.array([a]), np.array([b]), np.array([op]))[0, : self.prompt_len].tolist()

    def decode_answer(self, ids: list[int]) -> str:
        """The generated reversed answer digits (up to '.') in normal order, without leading zeros: 9750. -> 579."""
        ids = list(ids)[: self.answer_len - 1]  # at most the answer's digits, '.' or not
        if self.eot in ids:
            ids = ids[: ids.index(self.eot)]
        return self.decode(ids)[::-1].lstrip("0") or "0"


Tokenizer = GPT2Tokenizer | CharTokenizer | AdditionTokenizer


def get_tokenizer(name: str, text: str | None = None, digits: int = 3, ops: str = "+") -> Tokenizer:
    """`get_tokenizer("gpt2")`, `get_tokenizer("char", text=...)` or `get_tokenizer("addition", digits=3, ops="+")`."""
    if name == "gpt2":
        return GPT2Tokenizer()
    if name == "char":
        if not text:
            raise ValueError("the char tokenizer needs the training text: get_tokenizer('char', text=...)")
        return CharTokenizer(text)
    if name == "addition":
        return AdditionTokenizer(digits, ops)
    raise ValueError(f"unknown tokenizer {name!r}; use 'gpt2', 'char' or 'addition'")


def tokenizer_from_dict(d: dict) -> Tokenizer:
    """Rebuild the tokenizer a checkpoint recorded with `to_dict()`."""
    if d.get("name") == "char":
        return CharTokenizer(d["chars"])
    if d.get("name") == "addition":
        return AdditionTokenizer(d["digits"], d["ops"])
    return get_tokenizer(d.get("name", "gpt2"))
