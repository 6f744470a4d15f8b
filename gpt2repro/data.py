"""Token batches for training and evaluation, from uint16 `.npy` shards or from an array in memory.

Shards (format in `shards.py`) are memory-mapped and only the tokens of one batch are turned into int64;
token ids are checked against the model's vocabulary batch by batch.

A batch is B rows of T+1 consecutive tokens: inputs are the first T, targets the last T. Rows are cut from a
shard at multiples of T (row j starts at token j*T), so without shuffling consecutive batches are consecutive
text, as in build-nanogpt. With shuffling, each epoch draws a new order of shards, of documents inside a shard
and of rows inside a shard, all from `(seed, epoch, shard)`, so the state to resume from is just four numbers.
Either way every row is served exactly once per epoch across all ranks; a shard's tail shorter than one step
of all ranks is left out of that epoch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gpt2repro.shards import check_token_ids, find_shards, open_shard
from gpt2repro.tokenizer import GPT2_EOT


def shuffle_documents(tokens: np.ndarray, eot: int, rng: np.random.Generator) -> np.ndarray:
    """The documents of `tokens` (each starting at an EOT) in a random order, as a new uint16 array."""
    starts = np.flatnonzero(tokens == eot)
    if starts.size == 0 or starts[0] != 0:
        starts = np.concatenate(([0], starts))  # text before the first EOT is a document too
    ends = np.append(starts[1:], len(tokens))
    order = rng.permutation(len(starts))
    return np.concatenate([tokens[starts[i] : ends[i]] for i in order])


def batch_fix(n: int, B: int, T: int, world_size: int) -> str:
    """What makes one batch fit in `n` tokens: a smaller --block_size or --batch_size where one exists, else more
    text (never "at most 0")."""
    fixes = []
    if (n - 1) // (B * world_size) >= 1:
        fixes.append(f"--block_size {(n - 1) // (B * world_size)} or less")
    if (n - 1) // T // world_size >= 1:
        fixes.append(f"--batch_size {(n - 1) // T // world_size} or less")
    if fixes:
        return "use " + ", or ".join(fixes)
    return f"give it more text: even --batch_size 1 --block_size 1 needs {world_size + 1} tokens"


class TokenLoader:
    """Batches (x, y) of shape (B, T) from a list of token sources, striped over `world_size` ranks.

    Each source is a `.npy` path (memory-mapped on use) or an integer array. All ranks walk the same order;
    rank r takes the r-th group of B rows of every step, so together they cover every row once per epoch.
    """

    def __init__(
        self,
        sources: list[Path | np.ndarray],
        B: int,
        T: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = False,
        seed: int = 1337,
        eot: int | None = GPT2_EOT,
        name: str = "data",
        vocab_size: int | None = None,
    ) -> None:
        self.sources, self.B, self.T = list(sources), B, T
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.seed, self.eot, self.name = shuffle, seed, eot, name
        self.vocab_size = vocab_size  # ids at or above it are refused batch by batch
        self.rows_per_step = B * world_size
        for i, src in enumerate(self.sources):
            n = len(src) if isinstance(src, np.ndarray) else len(open_shard(src))
            if (n - 1) // T < self.rows_per_step:
                where = src if isinstance(src, Path) else f"{name} source {i}"
                raise ValueError(f"{where}: {n:,} tokens cannot fill one batch of {world_size} rank(s) x {B} rows x "
                                 f"{T}+1 tokens; {batch_fix(n, B, T, world_size)}")
        self.reset()

    def reset(self, epoch: int = 0) -> None:
        """Back to the first batch of `epoch`."""
        self.epoch, self.shard, self.position = epoch, 0, 0
        self._load()

    def _rng(self, *keys: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, *keys])

    def _order(self):
        """This epoch's order of sources."""
        return self._rng().permutation(len(self.sources)) if self.shuffle else range(len(self.sources))

    def _load(self) -> None:
        """Open the current shard of this epoch's order and fix its row order."""
        order = self._order()
        src = self.sources[order[self.shard]]
        tokens = open_shard(src) if isinstance(src, Path) else src
        n_rows = (len(tokens) - 1) // self.T
        self.rows = None  # None: rows in file order
        if self.shuffle:
            rng = self._rng(int(order[self.shard]))
            if self.eot is not None:
                tokens = shuffle_documents(tokens, self.eot, rng)
            self.rows = rng.permutation(n_rows)
        self.tokens = tokens
        # only whole steps of all ranks: the ranks must change shard together
        self.usable_rows = n_rows - n_rows % self.rows_per_step

    def _advance_shard(self) -> None:
        self.shard, self.position = self.shard + 1, 0
        if self.shard == len(self.sources):
            self.epoch, self.shard = self.epoch + 1, 0
        self._load()

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next (x, y), int64 tensors of shape (B, T)."""
        if self.position == self.usable_rows:
            self._advance_shard()
        B, T = self.B, self.T
        first = self.position + self.rank * B
        if self.rows is None:  # consecutive rows are one contiguous slice
            buf = np.asarray(self.tokens[first * T : (first + B) * T + 1], dtype=np.int64)
            x, y = buf[:-1].reshape(B, T), buf[1:].reshape(B, T)
        else:
            starts = self.rows[first : first + B] * T
            buf = np.asarray(self.tokens[starts[:, None] + np.arange(T + 1)], dtype=np.int64)
            x, y = buf[:, :-1], buf[:, 1:]
        self.position += self.rows_per_step
        if self.vocab_size is not None:
            check_token_ids(buf, self.vocab_size, self.where())
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))

    def where(self) -> str:
        """The source the current rows come from, for error messages."""
        src = self.sources[self._order()[self.shard]]
        return str(src) if isinstance(src, Path) else self.name

    def state_dict(self) -> dict:
        """Where the loader is; positions count rows of all ranks, so they do not depend on the rank."""
        return {"epoch": self.epoch, "shard": self.shard, "position": self.position, "seed": self.seed,
                "shuffle": self.shuffle, "B": self.B, "T": self.T, "world_size": self.world_size,
                "num_sources": len(self.sources)}

    def load_state_dict(self, state: dict) -> None:
        if state["num_sources"] != len(self.sources) or state["T"] != self.T:
            raise ValueError(
                f"{self.name}: saved loader state is for {state['num_sources']} shard(s) at T={state['T']}, "
                f"this run has {len(self.sources)} at T={self.T}; resume with the same data and --block_size"
            )
        if state["position"] % self.rows_per_step:
            raise ValueError(f"{self.name}: saved position {state['position']} is not a whole step of "
                             f"{self.rows_per_step} rows; resume with the same batch_size x world_size product")
        self.seed, self.shuffle = state["seed"], state["shuffle"]
        self.epoch, self.shard = state["epoch"], state["shard"]
        self._load()
        if state["position"] > self.usable_rows:
            raise ValueError(f"{self.where()}: the saved position (row {state['position']:,}) is past this shard's "
                             f"{self.usable_rows:,} usable rows; the data changed since the checkpoint, restore it")
        self.position = state["position"]


class ShardedTokenLoader(TokenLoader):
    """`TokenLoader` over the `*_{split}_*.npy` shards of `data_dir` (split is "train" or "val"); the other
    arguments are TokenLoader's, after B and T."""

    def __init__(self, data_dir: str | Path, split: str, B: int, T: int, *args, **kwargs) -> None:
        assert split in ("train", "val"), f"split must be 'train' or 'val', not {split!r}"
        super().__init__(find_shards(data_dir, split), B, T, *args, **{"name": f"{data_dir} ({split})"} | kwargs)


def split_tokens(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """First (1 - val_fraction) for training, the rest for validation, as the lecture splits tiny Shakespeare."""
    n = int(len(tokens) * (1 - val_fraction))
    return tokens[:n], tokens[n:]
