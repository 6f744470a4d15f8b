"""Files written so that nothing is ever half there: temp file beside the target, fsync, rename.

Every stage writes its results (checkpoints, shards, manifests, configs, figures) through `atomic_write`, with
the permissions the umask gives a plain `open`; `refused_object` names what torch's safe loader refused.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def current_umask() -> int:
    """The process umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def public_mode(directory: bool = False) -> int:
    """The mode a plain `open`/`mkdir` would give: mkstemp/mkdtemp use 0600/0700 whatever the umask says."""
    return (0o777 if directory else 0o666) & ~current_umask()


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> Path:
    """Call `write` on a temp file beside `path`, fsync, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), public_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def refused_object(message: str) -> str:
    """The sentence of torch's multi-paragraph refusal (with terminal escapes) that names what was refused, whole."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", message)
    _, found, detail = text.partition("WeightsUnpickler error:")  # "...error: Unsupported global: GLOBAL x was not..."
    if not found:  # "Trying to load unsupported GLOBAL x whose module y is blocked."
        detail = next((line for line in text.splitlines() if "unsupported global" in line.lower()), "")
    line = next((line.strip() for line in detail.splitlines() if line.strip()), "")
    return line.split(". ")[0].rstrip(".") or "torch.load with weights_only=True refused it"
