"""fineweb.py: shards equal an independent tokenization, resume after a kill, --verify, full disk, the loader."""

import contextlib
import errno
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import shakespeare

import fineweb
from gpt2repro.tokenizer import gpt2_encoding, gpt2_ranks_path

ROOT = Path(__file__).resolve().parents[1]
EOT = 50256
SHARD = 20_000  # tokens per shard in these tests: ~30 shards from the corpus below


def make_documents(n_docs: int, seed: int = 0) -> list[str]:
    """Documents of 1-12 paragraphs of tiny Shakespeare, plus the awkward cases."""
    path = shakespeare()
    paragraphs = path.read_text().split("\n\n")
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        k = rng.randint(1, 12)
        i = rng.randrange(len(paragraphs) - k)
        docs.append("\n\n".join(paragraphs[i : i + k]))
    # an empty document, special-token text (must stay ordinary text), non-ASCII, whitespace only
    docs[3:3] = ["", "a <|endoftext|> inside", "naïve café 日本語 🙂", "  \n\n  "]
    return docs


def reference_tokens(docs: list[str]) -> np.ndarray:
    """The naive way: per document, EOT then its tokens, concatenated."""
    enc = gpt2_encoding()
    out = []
    for d in docs:
        out.append(EOT)
        out.extend(enc.encode_ordinary(d))
    return np.array(out, dtype=np.int64)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The same documents as two parquet files (with an extra column) and as one jsonl file."""
    root = tmp_path_factory.mktemp("corpus")
    docs = make_documents(2400)
    half = len(docs) // 2
    for name, part, first in (("a", docs[:half], 0), ("b", docs[half:], half)):
        ids = list(range(first, first + len(part)))
        pq.write_table(pa.table({"id": ids, "text": part}), root / f"part_{name}.parquet", row_group_size=500)
    with open(root / "docs.jsonl", "w") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, "text": d}) + "\n")
    return {"dir": root, "docs": docs, "tokens": reference_tokens(docs)}


@pytest.fixture(autouse=True)
def hf_cache(tmp_path_factory, monkeypatch):
    """Keep `datasets`' arrow cache out of the home directory."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf"))


@pytest.fixture(scope="module")
def finished(corpus, tmp_path_factory):
    """One uninterrupted run on the parquet files, with 2 spawned tokenizer processes."""
    import datasets

    out = tmp_path_factory.mktemp("finished") / "shards"
    saved = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = str(tmp_path_factory.getbasetemp() / "hf")
    try:
        fineweb.main(parquet_args(corpus, out) + ["--num_proc", "2"])
    finally:
        datasets.config.HF_DATASETS_CACHE = saved
    return out


def parquet_args(corpus, out: Path) -> list[str]:
    return ["--data_files", str(corpus["dir"] / "*.parquet"), "--out_dir", str(out), "--shard_size", str(SHARD)]


def shard_files(out: Path) -> list[Path]:
    return sorted(out.glob("edufineweb_*.npy"), key=lambda p: p.name.split("_")[-1])


def file_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in shard_files(out)}


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a.astype(np.uint16))
    return buf.getvalue()


def cli_env(tmp_path: Path) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf"),
            "PYTHONPATH": str(ROOT)}


def test_shards_are_the_documents_tokenized_in_order(corpus, finished):
    ref = corpus["tokens"]
    files = shard_files(finished)
    n = -(-len(ref) // SHARD)
    assert [p.name for p in files] == ["edufineweb_val_000000.npy"] + [f"edufineweb_train_{i:06d}.npy"
                                                                      for i in range(1, n)]
    for i, p in enumerate(files):
        # each file is exactly what np.save writes for its slice of the reference stream
        assert p.read_bytes() == npy_bytes(ref[i * SHARD : (i + 1) * SHARD]), p.name
    manifest = json.loads((finished / "manifest.json").read_text())
    assert manifest["complete"] and manifest["total_tokens"] == len(ref)
    assert manifest["total_documents"] == len(corpus["docs"])
    assert manifest["source"]["builder"] == "parquet" and len(manifest["source"]["files"]) == 2
    # each shard's recorded start is the document and in-document offset of token i * SHARD
    doc_starts = np.flatnonzero(ref == EOT)
    for i, entry in enumerate(manifest["shards"]):
        doc = int(np.searchsorted(doc_starts, i * SHARD, side="right")) - 1
        assert entry["start"] == {"doc": doc, "offset": i * SHARD - int(doc_starts[doc])}
        assert entry["documents"] == int(np.count_nonzero(ref[i * SHARD : (i + 1) * SHARD] == EOT))
    assert fineweb.verify(finished) == []


def test_jsonl_streaming_one_process_max_tokens(corpus, tmp_path):
    out = tmp_path / "shards"
    limit = 3 * SHARD + 1234
    fineweb.main(["--data_files", str(corpus["dir"] / "docs.jsonl"), "--out_dir", str(out), "--shard_size",
                  str(SHARD), "--num_proc", "1", "--streaming", "--max_tokens", str(limit), "--prefix", "tiny"])
    files = sorted(out.glob("tiny_*.npy"), key=lambda p: p.name.split("_")[-1])
    assert [p.name for p in files] == ["tiny_val_000000.npy"] + [f"tiny_train_{i:06d}.npy" for i in (1, 2, 3)]
    got = np.concatenate([np.load(p) for p in files])
    assert got.dtype == np.uint16
    np.testing.assert_array_equal(got, corpus["tokens"][:limit])
    assert fineweb.verify(out) == []


def test_txt_files_are_one_document_each(tmp_path):
    texts = ["First file.\nline two\n", "Second  file\n\n\nend ", "naïve café 🙂"]
    for i, t in enumerate(texts):
        (tmp_path / f"doc{i}.txt").write_text(t)
    out = tmp_path / "shards"
    fineweb.main(["--data_files", str(tmp_path / "*.txt"), "--out_dir", str(out), "--shard_size", "8",
                  "--num_proc", "1"])
    got = np.concatenate([np.load(p) for p in shard_files(out)])
    np.testing.assert_array_equal(got, reference_tokens(texts))


def test_tokenize_documents_matches_naive_loop(corpus):
    docs = corpus["docs"][:50]
    flat, lengths = fineweb.tokenize_documents(docs)
    assert flat.dtype == np.uint16
    np.testing.assert_array_equal(flat, reference_tokens(docs))
    assert lengths.tolist() == [len(gpt2_encoding().encode_ordinary(d)) + 1 for d in docs]


@pytest.mark.parametrize("n", [0, 1, 99_999, 10**7])
def test_npy_header_is_what_numpy_writes(n, tmp_path):
    path = tmp_path / "a.npy"
    np.lib.format.open_memmap(path, mode="w+", dtype=np.uint16, shape=(n,))  # sparse file, numpy's own header
    assert fineweb.npy_header(n) == path.read_bytes()[:128]
    assert len(fineweb.npy_header(n)) == 128  # so a short last shard's header fits in place of a full one's


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for a reaper (Linux /proc)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the tokenizer processes through /proc")
def test_killed_run_resumes_to_identical_shards(corpus, finished, tmp_path):
    out = tmp_path / "shards"
    cmd = [sys.executable, str(ROOT / "fineweb.py")] + parquet_args(corpus, out) + ["--num_proc", "2"]
    log = open(tmp_path / "stderr.txt", "wb")  # a file, not a pipe: processes left behind would hold a pipe open
    proc = subprocess.Popen(cmd, env=cli_env(tmp_path), stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            m = out / "manifest.json"
            if m.exists() and json.loads(m.read_text())["shards"]:
                break
            time.sleep(0.005)
        children = child_pids(proc.pid)  # 2 tokenizer processes and multiprocessing's resource tracker
        os.kill(proc.pid, signal.SIGKILL)  # the run alone, mid-shard, as the OOM killer or `kill -9` does it
        proc.wait()
        log.close()
        err = (tmp_path / "stderr.txt").read_bytes()
        gone = time.monotonic() + 30
        while time.monotonic() < gone and any(alive(c) for c in children):
            time.sleep(0.1)
        left = [c for c in children if alive(c)]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert len(children) >= 2 and not left, f"still running after the run was killed: {left} of {children}"
    killed = json.loads((out / "manifest.json").read_text())
    assert not killed["complete"], f"the run ended before it could be killed: {err.decode()[-500:]}"
    assert 1 <= len(killed["shards"]) < len(json.loads((finished / "manifest.json").read_text())["shards"])
    assert any("unfinished" in p for p in fineweb.verify(out))

    fineweb.main(parquet_args(corpus, out) + ["--num_proc", "1"])
    assert file_bytes(out) == file_bytes(finished)
    assert not list(out.glob(".*.tmp"))
    assert json.loads((out / "manifest.json").read_text())["shards"] == \
        json.loads((finished / "manifest.json").read_text())["shards"]
    fineweb.main(["--verify", "--out_dir", str(out)])


def test_resume_stopped_before_its_first_shard_resumes_again_from_the_same_place(corpus, finished, tmp_path,
                                                                                 monkeypatch):
    out = tmp_path / "shards"
    shutil.copytree(finished, out)
    # the state a run leaves when stopped after its first two shards: manifest with two, the later files gone
    m = json.loads((out / "manifest.json").read_text())
    for entry in m["shards"][2:]:
        (out / entry["file"]).unlink()
    m["next"], m["shards"], m["complete"] = m["shards"][2]["start"], m["shards"][:2], False
    del m["total_tokens"], m["total_documents"]
    (out / "manifest.json").write_text(json.dumps(m))

    def stopped(*args, **kwargs):  # the resumed run is stopped again before it finishes a shard
        raise KeyboardInterrupt

    monkeypatch.setattr(fineweb, "write_shards", stopped)
    with pytest.raises(SystemExit, match="interrupted"):
        fineweb.main(parquet_args(corpus, out) + ["--num_proc", "1"])
    assert json.loads((out / "manifest.json").read_text())["next"] == m["next"]
    monkeypatch.undo()
    fineweb.main(parquet_args(corpus, out) + ["--num_proc", "1"])
    assert file_bytes(out) == file_bytes(finished)
    assert fineweb.verify(out) == []


def test_verify_names_a_shard_that_goes_back_in_the_corpus(finished, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(finished, out)
    m = json.loads((out / "manifest.json").read_text())
    m["shards"][3]["start"] = m["shards"][1]["start"]  # as if a resume had gone back to shard 1's documents
    (out / "manifest.json").write_text(json.dumps(m))
    problems = fineweb.verify(out)
    assert len(problems) == 1 and m["shards"][3]["file"] in problems[0] and "twice" in problems[0]


def test_rerun_of_finished_job_is_a_no_op_and_other_options_are_refused(corpus, finished, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in shard_files(finished)}
    fineweb.main(parquet_args(corpus, finished) + ["--num_proc", "1"])
    assert "nothing to do" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in shard_files(finished)} == before
    with pytest.raises(SystemExit, match="different job.*shard_size"):
        fineweb.main(parquet_args(corpus, finished)[:-1] + [str(SHARD * 2)])


def test_verify_names_corrupt_and_truncated_shards(finished, tmp_path, capsys):
    out = tmp_path / "copy"
    out.mkdir()
    for p in [*shard_files(finished), finished / "manifest.json"]:
        (out / p.name).write_bytes(p.read_bytes())
    files = shard_files(out)
    corrupt, truncated = files[1], files[4]
    data = bytearray(corrupt.read_bytes())
    data[5000] ^= 1
    corrupt.write_bytes(bytes(data))
    truncated.write_bytes(truncated.read_bytes()[:-2])
    problems = fineweb.verify(out)
    assert len(problems) == 2
    assert str(corrupt) in problems[0] and "sha256" in problems[0]
    assert str(truncated) in problems[1]
    with pytest.raises(SystemExit, match="2 problem"):
        fineweb.main(["--verify", "--out_dir", str(out)])
    assert corrupt.name in capsys.readouterr().out
    # re-running the job makes the truncated shard again (a same-size corruption is for --verify to find)
    corrupt.write_bytes((finished / corrupt.name).read_bytes())
    fineweb.main(["--data_files", json.loads((out / "manifest.json").read_text())["source"]["files"][0]["path"],
                  json.loads((out / "manifest.json").read_text())["source"]["files"][1]["path"],
                  "--out_dir", str(out), "--shard_size", str(SHARD), "--num_proc", "1"])
    assert file_bytes(out) == file_bytes(finished)


def test_full_disk_stops_cleanly_and_leaves_only_complete_shards(corpus, finished, tmp_path, monkeypatch):
    out = tmp_path / "shards"
    written = [0]
    real_write = fineweb.write_bytes

    def write_until_full(f, data):  # the disk holds 3.5 shards' worth of bytes
        written[0] += len(memoryview(data).cast("B"))
        if written[0] > 7 * SHARD:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(f, data)

    monkeypatch.setattr(fineweb, "write_bytes", write_until_full)
    with pytest.raises(SystemExit, match=r"disk full writing .*edufineweb_train_000003\.npy.*3 finished shards"):
        fineweb.main(parquet_args(corpus, out) + ["--num_proc", "1"])
    assert [p.name for p in shard_files(out)] == [p.name for p in shard_files(finished)[:3]]
    assert not list(out.glob(".*.tmp"))
    assert fineweb.verify(out) == [f"{out / 'manifest.json'}: the run is unfinished; re-run the same fineweb.py "
                                   "command to finish it"]
    monkeypatch.setattr(fineweb, "write_bytes", real_write)
    fineweb.main(parquet_args(corpus, out) + ["--num_proc", "1"])
    assert file_bytes(out) == file_bytes(finished)


def test_refuses_to_start_when_the_disk_is_too_small(corpus, tmp_path, monkeypatch):
    out = tmp_path / "shards"
    real = fineweb.shutil.disk_usage
    monkeypatch.setattr(fineweb.shutil, "disk_usage", lambda p: real(p)._replace(free=100_000))
    with pytest.raises(SystemExit, match=r"0\.00 GB free but the shards need about"):
        fineweb.main(parquet_args(corpus, out) + ["--num_proc", "1"])
    assert not shard_files(out)


def test_bad_inputs_give_one_line_errors(corpus, tmp_path):
    with pytest.raises(SystemExit, match="matches no files"):
        fineweb.main(["--data_files", str(tmp_path / "nothing*.parquet"), "--out_dir", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="no column 'body'.*--text_column"):
        fineweb.main(parquet_args(corpus, tmp_path / "o") + ["--text_column", "body", "--num_proc", "1"])
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    np.save(foreign / "edufineweb_val_000000.npy", np.zeros(10, np.uint16))
    with pytest.raises(SystemExit, match="no manifest.json"):
        fineweb.main(parquet_args(corpus, foreign))


def test_offline_hub_download_fails_with_one_line(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "fineweb.py"), "--out_dir", str(tmp_path / "o")],
                       env=cli_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: could not load HuggingFaceFW/fineweb-edu")


def test_training_loader_reads_the_shards(corpus, finished):
    data = pytest.importorskip("data")
    B, T = 4, 64
    loader = data.ShardedTokenLoader(finished, "train", B, T)
    ref = corpus["tokens"]
    expected = []  # consecutive rows of each train shard, whole batches only
    for i in range(1, len(shard_files(finished))):
        shard = ref[i * SHARD : (i + 1) * SHARD]
        usable = (len(shard) - 1) // T // B * B
        expected += [shard[r * T : (r + B) * T + 1] for r in range(0, usable, B)]
    for buf in expected:
        x, y = loader.next_batch()
        np.testing.assert_array_equal(x.numpy().ravel(), buf[:-1])
        np.testing.assert_array_equal(y.numpy().ravel(), buf[1:])
    val = data.ShardedTokenLoader(finished, "val", B, T)
    x, _ = val.next_batch()
    np.testing.assert_array_equal(x.numpy().ravel(), ref[: B * T])


def test_ids_beyond_uint16_and_non_uint16_shards_are_refused(finished, tmp_path, monkeypatch):
    class WideTokenizer:  # a vocabulary too big for uint16
        def encode_to_numpy(self, text, **kwargs):
            return np.array([1, 70_000], dtype=np.uint32)

    monkeypatch.setattr(fineweb, "gpt2_encoding", lambda: WideTokenizer())
    with pytest.raises(fineweb.FinewebError, match="70000 does not fit in uint16"):
        fineweb.tokenize_documents(["a"])
    out = tmp_path / "copy"
    out.mkdir()
    for p in [*shard_files(finished), finished / "manifest.json"]:
        (out / p.name).write_bytes(p.read_bytes())
    wide = shard_files(out)[2]
    np.save(wide, np.load(wide).astype(np.int32))
    assert fineweb.verify(out) == [f"{wide}: expected a 1-D uint16 array, found 1-D int32; rewrite it with fineweb.py"]


@pytest.mark.parametrize("streaming", [False, True])
def test_corpus_without_text_writes_no_shard(tmp_path, streaming):
    """A zero-byte .txt, documents that are all empty strings, a text column of numbers: one line naming the file."""
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n{"text": ""}\n')
    (tmp_path / "numbers.jsonl").write_text('{"text": 5}\n{"text": 7}\n')
    for name, needle in (("empty.txt", "no text in it"), ("blank.jsonl", "no text in it"),
                         ("numbers.jsonl", "'text'")):
        out = tmp_path / f"out_{name}"
        args = ["--data_files", str(tmp_path / name), "--out_dir", str(out), "--num_proc", "1"]
        with pytest.raises(SystemExit) as e:
            fineweb.main(args + (["--streaming"] if streaming else []))
        msg = str(e.value.code)
        assert msg.startswith(f"error: {tmp_path / name}: ") and needle in msg and "\n" not in msg, msg
        if not (streaming and name == "blank.jsonl"):  # a stream's empty documents are known only once read
            assert not shard_files(out), name


def test_unwritable_out_dir_is_refused_before_anything_is_read(tmp_path, monkeypatch):
    """A read-only --out_dir (simulated: root writes anywhere) is named with the fix; nothing is created in it."""
    (tmp_path / "doc.txt").write_text("some text")
    out = tmp_path / "ro" / "shards"
    out.parent.mkdir()
    real_access = os.access
    monkeypatch.setattr(fineweb.os, "access", lambda p, mode: False if Path(p) == out.parent else real_access(p, mode))
    with pytest.raises(SystemExit) as e:
        fineweb.main(["--data_files", str(tmp_path / "doc.txt"), "--out_dir", str(out), "--num_proc", "1"])
    msg = str(e.value.code)
    assert msg == (f"error: --out_dir {out}: {out.parent} is not writable (read-only?); make it writable or pick "
                   "another --out_dir")
    assert list(out.parent.iterdir()) == []


def test_io_error_without_a_file_name_names_out_dir(tmp_path, monkeypatch):
    """A failed write to an open shard carries no file name: the one line names --out_dir instead."""
    (tmp_path / "doc.txt").write_text("some text")
    out = tmp_path / "o"

    def broken(f, data):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(fineweb, "write_bytes", broken)
    with pytest.raises(SystemExit) as e:
        fineweb.main(["--data_files", str(tmp_path / "doc.txt"), "--out_dir", str(out), "--num_proc", "1"])
    assert str(e.value.code) == f"error: {out}: Input/output error; check the path and permissions"


def test_a_file_matched_by_two_patterns_is_tokenized_once(tmp_path):
    for name, text in (("a.txt", "first"), ("b.txt", "second")):
        (tmp_path / name).write_text(text)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a_again.txt").symlink_to(tmp_path / "a.txt")  # the same file by another path
    patterns = [str(tmp_path / "*.txt"), str(tmp_path / "a.txt"), str(tmp_path / "sub" / "*.txt")]
    assert fineweb.resolve_data_files(patterns) == [tmp_path / "a.txt", tmp_path / "b.txt"]
    out = tmp_path / "o"
    fineweb.main(["--data_files", *patterns, "--out_dir", str(out), "--num_proc", "1"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["total_documents"] == 2 and len(manifest["source"]["files"]) == 2


@pytest.mark.parametrize("extra,message", [
    (["--num_proc", "-1"], "--num_proc must be 0 (every core) or a positive number of processes, got -1"),
    (["--name", "sample-100BT"], "--name does not apply to --data_files"),
    (["--dataset", "someone/corpus", "--revision", "main"], "--dataset, --revision do not apply to --data_files"),
])
def test_out_of_range_or_ignored_options_are_refused_in_one_line(tmp_path, extra, message):
    (tmp_path / "doc.txt").write_text("some text")
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as e:
        fineweb.main(["--data_files", str(tmp_path / "doc.txt"), "--out_dir", str(out)] + extra)
    msg = str(e.value.code)
    assert msg.startswith(f"error: {message}") and "\n" not in msg, msg
    assert not out.exists()


def test_a_revision_that_cannot_be_pinned_is_a_one_line_warning(monkeypatch, capsys):
    import huggingface_hub

    class OfflineApi:
        def dataset_info(self, *args, **kwargs):
            raise OSError("cannot reach the hub\nsecond line")

    monkeypatch.setattr(huggingface_hub, "HfApi", OfflineApi)
    assert fineweb.resolve_revision(fineweb.JobConfig()) is None
    err = capsys.readouterr().err
    assert err.startswith("warning: could not look up the current revision of HuggingFaceFW/fineweb-edu (OSError: "
                          "cannot reach the hub)") and "--revision" in err and err.count("\n") == 1, err


def test_damaged_gpt2_ranks_file_is_a_one_line_error(tmp_path, monkeypatch):
    ranks = tmp_path / "cache" / "gpt2.tiktoken"
    ranks.parent.mkdir()
    ranks.write_bytes(gpt2_ranks_path().read_bytes()[:100_000])
    (tmp_path / "doc.txt").write_text("some text")
    monkeypatch.setenv("GPT2_REPRO_CACHE", str(ranks.parent))
    gpt2_encoding.cache_clear()
    try:
        with pytest.raises(SystemExit) as e:
            fineweb.main(["--data_files", str(tmp_path / "doc.txt"), "--out_dir", str(tmp_path / "o"),
                          "--num_proc", "1"])
    finally:
        gpt2_encoding.cache_clear()  # later tests rebuild the encoding from the real file
    msg = str(e.value.code)
    assert msg.startswith(f"error: {ranks}: ") and "python prepare.py" in msg and "\n" not in msg, msg


def test_file_edited_with_its_size_and_mtime_kept_is_read_anew(tmp_path):
    """`cp -p`, `rsync -a` and `tar x` keep size and mtime: the shards must hold the new text, not `datasets`'
    cached copy of the old one, and --verify must agree with the manifest's sha256 of the new file."""
    src = tmp_path / "docs.jsonl"
    old_docs, new_docs = ["the cat sat on the mat", "a dog"], ["THE DOG SAT ON THE RUG", "a cat"]
    assert [len(d) for d in old_docs] == [len(d) for d in new_docs]

    def run(docs: list[str], out: Path) -> np.ndarray:
        mtime = 1_700_000_000
        src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        os.utime(src, (mtime, mtime))
        fineweb.main(["--data_files", str(src), "--out_dir", str(out), "--num_proc", "1"])
        fineweb.main(["--verify", "--out_dir", str(out)])
        return np.load(out / "edufineweb_val_000000.npy")

    assert np.array_equal(run(old_docs, tmp_path / "old"), reference_tokens(old_docs))
    size = src.stat().st_size
    assert np.array_equal(run(new_docs, tmp_path / "new"), reference_tokens(new_docs))
    assert src.stat().st_size == size
