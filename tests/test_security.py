"""Loading never runs code from a file: no unsafe loads in the source, pickled code refused, exports are safetensors."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import export_hf
import sample
from gpt2repro.checkpoint import CheckpointError, load_checkpoint, load_model, model_checkpoint_fields, save_checkpoint
from gpt2repro.tokenizer import get_tokenizer
from model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".venv", "venv", ".git", "build", "dist", "node_modules", "__pycache__", "out"}

# calls that unpickle whatever the file holds; the project has no use for any of them
PICKLE_LOADS = {
    "pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads", "cPickle.load",
    "cPickle.loads", "dill.load", "dill.loads", "joblib.load", "cloudpickle.load", "cloudpickle.loads",
    "pandas.read_pickle", "numpy.core.multiarray._reconstruct",
}
TORCH_LOADS = {"torch.load", "torch.serialization.load"}
NUMPY_LOADS = {"numpy.load"}  # safe unless allow_pickle=True


def project_sources(root: Path = ROOT) -> list[Path]:
    """Every `.py` file of the project, leaving out virtual environments, VCS and build folders."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".") and not d.endswith(
            ".egg-info")]
        found += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    return sorted(found)


def import_aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> dotted origin for `import x as y` and `from x import y as z` anywhere in the module."""
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    return aliases


def dotted_name(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """`np.load` -> `numpy.load` (through the module's imports), or None for calls on computed values."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([aliases.get(node.id, node.id), *reversed(parts)])


def keyword_is(call: ast.Call, name: str, value: object) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value for k in call.keywords)


def unsafe_loads(source: str, filename: str = "<source>") -> list[str]:
    """`file:line: call` for each load that could unpickle arbitrary objects.

    A line marked `# unsafe-load-ok` is reported with that mark, so callers can hold such lines to a short list.
    """
    tree = ast.parse(source, filename)
    aliases = import_aliases(tree)
    lines = source.splitlines()
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = dotted_name(node.func, aliases)
        if name is None:
            continue
        # numpy only unpickles with allow_pickle set (or possibly set, through **kwargs)
        numpy_pickles = name in NUMPY_LOADS and any(
            k.arg is None or (k.arg == "allow_pickle" and not keyword_is(node, "allow_pickle", False))
            for k in node.keywords
        )
        torch_unsafe = name in TORCH_LOADS and not keyword_is(node, "weights_only", True)
        if torch_unsafe or name in PICKLE_LOADS or numpy_pickles:
            mark = " (unsafe-load-ok)" if "# unsafe-load-ok" in lines[node.lineno - 1] else ""
            found.append(f"{filename}:{node.lineno}: {name}{mark}")
    return found


@pytest.mark.parametrize(
    "source, flagged",
    [
        ("import torch\ntorch.load('x.pt')", True),
        ("import torch\ntorch.load('x.pt', weights_only=False)", True),
        ("import torch\ntorch.load('x.pt', **kw)", True),
        ("import torch\nflag = True\ntorch.load('x.pt', weights_only=flag)", True),
        ("from torch import load\nload('x.pt')", True),
        ("import torch as T\nT.load('x.pt')", True),
        ("import torch.serialization\ntorch.serialization.load('x.pt')", True),
        ("import pickle\npickle.loads(b'')", True),
        ("import pickle as pk\nwith open('f', 'rb') as f:\n    pk.load(f)", True),
        ("from pickle import Unpickler\nUnpickler(f).load()", True),
        ("import numpy as np\nnp.load('x.npy', allow_pickle=True)", True),
        ("import torch\ntorch.load('x.pt', map_location='cpu', weights_only=True)", False),
        ("import numpy as np\nnp.load('x.npy', mmap_mode='r', allow_pickle=False)", False),
        ("import numpy as np\nnp.load('x.npy')", False),
        ("import pickle\ntry:\n    pass\nexcept pickle.UnpicklingError:\n    pass", False),
        ("import json\njson.load(open('x'))", False),
    ],
)
def test_scanner_flags_unsafe_loads(source, flagged):
    assert bool(unsafe_loads(source)) is flagged, source


def test_project_source_has_no_unsafe_loads():
    files = project_sources()
    names = {p.relative_to(ROOT).as_posix() for p in files}
    # the walk must really see the project (and this file), not an empty or wrong folder
    assert {"model.py", "gpt2repro/checkpoint.py", "tests/test_security.py"} <= names
    assert not any(n.startswith(".venv/") for n in names)
    found = [hit for p in files for hit in unsafe_loads(p.read_text(encoding="utf-8"), p.relative_to(ROOT).as_posix())]
    unmarked = [hit for hit in found if not hit.endswith("(unsafe-load-ok)")]
    assert unmarked == [], "unsafe loads (use torch.load(..., weights_only=True), safetensors or json):\n" + "\n".join(
        unmarked)
    # the only marked one is this file's control, which loads a file the test itself wrote
    assert [hit.split(":")[0] for hit in found] == ["tests/test_security.py"], found


# ----------------------------------------------------------------------------- pickled code is refused


class WritesMarker:
    """Unpickling this runs `exec`, which creates `marker`: what a hostile checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def hostile_checkpoint(path: Path, marker: Path, legacy: bool = False) -> Path:
    """A file shaped like our checkpoints whose model entry executes code when unpickled."""
    tok = get_tokenizer("char", text="abc")
    fields = model_checkpoint_fields(GPT(GPTConfig(block_size=8, vocab_size=3, n_layer=1, n_head=1, n_embd=8)), tok)
    fields["model"]["payload"] = WritesMarker(marker)
    fields["step"] = 1
    path.parent.mkdir(parents=True, exist_ok=True)
    if legacy:  # the pre-zip raw pickle format
        torch.save(fields, path, _use_new_zipfile_serialization=False)
    else:
        torch.save(fields, path)
    return path


@pytest.fixture(params=["zip", "legacy"])
def hostile(tmp_path, request):
    marker = tmp_path / f"pwned-{request.param}"
    return hostile_checkpoint(tmp_path / "run" / "ckpt_0000001.pt", marker, request.param == "legacy"), marker


def test_hostile_checkpoint_really_runs_code_when_unpickled(tmp_path):
    """The control: without weights_only the payload fires, so the refusals below are meaningful."""
    marker = tmp_path / "pwned-control"
    path = hostile_checkpoint(tmp_path / "control.pt", marker)
    torch.load(path, weights_only=False)  # unsafe-load-ok: our own test file, to show the payload is live
    assert marker.exists()


def test_load_checkpoint_refuses_pickled_code(hostile):
    path, marker = hostile
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert str(path) in msg and "refused" in msg and "\n" not in msg
    assert "GLOBAL exec" in msg and "\x1b" not in msg  # names what was refused, no terminal escapes
    with pytest.raises(CheckpointError):
        load_model(str(path.parent))  # a run dir resolves to the same file
    assert not marker.exists()


def test_clis_refuse_pickled_code(hostile, tmp_path):
    path, marker = hostile
    for main, argv in [
        (sample.main, ["--init", str(path), "--device", "cpu", "--max_new_tokens", "2"]),
        (export_hf.main, [str(path), str(tmp_path / "hf")]),
    ]:
        with pytest.raises(SystemExit) as e:
            main(argv)
        msg = str(e.value.code)
        assert msg.startswith("error: ") and "\n" not in msg and str(path) in msg, msg
    assert not (tmp_path / "hf").exists()
    assert not marker.exists()


def tiny_training_flags(tmp_path: Path) -> list[str]:
    text = tmp_path / "text.txt"
    text.write_text("abc" * 400)
    return ["--preset", "shakespeare-char", "--text_path", str(text), "--n_layer", "1", "--n_head", "1", "--n_embd",
            "8", "--block_size", "8", "--batch_size", "2", "--total_batch_size", "16", "--max_steps", "1",
            "--eval_iters", "1", "--sample_prompt", "abc", "--sample_tokens", "2", "--device", "cpu",
            "--out_dir", str(tmp_path / "out")]


def test_training_resume_and_init_refuse_pickled_code(hostile, tmp_path):
    train_gpt2 = pytest.importorskip("train_gpt2")
    path, marker = hostile
    for flag in ("--resume", "--init"):
        with pytest.raises(SystemExit) as e:
            train_gpt2.main(tiny_training_flags(tmp_path) + [flag, str(path)])
        msg = str(e.value.code)
        assert msg.startswith("error: ") and "\n" not in msg and str(path) in msg and "refused" in msg, (flag, msg)
        assert not marker.exists()
    assert not (tmp_path / "out" / "ckpt_0000001.pt").exists()


def test_resume_auto_sets_pickled_code_aside(hostile, tmp_path):
    """`--resume auto` skips an unreadable newest checkpoint; a hostile one is unreadable, and kept for inspection."""
    train_gpt2 = pytest.importorskip("train_gpt2")
    path, marker = hostile
    original = path.read_bytes()
    train_gpt2.main(tiny_training_flags(tmp_path) + ["--out_dir", str(path.parent), "--resume", "auto"])
    assert not marker.exists()
    kept = [p for p in path.parent.iterdir() if p.read_bytes() == original]
    assert kept and kept[0].name.startswith(path.name) and kept[0].name != path.name, sorted(path.parent.iterdir())


def test_hugging_face_dir_with_pickled_weights_is_refused(tmp_path, monkeypatch):
    """`--init HF_DIR` goes through transformers: a pytorch_model.bin carrying code is refused there too."""
    from transformers import GPT2Config

    hf_dir, marker = tmp_path / "hf", tmp_path / "pwned-hf"
    GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=32).save_pretrained(hf_dir)
    torch.save({"transformer.wte.weight": WritesMarker(marker)}, hf_dir / "pytorch_model.bin")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="refused"):
        load_model(str(hf_dir))
    with pytest.raises(SystemExit) as e:
        sample.main(["--init", str(hf_dir), "--device", "cpu", "--max_new_tokens", "2"])
    msg = str(e.value.code)
    assert msg.startswith("error: ") and str(hf_dir) in msg and "GLOBAL" in msg and "\n" not in msg, msg
    assert not marker.exists()


def test_sample_cli_subprocess_refuses_pickled_code(tmp_path):
    """End to end through the interpreter: exit status, one stderr line, no traceback, no payload."""
    marker = tmp_path / "pwned-cli"
    path = hostile_checkpoint(tmp_path / "evil.pt", marker)
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--init", str(path), "--device", "cpu"],
                       capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(path) in last and "refused" in last
    assert not marker.exists()


# ----------------------------------------------------------------------------- exports


def test_export_writes_only_safetensors_weights(tmp_path):
    from safetensors import safe_open

    tok = get_tokenizer("char", text="hello world")
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16))
    ckpt = tmp_path / "ckpt_0000003.pt"
    save_checkpoint({**model_checkpoint_fields(model, tok), "step": 3}, ckpt)
    export_hf.main([str(ckpt), str(tmp_path / "hf")])
    files = sorted(p.name for p in (tmp_path / "hf").iterdir())
    pickled = [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"))]
    assert pickled == [] and "model.safetensors" in files, files
    with safe_open(tmp_path / "hf" / "model.safetensors", framework="pt") as f:
        wte = f.get_tensor("transformer.wte.weight")
    assert torch.equal(wte, model.transformer.wte.weight.detach()[: tok.vocab_size])
