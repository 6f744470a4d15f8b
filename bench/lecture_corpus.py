"""The English corpus of the lecture's exercise EX3 (pretrain a character model on a large text, then finetune it
on tiny Shakespeare), built from three Debian packages, which nothing in this repository redistributes:

    apt-get install -y dict-gcide wordnet-base bible-kjv bible-kjv-text
    python -m bench.lecture_corpus english.txt

- dict-gcide: the Collaborative International Dictionary of English (Webster's 1913 and WordNet), the dictd
  file /usr/share/dictd/gcide.dict.dz (gzip), lines stripped of their indentation, blank runs squeezed;
- bible-kjv-text: the King James Bible, as `bible Gen1:1-Rev22:21` (bible-kjv's reader) prints it;
- wordnet-base: every gloss (definition and examples: the text after " | ") of /usr/share/wordnet/data.{noun,
  verb,adj,adv}, one a line.

Each is turned into printable ASCII (NFKD, accents dropped; other characters removed) so the vocabulary is
small and holds every character of tiny Shakespeare. Each is cut at line ends into `PIECES` pieces of equal
size and the file interleaves them (piece 1 of each, then piece 2 of each, ...), so the last 10%, the validation
split train_gpt2.py takes, is the end of all three: the same kinds of text as the training split.
"""

from __future__ import annotations

import gzip
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

GCIDE = Path("/usr/share/dictd/gcide.dict.dz")
WORDNET = [Path(f"/usr/share/wordnet/data.{pos}") for pos in ("noun", "verb", "adj", "adv")]
ASCII_TEXT = re.compile(r"[^\n\x20-\x7e]")
PIECES = 1000


def to_ascii(text: str) -> str:
    return ASCII_TEXT.sub("", unicodedata.normalize("NFKD", text))


def gcide() -> str:
    lines = [line.strip() for line in gzip.open(GCIDE, "rt", encoding="utf-8", errors="replace")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines))


def bible() -> str:
    return subprocess.run(["bible", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True).stdout


def wordnet_glosses() -> str:
    glosses = []
    for path in WORDNET:
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.startswith("  ") and " | " in line:  # the licence header lines start with two spaces
                glosses.append(line.split(" | ", 1)[1].strip())
    return "\n".join(glosses) + "\n"


def pieces(text: str, n: int) -> list[str]:
    """`text` cut into `n` pieces of about equal size, each ending at a line end (the last may be empty)."""
    cuts = [0]
    for i in range(1, n):
        end = text.find("\n", max(cuts[-1], len(text) * i // n))
        cuts.append(len(text) if end < 0 else end + 1)
    cuts.append(len(text))
    return [text[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]


def build(out: Path) -> str:
    if out.exists():
        raise SystemExit(f"error: {out} exists; remove it or pass another path")
    missing = [str(p) for p in (GCIDE, *WORDNET) if not p.exists()]
    if missing:
        raise SystemExit(f"error: {missing[0]} is missing; apt-get install -y dict-gcide wordnet-base bible-kjv "
                         "bible-kjv-text")
    sources = [pieces(to_ascii(text), PIECES) for text in (gcide(), bible(), wordnet_glosses())]
    text = "".join(piece for group in zip(*sources, strict=True) for piece in group)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
    return text


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m bench.lecture_corpus OUT.txt")
    corpus = build(Path(sys.argv[1]))
    print(f"{sys.argv[1]}: {len(corpus):,} characters, vocabulary of {len(set(corpus))}")
