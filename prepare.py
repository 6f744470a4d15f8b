"""Put the offline assets in place: tiny Shakespeare as `input.txt` and the GPT-2 BPE ranks file.

    python prepare.py            # idempotent: verified files already in place are kept

`input.txt` is downloaded from its canonical char-rnn URL when online, otherwise copied from
`$TINYSHAKESPEARE` or `../shared/data/tinyshakespeare/input.txt`; its sha256 is checked either way.
An `input.txt` that is already there with other text (your own corpus) is kept, never replaced.
The GPT-2 ranks file `whisper/assets/gpt2.tiktoken` is taken from the PyPI sdist of openai-whisper
(`pip download --no-deps`) into the cache dir of `tokenizer.py`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

from gpt2repro.errors import one_line_errors
from gpt2repro.fileio import atomic_write_bytes, read_limited, sha256_of
from gpt2repro.tokenizer import GPT2_RANKS_SHA256, gpt2_ranks_path

ROOT = Path(__file__).resolve().parent
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
WHISPER_SDIST = "openai-whisper==20250625"


def _download(url: str, timeout: float = 15.0) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.read()
    except Exception:
        return None


def ensure_shakespeare(dest: Path = ROOT / "input.txt") -> Path:
    """Put tiny Shakespeare at `dest`, verified by its sha256; a different file already there is left as it is."""
    if dest.exists():
        # someone's own text, put there as with nanoGPT, is what they mean to train on: never overwrite it
        if sha256_of(dest) != SHAKESPEARE_SHA256:
            print(f"{dest}: kept as it is ({dest.stat().st_size:,} bytes, not tiny Shakespeare), so training on "
                  "--text_path input.txt (the default) uses it; move it away and run `python prepare.py` again for "
                  "tiny Shakespeare")
        return dest
    local = [Path(p) for p in (os.environ.get("TINYSHAKESPEARE"),) if p]
    local += [ROOT.parent / "shared/data/tinyshakespeare/input.txt"]
    candidates: list[tuple[str, bytes | None]] = []
    for p in local:
        if p.is_file():
            candidates.append((str(p), read_limited(p, 64 << 20)))  # 1 MB expected; its sha256 decides
    candidates.append((SHAKESPEARE_URL, None))
    for source, data in candidates:
        if data is None:
            data = _download(source)
        if data is not None and hashlib.sha256(data).hexdigest() == SHAKESPEARE_SHA256:
            atomic_write_bytes(dest, data)
            print(f"input.txt: {len(data):,} bytes from {source}")
            return dest
    sys.exit(
        f"error: could not get tiny Shakespeare for {dest}: no verified copy at {', '.join(map(str, local))} "
        f"and {SHAKESPEARE_URL} unreachable; set TINYSHAKESPEARE=/path/to/input.txt"
    )


def ensure_gpt2_ranks(dest: Path | None = None) -> Path:
    """Cache GPT-2's BPE ranks file from the openai-whisper sdist, verified by its sha256."""
    dest = dest or gpt2_ranks_path()
    if dest.exists() and sha256_of(dest) == GPT2_RANKS_SHA256:
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", tmp,
               WHISPER_SDIST]
        r = subprocess.run(cmd, capture_output=True, text=True)
        sdists = list(Path(tmp).glob("*.tar.gz"))
        if r.returncode != 0 or not sdists:
            sys.exit(f"error: `{' '.join(cmd[2:])}` failed ({r.stderr.strip()[-200:]}); "
                     f"put gpt2.tiktoken at {dest} by hand")
        with tarfile.open(sdists[0]) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("whisper/assets/gpt2.tiktoken"))
            data = tar.extractfile(member).read()
    if hashlib.sha256(data).hexdigest() != GPT2_RANKS_SHA256:
        sys.exit(f"error: gpt2.tiktoken from {WHISPER_SDIST} has an unexpected sha256; not installed at {dest}")
    atomic_write_bytes(dest, data)
    print(f"gpt2.tiktoken: {len(data):,} bytes cached at {dest}")
    return dest


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.parse_args(argv)
    with one_line_errors():  # an unwritable directory or cache dir: one line naming it
        ensure_shakespeare()
        ensure_gpt2_ranks()


if __name__ == "__main__":
    main()
