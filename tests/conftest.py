"""What every test file shares: tiny Shakespeare from a copy the tests own, never the repository's input.txt.

A user trains on their own text by putting it at input.txt (set-up keeps it), so tests that need Shakespeare read
`shakespeare()`: tests/.data/tinyshakespeare.txt, copied once via prepare.ensure_shakespeare from $TINYSHAKESPEARE
or ../shared (or from input.txt while that is still tiny Shakespeare) and checked against its sha256.
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

import pytest

import prepare
from gpt2repro.fileio import sha256_of

ROOT = Path(__file__).resolve().parents[1]
TEST_DATA = ROOT / "tests" / ".data"


@functools.cache
def shakespeare() -> Path:
    """The tests' own verified copy of tiny Shakespeare (skips the test where none can be had offline)."""
    dest = TEST_DATA / "tinyshakespeare.txt"
    if dest.is_file() and sha256_of(dest) == prepare.SHAKESPEARE_SHA256:
        return dest
    dest.unlink(missing_ok=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    own = ROOT / "input.txt"
    if not os.environ.get("TINYSHAKESPEARE") and own.is_file() and sha256_of(own) == prepare.SHAKESPEARE_SHA256:
        tmp = dest.with_suffix(".tmp")
        shutil.copyfile(own, tmp)
        os.replace(tmp, dest)
    else:
        try:
            prepare.ensure_shakespeare(dest)
        except (OSError, ValueError) as e:
            pytest.skip(f"no copy of tiny Shakespeare to test with ({e}); set $TINYSHAKESPEARE")
    if not dest.is_file() or sha256_of(dest) != prepare.SHAKESPEARE_SHA256:
        dest.unlink(missing_ok=True)
        pytest.skip("no verified copy of tiny Shakespeare to test with; set $TINYSHAKESPEARE to one")
    return dest
