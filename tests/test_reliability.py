"""Nothing is lost: one trainer per run directory, divergence caught before it is checkpointed, checkpoints
validated before they are trusted, permissions from the umask, one-line errors for bad numbers and bad paths.

Each defect is reproduced with real processes or real files; every case checks that no existing file changed.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import zipfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt2
from gpt2repro.checkpoint import (
    CheckpointError,
    UnreadableCheckpoint,
    list_checkpoints,
    load_checkpoint,
    model_checkpoint_fields,
    save_checkpoint,
)
from gpt2repro.config import BOUNDS, TrainConfig
from gpt2repro.errors import one_line_errors
from gpt2repro.fileio import atomic_write_bytes
from gpt2repro.rundir import lock_holder
from gpt2repro.tokenizer import get_tokenizer
from model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[1]
TEXT = "ROMEO: to be or not to be, that is the question.\nJULIET: hello world, good night!\n" * 60
TINY = ["--preset", "shakespeare-char", "--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--block_size", "16",
        "--batch_size", "2", "--total_batch_size", "32", "--eval_iters", "1", "--eval_interval", "2",
        "--ckpt_interval", "2", "--keep_last", "0", "--sample_tokens", "4", "--device", "cpu", "--dtype", "float32",
        "--compile", "false", "--log_interval", "1000"]


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def text(tmp_path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


def args(text: Path, out: Path, *extra: str) -> list[str]:
    return TINY + ["--text_path", str(text), "--out_dir", str(out), *extra]


def one_line_error(argv: list[str], *needles: str) -> str:
    with pytest.raises(SystemExit) as e:
        train_gpt2.main(argv)
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    return msg


# ----------------------------------------------------------------------------- one trainer per run directory


def test_second_trainer_on_the_same_out_dir_is_refused(text, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, str(ROOT / "train_gpt2.py"), *args(text, out, "--max_steps", "100000",
                              "--ckpt_interval", "0", "--eval_interval", "100000", "--num_samples", "0")],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").exists() and time.time() < deadline:
            time.sleep(0.2)
        assert first.poll() is None, first.stdout.read()
        before = snapshot(out)
        second = subprocess.run([sys.executable, str(ROOT / "train_gpt2.py"), *args(text, out, "--max_steps", "4",
                                 "--seed", "2", "--resume", "auto")], cwd=ROOT, capture_output=True, text=True)
        assert second.returncode != 0
        last = second.stderr.strip().splitlines()[-1]
        assert f"in use by another trainer or export (pid {first.pid})" in last, second.stderr
        assert "Traceback" not in second.stderr
        assert all(snapshot(out).get(k) == v for k, v in before.items() if k != "metrics.jsonl")
    finally:
        first.kill()  # SIGKILL: the lock must go with the process
        first.wait()
    train_gpt2.main(args(text, out, "--max_steps", "2", "--resume", "auto"))  # the dead run blocks nothing


def test_export_refuses_the_empty_run_dir_of_a_trainer_still_setting_up(tmp_path, capsys):
    """A trainer holds its lock on the new, empty --out_dir while it reads a large --text_path: export_hf.py must
    not rename over it (the trainer would write beside the export, its lock on a deleted directory)."""
    import transformers  # noqa: F401 - imported before the race, as a warm export process has it

    import export_hf

    big = tmp_path / "big.txt"
    big.write_text(TEXT * 9000)  # 44 MB: seconds of set-up before the trainer writes anything
    ckpt = tmp_path / "weights.pt"
    tok = get_tokenizer("char", text=TEXT)
    save_checkpoint(model_checkpoint_fields(GPT(GPTConfig(block_size=16, vocab_size=tok.vocab_size, n_layer=1,
                                                          n_head=2, n_embd=16)), tok), ckpt)
    out = tmp_path / "run"
    trainer = subprocess.Popen([sys.executable, str(ROOT / "train_gpt2.py"), *args(big, out, "--max_steps", "100000",
                                "--ckpt_interval", "0", "--eval_interval", "100000", "--num_samples", "0")],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out.is_dir() and lock_holder(out.stat().st_ino) == str(trainer.pid)) and time.time() < deadline:
            assert trainer.poll() is None, trainer.stderr.read()
            time.sleep(0.01)
        inode = out.stat().st_ino
        with pytest.raises(SystemExit) as e:
            export_hf.main(["--no_verify", str(ckpt), str(out)])
        msg = str(e.value.code)
        assert msg.startswith("error: ") and str(out) in msg and f"pid {trainer.pid}" in msg, msg
        assert out.stat().st_ino == inode and not (out / export_hf.EXPORT_MARKER).exists()
        second = subprocess.run([sys.executable, str(ROOT / "train_gpt2.py"), *args(big, out, "--max_steps", "4",
                                 "--resume", "auto")], cwd=ROOT, capture_output=True, text=True)
        assert f"(pid {trainer.pid})" in second.stderr.strip().splitlines()[-1], second.stderr
    finally:
        trainer.kill()
        trainer.wait()


# ----------------------------------------------------------------------------- divergence


def test_divergence_stops_before_a_nonfinite_checkpoint(text, tmp_path):
    out = tmp_path / "run"
    train_gpt2.main(args(text, out, "--max_steps", "4", "--keep_last", "2"))
    good = {p.name: p.read_bytes() for p in list_checkpoints(out)}
    msg = one_line_error(args(text, out, "--max_steps", "40", "--keep_last", "2", "--resume", "auto", "--max_lr",
                              "1e4", "--min_lr", "1e4", "--ckpt_interval", "1", "--warmup_steps", "0"),
                         "diverged", "--max_lr")
    assert "step " in msg
    after = {p.name: p.read_bytes() for p in list_checkpoints(out)}
    for path in list_checkpoints(out):
        sd = load_checkpoint(path)["model"]
        assert all(torch.isfinite(v).all() for v in sd.values()), f"{path.name} holds non-finite weights"
    assert list(after)[-1] >= list(good)[-1]  # the newest finite checkpoint was never pruned away


def test_isolated_nonfinite_steps_can_be_skipped(text, tmp_path, monkeypatch):
    calls = {"n": 0}
    forward_backward = train_gpt2.Trainer.forward_backward

    def spiky(self):
        calls["n"] += 1
        loss = forward_backward(self)
        return loss * float("nan") if calls["n"] == 2 else loss

    monkeypatch.setattr(train_gpt2.Trainer, "forward_backward", spiky)
    result = train_gpt2.main(args(text, tmp_path / "run", "--max_steps", "4", "--nonfinite_skips", "1"))
    assert result["step"] == 4 and np.isfinite(result["val_loss"])
    calls["n"] = 0
    one_line_error(args(text, tmp_path / "run2", "--max_steps", "4"), "step 1", "diverged")


# ----------------------------------------------------------------------------- checkpoints


def test_resume_auto_on_a_model_only_checkpoint_is_the_same_error_as_resume_path(text, tmp_path):
    out = tmp_path / "run"
    train_gpt2.main(args(text, out, "--max_steps", "2"))
    ckpt = load_checkpoint(list_checkpoints(out)[-1])
    only = {k: ckpt[k] for k in ("model", "model_config", "model_type", "tokenizer")}
    save_checkpoint(only, out / "ckpt_0000009.pt")
    before = snapshot(tmp_path)
    auto = one_line_error(args(text, out, "--max_steps", "12", "--resume", "auto"), "model-only", "--init")
    path = one_line_error(args(text, out, "--max_steps", "12", "--resume", str(out / "ckpt_0000009.pt")))
    assert auto == path
    assert snapshot(tmp_path) == before


def flips_near_the_end(data: bytes, n: int, seed: int = 0) -> list[bytes]:
    """`n` copies of `data`, each with one random bit of its last 3 KB (the zip directory) flipped; seeded."""
    rng, out = random.Random(seed), []
    for _ in range(n):
        b = bytearray(data)
        b[len(b) - 1 - rng.randrange(min(3000, len(b)))] ^= 1 << rng.randrange(8)
        out.append(bytes(b))
    return out


def zip_reader_error(path: Path) -> BaseException | None:
    """What Python's zipfile raises reading `path` through (None when it reads): the errors that escaped before."""
    try:
        with zipfile.ZipFile(path) as zf:
            zf.testzip()
    except Exception as e:  # noqa: BLE001 - any of them
        return e
    return None


def test_random_bit_flips_in_the_zip_directory_are_unreadable_or_intact(tmp_path):
    """Every flip either loads the very same weights or is an UnreadableCheckpoint naming the file: never
    NotImplementedError ("compression method", "zip file version"), zlib.error or RuntimeError ("encrypted")."""
    tok = get_tokenizer("char", text=TEXT)
    model = GPT(GPTConfig(block_size=16, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16))
    good = save_checkpoint({**model_checkpoint_fields(model, tok), "step": 1}, tmp_path / "good.pt")
    want = load_checkpoint(good)["model"]
    kinds = Counter()
    for i, data in enumerate(flips_near_the_end(good.read_bytes(), 800)):
        path = tmp_path / f"flip{i}.pt"
        path.write_bytes(data)
        kinds[type(zip_reader_error(path)).__name__] += 1
        try:
            got = load_checkpoint(path)["model"]
        except UnreadableCheckpoint as e:
            assert str(path) in str(e) and "\n" not in str(e), str(e)
        else:
            assert all(torch.equal(want[k], got[k]) for k in want)
        path.unlink()
    assert kinds["NotImplementedError"] + kinds["error"] + kinds["RuntimeError"] > 0, kinds  # the cases at stake


def damaged_directory(path: Path) -> bytes:
    """`path`'s bytes with the first seeded flip that makes zipfile raise what a corrupt-zip check missed."""
    probe = path.with_name("probe.pt")
    for data in flips_near_the_end(path.read_bytes(), 3000, seed=1):
        probe.write_bytes(data)
        if isinstance(zip_reader_error(probe), (NotImplementedError, RuntimeError, zlib.error)):
            probe.unlink()
            return data
    raise AssertionError("no flip found")


def test_resume_auto_sets_aside_a_checkpoint_with_a_damaged_zip_directory(text, tmp_path, capsys):
    """--resume auto goes on from the previous checkpoint; sample.py and export_hf.py name the file in one line."""
    import export_hf
    import sample

    out = tmp_path / "run"
    train_gpt2.main(args(text, out, "--max_steps", "4"))
    newest = list_checkpoints(out)[-1]
    newest.write_bytes(damaged_directory(newest))
    for main, argv in ((sample.main, ["--init", str(newest), "--device", "cpu", "--max_new_tokens", "2"]),
                       (export_hf.main, ["--no_verify", str(newest), str(tmp_path / "hf")])):
        with pytest.raises(SystemExit) as e:
            main(argv)
        msg = str(e.value.code)
        assert msg.startswith("error: ") and str(newest) in msg and "\n" not in msg, msg
    capsys.readouterr()
    train_gpt2.main(args(text, out, "--max_steps", "6", "--resume", "auto"))
    printed = capsys.readouterr().out
    assert "at step 2" in printed and newest.name in printed, printed
    assert (out / (newest.name + ".unreadable")).exists() and list_checkpoints(out)[-1].name == "ckpt_0000006.pt"


def test_implausible_model_config_is_refused_before_allocating(tmp_path):
    tok = get_tokenizer("char", text=TEXT)
    fields = model_checkpoint_fields(GPT(GPTConfig(block_size=16, vocab_size=tok.vocab_size, n_layer=1, n_head=2,
                                                   n_embd=16)), tok)
    fields["model_config"] |= {"n_embd": 16384, "n_layer": 8, "n_head": 16}
    save_checkpoint(fields, tmp_path / "big.pt")
    code = ("import resource, sys, sample\n"
            "try:\n    sample.main(['--init', sys.argv[1], '--device', 'cpu'])\n"
            "finally:\n    print('maxrss_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "big.pt")], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode != 0 and "shape" in r.stderr.strip().splitlines()[-1], r.stderr
    rss_gb = int(r.stdout.split("maxrss_kb")[1]) / 2**20
    assert rss_gb < 2, f"{rss_gb:.1f} GB resident: the claimed model was allocated"  # 8 x 16384 wide is ~100 GB


@pytest.mark.parametrize("config, needle", [
    ({"n_layer": "twelve"}, "n_layer='twelve'"),
    ({"n_embd": 16.5}, "n_embd=16.5"),
    ({"bias": "yes"}, "bias='yes'"),
    ({"n_layer": 0}, "positive"),
    ({"wat": 1}, "unknown field 'wat'"),
])
def test_model_config_types_are_checked(tmp_path, config, needle):
    tok = get_tokenizer("char", text=TEXT)
    fields = model_checkpoint_fields(GPT(GPTConfig(block_size=16, vocab_size=tok.vocab_size, n_layer=1, n_head=2,
                                                   n_embd=16)), tok)
    fields["model_config"] |= config
    save_checkpoint(fields, tmp_path / "f.pt")
    with pytest.raises(CheckpointError, match="model_config") as e:
        load_checkpoint(tmp_path / "f.pt")
    assert needle in str(e.value)


@pytest.mark.parametrize("broken, needle", [
    (lambda c: c | {"model_type": "mamba"}, "unknown model_type 'mamba'"),
    (lambda c: c | {"model": [1, 2, 3]}, "not a state dict"),
])
def test_checkpoint_entries_are_checked(tmp_path, broken, needle):
    tok = get_tokenizer("char", text=TEXT)
    fields = model_checkpoint_fields(GPT(GPTConfig(block_size=16, vocab_size=tok.vocab_size, n_layer=1, n_head=2,
                                                   n_embd=16)), tok)
    save_checkpoint(broken(fields), tmp_path / "f.pt")
    with pytest.raises(CheckpointError, match=needle):
        load_checkpoint(tmp_path / "f.pt")


def test_full_disk_during_a_checkpoint_is_one_line_and_keeps_older_ones(text, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train_gpt2.main(args(text, out, "--max_steps", "2"))
    before = snapshot(out)
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        raise OSError(28, "No space left on device", str(out / "ckpt_0000004.pt"))

    monkeypatch.setattr(torch, "save", full_disk)
    one_line_error(args(text, out, "--max_steps", "4", "--resume", "auto"), "No space left", "free disk space")
    after = snapshot(out)
    assert {k: after.get(k) for k in before if k.startswith("ckpt_")} == {
        k: v for k, v in before.items() if k.startswith("ckpt_")}
    assert not [k for k in after if k.endswith(".tmp")]


def test_last_checkpoint_is_written_before_a_sample_that_never_ends(text, tmp_path):
    """A preset run checkpoints only at its last step; a sample that hangs (or fails) there must not take the
    training with it. The char vocabulary has no end-of-text token, so 10^8 tokens are sampled to the end."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_gpt2.py"), *args(text, out, "--max_steps", "2",
                             "--ckpt_interval", "1000", "--num_samples", "1", "--sample_tokens", str(10**8))],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        while not (out / "ckpt_0000002.pt").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, proc.stdout.read()  # still sampling
        assert (out / "ckpt_0000002.pt").exists()
    finally:
        proc.kill()
        proc.wait()
    assert load_checkpoint(out / "ckpt_0000002.pt")["step"] == 2


# ----------------------------------------------------------------------------- memory


@pytest.mark.parametrize("flags, needle", [
    (["--n_embd", "768000"], "--n_embd 768000"),  # a plausible typo for 768
    (["--n_layer", str(10**30)], f"--n_layer {10**30}"),
    (["--model_type", "bigram", "--vocab_size", str(2**31 - 1)], "--vocab_size"),
])
def test_model_too_large_for_memory_is_refused_before_allocating(text, tmp_path, flags, needle):
    msg = one_line_error(args(text, tmp_path / "run", "--max_steps", "2", *flags), needle, "GiB")
    assert "free" in msg
    assert not (tmp_path / "run").exists()


def test_out_of_host_memory_is_the_one_line_oom_error():
    """The CPU allocator's failure is a plain RuntimeError; it gets the same line as CUDA's OutOfMemoryError."""
    with pytest.raises(SystemExit) as e, one_line_errors():
        torch.empty(2**62, dtype=torch.uint8)  # 4 EiB: more than any machine
    assert str(e.value.code).startswith("error: out of memory; lower --batch_size")


# ----------------------------------------------------------------------------- files and permissions


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = atomic_write_bytes(tmp_path / "f.bin", b"x")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode


def test_out_dir_that_is_a_file_is_one_line(text, tmp_path):
    (tmp_path / "taken").write_text("precious")
    one_line_error(args(text, tmp_path / "taken", "--max_steps", "2"), str(tmp_path / "taken"))
    assert (tmp_path / "taken").read_text() == "precious"


# ----------------------------------------------------------------------------- numbers


def test_every_number_has_a_range():
    numeric = [f.name for f in TrainConfig.__dataclass_fields__.values() if f.type in ("int", "float")]
    assert sorted(numeric) == sorted(BOUNDS)


@pytest.mark.parametrize("flag, value", [
    ("max_lr", "nan"), ("eps", "nan"), ("dropout", "1.5"), ("eval_interval", "0"), ("log_interval", "0"),
    ("val_fraction", "1.5"), ("ckpt_interval", "-1"), ("warmup_steps", "-10"), ("keep_last", "-1"),
    ("num_samples", "-3"), ("max_lr", "inf"), ("beta2", "1.0"), ("grad_clip", "-1"),
])
def test_out_of_range_numbers_are_one_line(text, tmp_path, flag, value):
    one_line_error(args(text, tmp_path / "run", "--max_steps", "2", f"--{flag}", value), f"--{flag}")
    assert not (tmp_path / "run").exists()


def test_shard_with_ids_beyond_the_vocabulary(text, tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    np.save(d / "x_val_000000.npy", np.arange(4000, dtype=np.uint16) % 50257)
    np.save(d / "x_train_000001.npy", np.full(4000, 60000, dtype=np.uint16))
    one_line_error(args(text, tmp_path / "run", "--max_steps", "2", "--data", "shards", "--data_dir", str(d),
                        "--vocab_size", "50304"), "x_train_000001.npy", "60000", "vocabulary")


def test_shard_that_shrank_since_the_checkpoint(text, tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    np.save(d / "x_val_000000.npy", np.arange(4000, dtype=np.uint16))
    np.save(d / "x_train_000001.npy", np.arange(4000, dtype=np.uint16))
    shard = ["--data", "shards", "--data_dir", str(d), "--vocab_size", "50304", "--shuffle", "false"]
    train_gpt2.main(args(text, tmp_path / "run", "--max_steps", "40", "--ckpt_interval", "40", *shard))
    np.save(d / "x_train_000001.npy", np.arange(200, dtype=np.uint16))
    one_line_error(args(text, tmp_path / "run", "--max_steps", "42", "--resume", "auto", *shard),
                   "x_train_000001.npy", "data changed")


def test_second_sigterm_exits_quietly(text, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_gpt2.py"), *args(text, out, "--max_steps", "100000",
                             "--ckpt_interval", "0", "--eval_interval", "100000", "--num_samples", "0")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert "Traceback" not in err, err
    assert proc.returncode in (0, 1), err
    assert list_checkpoints(out) or "interrupted" in err



def test_eval_only_of_a_char_model_on_gpt2_shards(text, tmp_path):
    train_gpt2.main(args(text, tmp_path / "run", "--max_steps", "2"))
    d = tmp_path / "shards"
    d.mkdir()
    for name in ("x_val_000000.npy", "x_train_000001.npy"):
        np.save(d / name, np.arange(4000, dtype=np.uint16))
    one_line_error(args(text, tmp_path / "unused", "--eval_only", "--init", str(tmp_path / "run"), "--data",
                        "shards", "--data_dir", str(d)), "char tokenizer", "GPT-2 tokens")


def test_resume_on_another_text_names_the_vocabulary_not_the_prompt(text, tmp_path):
    out = tmp_path / "run"
    train_gpt2.main(args(text, out, "--max_steps", "2"))
    other = tmp_path / "other.txt"
    other.write_text("xyz xyz zzz yyy\\n" * 400)
    msg = one_line_error(args(other, out, "--max_steps", "4", "--resume", "auto"), "vocabulary")
    assert "--sample_prompt" not in msg
