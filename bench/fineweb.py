"""fineweb.py against build-nanogpt's method on one local corpus: tokens/s and peak memory.

    python -m bench.fineweb [--quick]

The corpus (>= 50 MB of text, 5 MB with --quick) is made from tiny Shakespeare: documents of 1-40 random
consecutive paragraphs, written as parquet into a temp dir. The baseline is the reference method, reimplemented
here: `multiprocessing.Pool(num_proc).imap(tokenize, dataset, chunksize=16)` where `tokenize` encodes one document
with `encode_ordinary` and converts it to numpy on its own, into a preallocated shard buffer saved with `np.save`.
Both run as separate commands on the same files with the same number of processes: alternating, fastest of 3, for
speed; once each at two shard sizes for memory. Tokens/s is over the whole command (start-up included); CPU time is
summed over its processes; memory is the peak of the summed proportional set size (PSS) of its processes, so pages
shared by forked workers are not counted twice, and growth with shard size is read from the anonymous part of PSS,
where a shard buffer lives (the memory-mapped corpus is not).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import Row, format_table
from gpt2repro.tokenizer import GPT2_EOT, gpt2_encoding

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- the baseline method


def reference_tokenize(doc: dict) -> np.ndarray:
    """One document: EOT + tokens as a Python list, then to int64 numpy, range-checked, then to uint16."""
    tokens = [GPT2_EOT]
    tokens.extend(gpt2_encoding().encode_ordinary(doc["text"]))
    tokens_np = np.array(tokens)
    assert (0 <= tokens_np).all() and (tokens_np < 2**16).all(), "token ids must fit in uint16"
    return tokens_np.astype(np.uint16)


def reference_run(files: list[str], out_dir: Path, shard_size: int, num_proc: int) -> None:
    """The reference loop: documents stream through a Pool into a shard buffer; a document is split at a boundary."""
    import datasets

    ds = datasets.load_dataset("parquet", data_files=files, split="train")
    out_dir.mkdir(parents=True, exist_ok=True)
    buf = np.empty((shard_size,), dtype=np.uint16)
    index, count = 0, 0
    with mp.Pool(num_proc) as pool:
        for tokens in pool.imap(reference_tokenize, ds, chunksize=16):
            if count + len(tokens) < shard_size:
                buf[count : count + len(tokens)] = tokens
                count += len(tokens)
                continue
            fill = shard_size - count
            buf[count:] = tokens[:fill]
            np.save(out_dir / f"edufineweb_{'val' if index == 0 else 'train'}_{index:06d}.npy", buf)
            index += 1
            count = len(tokens) - fill
            buf[:count] = tokens[fill:]
    if count:
        np.save(out_dir / f"edufineweb_{'val' if index == 0 else 'train'}_{index:06d}.npy", buf[:count])


# ----------------------------------------------------------------------------- measuring


def make_corpus(out_dir: Path, n_bytes: int, n_files: int = 4) -> list[str]:
    """Documents of random runs of tiny Shakespeare paragraphs, at least `n_bytes` of text, as parquet files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    paragraphs = (ROOT / "input.txt").read_text().split("\n\n")
    rng = random.Random(1337)
    docs, total = [], 0
    while total < n_bytes:
        k = rng.randint(1, 40)
        i = rng.randrange(len(paragraphs) - k)
        docs.append("\n\n".join(paragraphs[i : i + k]))
        total += len(docs[-1].encode())
    files = []
    per_file = -(-len(docs) // n_files)
    for f in range(n_files):
        path = out_dir / f"corpus_{f:02d}.parquet"
        pq.write_table(pa.table({"text": docs[f * per_file : (f + 1) * per_file]}), path)
        files.append(str(path))
    return files


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (Linux /proc)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return found


def tree_pss_bytes(pid: int) -> tuple[int, int]:
    """Summed PSS of a process tree, all of it and its anonymous part (without memory-mapped files)."""
    total, anon = 0, 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line and not line[0].isdigit())
        except OSError:
            continue
        total += int(fields.get("Pss", "0 kB").split()[0]) * 1024
        anon += int(fields.get("Pss_Anon", "0 kB").split()[0]) * 1024
    return total, anon


def measure(cmd: list[str], env: dict) -> tuple[float, float, float, float]:
    """Wall seconds, CPU seconds, peak PSS and peak anonymous PSS (bytes) of a command and its children.

    Memory is sampled every 50 ms; CPU time includes the workers the command waited for.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak, peak_anon = 0, 0
    while proc.poll() is None:
        pss, anon = tree_pss_bytes(proc.pid)
        peak, peak_anon = max(peak, pss), max(peak_anon, anon)
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    err = proc.stderr.read()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {err.strip()[-500:]}")
    return wall, cpu, peak, peak_anon


def shard_tokens(out_dir: Path) -> int:
    return sum(len(np.load(p, mmap_mode="r")) for p in out_dir.glob("edufineweb_*.npy"))


def same_shards(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.glob("edufineweb_*.npy"))
    return names == sorted(p.name for p in b.glob("edufineweb_*.npy")) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names)


def run(quick: bool = False) -> list[Row]:
    num_proc = 2 if quick else min(os.cpu_count() or 1, 8)
    n_bytes = 5_000_000 if quick else 50_000_000
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench_fineweb_") as tmp:
        tmp = Path(tmp)
        files = make_corpus(tmp, n_bytes)
        env = {**os.environ, "HF_DATASETS_CACHE": str(tmp / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "PYTHONPATH": str(ROOT)}
        # both commands load the same arrow cache: build it once, untimed
        subprocess.run([sys.executable, "-c", f"import datasets; datasets.load_dataset('parquet', data_files={files!r},"
                        " split='train')"], env=env, check=True, capture_output=True)

        def reference(out: Path, size: int, procs: int) -> tuple[float, float, float, float]:
            return measure([sys.executable, "-m", "bench.fineweb", "--reference", str(out), str(size), str(procs),
                            *files], env)

        def ours(out: Path, size: int) -> tuple[float, float, float, float]:
            return measure([sys.executable, "fineweb.py", "--data_files", *files, "--out_dir", str(out),
                            "--shard_size", str(size), "--num_proc", str(num_proc)], env)

        # speed: shard 1M, alternating runs, the fastest of each (the least disturbed by other work)
        size, repeats = 1_000_000, 1 if quick else 3
        timings: dict[str, list[tuple[float, float]]] = {"ref": [], "ours": []}
        for r in range(repeats):
            timings["ref"].append(reference(tmp / f"ref_{r}", size, num_proc)[:2])
            timings["ours"].append(ours(tmp / f"ours_{r}", size)[:2])
            if not same_shards(tmp / f"ref_{r}", tmp / f"ours_{r}"):
                raise RuntimeError(f"fineweb.py and the reference method wrote different shards in {tmp}")
        n = shard_tokens(tmp / "ours_0")
        ref_s, ours_s = (min(w for w, _ in timings[k]) for k in ("ref", "ours"))
        ref_cpu, ours_cpu = (min(c for _, c in timings[k]) for k in ("ref", "ours"))
        tag = f"{n / 1e6:.1f}M tokens, shard {size / 1e6:g}M, {num_proc} proc, best of {repeats}"
        rows += [
            Row("fineweb", f"reference method, {tag}", n / ref_s, "tok/s"),
            Row("fineweb", f"fineweb.py, {tag}", n / ours_s, "tok/s", "reference method", ref_s / ours_s, ">= 1.5"),
            Row("fineweb", f"reference method CPU time, {tag}", ref_cpu / n * 1e6, "CPU-s/Mtok"),
            Row("fineweb", f"fineweb.py CPU time, {tag}", ours_cpu / n * 1e6, "CPU-s/Mtok", "reference method",
                ours_cpu / ref_cpu, "lower is better"),
        ]
        # memory: each method at a small and a large shard size
        mem: dict[tuple[str, int], tuple[float, float]] = {}
        for size in [1_000_000] if quick else [1_000_000, 100_000_000]:
            mem["ref", size] = reference(tmp / f"ref_mem_{size}", size, num_proc)[2:]
            mem["ours", size] = ours(tmp / f"ours_mem_{size}", size)[2:]
            rows += [
                Row("fineweb", f"reference method peak PSS, shard {size / 1e6:g}M", mem["ref", size][0] / 1e6, "MB"),
                Row("fineweb", f"fineweb.py peak PSS, shard {size / 1e6:g}M", mem["ours", size][0] / 1e6, "MB",
                    "reference method", mem["ours", size][0] / mem["ref", size][0]),
            ]
        if not quick:  # a shard buffer is anonymous memory; the memory-mapped corpus is not
            for who, name in (("ref", "reference method"), ("ours", "fineweb.py")):
                big, small = mem[who, 100_000_000][1], mem[who, 1_000_000][1]
                rows.append(Row("fineweb", f"{name} peak anonymous PSS, shard 100M vs 1M", big / 1e6, "MB",
                                "shard 1M", big / small, "<= 1.05" if who == "ours" else ""))
    return rows


if __name__ == "__main__":
    if sys.argv[1:2] == ["--reference"]:
        out, size, procs, *data_files = sys.argv[2:]
        reference_run(data_files, Path(out), int(size), int(procs))
    else:
        print(format_table(run(quick="--quick" in sys.argv)))
