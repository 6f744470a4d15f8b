"""Checkpoint files: written atomically, read without unpickling arbitrary objects.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, saved with `torch.save`
and loaded with `torch.load(weights_only=True)`, so a file carrying pickled code is refused.
It holds at least `model`, `model_config`, `model_type` and `tokenizer` (see
`model.model_checkpoint_fields`); training adds optimizer, step, loader and RNG states.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path

import torch

from prepare import atomic_write

REQUIRED_KEYS = ("model", "model_config", "tokenizer")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


def save_checkpoint(obj: dict, path: str | Path) -> Path:
    """`torch.save` to a temp file in the same directory, fsync, then rename over `path`."""
    return atomic_write(Path(path), lambda f: torch.save(obj, f))


def check_crc(path: Path) -> None:
    """`torch.load` ignores the CRC-32 that `torch.save` records per entry, so a flipped bit would load as
    silently wrong weights; check them first (zip-format files only)."""
    try:
        if not zipfile.is_zipfile(path):
            return
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint ({e}); the file is corrupt or truncated") from None
    if bad is not None:
        raise CheckpointError(f"{path}: corrupt, its entry {bad} fails its CRC check; use an earlier checkpoint")


def refused_object(message: str) -> str:
    """The sentence of torch's multi-paragraph refusal (with terminal escapes) that names what was refused, whole."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", message)
    _, found, detail = text.partition("WeightsUnpickler error:")  # "...error: Unsupported global: GLOBAL x was not..."
    if not found:  # "Trying to load unsupported GLOBAL x whose module y is blocked."
        detail = next((line for line in text.splitlines() if "unsupported global" in line.lower()), "")
    line = next((line.strip() for line in detail.splitlines() if line.strip()), "")
    return line.split(". ")[0].rstrip(".") or "torch.load with weights_only=True refused it"


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load one of our checkpoints; any other file is a `CheckpointError` saying what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    check_crc(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise CheckpointError(
                f"{path}: refused, it contains pickled objects other than tensors and plain data "
                f"({refused_object(str(e))}); only load checkpoints you trust, and re-save them as plain state dicts"
            ) from None
        raise CheckpointError(f"{path}: not a readable checkpoint ({first[:120]}); the file may be corrupt") from None
    # LookupError: a text file read as a pickle
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, LookupError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: not a readable checkpoint ({first[:120]}); the file is corrupt or truncated"
        ) from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        raise CheckpointError(
            f"{path}: not a gpt2-repro checkpoint (needs keys {', '.join(REQUIRED_KEYS)}); "
            "for Hugging Face weights pass the model directory instead"
        )
    return ckpt


def checkpoint_path(out_dir: str | Path, step: int) -> Path:
    """Checkpoints are `OUT_DIR/ckpt_{step:07d}.pt`, so names sort by step."""
    return Path(out_dir) / f"ckpt_{step:07d}.pt"


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Finished checkpoints in `out_dir`, oldest first (temp files of interrupted writes are not listed)."""
    return sorted(Path(out_dir).glob("ckpt_*.pt"))


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None
