"""Token batches for training and evaluation, from uint16 `.npy` shards or from an array in memory.

A shard is a 1-D uint16 `.npy` file named `{prefix}_{split}_{index:06d}.npy` (the format of `fineweb.py`
and of build-nanogpt's `edu_fineweb10B`); every document starts with the EOT token. Shards are memory-mapped
and only the tokens of one batch are turned into int64.

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

EOT = 50256  # GPT-2's <|endoftext|>, the document separator in shards


def find_shards(data_dir: str | Path, split: str) -> list[Path]:
    """`*_{split}_*.npy` files of `data_dir`, sorted by name; a clear error when there are none."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ValueError(f"{data_dir}: no such data directory; run `python fineweb.py` or pass --data_dir")
    shards = sorted(data_dir.glob(f"*_{split}_*.npy"))
    if not shards:
        raise ValueError(f"{data_dir}: no *_{split}_*.npy shards; run `python fineweb.py` to write them")
    return shards


def open_shard(path: Path) -> np.ndarray:
    """Memory-map one shard, checking that it is a flat uint16 array."""
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable .npy shard ({e}); delete it and rerun fineweb.py") from None
    if tokens.dtype != np.uint16 or tokens.ndim != 1:
        raise ValueError(f"{path}: expected a 1-D uint16 array, found {tokens.ndim}-D {tokens.dtype}; "
                         "rewrite it with fineweb.py")
    return tokens


def shuffle_documents(tokens: np.ndarray, eot: int, rng: np.random.Generator) -> np.ndarray:
    """The documents of `tokens` (each starting at an EOT) in a random order, as a new uint16 array."""
    starts = np.flatnonzero(tokens == eot)
    if starts.size == 0 or starts[0] != 0:
        starts = np.concatenate(([0], starts))  # text before the first EOT is a document too
    ends = np.append(starts[1:], len(tokens))
    order = rng.permutation(len(starts))
    return np.concatenate([tokens[starts[i] : ends[i]] for i in order])


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
        eot: int | None = EOT,
        name: str = "data",
    ) -> None:
        self.sources, self.B, self.T = list(sources), B, T
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.seed, self.eot, self.name = shuffle, seed, eot, name
        self.rows_per_step = B * world_size
        for i, src in enumerate(self.sources):
            n = len(src) if isinstance(src, np.ndarray) else len(open_shard(src))
            if (n - 1) // T < self.rows_per_step:
                where = src if isinstance(src, Path) else f"{name} source {i}"
                raise ValueError(
                    f"{where}: {n:,} tokens cannot fill one batch of {world_size} rank(s) x {B} rows x {T}+1 tokens; "
                    f"lower --batch_size or --block_size (at most {max(n - 1, 0) // self.rows_per_step})"
                )
        self.reset()

    def reset(self, epoch: int = 0) -> None:
        """Back to the first batch of `epoch`."""
        self.epoch, self.shard, self.position = epoch, 0, 0
        self._load()

    def _rng(self, *keys: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, *keys])

    def _load(self) -> None:
        """Open the current shard of this epoch's order and fix its row order."""
        order = self._rng().permutation(len(self.sources)) if self.shuffle else range(len(self.sources))
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
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))

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
        self.position = state["position"]


class ShardedTokenLoader(TokenLoader):
    """`TokenLoader` over the `*_{split}_*.npy` shards of `data_dir` (split is "train" or "val")."""

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        B: int,
        T: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = False,
        seed: int = 1337,
    ) -> None:
        assert split in ("train", "val"), f"split must be 'train' or 'val', not {split!r}"
        super().__init__(find_shards(data_dir, split), B, T, rank, world_size, shuffle, seed, EOT,
                         name=f"{data_dir} ({split})")


def split_tokens(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """First (1 - val_fraction) for training, the rest for validation, as the lecture splits tiny Shakespeare."""
    n = int(len(tokens) * (1 - val_fraction))
    return tokens[:n], tokens[n:]
