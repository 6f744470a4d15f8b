"""`train_gpt2.py --fsdp true` on CPU: 2 gloo ranks train as DDP does (AdamW and Muon); sharded checkpoints resume
bit for bit at the same world size and at another one, are pruned with --keep_last, and an interrupted or hostile
one is passed over by --resume auto; the model file beside the shards is what sample.py and --init read."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import shakespeare

import train_gpt2
from gpt2repro.checkpoint import checkpoint_path, load_checkpoint, load_model

ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS, CKPT_INTERVAL = 9, 3
FLAGS = ["--preset", "shakespeare-char", "--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "32",
         "--batch_size", "2", "--total_batch_size", "256", "--max_steps", str(MAX_STEPS), "--eval_interval", "3",
         "--eval_iters", "2", "--ckpt_interval", str(CKPT_INTERVAL), "--keep_last", "2", "--num_samples", "1",
         "--sample_tokens", "8", "--sample_interval", "3", "--log_interval", "100", "--device", "cpu", "--dtype",
         "float32", "--compile", "false", "--dropout", "0.0"]
OPTIMIZERS = {"muon": ["--optimizer", "muon", "--pos", "rope"], "adamw": ["--optimizer", "adamw", "--pos", "learned"]}


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "small.txt"
    path.write_text(shakespeare().read_text()[:20000])
    return path


def flags(text: Path, out: Path, optimizer: str = "muon") -> list[str]:
    return [*FLAGS, *OPTIMIZERS[optimizer], "--text_path", str(text), "--out_dir", str(out)]


def torchrun(args: list[str], nproc: int = 2) -> str:
    cmd = ["nice", sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "train_gpt2.py"), *args]
    r = subprocess.run(cmd, cwd=ROOT, env=os.environ | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def losses(out: Path, key: str = "train_loss") -> dict[int, float]:
    events = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    return {e["step"]: e[key] for e in events if key in e}


def weights(out: Path, step: int = MAX_STEPS) -> dict[str, torch.Tensor]:
    return load_checkpoint(checkpoint_path(out, step))["model"]


@pytest.fixture(scope="module")
def runs(text, tmp_path_factory) -> dict[str, Path]:
    """Uninterrupted 2-rank runs: DDP and FSDP, each with Muon and with AdamW."""
    found = {}
    for optimizer in OPTIMIZERS:
        for kind in ("ddp", "fsdp"):
            out = tmp_path_factory.mktemp(f"{kind}_{optimizer}") / "run"
            torchrun(flags(text, out, optimizer) + ["--fsdp", str(kind == "fsdp").lower()])
            found[f"{kind} {optimizer}"] = out
    return found


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_fsdp_trains_as_ddp(runs, optimizer):
    ddp, fsdp = runs[f"ddp {optimizer}"], runs[f"fsdp {optimizer}"]
    want, got = losses(ddp), losses(fsdp)
    assert sorted(got) == list(range(MAX_STEPS))
    assert max(abs(got[s] - want[s]) for s in want) <= 1e-6, (want, got)
    assert got[MAX_STEPS - 1] < got[0]
    w_ddp, w_fsdp = weights(ddp), weights(fsdp)
    assert w_ddp.keys() == w_fsdp.keys()
    assert max((w_ddp[k] - w_fsdp[k]).abs().max().item() for k in w_ddp) <= 1e-4
    assert torch.equal(w_fsdp["lm_head.weight"], w_fsdp["transformer.wte.weight"])  # the tie survived sharding
    # pruned to the newest 2, model files and shards alike; only finished ones are left
    assert sorted(p.name for p in fsdp.glob("*ckpt_*")) == ["ckpt_0000006.dcp", "ckpt_0000006.pt",
                                                            "ckpt_0000009.dcp", "ckpt_0000009.pt"]
    # sample.py, hellaswag.py, export_hf.py and --init read the run dir's model file, without torch.distributed
    model, _ = load_model(str(fsdp))
    assert all(torch.equal(v, w_fsdp[k]) for k, v in model.state_dict().items())
    assert (losses(fsdp, "sample")) and losses(fsdp, "val_loss").keys() == {0, 3, 6, 9}


def test_resume_at_the_same_world_size_is_bitwise(runs, tmp_path):
    ref = runs["fsdp muon"]
    out = tmp_path / "run"
    out.mkdir()
    for name in ("ckpt_0000006.pt", "ckpt_0000006.dcp"):
        (shutil.copytree if name.endswith(".dcp") else shutil.copy)(ref / name, out / name)
    printed = torchrun(flags(Path(json.loads((ref / "config.json").read_text())["text_path"]), out)
                       + ["--fsdp", "true", "--resume", "auto"])
    assert "at step 6" in printed, printed
    want, got = weights(ref), weights(out)
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert all(losses(ref)[s] == v for s, v in losses(out).items()) and sorted(losses(out)) == [6, 7, 8]


def test_resume_at_another_world_size_continues_the_same_run(runs, text, tmp_path, capsys):
    """2 ranks' checkpoint, 1 process: the same global batches, so the same run up to float summation order."""
    ref = runs["fsdp muon"]
    out = tmp_path / "run"
    out.mkdir()
    for name in ("ckpt_0000006.pt", "ckpt_0000006.dcp"):
        (shutil.copytree if name.endswith(".dcp") else shutil.copy)(ref / name, out / name)
    # an interrupted write of step 9: shards renamed but no model file yet, and a temp dir
    shutil.copytree(ref / "ckpt_0000009.dcp", out / "ckpt_0000009.dcp")
    shutil.copytree(ref / "ckpt_0000009.dcp", out / ".ckpt_0000012.dcp.tmp")
    capsys.readouterr()
    train_gpt2.main(flags(text, out) + ["--fsdp", "true", "--resume", "auto"])
    printed = capsys.readouterr().out
    assert "written by 2 process(es), this run has 1" in printed and "at step 6" in printed, printed
    assert "removing ckpt_0000009.dcp" in printed and "removing .ckpt_0000012.dcp.tmp" in printed
    want, got = losses(ref), losses(out)
    assert sorted(got) == [6, 7, 8] and all(abs(got[s] - want[s]) <= 1e-5 for s in got)
    w_ref, w = weights(ref), weights(out)
    assert max((w_ref[k] - w[k]).abs().max().item() for k in w) <= 1e-4
    assert sorted(p.name for p in out.glob("*ckpt_*")) == ["ckpt_0000006.dcp", "ckpt_0000006.pt",
                                                           "ckpt_0000009.dcp", "ckpt_0000009.pt"]


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_hostile_newest_checkpoint_is_set_aside_never_run(runs, text, tmp_path, capsys):
    ref = runs["fsdp muon"]
    out = tmp_path / "run"
    shutil.copytree(ref, out)
    marker = tmp_path / "pwned"
    (out / "ckpt_0000009.dcp" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    capsys.readouterr()
    train_gpt2.main(flags(text, out) + ["--fsdp", "true", "--resume", "auto", "--max_steps", "10"])
    printed = capsys.readouterr().out
    assert not marker.exists()
    assert "posix.system is not part of a checkpoint's metadata" in printed and "at step 6" in printed, printed
    assert (out / "ckpt_0000009.dcp.unreadable").is_dir() and (out / "ckpt_0000009.pt.unreadable").is_file()


def test_a_sharded_run_is_resumed_only_with_fsdp(runs, text, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(runs["fsdp muon"], out)
    with pytest.raises(SystemExit, match="belongs to a sharded run.*resume it with --fsdp true"):
        train_gpt2.main(flags(text, out) + ["--resume", "auto", "--max_steps", "12"])
    ddp_out = tmp_path / "ddp"
    shutil.copytree(runs["ddp muon"], ddp_out)
    with pytest.raises(SystemExit, match="without --fsdp; resume it with --fsdp false"):
        train_gpt2.main(flags(text, ddp_out) + ["--fsdp", "true", "--resume", "auto", "--max_steps", "12"])


def test_hellaswag_and_samples_during_a_sharded_run(text, tmp_path):
    """HellaSwag (3 examples over 2 ranks: unequal work per rank) and samples run on a gathered copy."""
    import hellaswag

    rows = [{"ind": i, "ctx": ctx, "label": i % 4, "activity_label": "Talking",
             "endings": ["to the king.", "and then he left.", "with a sword.", "in the garden."]}
            for i, ctx in enumerate(["ROMEO: I will go", "JULIET: Come hither", "KING: Speak now"])]
    jsonl = tmp_path / "hs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    torchrun(["--preset", "shakespeare-gpt2", "--text_path", str(text), "--out_dir", str(out), "--n_layer", "1",
              "--n_head", "2", "--n_embd", "32", "--block_size", "32", "--batch_size", "2", "--total_batch_size",
              "128", "--max_steps", "2", "--eval_interval", "2", "--eval_iters", "1", "--ckpt_interval", "2",
              "--num_samples", "1", "--sample_tokens", "4", "--sample_interval", "2", "--device", "cpu", "--dtype",
              "float32", "--compile", "false", "--hellaswag_jsonl", str(jsonl), "--fsdp", "true"])
    logged = losses(out, "hellaswag_acc_norm")
    assert sorted(logged) == [0, 2] and sorted(losses(out, "sample")) == [2]
    model, tok = load_model(str(out))
    ref = hellaswag.evaluate(model, hellaswag.load_examples(jsonl=jsonl), tokenizer=tok)
    assert logged[2] == pytest.approx(ref["acc_norm"])


def test_addition_is_scored_during_a_sharded_run(tmp_path):
    out = tmp_path / "run"
    torchrun(["--preset", "addition", "--out_dir", str(out), "--n_layer", "1", "--n_head", "2", "--n_embd", "32",
              "--max_steps", "2", "--eval_interval", "2", "--eval_iters", "1", "--ckpt_interval", "2",
              "--num_samples", "0", "--device", "cpu", "--dtype", "float32", "--compile", "false", "--fsdp", "true"])
    assert sorted(losses(out, "addition_acc")) == [0, 2]


def test_blocks_compiled_one_by_one_train_as_eager(text, tmp_path):
    args = [*FLAGS, *OPTIMIZERS["muon"], "--text_path", str(text), "--max_steps", "3", "--fsdp", "true"]
    for compiled in ("false", "true"):
        torchrun([*args, "--compile", compiled, "--out_dir", str(tmp_path / compiled)])
    eager, compiled = weights(tmp_path / "false", 3), weights(tmp_path / "true", 3)
    assert eager.keys() == compiled.keys()  # the state dict keeps its keys: blocks are compiled in place
    assert max((eager[k] - compiled[k]).abs().max().item() for k in eager) <= 1e-5
    assert losses(tmp_path / "true") == pytest.approx(losses(tmp_path / "false"), abs=1e-5)


def test_hostile_training_state_entry_never_runs(runs, text, tmp_path):
    """The shards' one non-tensor entry replaced by a pickle that calls os.system: refused in one line."""
    import io

    from gpt2repro.sharding import SafeReader

    out = tmp_path / "run"
    shutil.copytree(runs["fsdp muon"], out)
    shards = out / "ckpt_0000009.dcp"
    metadata = SafeReader(shards).read_metadata()
    marker = tmp_path / "pwned"
    payload = io.BytesIO()
    torch.save(Payload(marker), payload)
    info = next(v for k, v in metadata.storage_data.items() if k.fqn == "train")
    data_file = shards / info.relative_path
    info.offset, info.length = data_file.stat().st_size, len(payload.getvalue())
    with open(data_file, "ab") as f:
        f.write(payload.getvalue())
    (shards / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(SystemExit, match="entry train refused.*system"):
        train_gpt2.main(flags(text, out) + ["--fsdp", "true", "--resume", "auto", "--max_steps", "10"])
    assert not marker.exists()


def test_resume_from_a_named_sharded_checkpoint(runs, text, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(runs["fsdp muon"], out)
    capsys.readouterr()
    train_gpt2.main(flags(text, out) + ["--fsdp", "true", "--resume", str(out / "ckpt_0000009.dcp"), "--max_steps",
                                        "10"])
    assert "at step 9" in capsys.readouterr().out
    assert sorted(losses(out)) == [*range(MAX_STEPS), 9]
    with pytest.raises(SystemExit, match="no such checkpoint"):  # pruned by --keep_last
        train_gpt2.main(flags(text, tmp_path / "a") + ["--fsdp", "true", "--resume", str(out / "ckpt_0000003.pt")])
    whole = runs["ddp muon"] / "ckpt_0000009.pt"  # a run without --fsdp has no shards
    with pytest.raises(SystemExit, match=r"ckpt_0000009.dcp/ \(the optimizer state of a sharded run\) is missing"):
        train_gpt2.main(flags(text, tmp_path / "b") + ["--fsdp", "true", "--resume", str(whole)])
