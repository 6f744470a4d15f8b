"""FSDP (gpt2repro/sharding.py): 2 gloo ranks train as DDP does, with AdamW and with Muon; sharded checkpoints
written by 2 ranks load bit for bit at 1 and 2; hostile checkpoint files never run code while loading."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from gpt2repro.checkpoint import UnreadableCheckpoint
from gpt2repro.sharding import SafeReader, read_metadata, safe_load
from model import GPT

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "sharding_worker.py"
sys.path.insert(0, str(ROOT / "tests"))
from sharding_worker import CONFIG, STEPS  # noqa: E402


def torchrun(nproc: int, *args: str, timeout: float = 300) -> None:
    cmd = ["nice", sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(WORKER), *args]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_fsdp_trains_as_ddp(tmp_path, optimizer):
    torchrun(2, "compare", str(tmp_path), optimizer)
    result = torch.load(tmp_path / "compare.pt", weights_only=True)
    ddp, fsdp = result["losses"]["ddp"], result["losses"]["fsdp"]
    assert len(ddp) == len(fsdp) == STEPS
    assert max(abs(a - b) for a, b in zip(ddp, fsdp, strict=True)) <= 1e-6, (ddp, fsdp)
    assert ddp[-1] < ddp[0] - 0.5  # it trained: the same batches every step are being learned
    # gradient_as_bucket_view=True (the trainer's DDP) changes nothing but memory
    assert result["losses"]["ddp_copied_grads"] == ddp
    assert all(torch.equal(v, result["ddp_copied_grads"][k]) for k, v in result["ddp"].items())
    assert result["ddp"].keys() == result["fsdp"].keys()
    for k, v in result["ddp"].items():
        torch.testing.assert_close(result["fsdp"][k], v, atol=1e-4, rtol=0, msg=k)
    torch.manual_seed(0)
    init = GPT(CONFIG).state_dict()
    moved = max((result["fsdp"][k] - init[k]).abs().max().item() for k in init)
    assert moved > 1e-2  # the weights compared are trained ones, not the shared initialisation
    assert torch.equal(result["fsdp"]["lm_head.weight"], result["fsdp"]["transformer.wte.weight"])  # still tied


def test_sharded_checkpoint_from_2_ranks_loads_bit_for_bit_at_1_and_2(tmp_path):
    torchrun(2, "save", str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_0000003.dcp", "saved_full.pt"]  # temp dir renamed
    torchrun(1, "load", str(tmp_path))
    torchrun(2, "load", str(tmp_path))
    saved = torch.load(tmp_path / "saved_full.pt", weights_only=True)
    assert any(k.startswith("transformer.h.0.attn.c_attn") for k in saved["optim"]["state"])  # Muon's momentum
    for world in (1, 2):
        loaded = torch.load(tmp_path / f"loaded_full_{world}.pt", weights_only=True)
        assert loaded["train"]["step"] == 3 and loaded["train"]["loader"] == {"position": 12, "epoch": 0}
        assert saved["model"].keys() == loaded["model"].keys()
        assert all(torch.equal(saved["model"][k], loaded["model"][k]) for k in saved["model"])
        s, g = saved["optim"]["state"], loaded["optim"]["state"]
        assert s.keys() == g.keys() and all(s[k].keys() == g[k].keys() for k in s)
        assert all(torch.equal(torch.as_tensor(s[k][n]), torch.as_tensor(g[k][n])) for k in s for n in s[k])


# ----------------------------------------------------------------------------- hostile files


class Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def genuine(path: Path) -> dict:
    state = {"w": torch.arange(6.0).reshape(2, 3), "train": b"plain bytes"}
    dcp.save(state, checkpoint_id=path, no_dist=True)
    return state


def test_genuine_checkpoint_loads_through_the_safe_reader(tmp_path):
    genuine(tmp_path / "ck")
    state = {"w": torch.zeros(2, 3), "train": b""}
    safe_load(state, tmp_path / "ck")
    assert torch.equal(state["w"], torch.arange(6.0).reshape(2, 3)) and state["train"] == b"plain bytes"


def test_hostile_metadata_never_runs(tmp_path):
    genuine(tmp_path / "ck")
    marker = tmp_path / "pwned"
    (tmp_path / "ck" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(UnreadableCheckpoint, match=r"\.metadata: refused.*system"):
        read_metadata(tmp_path / "ck")
    with pytest.raises(UnreadableCheckpoint, match="refused"):
        safe_load({"w": torch.zeros(2, 3), "train": b""}, tmp_path / "ck")
    assert not marker.exists()
    with pytest.raises(CheckpointException):  # DCP's own reader runs it (then fails): the test can fail
        dcp.load({"w": torch.zeros(2, 3)}, checkpoint_id=tmp_path / "ck", no_dist=True)
    assert marker.exists()


def test_metadata_pointing_outside_the_checkpoint_is_refused(tmp_path):
    genuine(tmp_path / "ck")
    metadata = SafeReader(tmp_path / "ck").read_metadata()
    for info in metadata.storage_data.values():
        info.relative_path = "../../etc/passwd"
    (tmp_path / "ck" / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(UnreadableCheckpoint, match="other than this checkpoint's shards"):
        read_metadata(tmp_path / "ck")


def test_hostile_bytes_entry_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    # DCP pickles a non-tensor value with torch.save: this one unpickles to os.system(...)
    dcp.save({"w": torch.ones(3), "train": Payload(marker)}, checkpoint_id=tmp_path / "ck", no_dist=True)
    assert not marker.exists()
    with pytest.raises(UnreadableCheckpoint, match="entry train refused.*system"):
        safe_load({"w": torch.zeros(3), "train": b""}, tmp_path / "ck")
    assert not marker.exists()
    dcp.load({"w": torch.zeros(3), "train": b""}, checkpoint_id=tmp_path / "ck", no_dist=True)  # DCP's own: runs
    assert marker.exists()


def test_clipping_sharded_gradients_is_clip_grad_norm(tmp_path):
    """One process, FSDP over a world of 1: the norm and the clipped gradients are torch's own, bit for bit."""
    import copy

    import torch.distributed as dist

    from gpt2repro.sharding import clip_grad_norm, ensure_process_group, shard_model

    ensure_process_group("cpu")
    try:
        torch.manual_seed(0)
        plain = GPT(CONFIG)
        sharded = shard_model(copy.deepcopy(plain))
        x = torch.randint(0, CONFIG.vocab_size, (2, CONFIG.block_size))
        for m in (plain, sharded):
            m(x, x)[1].backward()
        want = torch.nn.utils.clip_grad_norm_(plain.parameters(), 0.1)
        got = clip_grad_norm(sharded.parameters(), 0.1)
        assert want > 1 and torch.equal(got, want)  # clipped by more than 10x
        grads = {n: p.grad.full_tensor() for n, p in sharded.named_parameters()}
        assert all(torch.equal(grads[n], p.grad) for n, p in plain.named_parameters())
    finally:
        dist.destroy_process_group()
