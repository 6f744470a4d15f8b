"""Several nodes, as torchrun runs them: two `torchrun --nnodes=2 --nproc_per_node=1` agents on this machine meet at
a c10d rendezvous endpoint on localhost (gloo), train together to identical weights on both ranks, and after a
worker is killed past a checkpoint, both agents restart (--max-restarts 1) and reach the very weights of the
uninterrupted job; with DDP and with --fsdp true (sharded checkpoints). Every wait is bounded; a job past its time
is killed with its whole process group."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import shakespeare

from gpt2repro.checkpoint import checkpoint_path, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS, CKPT_INTERVAL = 16, 8
FLAGS = ["--preset", "shakespeare-char", "--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "32",
         "--batch_size", "2", "--total_batch_size", "128", "--max_steps", str(MAX_STEPS), "--eval_interval", "8",
         "--eval_iters", "2", "--ckpt_interval", str(CKPT_INTERVAL), "--keep_last", "0", "--num_samples", "0",
         "--log_interval", "100", "--device", "cpu", "--dtype", "float32", "--compile", "false", "--dropout", "0.0"]
# each worker also saves the weights it ends with, so the test sees every rank's copy, not only rank 0's checkpoint
WORKER = """
import os, sys, torch
sys.path.insert(0, {root!r})
import train_gpt2
finish = train_gpt2.loop
def loop(t, *args):
    result = finish(t, *args)
    # under FSDP each rank gathers the whole weights from the shards (a collective: every rank calls it)
    state = {{k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in t.raw.state_dict().items()}}
    torch.save(state, os.path.join({out!r}, "weights_rank" + os.environ["RANK"] + ".pt"))
    return result
train_gpt2.loop = loop
train_gpt2.main(sys.argv[1:])
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "small.txt"
    path.write_text(shakespeare().read_text()[:20000])
    return path


def start_job(tmp: Path, text: Path, out: Path, extra: list[str]) -> list[subprocess.Popen]:
    """Two agents, one per "node", each in a session of its own (so a hung one can be killed whole)."""
    script = tmp / "worker.py"
    script.write_text(WORKER.format(root=str(ROOT), out=str(out)))
    out.mkdir(parents=True, exist_ok=True)
    port, job = free_port(), f"job{os.getpid()}{out.name}"
    # a fresh rendezvous store per attempt: the shared one keeps the dead attempt's gloo addresses
    env = os.environ | {"OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    cmd = ["nice", sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
           f"--rdzv_id={job}", "--rdzv_backend=c10d", f"--rdzv_endpoint=localhost:{port}", "--max-restarts=1",
           "--monitor-interval=0.1", str(script), *FLAGS, "--text_path", str(text), "--out_dir", str(out),
           "--resume", "auto", *extra]
    return [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True) for _ in range(2)]


def finish_job(agents: list[subprocess.Popen], timeout: float = 300) -> list[str]:
    deadline, logs = time.time() + timeout, []
    for agent in agents:
        try:
            logs.append(agent.communicate(timeout=max(1.0, deadline - time.time()))[0])
        except subprocess.TimeoutExpired:
            for a in agents:
                if a.poll() is None:
                    os.killpg(a.pid, signal.SIGKILL)
            pytest.fail("the two-node job did not finish in time:\n" + "\n".join(a.communicate()[0][-3000:]
                                                                                 for a in agents))
    return logs


def train_losses(out: Path) -> list[tuple[int, float]]:
    events = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines() if s.strip()]
    return [(e["step"], e["train_loss"]) for e in events if "train_loss" in e]


def worker_pid(out: Path, rank: str) -> int | None:
    """The first attempt's worker of `rank` training into `out` (found through /proc)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline, environ = (proc / "cmdline").read_bytes(), (proc / "environ").read_bytes()
        except OSError:
            continue
        env = dict(kv.split(b"=", 1) for kv in environ.split(b"\0") if b"=" in kv)
        if (str(out).encode() in cmdline and env.get(b"RANK") == rank.encode()
                and env.get(b"TORCHELASTIC_RESTART_COUNT") == b"0"):
            return int(proc.name)
    return None


@pytest.fixture(scope="module", params=["ddp", "fsdp"])
def kind(request) -> list[str]:
    return ["--fsdp", str(request.param == "fsdp").lower()]


@pytest.fixture(scope="module")
def uninterrupted(text, kind, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("two_nodes")
    out = tmp / "run"
    logs = finish_job(start_job(tmp, text, out, kind))
    assert all("Traceback" not in log for log in logs), logs
    return out


def test_two_nodes_train_to_identical_weights(uninterrupted):
    w0, w1 = (torch.load(uninterrupted / f"weights_rank{r}.pt", weights_only=True) for r in (0, 1))
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    final = load_checkpoint(checkpoint_path(uninterrupted, MAX_STEPS))["model"]
    assert all(torch.equal(final[k], w0[k]) for k in final)
    assert [s for s, _ in train_losses(uninterrupted)] == list(range(MAX_STEPS))


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the workers through /proc")
def test_a_killed_node_restarts_from_its_checkpoint_to_the_same_weights(uninterrupted, kind, text, tmp_path):
    out = tmp_path / "run"
    agents = start_job(tmp_path, text, out, kind)
    deadline = time.time() + 240
    while not (checkpoint_path(out, CKPT_INTERVAL).exists() and (out / "metrics.jsonl").exists()
               and train_losses(out)[-1][0] > CKPT_INTERVAL):
        if time.time() > deadline or any(a.poll() is not None for a in agents):
            finish_job(agents, timeout=5)
            pytest.fail("the job ended or stalled before its first checkpoint")
        time.sleep(0.01)
    victim = worker_pid(out, "1")
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    logs = finish_job(agents)
    assert all(a.returncode == 0 for a in agents), logs
    assert any(f"at step {CKPT_INTERVAL}" in log for log in logs), logs  # resumed, not started over
    losses = train_losses(out)
    assert losses[-1][0] == MAX_STEPS - 1 and len(losses) > MAX_STEPS  # some steps were trained twice
    want = dict(train_losses(uninterrupted))
    assert all(v == want[s] for s, v in losses)
    w = load_checkpoint(checkpoint_path(out, MAX_STEPS))["model"]
    ref = load_checkpoint(checkpoint_path(uninterrupted, MAX_STEPS))["model"]
    assert all(torch.equal(w[k], ref[k]) for k in ref)
    w0, w1 = (torch.load(out / f"weights_rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
