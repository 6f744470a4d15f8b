"""The token shard format shared by `fineweb.py` (which writes it) and `data.py` (which reads it).

A shard is a 1-D little-endian uint16 `.npy` file named `{prefix}_{split}_{index:06d}.npy` (the format of
build-nanogpt's `edu_fineweb10B`); shard 0 is the validation shard and every document starts with the EOT token.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

DTYPE = np.dtype("<u2")  # uint16: every GPT-2 id (< 50257) fits, at half the bytes of int32


def check_prefix(prefix: str) -> str:
    """A shard prefix is a plain name: with a path separator (`../x`) the shards would land outside their folder."""
    if not prefix or prefix in (".", "..") or "/" in prefix or "\\" in prefix or "\0" in prefix \
            or prefix.startswith("."):
        raise ValueError(f"--prefix {prefix!r}: must be a plain file-name prefix (no '/', '\\', or leading '.'), as "
                         "shards are written inside --out_dir; choose the folder with --out_dir")
    return prefix


def shard_name(prefix: str, index: int) -> str:
    """Shard 0 is the validation shard, as in build-nanogpt."""
    return f"{check_prefix(prefix)}_{'val' if index == 0 else 'train'}_{index:06d}.npy"


def npy_header(n_tokens: int) -> bytes:
    """The exact header `np.save` writes for a 1-D uint16 array of `n_tokens` (128 bytes for any length)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(DTYPE), "fortran_order": False, "shape": (n_tokens,)})
    return buf.getvalue()


def shard_bytes(n_tokens: int) -> int:
    """File size of a shard of `n_tokens`."""
    return len(npy_header(n_tokens)) + DTYPE.itemsize * n_tokens


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
    if tokens.dtype != DTYPE or tokens.ndim != 1:
        raise ValueError(f"{path}: expected a 1-D uint16 array, found {tokens.ndim}-D {tokens.dtype}; "
                         "rewrite it with fineweb.py")
    return tokens


def check_token_ids(tokens: np.ndarray, vocab_size: int, where: str) -> None:
    """Token ids must index the embedding table; a larger one would fail deep inside the model."""
    if len(tokens) and int(tokens.max()) >= vocab_size:
        raise ValueError(f"{where}: token id {int(tokens.max())} is >= the vocabulary size {vocab_size}; "
                         "the shards were written with another tokenizer, rewrite them with fineweb.py")
