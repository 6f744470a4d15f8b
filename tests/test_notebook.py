"""play.ipynb runs headless on a real (short) training run, with a small random GPT-2 as the reference model."""

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import nbformat
import pytest
from conftest import shakespeare
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "play.ipynb"
EVAL_ITERS = 2


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """6 steps of the char-level preset, shrunk, with val loss at steps 0, 3 and 6 and a checkpoint at 6."""
    tmp = tmp_path_factory.mktemp("nb")
    text = tmp / "small.txt"
    text.write_text(shakespeare().read_text()[:30000])
    out = tmp / "run"
    cmd = [sys.executable, "train_gpt2.py", "--preset", "shakespeare-char", "--text_path", str(text),
           "--out_dir", str(out), "--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "32",
           "--batch_size", "4", "--total_batch_size", "128", "--max_steps", "6", "--eval_interval", "3",
           "--eval_iters", str(EVAL_ITERS), "--num_samples", "1", "--sample_tokens", "8", "--device", "cpu",
           "--compile", "false"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory) -> Path:
    """A random-weight GPT-2 in Hugging Face format standing in for OpenAI's checkpoint."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("reference")
    GPT2LMHeadModel(GPT2Config(n_positions=64, n_embd=16, n_layer=1, n_head=2)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def executed(run_dir, reference_dir, tmp_path_factory):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    figure = tmp_path_factory.mktemp("figs") / "play.png"
    params = dict(RUN_DIR=str(run_dir), REFERENCE=str(reference_dir), FIGURE=str(figure), PROMPT="ROMEO:",
                  NUM_SAMPLES=1, MAX_NEW_TOKENS=8, EVAL_ITERS=EVAL_ITERS, DEVICE="cpu", SEED=7)
    # papermill-style: a cell after the tagged parameters cell overrides them
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in params.items())))
    NotebookClient(nb, kernel_name="python3", timeout=240, resources={"metadata": {"path": str(ROOT)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    return nb, text, figure


def test_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)
    assert "parameters" in code[0].metadata.get("tags", [])


def test_figures_and_best_values(executed, run_dir):
    nb, text, figure = executed
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shown = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(shown) == 1
    val = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        event = json.loads(line)
        if "val_loss" in event:
            val[event["step"]] = event["val_loss"]
    assert sorted(val) == [0, 3, 6]
    best = min(val, key=val.get)
    assert f"min_val_loss {val[best]:.4f} (step {best})" in text


def test_samples_from_both_models(executed):
    _, text, _ = executed
    ours = text.split("----- ours")[1].split("----- reference")[0]
    reference = text.split("----- reference")[1]
    assert "[0] ROMEO:" in ours and "[0] ROMEO:" in reference


def test_val_loss_of_both_models_on_the_same_data(executed, run_dir):
    _, text, _ = executed
    lines = {ln.split(":")[0].strip(): ln for ln in text.splitlines() if ln.strip().startswith(("ours:", "reference:"))}
    ours = float(lines["ours"].split("val_loss ")[1].split(",")[0])
    # the trainer's own val loss at the step of the checkpoint, on the same batches
    last = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if '"val_loss"' in ln][-1]
    assert last["step"] == 6 and ours == pytest.approx(last["val_loss"], abs=1e-4)
    reference = float(lines["reference"].split("val_loss ")[1].split(",")[0])
    assert 9.0 < reference < 12.5  # a random GPT-2: about ln(50257) = 10.8 per token
    assert "tokenizers differ" in text


# ----------------------------------------------------------------------------- lecture.ipynb

LECTURE_NOTEBOOK = ROOT / "lecture.ipynb"


def test_lecture_notebook_committed_without_outputs():
    nb = nbformat.read(LECTURE_NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)
    assert "parameters" in code[0].metadata.get("tags", [])


def test_lecture_notebook_runs_its_checks_and_trains_the_stages(tmp_path):
    """Every cell runs (its asserts: the four attention versions agree, the scaling's variances, the bigram's
    initial loss); each stage trains 3 steps on a small text through its preset and prints a val loss."""
    text = tmp_path / "small.txt"
    text.write_text(shakespeare().read_text()[:30000])
    stages = ["lecture-bigram", "lecture-heads", "lecture-dropout"]
    params = dict(TEXT_PATH=str(text), STAGES=stages, MAX_STEPS=3, EVAL_ITERS=2, OUT_DIR=str(tmp_path / "out"),
                  DEVICE="cpu", SEED=7)
    nb = nbformat.read(LECTURE_NOTEBOOK, as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in params.items())))
    NotebookClient(nb, kernel_name="python3", timeout=240, resources={"metadata": {"path": str(ROOT)}}).execute()
    text_out = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "versions 1, 2 and 3 agree" in text_out
    for stage in stages:
        metrics = (tmp_path / "out" / stage / "metrics.jsonl").read_text().splitlines()
        last = [json.loads(line) for line in metrics if '"val_loss"' in line][-1]
        assert last["step"] == 3 and f"| {stage} | " in text_out and f"{last['val_loss']:.4f}" in text_out
