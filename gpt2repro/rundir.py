"""A run directory: owned by one trainer at a time, holding `config.json`, `metrics.jsonl` and checkpoints.

`metrics.jsonl` has one JSON object per event (`{"step": ..., "time": ..., "val_loss": ...}`), appended as the run
goes; a line torn by a killed run is closed by the next run before it appends, and readers skip it.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

from gpt2repro.fileio import atomic_write_bytes

try:
    import fcntl
except ImportError:  # not POSIX: no lock
    fcntl = None

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"


class RunLock:
    """An OS lock (flock) on the run directory itself: held for the life of the process, released by the kernel
    on any exit (SIGKILL included), so a crashed run never blocks the next one; no file is created for it.
    export_hf.py takes the same lock before it renames an export into place, so it never replaces a directory
    a trainer holds, and a trainer never holds a directory that was renamed away under it."""

    def __init__(self, out_dir: Path, what: str = "--out_dir") -> None:
        self.out_dir, self.created = out_dir, not out_dir.exists()
        out_dir.mkdir(parents=True, exist_ok=True)
        self.fd: int | None = lock_directory(out_dir, what)

    def release(self) -> None:
        """Drop the lock; a directory this run created and left empty (a failed start) is removed again."""
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None
            if self.created:
                with contextlib.suppress(OSError):  # not empty: the run wrote something, keep it
                    self.out_dir.rmdir()


def lock_directory(path: Path, what: str = "--out_dir") -> int:
    """An open fd of directory `path` holding its exclusive flock; a ValueError naming the holder when another
    process holds it. The lock is taken again when `path` was replaced between the open and the lock, so the
    lock held is always on the directory that `path` names."""
    for _ in range(100):
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        if fcntl is None:
            return fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock_holder(os.fstat(fd).st_ino) or "unknown"
            os.close(fd)
            raise ValueError(f"{path} is in use by another trainer or export (pid {holder}); wait for it to finish, "
                             f"stop it, or choose another {what}") from None
        try:
            same = os.path.samestat(os.stat(path), os.fstat(fd))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # renamed away meanwhile: lock what is there now
        path.mkdir(parents=True, exist_ok=True)
    raise ValueError(f"{path} keeps being replaced by another process; choose another {what}")


def lock_holder(inode: int) -> str:
    """The pid holding a flock on `inode`, from /proc/locks (Linux); "" where that cannot be read."""
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return ""
    for line in lines:
        parts = line.split()
        if len(parts) > 5 and parts[1] == "FLOCK" and parts[5].rsplit(":", 1)[-1] == str(inode):
            return parts[4]
    return ""


def write_config(out_dir: Path, config: dict) -> None:
    atomic_write_bytes(out_dir / CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode())


def tail_is_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


class Metrics:
    """`metrics.jsonl` (appended, one JSON object per event) plus the optional TensorBoard/W&B sinks."""

    def __init__(self, out_dir: Path | None, time_offset: float = 0.0, tensorboard: bool = False,
                 wandb_project: str = "", config: dict | None = None) -> None:
        self.enabled, self.t0 = out_dir is not None, time.time() - time_offset
        self.tb = self.wandb = None
        if out_dir is None:
            return
        self.path = out_dir / METRICS_FILE
        # a line cut short by a killed run must not swallow the next one
        needs_newline = self.path.exists() and self.path.stat().st_size > 0 and not tail_is_newline(self.path)
        self.file = open(self.path, "a", encoding="utf-8")
        if needs_newline:
            self.file.write("\n")
        if tensorboard:
            self.tb = open_tensorboard(out_dir)
        if wandb_project:
            self.wandb = open_wandb(out_dir, wandb_project, config or {})

    def elapsed(self) -> float:
        return time.time() - self.t0

    def log(self, step: int, **values) -> None:
        if not self.enabled:
            return
        event = {"step": step, "time": round(self.elapsed(), 3), **values}
        self.file.write(json.dumps(event) + "\n")
        self.file.flush()
        numbers = {k: v for k, v in values.items() if isinstance(v, (int, float)) and v is not None}
        if self.tb is not None:
            for k, v in numbers.items():
                self.tb.add_scalar(k, v, step)
            if "sample" in values:
                self.tb.add_text("sample", values["sample"], step)
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()
            if self.wandb is not None:
                self.wandb.finish()


def open_tensorboard(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(log_dir=str(out_dir / "tensorboard"))


def open_wandb(out_dir: Path, project: str, config: dict):
    try:
        import wandb
    except ImportError:
        raise ValueError("--wandb needs the wandb package: pip install wandb") from None
    wandb.init(project=project, name=out_dir.name, config=config, resume="allow")
    return wandb
