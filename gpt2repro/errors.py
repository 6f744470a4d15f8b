"""Errors at the command-line boundary: whatever a stage raises for bad input becomes one line naming the
file or flag and the fix, never a traceback from deep inside torch."""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from collections.abc import Iterator
from pathlib import Path

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
    """The first line of an exception's message (or its type's name), for a one-line error."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]


def is_compile_failure(e: BaseException) -> bool:
    """torch.compile's own failures (a broken C compiler, an inductor bug) come from these packages."""
    return type(e).__module__.startswith(("torch._dynamo", "torch._inductor"))


def is_out_of_memory(e: BaseException) -> bool:
    """torch's out-of-memory error, without importing torch: stages that never import it (fineweb.py, whose
    spawned workers import this module too) start faster without it, and cannot run out of GPU memory."""
    torch = sys.modules.get("torch")
    if isinstance(e, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(e):
        return True  # out of host memory is a plain RuntimeError
    return torch is not None and isinstance(e, torch.OutOfMemoryError)


def check_writable(path: Path, flag: str) -> None:
    """Refuse up front an output path (given by `flag`) that is a file where a directory is needed, lies inside
    a file, or whose nearest existing directory cannot be written; nothing is created."""
    path = Path(path)
    existing = next(p for p in (path, *path.parents) if p.exists())  # "." or "/" at the latest
    if not existing.is_dir():
        where = "is" if existing == path else f"is inside {existing}, which is"
        raise ValueError(f"{flag} {path} {where} a file, not a directory; pick another {flag}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: {existing} is not writable (read-only?); make it writable or "
                         f"pick another {flag}")


STDOUT = "stdout"  # the `path` of one_line_errors for a stage whose only output is what it prints


def stdout_failed() -> bool:
    """Whether stdout cannot take its buffered output now (a print to a full disk or a closed pipe)."""
    try:
        sys.stdout.flush()
        return False
    except (OSError, ValueError):  # ValueError: stdout was closed
        return True


def drop_stdout() -> None:
    """Point stdout at /dev/null once it has failed, so that the flush at exit does not fail again with a traceback."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


@contextlib.contextmanager
def one_line_errors(oom_advice: str = OOM_ADVICE, path: str | Path = "") -> Iterator[None]:
    """Turn the errors a user can fix into `sys.exit("error: ...")`; anything else is a bug and keeps its traceback.

    `path` names an OSError that carries no file name (a failed write to a file already open); such an error while
    stdout cannot be flushed is stdout's (`STDOUT`: always).
    """
    try:
        yield
    except OSError as e:
        if not e.filename and (str(path) == STDOUT or stdout_failed()):  # a print to a full disk or a closed pipe
            drop_stdout()
            sys.exit(f"error: cannot write to stdout ({e.strerror or e}); the output is incomplete, send it "
                     "somewhere else")
        sys.exit(f"error: {describe_os_error(e, '' if e.filename else str(path))}")
    except ValueError as e:  # includes CheckpointError, ConfigError, HellaSwagError and FinewebError
        sys.exit(f"error: {e}")
    except Exception as e:
        if is_out_of_memory(e):
            sys.exit(f"error: out of memory; {oom_advice}")
        if is_compile_failure(e):
            sys.exit(f"error: torch.compile failed ({first_line(e)}); turn --compile off, or fix the C compiler")
        raise
