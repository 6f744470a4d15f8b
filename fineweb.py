"""FineWeb-EDU (or any text corpus) to GPT-2 token shards: parallel, bounded in memory, resumable, verified.

    python fineweb.py                                          # FineWeb-EDU sample-10BT -> edu_fineweb10B/
    python fineweb.py --data_files 'corpus/*.parquet' --shard_size 1000000 --out_dir corpus_tokens
    python fineweb.py --verify --out_dir edu_fineweb10B        # check every shard against manifest.json

Every document becomes EOT (50256) followed by its GPT-2 tokens; the token stream is cut into shards of
`--shard_size` tokens saved as uint16 `.npy` files named `{prefix}_{split}_{index:06d}.npy`, shard 0 `val` and
the rest `train`, the last one shorter: the same files build-nanogpt's fineweb.py writes. `manifest.json` beside
them records the source (pinned revision or the sha256 of each local file), the tokenizer and its hash, and for
each shard its token count, document count, sha256 and the corpus position (document, token offset) where it
starts, so re-running the same command after a crash resumes after the last finished shard and writes the same
bytes an uninterrupted run would have.
"""

from __future__ import annotations

import argparse
import errno
import glob
import hashlib
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import chain, pairwise
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
from tqdm import tqdm

from gpt2repro.errors import check_writable, first_line, one_line_errors
from gpt2repro.fileio import atomic_write_bytes, limited_lines, parse_json, read_json, sha256_of
from gpt2repro.shards import DTYPE, check_prefix, check_token_ids, npy_header, open_shard, shard_bytes, shard_name
from gpt2repro.tokenizer import GPT2_EOT, GPT2_PATTERN, gpt2_encoding

if TYPE_CHECKING:  # datasets is imported where it is used: tokenizer workers never need it
    from datasets import Dataset, IterableDataset

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "gpt2-repro token shards v1"
BATCH_DOCS = 256  # documents per tokenizer task: ~1 MB of web text, large enough to amortize the IPC
TOKENS_PER_BYTE = 0.3  # a deliberately high guess of GPT-2 tokens per byte of English text, for the disk check
MAX_LINE_BYTES = 1 << 30  # one JSON line (one document) of a --data_files .jsonl, as `datasets` reads it whole
FILE_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "text"}


class FinewebError(ValueError):
    """Bad input or state; the message names the file or option and the fix (one line, via one_line_errors)."""


class DiskFullError(FinewebError):
    """The disk filled up while writing; only complete shards are left."""


@dataclass
class JobConfig:
    dataset: str = "HuggingFaceFW/fineweb-edu"
    name: str | None = "sample-10BT"
    revision: str | None = None  # a commit of the dataset repo; resolved and recorded when not given
    split: str = "train"
    data_files: list[str] = field(default_factory=list)  # local files or globs instead of a hub dataset
    text_column: str = "text"
    txt_sample_by: str = "document"  # for .txt files: one document per file, paragraph or line
    out_dir: str = "edu_fineweb10B"
    prefix: str = "edufineweb"
    shard_size: int = 100_000_000
    num_proc: int = 0  # 0: every core this process may use
    max_tokens: int | None = None  # stop after this many tokens
    streaming: bool = False


@dataclass
class Position:
    """A place in the token stream: document `doc` of the corpus, after its first `offset` tokens."""

    doc: int = 0
    offset: int = 0


# ----------------------------------------------------------------------------- tokenizing (in worker processes)


def tokenizer_info() -> dict:
    """Which tokenizer made the shards: a hash of its pattern and of every token's bytes, in id order."""
    enc = gpt2_encoding()
    h = hashlib.sha256(GPT2_PATTERN.encode())
    for i in range(enc.n_vocab):
        b = enc.decode_single_token_bytes(i)
        h.update(len(b).to_bytes(4, "little") + b)
    return {"name": "gpt2", "eot": GPT2_EOT, "n_vocab": enc.n_vocab, "sha256": h.hexdigest()}


def tokenize_documents(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """EOT + GPT-2 tokens of each text, concatenated as uint16, and each document's token count (EOT included)."""
    enc = gpt2_encoding()
    # encode_to_numpy with no special tokens allowed or disallowed is encode_ordinary, minus the Python int list
    docs = [enc.encode_to_numpy(t, disallowed_special=()) for t in texts]
    lengths = np.fromiter((len(d) + 1 for d in docs), dtype=np.int64, count=len(docs))
    eot = np.array([GPT2_EOT], dtype=np.uint32)
    flat = np.concatenate([a for d in docs for a in (eot, d)]) if docs else np.empty(0, np.uint32)
    if flat.size and int(flat.max()) >= 1 << 16:
        raise FinewebError(f"token id {int(flat.max())} does not fit in uint16; the tokenizer is not GPT-2's")
    return flat.astype(DTYPE), lengths


def _init_worker(parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops the pool cleanly
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    gpt2_encoding()


def _exit_with_parent(parent: int) -> None:
    """A parent killed outright (SIGKILL, the OOM killer) never stops its pool, and a worker waiting for the next
    batch would wait forever (it holds the task queue's write end itself): exit once the parent is gone, which
    also lets multiprocessing's resource tracker see its last user go and exit."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


# ----------------------------------------------------------------------------- the source corpus


def resolve_data_files(patterns: list[str]) -> list[Path]:
    """Expand local files and globs, in a stable order; every pattern must match, and a file matched by two
    patterns (or reached by two paths) is read once, where it first appears."""
    files: dict[Path, Path] = {}  # resolved path -> the path as matched, in order
    for pattern in patterns:
        matched = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        matched = [m for m in matched if os.path.isfile(m)]
        if not matched:
            raise FinewebError(f"--data_files {pattern!r} matches no files; check the path or quote the glob")
        for m in matched:
            files.setdefault(Path(m).resolve(), Path(m))
    return list(files.values())


def file_builder(files: list[Path]) -> str:
    """The `datasets` builder that reads these files (parquet, json lines or text), all of one kind."""
    kinds = set()
    for f in files:
        suffixes = [s for s in f.suffixes if s not in (".gz", ".bz2", ".xz", ".zst")]
        kind = FILE_BUILDERS.get(suffixes[-1] if suffixes else "")
        if kind is None:
            raise FinewebError(f"{f}: unknown file type; --data_files takes .parquet, .jsonl/.json or .txt files")
        kinds.add(kind)
    if len(kinds) > 1:
        raise FinewebError(f"--data_files mixes file types ({', '.join(sorted(kinds))}); pass one kind per run")
    return kinds.pop()


def describe_source(cfg: JobConfig, files: list[Path]) -> dict:
    """What the tokens are made from, precisely enough to refuse resuming from a different corpus."""
    if files:
        return {"builder": file_builder(files), "split": cfg.split, "text_column": cfg.text_column,
                "txt_sample_by": cfg.txt_sample_by,
                "files": [{"path": str(f), "bytes": f.stat().st_size, "sha256": sha256_of(f)} for f in files]}
    return {"dataset": cfg.dataset, "name": cfg.name, "revision": cfg.revision, "split": cfg.split,
            "text_column": cfg.text_column}


def resolve_revision(cfg: JobConfig) -> str | None:
    """The dataset repo's current commit, so the run is pinned to it; None (with a warning) when the hub cannot
    be reached."""
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(cfg.dataset, revision=cfg.revision).sha
    except Exception as e:  # offline, unknown repo, no huggingface_hub: load_corpus says what fails, if anything
        print(f"warning: could not look up the current revision of {cfg.dataset} ({type(e).__name__}: "
              f"{first_line(e, 120)}); the run is not pinned to one, pass --revision to pin it", file=sys.stderr)
        return cfg.revision


def content_key(source: dict) -> str:
    """A name for the local files' exact bytes: `datasets` keys its cache of local files on path and mtime only,
    so a file edited in place with its size and mtime kept (`cp -p`, `rsync -a`, `tar x`) would be read stale."""
    digests = "".join(f["sha256"] for f in source.get("files", []))
    return "sha256-" + hashlib.sha256(digests.encode()).hexdigest()[:32]


def load_corpus(cfg: JobConfig, files: list[Path], num_proc: int, key: str | None = None) -> Dataset | IterableDataset:
    """The corpus as a `datasets` Dataset (or IterableDataset with --streaming) of just the text column; local
    files are cached under the config name `key` (`content_key`), so new bytes are never served from an old cache."""
    import datasets  # here, not at the top: tokenizer workers never need it

    try:
        if files:
            kwargs = {"sample_by": cfg.txt_sample_by} if file_builder(files) == "text" else {}
            if key is not None:
                kwargs["name"] = key
            ds = datasets.load_dataset(file_builder(files), data_files=[str(f) for f in files], split=cfg.split,
                                       streaming=cfg.streaming,
                                       num_proc=None if cfg.streaming or len(files) < 2 else min(num_proc, len(files)),
                                       **kwargs)
        else:
            ds = datasets.load_dataset(cfg.dataset, name=cfg.name, split=cfg.split, revision=cfg.revision,
                                       streaming=cfg.streaming, num_proc=None if cfg.streaming else num_proc)
    except Exception as e:
        if files and file_builder(files) == "json":
            check_json_lines(files)  # names file:line of what datasets only calls a generation error
        what = ", ".join(map(str, files[:3])) + (" ..." if len(files) > 3 else "") if files else cfg.dataset
        first = (str(e).strip().splitlines() or [""])[0][:200]
        hint = "check the files" if files else "check the network (and HF_HUB_OFFLINE), or read local --data_files"
        raise FinewebError(f"could not load {what} ({type(e).__name__}: {first}); {hint}") from None
    columns = ds.column_names
    if columns is not None and cfg.text_column not in columns:
        raise FinewebError(f"the corpus has no column {cfg.text_column!r} (columns: {', '.join(columns)}); "
                           "pass --text_column")
    feature = (ds.features or {}).get(cfg.text_column)
    kind = getattr(feature, "dtype", type(feature).__name__)
    if feature is not None and kind not in ("string", "large_string"):
        raise FinewebError(f"{source_name(cfg)}: column {cfg.text_column!r} holds {kind}, not text; "
                           "pick another --text_column or clean the corpus")
    return ds.select_columns([cfg.text_column])


def check_json_lines(files: list[Path]) -> None:
    """Find the first line of these JSON-lines files that is not a JSON object, as `file:line`, as hellaswag.py
    does; an empty file is named too."""
    for path in files:
        if path.suffix != ".jsonl":  # compressed, or a .json document: left to `datasets`' own message
            continue
        seen = False
        with open(path, "rb") as f:
            for number, raw in limited_lines(f, str(path), 1 << 62, MAX_LINE_BYTES):
                if not raw.strip():
                    continue
                seen = True
                try:
                    record = parse_json(raw.decode("utf-8"))
                except UnicodeDecodeError as e:
                    raise FinewebError(f"{path}:{number}: not UTF-8 text (byte {e.start + 1} of the line); fix or "
                                       "remove that line") from None
                except ValueError as e:  # JSONDecodeError, nested too deeply, a number of hundreds of digits
                    reason = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
                    raise FinewebError(f"{path}:{number}: not valid JSON ({reason}); fix or remove that line") from None
                if not isinstance(record, dict):
                    raise FinewebError(f"{path}:{number}: a JSON {type(record).__name__}, not an object with a "
                                       "text field; fix or remove that line")
        if not seen:
            raise FinewebError(f"{path}: no JSON lines in it (the file is empty); pass files with documents")


def source_name(cfg: JobConfig) -> str:
    """The corpus as the user named it, for messages."""
    return " ".join(cfg.data_files) if cfg.data_files else cfg.dataset


def text_bytes(ds: Dataset | IterableDataset, cfg: JobConfig, files: list[Path]) -> int | None:
    """Bytes of text in the corpus (exact for a loaded Dataset, from file metadata otherwise), None if unknown."""
    import pyarrow.compute as pc

    if hasattr(ds, "data"):  # a memory-mapped Dataset: sum the string lengths from the arrow offsets
        return int(pc.sum(pc.binary_length(ds.data.column(cfg.text_column))).as_py() or 0)
    if files and file_builder(files) == "parquet":
        import pyarrow.parquet as pq

        total = 0
        for f in files:
            meta = pq.ParquetFile(f).metadata
            for g in range(meta.num_row_groups):
                rg = meta.row_group(g)
                total += sum(rg.column(c).total_uncompressed_size for c in range(rg.num_columns)
                             if rg.column(c).path_in_schema == cfg.text_column)
        return total
    if files:
        return sum(f.stat().st_size for f in files)
    info = getattr(ds, "info", None)
    split = info.splits.get(cfg.split) if info is not None and info.splits else None
    return split.num_bytes if split is not None and split.num_bytes else None


def document_batches(ds: Dataset | IterableDataset, cfg: JobConfig, start_doc: int) -> Iterator[list[str]]:
    """Lists of BATCH_DOCS texts in corpus order, from document `start_doc` on."""
    if start_doc:
        ds = ds.skip(start_doc)
    doc = start_doc
    for batch in ds.iter(batch_size=BATCH_DOCS):
        if cfg.text_column not in batch:
            raise FinewebError(f"the corpus has no column {cfg.text_column!r} (columns: {', '.join(batch)}); "
                               "pass --text_column")
        texts = batch[cfg.text_column]
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise FinewebError(f"{source_name(cfg)}: document {doc + i} has {type(t).__name__} in column "
                                   f"{cfg.text_column!r}, not text; clean the corpus or pick another --text_column")
        doc += len(texts)
        yield texts


# ----------------------------------------------------------------------------- writing shards


def write_bytes(f: BinaryIO, data: bytes | memoryview) -> None:
    """Every byte write of a shard goes through here (one place where a full disk shows up)."""
    f.write(data)


def is_disk_full(e: OSError) -> bool:
    return e.errno in (errno.ENOSPC, errno.EDQUOT)


class ShardWriter:
    """Writes the token stream into shards as it arrives: each shard goes to a temp file, then is renamed.

    Memory stays bounded by one batch, whatever the shard size: tokens are appended to the file and hashed
    on the way. A full shard's header is known in advance; the last, shorter shard gets its header rewritten
    in place (numpy pads headers so the length never changes) and is hashed from disk.
    """

    def __init__(self, out_dir: Path, prefix: str, shard_size: int) -> None:
        self.out_dir, self.prefix, self.shard_size = out_dir, prefix, shard_size
        self.file = None
        self.tmp: Path | None = None

    def open(self, index: int, start: Position) -> None:
        self.index, self.start, self.count, self.documents = index, start, 0, 0
        self.path = self.out_dir / shard_name(self.prefix, index)
        fd, tmp = tempfile.mkstemp(dir=self.out_dir, prefix=f".{self.path.name}.", suffix=".tmp")
        self.file, self.tmp = os.fdopen(fd, "wb"), Path(tmp)
        header = npy_header(self.shard_size)
        self.sha = hashlib.sha256(header)
        self._write(header)

    def write(self, tokens: np.ndarray) -> None:
        data = memoryview(np.ascontiguousarray(tokens, dtype=DTYPE)).cast("B")
        self._write(data)
        self.sha.update(data)
        self.count += len(tokens)
        self.documents += int(np.count_nonzero(tokens == GPT2_EOT))  # every document starts with one EOT

    def close(self) -> dict:
        """Finish the open shard: fix a short shard's header, fsync, rename into place; its manifest entry."""
        try:
            if self.count != self.shard_size:
                header = npy_header(self.count)
                assert len(header) == len(npy_header(self.shard_size)), "numpy header length changed"
                self.file.seek(0)
                self._write(header)
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
        except OSError as e:
            self.discard()
            raise DiskFullError(self._full_message()) if is_disk_full(e) else e from None
        digest = sha256_of(self.tmp) if self.count != self.shard_size else self.sha.hexdigest()
        os.replace(self.tmp, self.path)
        self.file, self.tmp = None, None
        return {"file": self.path.name, "split": "val" if self.index == 0 else "train", "index": self.index,
                "tokens": self.count, "documents": self.documents, "sha256": digest, "start": asdict(self.start)}

    def discard(self) -> None:
        """Drop the unfinished shard (on an error or Ctrl-C) so only complete shards are left."""
        if self.file is not None:
            try:
                self.file.close()
            except OSError:
                pass
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)
        self.file, self.tmp = None, None

    def _write(self, data: bytes | memoryview) -> None:
        try:
            write_bytes(self.file, data)
        except OSError as e:
            self.discard()
            raise DiskFullError(self._full_message()) if is_disk_full(e) else e from None

    def _full_message(self) -> str:
        free = shutil.disk_usage(self.out_dir).free
        return (f"disk full writing {self.path} ({free / 1e9:.2f} GB free on {self.out_dir}); the unfinished shard "
                f"was removed and the {self.index} finished shards are kept; free space and re-run the same "
                "command to resume")


# ----------------------------------------------------------------------------- the manifest


def read_manifest(out_dir: Path) -> dict | None:
    path = out_dir / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = read_json(path)
    except (OSError, ValueError) as e:
        raise FinewebError(f"{path}: unreadable ({e}); delete {out_dir} to start over") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise FinewebError(f"{path}: not a manifest written by fineweb.py; use another --out_dir")
    return manifest


def write_manifest(out_dir: Path, manifest: dict) -> None:
    try:
        atomic_write_bytes(out_dir / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    except OSError as e:
        if is_disk_full(e):
            raise DiskFullError(f"disk full writing {out_dir / MANIFEST}; free space and re-run the same "
                                "command to resume") from None
        raise


def job_identity(manifest: dict) -> dict:
    """The fields that decide the shards' bytes: a resumed run must agree on all of them."""
    return {k: manifest[k] for k in ("source", "tokenizer", "prefix", "shard_size", "max_tokens")}


def shard_file_ok(out_dir: Path, entry: dict) -> bool:
    """Cheap resume check: the shard is there with the right size (`--verify` checks the hashes)."""
    path = out_dir / entry["file"]
    return path.is_file() and path.stat().st_size == shard_bytes(entry["tokens"])


def resume_state(out_dir: Path, manifest: dict) -> tuple[list[dict], Position]:
    """The finished shards to keep and where to go on; a missing or truncated shard is made again from its start."""
    shards = manifest["shards"]
    for i, entry in enumerate(shards):
        if not shard_file_ok(out_dir, entry):
            print(f"{out_dir / entry['file']}: missing or the wrong size; writing it again from there on")
            return shards[:i], Position(**entry["start"])
    return shards, Position(**manifest["next"])


def remove_temp_files(out_dir: Path, prefix: str) -> None:
    """Temp files of an interrupted run (killed before it could clean up)."""
    for tmp in chain(out_dir.glob(f".{prefix}_*.npy.*.tmp"), out_dir.glob(f".{MANIFEST}.*.tmp")):
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- the job


def default_num_proc() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_disk_space(out_dir: Path, n_bytes: int | None, n_docs: int | None, remaining_tokens: int | None,
                     shard_size: int) -> None:
    """Refuse to start when the shards (estimated) will not fit on the disk."""
    estimates = []
    if n_bytes is not None:
        estimates.append(int(n_bytes * TOKENS_PER_BYTE) + (n_docs or 0))
    if remaining_tokens is not None:
        estimates.append(remaining_tokens)
    if not estimates:
        print("disk check: corpus size unknown, not estimated")
        return
    tokens = min(estimates)
    need = tokens * DTYPE.itemsize + (tokens // shard_size + 1) * shard_bytes(0)  # shard_bytes(0): one header
    free = shutil.disk_usage(out_dir).free
    print(f"disk check: about {tokens / 1e6:,.1f}M tokens -> {need / 1e9:.2f} GB of shards; {free / 1e9:.2f} GB free")
    if need > free:
        raise FinewebError(f"{out_dir} has {free / 1e9:.2f} GB free but the shards need about {need / 1e9:.2f} GB; "
                           "free space, pick another --out_dir, or cap the run with --max_tokens")


def tokenized_batches(batches: Iterator[list[str]], num_proc: int) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """`tokenize_documents` of each batch plus its document count, in order.

    Runs on `num_proc` spawned processes with a few batches in flight.
    """
    if num_proc <= 1:
        for texts in batches:
            yield (*tokenize_documents(texts), len(texts))
        return
    # spawn on every OS: the same start method as macOS and Windows, and no fork of a process holding datasets
    with ProcessPoolExecutor(num_proc, mp_context=get_context("spawn"), initializer=_init_worker,
                             initargs=(os.getpid(),)) as pool:
        pending: deque[tuple[Future, int]] = deque()
        try:
            for texts in batches:
                pending.append((pool.submit(tokenize_documents, texts), len(texts)))
                if len(pending) >= 2 * num_proc + 2:  # bounded: never the whole corpus in flight
                    fut, n = pending.popleft()
                    yield (*fut.result(), n)
            while pending:
                fut, n = pending.popleft()
                yield (*fut.result(), n)
        finally:
            for fut, _ in pending:
                fut.cancel()


def position_in_batch(lengths: np.ndarray, first_doc: int, j: int) -> Position:
    """The corpus position of token `j` of a batch whose documents have token counts `lengths`."""
    ends = np.cumsum(lengths)
    k = int(np.searchsorted(ends, j, side="right"))
    if k == len(lengths):
        return Position(first_doc + k, 0)
    return Position(first_doc + k, j - int(ends[k] - lengths[k]))


def check_options(cfg: JobConfig) -> None:
    """Numbers in range, and no hub option that --data_files would silently ignore."""
    check_prefix(cfg.prefix)
    if cfg.shard_size < 1:
        raise FinewebError(f"--shard_size must be positive, got {cfg.shard_size}")
    if cfg.max_tokens is not None and cfg.max_tokens < 1:
        raise FinewebError(f"--max_tokens must be positive, got {cfg.max_tokens}")
    if cfg.num_proc < 0:
        raise FinewebError(f"--num_proc must be 0 (every core) or a positive number of processes, got {cfg.num_proc}")
    default = JobConfig()
    ignored = [f"--{k}" for k in ("dataset", "name", "revision") if getattr(cfg, k) != getattr(default, k)]
    if cfg.data_files and ignored:
        one = len(ignored) == 1
        raise FinewebError(f"{', '.join(ignored)} {'does' if one else 'do'} not apply to --data_files (local files "
                           f"read instead of a hub dataset); drop {'it' if one else 'them'} or --data_files")


def plan(cfg: JobConfig, files: list[Path]) -> tuple[dict, Position, dict | None]:
    """The manifest of this job with the finished shards kept, where to start, and the previous manifest."""
    check_options(cfg)
    out_dir = Path(cfg.out_dir)
    old = read_manifest(out_dir)
    if old is None and out_dir.is_dir() and any(out_dir.glob(f"{cfg.prefix}_*.npy")):
        raise FinewebError(f"{out_dir} holds {cfg.prefix}_*.npy shards but no {MANIFEST} (written by another "
                           "tool?); pick a new --out_dir or move them away")
    if not files and cfg.revision is None:
        # pin the dataset: reuse the commit an earlier run recorded, or the hub's current one
        cfg.revision = (old or {}).get("source", {}).get("revision") or resolve_revision(cfg)
    tok = tokenizer_info()
    if tok["n_vocab"] > 1 << 16:
        raise FinewebError(f"the tokenizer has {tok['n_vocab']} ids; uint16 shards hold at most 65,536")
    manifest = {"format": MANIFEST_FORMAT, "source": describe_source(cfg, files), "tokenizer": tok,
                "dtype": "uint16", "prefix": cfg.prefix, "shard_size": cfg.shard_size, "max_tokens": cfg.max_tokens,
                "shards": [], "next": asdict(Position()), "complete": False}
    if old is None:
        return manifest, Position(), None
    if job_identity(old) != job_identity(manifest):
        diff = [k for k, v in job_identity(manifest).items() if job_identity(old)[k] != v]
        raise FinewebError(f"{out_dir / MANIFEST} is from a different job ({', '.join(diff)} differ); "
                           "re-run with the same options, or pick a new --out_dir")
    manifest["shards"], start = resume_state(out_dir, old)
    manifest["next"] = asdict(start)  # written before any new shard: a run stopped again resumes from here too
    return manifest, start, old


def write_shards(ds: Dataset | IterableDataset, cfg: JobConfig, manifest: dict, start: Position, num_proc: int,
                 n_docs: int | None) -> int:
    """Tokenize from `start` on and cut the stream into shards, recording each in the manifest; new tokens."""
    out_dir = Path(cfg.out_dir)
    writer = ShardWriter(out_dir, cfg.prefix, cfg.shard_size)
    bar = tqdm(total=n_docs, initial=start.doc, unit="doc", unit_scale=True, dynamic_ncols=True, mininterval=1.0,
               desc=f"tokenizing -> {out_dir}")
    log = tqdm.write if sys.stderr.isatty() else print  # beside a live bar on a terminal, plain lines in a log
    t0, new_tokens = time.perf_counter(), 0

    def finish_shard(next_pos: Position) -> None:
        entry = writer.close()
        manifest["shards"].append(entry)
        manifest["next"] = asdict(next_pos)
        try:
            write_manifest(out_dir, manifest)
        except DiskFullError:
            (out_dir / entry["file"]).unlink(missing_ok=True)  # keep the directory exactly what the manifest lists
            raise
        log(f"wrote {entry['file']}: {entry['tokens']:,} tokens, {entry['documents']:,} documents")

    done = sum(s["tokens"] for s in manifest["shards"])
    budget = cfg.max_tokens - done if cfg.max_tokens is not None else float("inf")
    batches = tokenized_batches(document_batches(ds, cfg, start.doc), num_proc)
    try:
        doc, skip = start.doc, start.offset
        for tokens, lengths, n in batches:
            i = skip  # a resumed run drops the part of its first document that earlier shards hold
            skip = 0
            while i < len(tokens) and budget > 0:
                if writer.file is None:
                    writer.open(len(manifest["shards"]), position_in_batch(lengths, doc, i))
                take = int(min(cfg.shard_size - writer.count, len(tokens) - i, budget))
                writer.write(tokens[i : i + take])
                i, budget, new_tokens = i + take, budget - take, new_tokens + take
                if writer.count == cfg.shard_size:
                    finish_shard(position_in_batch(lengths, doc, i))
            doc += n
            bar.update(n)
            bar.set_postfix_str(f"{new_tokens / (time.perf_counter() - t0) / 1e6:.2f}M tok/s", refresh=False)
            if budget <= 0:
                break
        if writer.file is not None:  # the last, shorter shard
            finish_shard(Position(doc, 0) if budget > 0 else position_in_batch(lengths, doc - n, i))
    except BaseException:
        writer.discard()
        raise
    finally:
        batches.close()  # stops the worker processes now, also on errors and Ctrl-C
        bar.close()
    return new_tokens


def run(cfg: JobConfig) -> dict:
    """Tokenize the corpus into shards in `cfg.out_dir` (resuming a previous run); returns the manifest."""
    out_dir = Path(cfg.out_dir)
    check_writable(out_dir, "--out_dir")
    files = resolve_data_files(cfg.data_files) if cfg.data_files else []
    manifest, start, old = plan(cfg, files)
    if old is not None and old.get("complete") and len(manifest["shards"]) == len(old["shards"]):
        print(f"nothing to do: {out_dir} already holds the {len(old['shards'])} shards of this job "
              f"({old['total_tokens']:,} tokens); `python fineweb.py --verify --out_dir {out_dir}` checks them")
        return old
    if manifest["shards"]:
        print(f"resuming: keeping {len(manifest['shards'])} finished shards, going on from document {start.doc:,}")
    num_proc = cfg.num_proc or default_num_proc()
    ds = load_corpus(cfg, files, num_proc, content_key(manifest["source"]) if files else None)
    n_docs = None if cfg.streaming else len(ds)
    n_bytes = text_bytes(ds, cfg, files)
    if n_bytes == 0:  # else every document would be a lone EOT
        raise FinewebError(f"{source_name(cfg)}: no text in it (documents: {n_docs if n_docs is not None else '?'}, "
                           "all empty); nothing to tokenize, check --data_files and --text_column")
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_temp_files(out_dir, cfg.prefix)
    if n_bytes is not None and n_docs:  # only what is left to do
        n_bytes = int(n_bytes * max(0, n_docs - start.doc) / n_docs)
    done = sum(s["tokens"] for s in manifest["shards"])
    check_disk_space(out_dir, n_bytes, n_docs, None if cfg.max_tokens is None else cfg.max_tokens - done,
                     cfg.shard_size)
    write_manifest(out_dir, manifest)

    t0 = time.perf_counter()
    new_tokens = write_shards(ds, cfg, manifest, start, num_proc, n_docs)
    if not manifest["shards"]:
        raise FinewebError("the corpus has no documents; nothing written")
    if all(s["tokens"] == s["documents"] for s in manifest["shards"]):  # known only now for a stream
        raise FinewebError(f"{source_name(cfg)}: no text in it (every document is empty), so {out_dir} holds only "
                           "end-of-text tokens; delete it and check --data_files and --text_column")
    manifest["complete"] = True
    manifest["total_tokens"] = sum(s["tokens"] for s in manifest["shards"])
    manifest["total_documents"] = sum(s["documents"] for s in manifest["shards"])
    write_manifest(out_dir, manifest)
    print(f"done: {len(manifest['shards'])} shards, {manifest['total_tokens']:,} tokens in {out_dir} "
          f"({new_tokens / max(time.perf_counter() - t0, 1e-9) / 1e6:.2f}M tok/s this run)")
    if len(manifest["shards"]) == 1:
        print("note: one shard only, so every token is in the val split; a smaller --shard_size gives train shards")
    return manifest


# ----------------------------------------------------------------------------- verifying


def verify(out_dir: str | Path) -> list[str]:
    """Check every shard against the manifest (exists, dtype, length, token ids, documents, sha256).

    Returns one line per problem, each naming the file; empty when everything matches.
    """
    out_dir = Path(out_dir)
    try:
        manifest = read_manifest(out_dir)
    except FinewebError as e:
        return [str(e)]
    if manifest is None:
        return [f"{out_dir / MANIFEST}: missing; was {out_dir} written by fineweb.py?"]
    problems = []
    n_vocab = manifest["tokenizer"]["n_vocab"]
    for entry in tqdm(manifest["shards"], unit="shard", desc=f"verifying {out_dir}", disable=None):
        path = out_dir / entry["file"]
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        try:
            tokens = open_shard(path)
            if len(tokens) != entry["tokens"]:
                raise ValueError(f"{path}: {len(tokens):,} tokens, the manifest says {entry['tokens']:,} (truncated?)")
            if sha256_of(path) != entry["sha256"]:
                raise ValueError(f"{path}: sha256 differs from the manifest (the file changed or is corrupt)")
            check_token_ids(tokens, n_vocab, str(path))
        except ValueError as e:
            problems.append(str(e))
            continue
        if int(np.count_nonzero(tokens == manifest["tokenizer"]["eot"])) != entry["documents"]:
            problems.append(f"{path}: document count differs from the manifest")
    problems += order_problems(out_dir, manifest["shards"])
    listed = {e["file"] for e in manifest["shards"]}
    problems += [f"{p}: not in the manifest" for p in sorted(out_dir.glob(f"{manifest['prefix']}_*.npy"))
                 if p.name not in listed]
    if not manifest.get("complete"):
        problems.append(f"{out_dir / MANIFEST}: the run is unfinished; re-run the same fineweb.py command to finish it")
    return problems


def order_problems(out_dir: Path, shards: list[dict]) -> list[str]:
    """Shards must follow each other through the corpus: one that starts at or before the one ahead of it holds
    documents again (a resume that went back)."""
    problems = []
    for before, entry in pairwise(shards):
        a, b = Position(**before["start"]), Position(**entry["start"])
        if (b.doc, b.offset) <= (a.doc, a.offset):
            problems.append(f"{out_dir / entry['file']}: starts at document {b.doc:,} (token {b.offset:,}), not "
                            f"after {before['file']} (document {a.doc:,}): part of the corpus is in the shards twice; "
                            "delete the directory and run the job again")
    return problems


# ----------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> tuple[JobConfig, bool]:
    d = JobConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default=d.dataset, help="Hugging Face dataset repo")
    p.add_argument("--name", default=d.name, help="dataset config")
    p.add_argument("--revision", default=d.revision, help="dataset commit to pin (default: the current one)")
    p.add_argument("--split", default=d.split)
    p.add_argument("--data_files", nargs="+", default=[], metavar="FILE",
                   help="local .parquet/.jsonl/.txt files or globs, read instead of --dataset")
    p.add_argument("--text_column", default=d.text_column)
    p.add_argument("--txt_sample_by", default=d.txt_sample_by, choices=["document", "paragraph", "line"],
                   help="what one document of a .txt file is")
    p.add_argument("--out_dir", default=d.out_dir)
    p.add_argument("--prefix", default=d.prefix, help="shard names are PREFIX_{val,train}_NNNNNN.npy")
    p.add_argument("--shard_size", type=int, default=d.shard_size, help="tokens per shard")
    p.add_argument("--num_proc", type=int, default=d.num_proc, help="tokenizer processes (default: all cores)")
    p.add_argument("--max_tokens", type=int, default=d.max_tokens, help="stop after this many tokens")
    p.add_argument("--streaming", action="store_true", help="read the dataset as a stream, with no local copy")
    p.add_argument("--verify", action="store_true", help="check the shards in --out_dir against the manifest")
    args = p.parse_args(argv)
    verify_only = args.verify
    del args.verify
    return JobConfig(**vars(args)), verify_only


def main(argv: list[str] | None = None) -> None:
    cfg, verify_only = parse_args(argv)
    # FinewebError and the tokenizer's errors are ValueErrors; an OSError with no file name is about --out_dir
    with one_line_errors(path=cfg.out_dir):
        if verify_only:
            problems = verify(cfg.out_dir)
            if problems:
                print("\n".join(problems), flush=True)
                sys.exit(f"error: {len(problems)} problem(s) in {cfg.out_dir}")
            m = read_manifest(Path(cfg.out_dir))
            print(f"ok: {len(m['shards'])} shards, {m['total_tokens']:,} tokens in {cfg.out_dir} match {MANIFEST}")
            return
        try:
            run(cfg)
        except KeyboardInterrupt:
            sys.exit(f"interrupted: the finished shards in {cfg.out_dir} are kept; re-run the same command to resume")


if __name__ == "__main__":
    main()
