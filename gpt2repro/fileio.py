"""Files written so that nothing is ever half there: temp file beside the target, fsync, rename.

Every stage writes its results (checkpoints, shards, manifests, configs, figures) through `atomic_write`, with
the permissions the umask gives a plain `open`; `refused_object` names what torch's safe loader refused.
Every reader of a user's file goes through `read_limited`, `limited_lines` and `parse_json`: a file, a line and
a JSON value are bounded in size, nesting and digits, so /dev/zero or a hostile line is a ValueError naming the
file, never a MemoryError or RecursionError.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

MiB = 1 << 20
MAX_JSON_FILE = 64 * MiB  # config.json, manifest.json, export markers, tokenizers: far smaller in practice
MAX_NUMBER_DIGITS = 100  # an integer longer than this is no count or id of ours (and float() of it overflows)


def read_limited(path: str | Path, limit: int, what: str = "") -> bytes:
    """The bytes of `path`, refused with a ValueError naming it (and `what`, the flag) when over `limit` bytes.
    Reads at most `limit + 1` bytes, so a device or a pipe that never ends (/dev/zero) is refused too."""
    label = f"{what} {path}" if what else str(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:  # a regular file says its size up front
            raise ValueError(too_large(label, limit))
        chunks, total = [], 0
        while total <= limit:
            chunk = f.read(min(MiB, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    if total > limit:
        raise ValueError(too_large(label, limit))
    return b"".join(chunks)


def too_large(label: str, limit: int) -> str:
    return f"{label}: larger than {limit:,} bytes, the most this reads; pass a smaller file (is it the right one?)"


def limited_lines(f: BinaryIO, label: str, limit: int, line_limit: int) -> Iterator[tuple[int, bytes]]:
    """(line number, line) of an open binary file, each line at most `line_limit` bytes and all at most `limit`."""
    total = 0
    for number in range(1, 1 << 62):
        line = f.readline(line_limit + 1)
        if not line:
            return
        if len(line) > line_limit and not line.endswith(b"\n"):
            raise ValueError(f"{label}:{number}: a line longer than {line_limit:,} bytes; is this the right file?")
        total += len(line)
        if total > limit:
            raise ValueError(too_large(label, limit))
        yield number, line


def _bounded_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_NUMBER_DIGITS:
        raise ValueError(f"a number of {len(digits)} digits (at most {MAX_NUMBER_DIGITS} are read)")
    return int(digits)


def parse_json(text: str | bytes) -> object:
    """`json.loads` bounded in nesting (the interpreter's recursion limit) and in the digits of an integer; every
    failure is a ValueError (json.JSONDecodeError for bad syntax) whose message says what is wrong."""
    try:
        return json.loads(text, parse_int=_bounded_int)
    except RecursionError:
        raise ValueError("nested too deeply (JSON arrays or objects within each other beyond Python's recursion "
                         "limit)") from None


def read_json(path: str | Path, limit: int = MAX_JSON_FILE) -> object:
    """A JSON file, bounded as `read_limited` and `parse_json` are; OSError or ValueError (the latter naming it)."""
    data = read_limited(path, limit)
    try:
        return parse_json(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


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
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.filename:
            raise
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None  # a write to the open file names no path
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap what `a` and `b` name in one step (Linux renameat2 RENAME_EXCHANGE), so that `b` never goes missing;
    False where the system or file system cannot, and the caller renames in two steps instead."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_create_bytes(path: Path, data: bytes) -> Path:
    """Like `atomic_write_bytes`, but a file at `path` is never replaced, even one that appeared while `data` was
    made: the finished temp file is published with a hard link (FileExistsError when `path` is taken), or, where
    the file system has none, by claiming the name with an exclusive create first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), public_mode())
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise FileExistsError(errno.EEXIST, "appeared while this ran, and is kept", str(path)) from None
        except OSError:  # no hard links here (EPERM, ENOTSUP, ...): claim the name, then rename onto our claim
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            os.replace(tmp, path)
    except OSError as e:
        if e.filename:
            raise
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def refused_object(message: str) -> str:
    """The sentence of torch's multi-paragraph refusal (with terminal escapes) that names what was refused, whole."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", message)
    _, found, detail = text.partition("WeightsUnpickler error:")  # "...error: Unsupported global: GLOBAL x was not..."
    if not found:  # "Trying to load unsupported GLOBAL x whose module y is blocked."
        detail = next((line for line in text.splitlines() if "unsupported global" in line.lower()), "")
    line = next((line.strip() for line in detail.splitlines() if line.strip()), "")
    return line.split(". ")[0].rstrip(".") or "torch.load with weights_only=True refused it"
