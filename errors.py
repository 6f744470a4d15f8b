"""Errors at the command-line boundary: whatever a stage raises for bad input becomes one line naming the
file or flag and the fix, never a traceback from deep inside torch."""

from __future__ import annotations

import contextlib
import errno
import sys
from collections.abc import Iterator

import torch

OOM_ADVICE = ("lower --batch_size (accumulation keeps the total batch), --block_size or the model size, "
              "or use --batch_size auto")


def describe_os_error(e: OSError, what: str = "") -> str:
    """One line for a failed file operation: the path, the reason, and what to do about it."""
    path = e.filename or what or "a file"
    reason = e.strerror or str(e)
    fixes = {
        "ENOSPC": "free disk space (older files were left intact) and run again",
        "EDQUOT": "free disk space (older files were left intact) and run again",
        "EACCES": "make it writable or choose another path",
        "EPERM": "make it writable or choose another path",
        "EROFS": "it is on a read-only file system; choose another path",
        "ENOTDIR": "a part of it is a file, not a directory; choose another path",
        "EEXIST": "something is already there; choose another path",
        "EISDIR": "it is a directory; pass a file",
        "ENOENT": "check the path",
    }
    fix = fixes.get(errno.errorcode.get(e.errno or 0, ""), "check the path and permissions")
    prefix = f"{what}: " if what and what != path else ""
    return f"{prefix}{path}: {reason}; {fix}"


def first_line(e: BaseException, limit: int = 200) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]


def is_compile_failure(e: BaseException) -> bool:
    """torch.compile's own failures (a broken C compiler, an inductor bug) come from these packages."""
    return type(e).__module__.startswith(("torch._dynamo", "torch._inductor"))


@contextlib.contextmanager
def one_line_errors(oom_advice: str = OOM_ADVICE) -> Iterator[None]:
    """Turn the errors a user can fix into `sys.exit("error: ...")`; anything else is a bug and keeps its traceback."""
    try:
        yield
    except torch.OutOfMemoryError:
        sys.exit(f"error: out of memory; {oom_advice}")
    except OSError as e:
        sys.exit(f"error: {describe_os_error(e)}")
    except ValueError as e:  # includes CheckpointError and ConfigError
        sys.exit(f"error: {e}")
    except Exception as e:
        if is_compile_failure(e):
            sys.exit(f"error: torch.compile failed ({first_line(e)}); pass --compile false, or fix the C compiler")
        raise
