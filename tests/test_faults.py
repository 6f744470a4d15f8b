"""Faults cost at most the steps since the last checkpoint, and never a silently different model.

Each test breaks a real `train_gpt2.py` process (SIGKILL at a random step, SIGKILL inside a checkpoint write,
SIGINT, a bit-flipped checkpoint, a rank killed under torchrun), resumes it with `--resume auto`, and compares
the final weights and every logged loss with an uninterrupted run of the same seed. The kill step is drawn at
random; set GPT2_REPRO_FAULT_SEED to replay one.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import shakespeare

from gpt2repro.checkpoint import checkpoint_path, list_checkpoints, load_checkpoint

train_gpt2 = pytest.importorskip("train_gpt2")

ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS, CKPT_INTERVAL = 40, 10
FLAGS = ["--preset", "shakespeare-char", "--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "32",
         "--batch_size", "2", "--total_batch_size", "128", "--max_steps", str(MAX_STEPS), "--eval_interval", "10",
         "--eval_iters", "2", "--ckpt_interval", str(CKPT_INTERVAL), "--keep_last", "0", "--num_samples", "1",
         "--sample_tokens", "8", "--log_interval", "100", "--device", "cpu", "--dtype", "float32",
         "--compile", "false"]
SEED = int(os.environ.get("GPT2_REPRO_FAULT_SEED") or random.SystemRandom().randrange(1 << 30))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread here and in the runs started (OMP_NUM_THREADS=1): tiny matmuls only lose to spinning
    OpenMP threads on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "small.txt"
    path.write_text(shakespeare().read_text()[:20000])
    return path


def flags(text: Path, out: Path, dropout: float = 0.1) -> list[str]:
    # dropout makes the RNG state part of what a resume must restore
    return FLAGS + ["--text_path", str(text), "--out_dir", str(out), "--dropout", str(dropout)]


@pytest.fixture(scope="module")
def reference(text, tmp_path_factory) -> Path:
    """The uninterrupted run every faulted one must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    train_gpt2.main(flags(text, out))
    return out


@pytest.fixture(scope="module")
def reference_no_dropout(text, tmp_path_factory) -> Path:
    """One process without dropout: what 2 DDP ranks compute up to float summation order."""
    out = tmp_path_factory.mktemp("reference_no_dropout")
    train_gpt2.main(flags(text, out, dropout=0.0))
    return out


def events(out: Path) -> list[dict]:
    """Every event of metrics.jsonl, in order; a line cut short by SIGKILL is the only one allowed to be torn."""
    found, torn = [], 0
    for line in (out / "metrics.jsonl").read_text().splitlines():
        try:
            found.append(json.loads(line))
        except json.JSONDecodeError:
            torn += 1
    assert torn <= 1, f"{torn} unreadable lines in {out / 'metrics.jsonl'}"
    return found


def losses(out: Path, key: str = "train_loss") -> list[tuple[int, float]]:
    return [(e["step"], e[key]) for e in events(out) if key in e] if (out / "metrics.jsonl").exists() else []


def last_step(out: Path) -> int:
    logged = losses(out)
    return logged[-1][0] if logged else -1


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    ckpt = load_checkpoint(checkpoint_path(out, MAX_STEPS))
    assert ckpt["step"] == MAX_STEPS
    return ckpt["model"]


def assert_same_run(out: Path, ref: Path, resumed_from: int | None = None) -> None:
    """Bit-identical final weights, and every loss ever logged (before and after the fault) equal to the reference's.

    `resumed_from`: the run began by resuming the reference's checkpoint of that step, so it logged nothing
    before it, nor that step's evaluation (logged before the checkpoint was written).
    """
    want, got = final_weights(ref), final_weights(out)
    assert want.keys() == got.keys()
    assert [k for k in want if not torch.equal(want[k], got[k])] == [], f"weights differ (fault seed {SEED})"
    for key in ("train_loss", "val_loss"):
        expected = {s: v for s, v in losses(ref, key)
                    if resumed_from is None or s > resumed_from or (s == resumed_from and key == "train_loss")}
        logged = losses(out, key)
        assert {s for s, _ in logged} == set(expected), (key, SEED)
        assert [(s, v) for s, v in logged if v != expected[s]] == [], f"{key} differs (fault seed {SEED})"


# the trainer with every checkpoint rename held back two minutes: the finished temp file waits to be killed
PAUSE_BEFORE_CHECKPOINT_RENAME = """
import os, runpy, sys, time
rename = os.replace
def paused(src, dst, *args, **kwargs):
    if os.path.basename(str(dst)).startswith("ckpt_"):
        time.sleep(120)
    return rename(src, dst, *args, **kwargs)
os.replace = paused
sys.argv = ["train_gpt2.py", *sys.argv[1:]]
runpy.run_path("train_gpt2.py", run_name="__main__")
"""


def start(argv: list[str], env: dict | None = None) -> subprocess.Popen:
    """The run in a session of its own, so a hung torchrun can be stopped with all its workers."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float) -> str:
    """Its output once it exits; past `timeout`, kill its whole process group and fail."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"no exit within {timeout:.0f} s (fault seed {SEED}):\n{out[-4000:]}")
    return out


def wait_until(condition: Callable[[], bool], proc: subprocess.Popen, what: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"run ended (exit {proc.returncode}) before {what} (fault seed {SEED}):\n{proc.stdout.read()}")
        if time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)


def kill(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> str:
    proc.send_signal(sig)
    return finish(proc, 120)


def resume(text: Path, out: Path, capsys, dropout: float = 0.1) -> str:
    """`--resume auto` in this process, returning what it printed."""
    capsys.readouterr()
    train_gpt2.main(flags(text, out, dropout) + ["--resume", "auto"])
    return capsys.readouterr().out


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def flip_tensor_byte(path: Path) -> None:
    """Invert one byte inside the data of the first tensor entry: the archive still opens, one weight is wrong."""
    with zipfile.ZipFile(path) as zf:
        entry = next(i for i in zf.infolist() if "/data/" in i.filename and i.file_size >= 64)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[entry.header_offset + 26 : entry.header_offset + 30])
    start = entry.header_offset + 30 + name_len + extra_len
    data[start + entry.file_size // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------- single process


def test_sigkill_at_a_random_step_then_resume_is_exact(reference, text, tmp_path, capsys):
    kill_at = random.Random(SEED).randint(CKPT_INTERVAL + 1, MAX_STEPS - 16)
    out = tmp_path / "run"
    proc = start([str(ROOT / "train_gpt2.py"), *flags(text, out), "--resume", "auto"])
    wait_until(lambda: last_step(out) >= kill_at, proc, f"step {kill_at}")
    log = kill(proc)
    assert proc.returncode == -signal.SIGKILL, log
    reached = last_step(out)
    assert kill_at <= reached < MAX_STEPS - 1, f"killed at step {reached}, meant {kill_at} (fault seed {SEED})"
    newest = load_checkpoint(list_checkpoints(out)[-1])["step"]
    assert reached - CKPT_INTERVAL < newest <= reached + 1  # at most the steps since the last checkpoint are lost

    printed = resume(text, out, capsys)
    assert f"at step {newest}" in printed, printed
    assert_same_run(out, reference)
    # the steps between the checkpoint and the kill were trained twice, with the same losses both times
    assert len(losses(out)) == MAX_STEPS + (reached + 1 - newest)


def test_sigkill_inside_a_checkpoint_write_keeps_the_previous_one(reference, text, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(checkpoint_path(reference, 10), out)  # the run so far: its step-10 checkpoint
    previous = checkpoint_path(out, 10)
    digest = sha256(previous)
    # hold every checkpoint write between its finished temp file and the rename
    proc = start(["-c", PAUSE_BEFORE_CHECKPOINT_RENAME, *flags(text, out), "--resume", "auto"])
    wait_until(lambda: any(out.glob(".ckpt_0000020.pt*.tmp")), proc, "the step-20 checkpoint write")
    log = kill(proc)
    assert proc.returncode == -signal.SIGKILL, log
    assert [p.name for p in list_checkpoints(out)] == ["ckpt_0000010.pt"], sorted(os.listdir(out))
    assert sha256(previous) == digest and load_checkpoint(previous)["step"] == 10
    # and a temp file torn mid-write, as the atomic writer leaves it when killed before the fsync
    torn = out / ".ckpt_0000020.pt.k3yz9q.tmp"
    torn.write_bytes(previous.read_bytes()[:5000])

    printed = resume(text, out, capsys)
    assert "at step 10" in printed, printed
    assert list(out.glob(".*.tmp")) == [], sorted(os.listdir(out))
    assert sha256(previous) == digest
    assert_same_run(out, reference, resumed_from=10)


def test_sigint_checkpoints_at_the_next_step_boundary_and_exits_0(reference, text, tmp_path, capsys):
    stop_at = random.Random(SEED + 1).randint(CKPT_INTERVAL + 1, MAX_STEPS - 16)
    out = tmp_path / "run"
    proc = start([str(ROOT / "train_gpt2.py"), *flags(text, out), "--resume", "auto"])
    wait_until(lambda: last_step(out) >= stop_at, proc, f"step {stop_at}")
    log = kill(proc, signal.SIGINT)
    assert proc.returncode == 0 and "SIGINT" in log and "Traceback" not in log, log
    reached = last_step(out)
    assert reached < MAX_STEPS - 1, f"the run finished before SIGINT reached it (fault seed {SEED})"
    newest = list_checkpoints(out)[-1]
    assert load_checkpoint(newest)["step"] == reached + 1  # the boundary right after the last finished step

    printed = resume(text, out, capsys)
    assert f"at step {reached + 1}" in printed, printed
    assert_same_run(out, reference)
    assert len(losses(out)) == MAX_STEPS  # nothing was trained twice


def test_bit_flipped_newest_checkpoint_is_set_aside_not_trained_on(reference, text, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    for step in (10, 20, 30):
        shutil.copy(checkpoint_path(reference, step), out)
    flip_tensor_byte(checkpoint_path(out, 30))
    flipped = checkpoint_path(out, 30).read_bytes()

    printed = resume(text, out, capsys)
    assert "at step 20" in printed and "ckpt_0000030.pt" in printed, printed
    kept = [p for p in out.iterdir() if p.name.startswith("ckpt_0000030.pt.")]
    assert len(kept) == 1 and kept[0].read_bytes() == flipped  # set aside for inspection, not deleted
    want, got = final_weights(reference), final_weights(out)
    assert all(torch.equal(want[k], got[k]) for k in want)


# ----------------------------------------------------------------------------- torchrun


def worker_pids(out: Path) -> dict[int, tuple[str, str]]:
    """pid -> (RANK, TORCHELASTIC_RESTART_COUNT) of the torchrun workers training into `out` (Linux /proc)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        if b"train_gpt2.py" not in cmdline or str(out).encode() not in cmdline:
            continue
        env = dict(kv.split(b"=", 1) for kv in environ.split(b"\0") if b"=" in kv)
        if b"RANK" in env and b"TORCHELASTIC_RESTART_COUNT" in env:
            found[int(proc.name)] = (env[b"RANK"].decode(), env[b"TORCHELASTIC_RESTART_COUNT"].decode())
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the workers through /proc")
def test_torchrun_restarts_a_killed_rank_from_the_last_checkpoint(reference_no_dropout, text, tmp_path):
    kill_at = random.Random(SEED + 2).randint(CKPT_INTERVAL + 2, MAX_STEPS - 16)
    out = tmp_path / "ddp"
    # torchrun's shared rendezvous store keeps the dead attempt's gloo addresses: restarted ranks can read a
    # stale peer port and fail or hang in connectFullMesh (about 1 restart in 2 here); a fresh store per attempt
    # avoids that
    proc = start(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
                  "--monitor-interval=0.1", str(ROOT / "train_gpt2.py"), *flags(text, out, dropout=0.0),
                  "--resume", "auto"], env={"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    wait_until(lambda: last_step(out) >= kill_at, proc, f"step {kill_at}")
    victims = [pid for pid, (rank, restart) in worker_pids(out).items() if rank == "1" and restart == "0"]
    assert len(victims) == 1, worker_pids(out)
    os.kill(victims[0], signal.SIGKILL)
    log = finish(proc, 240)
    assert proc.returncode == 0, log
    assert "at step 10" in log or "at step 20" in log, log

    logged = losses(out)
    resumed_at = next(i for i in range(1, len(logged)) if logged[i][0] <= logged[i - 1][0])
    first, second = dict(logged[:resumed_at]), dict(logged[resumed_at:])
    assert max(first) >= kill_at and min(second) in (10, 20) and max(second) == MAX_STEPS - 1
    # steps trained both before the failure and after the restart: the very same DDP computation
    assert all(first[s] == second[s] for s in set(first) & set(second))
    # against one process over the same global batches: equal up to float summation order
    want, got = final_weights(reference_no_dropout), final_weights(out)
    assert max((want[k] - got[k]).abs().max().item() for k in want) < 2e-5
    ref = dict(losses(reference_no_dropout))
    assert all(abs(v - ref[s]) < 1e-5 for s, v in logged)
