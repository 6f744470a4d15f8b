"""Bad input is refused with one line naming the file or flag and the fix, and no existing file is touched.

Each case runs a CLI's `main` in-process (the same `sys.exit("error: ...")` the interpreter prints) against a
scratch folder holding a finished run, and checks afterwards that every file there is byte-identical and that
nothing new appeared. A few cases also go through the real interpreter to show stderr ends in that one line.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

import export_hf
import fineweb
import plot
import sample
from gpt2repro import autobatch, config
from gpt2repro.checkpoint import load_pretrained, model_checkpoint_fields, save_checkpoint
from gpt2repro.fileio import refused_object
from gpt2repro.tokenizer import get_tokenizer
from model import GPT, GPTConfig

train_gpt2 = pytest.importorskip("train_gpt2")

ROOT = Path(__file__).resolve().parents[1]
TEXT = "ROMEO: to be or not to be, that is the question.\nJULIET: hello world, good night!\n" * 60
# GPT-2's architecture (the export cases need it) and AdamW, whatever the preset turns on
TINY = ["--preset", "shakespeare-char", "--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--block_size", "16",
        "--batch_size", "2", "--total_batch_size", "32", "--eval_iters", "1", "--eval_interval", "2",
        "--ckpt_interval", "2", "--keep_last", "0", "--sample_tokens", "4", "--device", "cpu", "--dtype", "float32",
        "--compile", "false", "--pos", "learned", "--optimizer", "adamw"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A 4-step char run with checkpoints at steps 2 and 4, trained once for all cases."""
    root = tmp_path_factory.mktemp("finished")
    (root / "text.txt").write_text(TEXT)
    train_gpt2.main(TINY + ["--text_path", str(root / "text.txt"), "--out_dir", str(root / "run"), "--max_steps", "4"])
    assert sorted(p.name for p in (root / "run").glob("ckpt_*.pt")) == ["ckpt_0000002.pt", "ckpt_0000004.pt"]
    return root


@pytest.fixture
def scratch(finished_run, tmp_path) -> Path:
    """A private copy of the finished run and its text: `text.txt`, `run/` (config, metrics, two checkpoints)."""
    shutil.copytree(finished_run, tmp_path, dirs_exist_ok=True)
    return tmp_path


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def train_args(s: Path, *extra: str) -> list[str]:
    """The tiny run's flags against the scratch run dir; a missing error would train at most one step."""
    return TINY + ["--text_path", str(s / "text.txt"), "--out_dir", str(s / "run"), "--max_steps", "1", *extra]


def write_shards(d: Path, train: np.ndarray | None = None, val: bool = True) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    tokens = np.arange(4000, dtype=np.uint16) % 50257
    if val:
        np.save(d / "edufineweb_val_000000.npy", tokens)
    np.save(d / "edufineweb_train_000001.npy", tokens)
    if train is not None:
        np.save(d / "edufineweb_train_000002.npy", train)
    return d


def shard_args(s: Path, d: Path) -> list[str]:
    return train_args(s, "--data", "shards", "--data_dir", str(d), "--vocab_size", "50304")


def foreign_checkpoint(path: Path) -> Path:
    """A torch file that is not ours: a bare state dict, as other projects save."""
    torch.save({"weight": torch.zeros(3, 3), "epoch": 7}, path)
    return path


def flipped(src: Path, dst: Path) -> Path:
    """`src` with one byte inverted inside a tensor's data: the archive still opens, a weight is silently wrong."""
    with zipfile.ZipFile(src) as zf:
        entry = next(i for i in zf.infolist() if "/data/" in i.filename and i.file_size >= 64)
    data = bytearray(src.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[entry.header_offset + 26 : entry.header_offset + 30])
    data[entry.header_offset + 30 + name_len + extra_len + entry.file_size // 2] ^= 0xFF
    dst.write_bytes(bytes(data))
    return dst


def model_only_checkpoint(path: Path, claimed_n_embd: int = 16) -> Path:
    """Weights, config and tokenizer of a 16-wide model (no training state); the config may claim another width."""
    tok = get_tokenizer("char", text=TEXT)
    fields = model_checkpoint_fields(GPT(GPTConfig(block_size=16, vocab_size=tok.vocab_size, n_layer=1, n_head=2,
                                                   n_embd=16)), tok)
    fields["model_config"]["n_embd"] = claimed_n_embd
    save_checkpoint(fields, path)
    return path


Case = Callable[[Path], tuple[Callable, list[str], list[str]]]
CASES: dict[str, Case] = {
    # data
    "missing data dir": lambda s: (train_gpt2.main, shard_args(s, s / "no_such_dir"),
                                   [str(s / "no_such_dir"), "fineweb.py"]),
    "no train shards": lambda s: (train_gpt2.main, shard_args(s, _only_val(s)), [str(s / "shards"), "_train_"]),
    "shard of the wrong dtype": lambda s: (
        train_gpt2.main, shard_args(s, write_shards(s / "shards", np.arange(4000, dtype=np.int32))),
        [str(s / "shards" / "edufineweb_train_000002.npy"), "uint16"]),
    "truncated npy shard": lambda s: (train_gpt2.main, shard_args(s, _truncated(s)),
                                      [str(s / "shards" / "edufineweb_train_000002.npy"), "fineweb.py"]),
    "empty input.txt": lambda s: (train_gpt2.main, train_args(s, "--text_path", str(_empty(s))),
                                  [str(s / "empty" / "input.txt")]),
    "non-UTF-8 input.txt": lambda s: (train_gpt2.main, train_args(s, "--text_path", str(_latin1(s))),
                                      [str(s / "latin1.txt"), "UTF-8"]),
    "endless --text_path (/dev/zero)": lambda s: (train_gpt2.main, train_args(s, "--text_path", "/dev/zero"),
                                                 ["--text_path /dev/zero", "bytes"]),
    # prompts
    "sample prompt outside the char vocabulary": lambda s: (
        train_gpt2.main, train_args(s, "--sample_prompt", "ROMEO: ¿qué?"), ["--sample_prompt", "'¿'"]),
    "sample.py prompt outside the char vocabulary": lambda s: (
        sample.main, ["--init", str(s / "run"), "--prompt", "ROMEO: ¿qué?", "--device", "cpu"], ["'¿'", "prompt"]),
    # checkpoints
    "resume with another model config": lambda s: (
        train_gpt2.main, train_args(s, "--resume", "auto", "--n_embd", "32"),
        [str(s / "run" / "ckpt_0000004.pt"), "n_embd=16 (flags say 32)"]),
    "checkpoint whose weights do not fit its config": lambda s: (
        sample.main, ["--init", str(model_only_checkpoint(s / "mismatched.pt", 32)), "--device", "cpu"],
        [str(s / "mismatched.pt"), "shape"]),
    "resume from a checkpoint that is not ours": lambda s: (
        train_gpt2.main, train_args(s, "--resume", str(foreign_checkpoint(s / "foreign.pt"))),
        [str(s / "foreign.pt"), "not a gpt2-repro checkpoint"]),
    "init from a checkpoint that is not ours": lambda s: (
        train_gpt2.main, train_args(s, "--init", str(foreign_checkpoint(s / "foreign.pt"))),
        [str(s / "foreign.pt"), "not a gpt2-repro checkpoint"]),
    "sample from a checkpoint that is not ours": lambda s: (
        sample.main, ["--init", str(foreign_checkpoint(s / "foreign.pt")), "--device", "cpu"],
        [str(s / "foreign.pt")]),
    "resume from a bit-flipped checkpoint": lambda s: (
        train_gpt2.main, train_args(s, "--resume", str(flipped(s / "run" / "ckpt_0000004.pt", s / "flip.pt"))),
        [str(s / "flip.pt"), "corrupt"]),
    "resume from a truncated checkpoint": lambda s: (
        train_gpt2.main, train_args(s, "--resume", str(_cut(s / "run" / "ckpt_0000004.pt", s / "cut.pt"))),
        [str(s / "cut.pt"), "truncated"]),
    "sample from a bit-flipped checkpoint": lambda s: (
        sample.main, ["--init", str(flipped(s / "run" / "ckpt_0000004.pt", s / "flip.pt")), "--device", "cpu"],
        [str(s / "flip.pt"), "corrupt"]),
    "resume from a model-only checkpoint": lambda s: (
        train_gpt2.main, train_args(s, "--resume", str(model_only_checkpoint(s / "weights.pt"))),
        [str(s / "weights.pt"), "--init"]),
    "fresh run into a run dir that has checkpoints": lambda s: (
        train_gpt2.main, train_args(s), [str(s / "run"), "--resume"]),
    "fresh run into a run dir without checkpoints yet": lambda s: (
        train_gpt2.main, train_args(s, "--out_dir", str(_run_without_checkpoints(s))),
        [str(s / "fresh"), "config.json", "--resume auto"]),
    "resume from an older checkpoint of the run": lambda s: (
        train_gpt2.main, train_args(s, "--resume", str(s / "run" / "ckpt_0000002.pt"), "--max_steps", "3"),
        [str(s / "run" / "ckpt_0000002.pt"), "ckpt_0000004.pt", "new --out_dir"]),
    "resume another run's checkpoint into a run dir": lambda s: (
        train_gpt2.main, train_args(s, "--resume", str(_other_run_checkpoint(s)), "--max_steps", "5"),
        [str(s / "other" / "ckpt_0000004.pt"), "ckpt_0000004.pt", "new --out_dir"]),
    "resume with another --seed": lambda s: (
        train_gpt2.main, train_args(s, "--resume", "auto", "--seed", "7", "--max_steps", "5"),
        ["--seed 1337", "not 7"]),
    "resume with another --shuffle": lambda s: (
        train_gpt2.main, train_args(s, "--resume", "auto", "--shuffle", "false", "--max_steps", "5"),
        ["--shuffle true", "not false"]),
    "resume from a directory without checkpoints": lambda s: (
        train_gpt2.main, train_args(s, "--resume", str(_run_without_checkpoints(s)), "--out_dir", str(s / "new")),
        [str(s / "fresh"), "no ckpt_*.pt"]),
    "resume auto from a checkpoint of a newer version": lambda s: (
        train_gpt2.main, train_args(s, "--resume", "auto", "--max_steps", "5"),
        [str(_newer_version(s / "run" / "ckpt_0000004.pt")), "unknown field"]),
    "missing --text_path that is not the default": lambda s: (
        train_gpt2.main, train_args(s, "--text_path", str(s / "mine" / "input.txt"), "--out_dir", str(s / "new")),
        [str(s / "mine" / "input.txt")]),
    "--hellaswag_jsonl with a char model": lambda s: (
        train_gpt2.main, train_args(s, "--hellaswag_jsonl", str(s / "hs.jsonl"), "--out_dir", str(s / "new")),
        ["--hellaswag_jsonl", "char"]),
    "malformed HellaSwag line": lambda s: (
        _hellaswag_main(), ["--jsonl", str(_bad_hellaswag(s)), "--model", str(s / "run"), "--device", "cpu"],
        [f"{s / 'hellaswag.jsonl'}:2"]),
    "HellaSwag line nested 200,000 deep": lambda s: (
        _hellaswag_main(), ["--jsonl", str(_hostile_line(s, "hs.jsonl", "[" * 200_000)), "--model", str(s / "run"),
                            "--device", "cpu"], [f"{s / 'hs.jsonl'}:2", "nested"]),
    "HellaSwag file with no line break (/dev/zero)": lambda s: (
        _hellaswag_main(), ["--jsonl", str(_endless(s)), "--model", str(s / "run"), "--device", "cpu"],
        [f"{s / 'endless'}:1", "longer than"]),
    # flags
    "unknown preset": lambda s: (train_gpt2.main, train_args(s, "--preset", "gpt3"), ["'gpt3'", "shakespeare-char"]),
    "unknown flag": lambda s: (train_gpt2.main, train_args(s, "--max_step", "3"), ["--max_step", "--max_steps"]),
    "flag value of the wrong type": lambda s: (train_gpt2.main, train_args(s, "--batch_size", "two"),
                                               ["--batch_size", "'two'"]),
    "B x T not dividing the total batch": lambda s: (
        train_gpt2.main, train_args(s, "--total_batch_size", "100"), ["--total_batch_size", "use e.g. --"]),
    "block_size above the model's": lambda s: (
        train_gpt2.main, train_args(s, "--init", str(s / "run" / "ckpt_0000004.pt"), "--block_size", "32",
                                    "--total_batch_size", "64"), ["--block_size 32", "16"]),
    # export never deletes what it did not write
    "export a run dir onto itself": lambda s: (export_hf.main, [str(s / "run"), str(s / "run")],
                                               [str(s / "run"), "ckpt_0000002.pt"]),
    "export another checkpoint into a run dir": lambda s: (
        export_hf.main, [str(model_only_checkpoint(s / "weights.pt")), str(s / "run")], [str(s / "run")]),
    "export a checkpoint into its own directory": lambda s: (
        export_hf.main, [str(s / "run" / "ckpt_0000002.pt"), str(s / "run")], [str(s / "run")]),
    "export onto a regular file": lambda s: (export_hf.main, [str(s / "run"), str(s / "text.txt")],
                                             [str(s / "text.txt"), "not a directory"]),
    "export inside a regular file": lambda s: (export_hf.main, [str(s / "run"), str(s / "text.txt" / "hf")],
                                               ["OUT_DIR", str(s / "text.txt"), "not a directory"]),
    "export over a Hugging Face dir it did not write": lambda s: (
        export_hf.main, [str(s / "run"), str(_foreign_hf_dir(s))], [str(s / "hf"), export_hf.EXPORT_MARKER]),
    "export over an earlier export holding another file": lambda s: (
        export_hf.main, [str(s / "run"), str(_export_with_notes(s))], [str(s / "hf" / "notes.txt")]),
    # sampling flags
    "sample --top_k 0": lambda s: (sample.main, _sample_args(s, "--top_k", "0"), ["--top_k", "0"]),
    "sample --top_k negative": lambda s: (sample.main, _sample_args(s, "--top_k", "-5"), ["--top_k", "-5"]),
    "sample --top_p 0": lambda s: (sample.main, _sample_args(s, "--top_p", "0"), ["--top_p", "(0, 1]"]),
    "sample --top_p above 1": lambda s: (sample.main, _sample_args(s, "--top_p", "1.5"), ["--top_p", "1.5"]),
    "sample --top_p nan": lambda s: (sample.main, _sample_args(s, "--top_p", "nan"), ["--top_p", "nan"]),
    "sample --temperature negative": lambda s: (sample.main, _sample_args(s, "--temperature", "-1"),
                                                ["--temperature", "-1"]),
    "sample --temperature nan": lambda s: (sample.main, _sample_args(s, "--temperature", "nan"),
                                           ["--temperature", "nan"]),
    "sample --temperature inf": lambda s: (sample.main, _sample_args(s, "--temperature", "inf"),
                                           ["--temperature", "inf"]),
    "sample --num_samples 0": lambda s: (sample.main, _sample_args(s, "--num_samples", "0"), ["--num_samples"]),
    "sample --num_samples negative": lambda s: (sample.main, _sample_args(s, "--num_samples", "-3"),
                                                ["--num_samples", "-3"]),
    "sample --max_new_tokens negative": lambda s: (sample.main, _sample_args(s, "--max_new_tokens", "-1"),
                                                   ["--max_new_tokens", "-1"]),
    # Hugging Face directories and run dirs
    "HF config.json with a string n_layer": lambda s: (
        sample.main, _sample_args(s, "--init", str(_hf_dir(s, config={"n_layer": "twelve"}))),
        [str(s / "hf" / "config.json"), "n_layer"]),
    "HF config.json with a float n_embd": lambda s: (
        sample.main, _sample_args(s, "--init", str(_hf_dir(s, config={"n_embd": 16.5}))),
        [str(s / "hf" / "config.json"), "n_embd"]),
    "HF config.json that is not JSON": lambda s: (
        sample.main, _sample_args(s, "--init", str(_hf_dir(s, raw_config=b"{not json"))),
        [str(s / "hf" / "config.json")]),
    "HF safetensors with a bad header": lambda s: (
        sample.main, _sample_args(s, "--init", str(_hf_dir(s, weights=lambda b: b[:8] + b"{garbage" + b[16:]))),
        [str(s / "hf" / "model.safetensors")]),
    "HF safetensors truncated": lambda s: (
        sample.main, _sample_args(s, "--init", str(_hf_dir(s, weights=lambda b: b[: len(b) // 2]))),
        [str(s / "hf" / "model.safetensors"), "truncated"]),
    "HF safetensors of three bytes": lambda s: (
        sample.main, _sample_args(s, "--init", str(_hf_dir(s, weights=lambda b: b"abc"))),
        [str(s / "hf" / "model.safetensors")]),
    "run dir without checkpoints yet": lambda s: (
        sample.main, _sample_args(s, "--init", str(_run_without_checkpoints(s))), [str(s / "fresh"), "no checkpoints"]),
    # plot
    "metrics.jsonl with no parsable line": lambda s: (
        plot.main, [str(_torn_metrics(s)), "--out", str(s / "loss.png")], [str(s / "torn" / "metrics.jsonl")]),
    "metrics.jsonl line nested 200,000 deep": lambda s: (
        plot.main, [str(_hostile_metrics(s, "[" * 200_000)), "--out", str(s / "loss.png")],
        [f"{s / 'hostile' / 'metrics.jsonl'}:2", "nested"]),
    "metrics.jsonl number of 401 digits": lambda s: (
        plot.main, [str(_hostile_metrics(s, '{"step": 2, "val_loss": 1' + "0" * 400 + "}")), "--out",
                    str(s / "loss.png")], [f"{s / 'hostile' / 'metrics.jsonl'}:2", "digits"]),
    # fineweb
    "fineweb zero-byte .txt": lambda s: (fineweb.main, _fineweb_args(s, "empty.txt", b""), [str(s / "empty.txt")]),
    "fineweb documents with no text": lambda s: (
        fineweb.main, _fineweb_args(s, "blank.jsonl", b'{"text": ""}\n{"text": ""}\n'), [str(s / "blank.jsonl")]),
    "fineweb text column of numbers": lambda s: (
        fineweb.main, _fineweb_args(s, "numbers.jsonl", b'{"text": 5}\n{"text": 7}\n'),
        [str(s / "numbers.jsonl"), "'text'", "--text_column"]),
    "fineweb malformed jsonl line": lambda s: (
        fineweb.main, _fineweb_args(s, "docs.jsonl", b'{"text": "a"}\n{"text": "b"}\n{"text": "c\n{"text": "d"}\n'),
        [f"{s / 'docs.jsonl'}:3", "not valid JSON"]),
    "fineweb empty jsonl": lambda s: (fineweb.main, _fineweb_args(s, "empty.jsonl", b""),
                                      [str(s / "empty.jsonl"), "no JSON lines"]),
    "fineweb --prefix ../escaped": lambda s: (
        fineweb.main, _fineweb_args(s, "doc.txt", b"some text") + ["--prefix", "../escaped"],
        ["--prefix '../escaped'", "--out_dir"]),
    "fineweb --out_dir is a regular file": lambda s: (
        fineweb.main, _fineweb_args(s, "doc.txt", b"some text", out=s / "text.txt"),
        [str(s / "text.txt"), "--out_dir"]),
    "fineweb --out_dir inside a regular file": lambda s: (
        fineweb.main, _fineweb_args(s, "doc.txt", b"some text", out=s / "text.txt" / "shards"),
        [str(s / "text.txt"), "--out_dir"]),
}


def _sample_args(s: Path, *extra: str) -> list[str]:
    return ["--init", str(s / "run"), "--device", "cpu", "--num_samples", "1", "--max_new_tokens", "2", *extra]


def _hf_dir(s: Path, config: dict | None = None, raw_config: bytes | None = None,
            weights: Callable[[bytes], bytes] | None = None) -> Path:
    """A tiny Hugging Face GPT-2 dir at s/hf, with its config.json or model.safetensors spoilt as asked."""
    from transformers import GPT2Config, GPT2LMHeadModel

    d = s / "hf"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=32)).save_pretrained(d)
    if config is not None:
        (d / "config.json").write_text(json.dumps(json.loads((d / "config.json").read_text()) | config))
    if raw_config is not None:
        (d / "config.json").write_bytes(raw_config)
    if weights is not None:
        (d / "model.safetensors").write_bytes(weights((d / "model.safetensors").read_bytes()))
    return d


def _foreign_hf_dir(s: Path) -> Path:
    """What `save_pretrained` writes, but not export_hf.py: it has no export marker."""
    return _hf_dir(s)


def _export_with_notes(s: Path) -> Path:
    export_hf.export(s / "run", s / "hf", verify=False)
    (s / "hf" / "notes.txt").write_text("my notes")
    return s / "hf"


def _run_without_checkpoints(s: Path) -> Path:
    """A run dir as train_gpt2.py leaves it before its first checkpoint: config.json and metrics only."""
    (s / "fresh").mkdir()
    shutil.copy(s / "run" / "config.json", s / "fresh" / "config.json")
    shutil.copy(s / "run" / "metrics.jsonl", s / "fresh" / "metrics.jsonl")
    return s / "fresh"


def _other_run_checkpoint(s: Path) -> Path:
    (s / "other").mkdir()
    return Path(shutil.copy(s / "run" / "ckpt_0000004.pt", s / "other" / "ckpt_0000004.pt"))


def _newer_version(path: Path) -> Path:
    """The checkpoint as a later version might write it: a model_config field this version does not know."""
    ckpt = torch.load(path, weights_only=True)
    ckpt["model_config"]["n_kv_head"] = 2
    save_checkpoint(ckpt, path)
    return path


def _torn_metrics(s: Path) -> Path:
    (s / "torn").mkdir()
    (s / "torn" / "metrics.jsonl").write_text('{"step": 1, "train_lo\n{"step": 2, "ti\n')
    return s / "torn"


def _hostile_line(s: Path, name: str, line: str) -> Path:
    good = '{"ind": 0, "ctx": "He", "label": 1, "activity_label": "Roofing", "endings": ["a", "b", "c", "d"]}'
    (s / name).write_text(good + "\n" + line + "\n" + good + "\n")
    return s / name


def _endless(s: Path) -> Path:
    """A 'file' with no line break and no end: /dev/zero, linked in as a named file."""
    os.symlink("/dev/zero", s / "endless")
    return s / "endless"


def _hostile_metrics(s: Path, line: str) -> Path:
    (s / "hostile").mkdir()
    (s / "hostile" / "metrics.jsonl").write_text('{"step": 1, "val_loss": 3.5}\n' + line + "\n")
    return s / "hostile"


def test_train_hellaswag_jsonl_nested_deep_is_one_error(tmp_path):
    """The trainer reads --hellaswag_jsonl through the same bounded reader: a ValueError naming the line."""
    path = _hostile_line(tmp_path, "hs.jsonl", "[" * 200_000)
    cfg = config.parse_config(TINY + ["--data", "gpt2-text", "--text_path", "unused.txt", "--out_dir", "unused",
                                      "--hellaswag_jsonl", str(path)])
    with pytest.raises(ValueError) as e:
        train_gpt2.hellaswag_examples(cfg, get_tokenizer("gpt2"))
    assert f"{path}:2" in str(e.value) and "nested" in str(e.value) and "\n" not in str(e.value)


def _fineweb_args(s: Path, name: str, content: bytes, out: Path | None = None) -> list[str]:
    (s / name).write_bytes(content)
    return ["--data_files", str(s / name), "--out_dir", str(out or s / "shards"), "--num_proc", "1"]


def _hellaswag_main() -> Callable:
    return pytest.importorskip("hellaswag").main


def _bad_hellaswag(s: Path) -> Path:
    good = '{"ind": 0, "ctx": "He", "label": 1, "activity_label": "Roofing", "endings": ["a", "b", "c", "d"]}'
    (s / "hellaswag.jsonl").write_text(good + "\n" + good[:40] + "\n")
    return s / "hellaswag.jsonl"


def _only_val(s: Path) -> Path:
    d = s / "shards"
    d.mkdir()
    np.save(d / "edufineweb_val_000000.npy", np.arange(4000, dtype=np.uint16))
    return d


def _truncated(s: Path) -> Path:
    d = write_shards(s / "shards", np.arange(4000, dtype=np.uint16))
    shard = d / "edufineweb_train_000002.npy"
    shard.write_bytes(shard.read_bytes()[:3000])
    return d


def _empty(s: Path) -> Path:
    (s / "empty").mkdir()
    (s / "empty" / "input.txt").write_bytes(b"")
    return s / "empty" / "input.txt"


def _latin1(s: Path) -> Path:
    (s / "latin1.txt").write_bytes(TEXT.replace("hello", "h\xe9llo").encode("latin-1"))
    return s / "latin1.txt"


def _cut(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    return dst


def error_line(main: Callable, argv: list[str], capsys) -> str:
    """The one line a CLI exits with: its `sys.exit` message, or argparse's last stderr line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    code = e.value.code
    if isinstance(code, str):
        return code
    assert code not in (0, None), "exited successfully"
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path_factory, monkeypatch):
    """fineweb.py's `datasets` cache goes beside the scratch folder, not into it (nor into the home directory)."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf_datasets"))


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_in_one_line_and_nothing_is_lost(case, scratch, capsys):
    main, argv, needles = CASES[case](scratch)
    before = snapshot(scratch)
    msg = error_line(main, argv, capsys)
    assert "error: " in msg and "\n" not in msg and "Traceback" not in msg, msg
    for needle in needles:
        assert needle.lower() in msg.lower(), f"{needle!r} not in: {msg}"
    after = snapshot(scratch)
    assert sorted(after) == sorted(before), "files appeared or vanished"
    changed = [name for name in before if before[name] != after[name]]
    assert changed == [], f"modified: {changed}"


def test_tiny_text_path_names_a_fix_that_exists(scratch, capsys):
    """A text too short for one batch: the advice is a --block_size or --batch_size that fits, or more text, never
    "--block_size (at most 0)"."""
    (scratch / "tiny.txt").write_text("ROMEO: to be or not\n")
    for extra, needle in ((), "--block_size 8 or less"), (("--block_size", "4"), "give it more text"):
        msg = error_line(train_gpt2.main, train_args(scratch, "--text_path", str(scratch / "tiny.txt"), "--out_dir",
                                                     str(scratch / "new"), *extra), capsys)
        assert str(scratch / "tiny.txt") in msg and needle in msg and "at most 0" not in msg, msg
    assert not (scratch / "new").exists()


def test_export_to_the_current_directory_is_refused_naming_it(scratch, monkeypatch, capsys):
    """`export_hf.py CKPT .` would rename over the shell's working directory: refused up front, naming OUT_DIR."""
    (scratch / "empty").mkdir()
    monkeypatch.chdir(scratch / "empty")
    msg = error_line(export_hf.main, ["--no_verify", str(scratch / "run"), "."], capsys)
    assert msg.startswith("error: OUT_DIR . is the current directory") and ".tmp" not in msg, msg
    assert list((scratch / "empty").iterdir()) == [] and list(scratch.glob(".*")) == []


def test_export_checks_out_dir_before_loading_the_checkpoint(scratch, monkeypatch, capsys):
    def not_reached(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before OUT_DIR was checked")

    monkeypatch.setattr(export_hf, "load_checkpoint", not_reached)
    msg = error_line(export_hf.main, ["--no_verify", str(scratch / "run"), str(scratch / "text.txt" / "hf")], capsys)
    assert "OUT_DIR" in msg and str(scratch / "text.txt") in msg, msg


def test_inductor_cache_dir_that_is_a_file_is_named(tmp_path, monkeypatch):
    from gpt2repro.devices import compile_cached

    (tmp_path / "cache").write_text("a file")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(ValueError) as e:
        compile_cached(torch.nn.Linear(2, 2))
    assert str(e.value).startswith(f"TORCHINDUCTOR_CACHE_DIR {tmp_path / 'cache'} is a file"), e.value


def test_hellaswag_to_a_full_stdout_names_stdout(finished_run, tmp_path):
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    good = '{"ind": 0, "ctx": "He", "label": 1, "activity_label": "Roofing", "endings": ["a", "b", "c", "d"]}'
    (tmp_path / "hs.jsonl").write_text(good + "\n")
    ckpt = tmp_path / "gpt.pt"
    tok = get_tokenizer("gpt2")
    save_checkpoint(model_checkpoint_fields(GPT(GPTConfig(block_size=32, vocab_size=tok.vocab_size, n_layer=1,
                                                          n_head=2, n_embd=16)), tok), ckpt)
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, str(ROOT / "hellaswag.py"), "--model", str(ckpt), "--jsonl",
                               str(tmp_path / "hs.jsonl"), "--device", "cpu"], stdout=full, stderr=subprocess.PIPE,
                              text=True, timeout=120)
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error")]
    assert proc.returncode == 1 and len(lines) == 1 and "stdout" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr


def test_world_size_not_dividing_the_total_batch():
    cfg = config.parse_config(TINY + ["--text_path", "unused.txt", "--out_dir", "unused", "--total_batch_size", "64"])
    assert autobatch.grad_accum_steps(cfg, 1) == 2 and autobatch.grad_accum_steps(cfg, 2) == 1
    with pytest.raises(config.ConfigError) as e:
        autobatch.grad_accum_steps(cfg, 3)
    msg = str(e.value)
    assert "--total_batch_size 64" in msg and "world_size" in msg and "2 x 16 x 3 = 96" in msg


def test_malformed_hellaswag_line_names_file_and_line(tmp_path):
    hellaswag = pytest.importorskip("hellaswag")
    good = {"ind": 0, "ctx": "A man is sitting on a roof. He", "label": 1, "activity_label": "Roof shingle removal",
            "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                        "is holding a rubik's cube.", "starts pulling up roofing on a roof."]}
    path = tmp_path / "hellaswag_val.jsonl"
    lines = [json.dumps(good), json.dumps(good | {"ind": 1}), '{"ctx": "cut off mid-li']
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError) as e:
        hellaswag.load_examples(jsonl=path)
    msg = str(e.value)
    assert f"{path}:3" in msg and "\n" not in msg
    missing = dict(good)
    del missing["endings"]
    path.write_text(json.dumps(good) + "\n" + json.dumps(missing) + "\n")
    with pytest.raises(ValueError) as e:
        hellaswag.load_examples(jsonl=path)
    assert f"{path}:2" in str(e.value) and "endings" in str(e.value)


def test_interpreter_prints_one_line_and_no_traceback(finished_run, tmp_path):
    """Through `python train_gpt2.py` / `python sample.py`: non-zero exit, stderr is the message alone (no library
    noise either: loading a Hugging Face dir imports transformers, which imports torchao where it is installed)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    text = finished_run / "text.txt"
    runs = {
        "missing data dir": ([str(ROOT / "train_gpt2.py"), *TINY, "--text_path", str(text), "--data", "shards",
                              "--data_dir", str(tmp_path / "nope"), "--out_dir", str(tmp_path / "out")],
                             str(tmp_path / "nope")),
        "corrupt checkpoint": ([str(ROOT / "sample.py"), "--init",
                                str(flipped(finished_run / "run" / "ckpt_0000004.pt", tmp_path / "flip.pt")),
                                "--device", "cpu"], str(tmp_path / "flip.pt")),
        "truncated HF weights": ([str(ROOT / "sample.py"), "--init", str(_hf_dir(tmp_path, weights=lambda b: b[:200])),
                                  "--device", "cpu"], str(tmp_path / "hf")),
    }
    procs = {name: subprocess.Popen([sys.executable, *argv], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for name, (argv, _) in runs.items()}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 1, (name, err)
        assert "Traceback" not in err, (name, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and runs[name][1] in lines[0], (name, lines)
    assert not (tmp_path / "out").exists()


def test_refusal_of_pickled_code_names_the_global_in_a_whole_sentence(tmp_path):
    """torch's refusal is several paragraphs; what we keep of it is the sentence naming the global, uncut."""

    class Hostile:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"x": Hostile()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(Exception) as e:
        torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    kept = refused_object(str(e.value))
    assert "system" in kept and "\x1b" not in kept and "\n" not in kept
    sentences = [ln.strip() for ln in str(e.value).splitlines() if ln.strip()]
    assert any(sentence.rstrip(".").endswith(kept.rstrip(".")) for sentence in sentences), kept


def test_hf_dir_with_pickled_weights_keeps_the_whole_refusal(tmp_path):
    """`load_pretrained` on a pytorch_model.bin carrying code: a ValueError naming the dir, its sentence whole."""

    class Hostile:
        def __reduce__(self):
            return (os.system, ("true",))

    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=32).save_pretrained(tmp_path)
    torch.save({"x": Hostile()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError) as e:
        load_pretrained(str(tmp_path))
    msg = str(e.value)
    assert str(tmp_path) in msg and "refused" in msg and "\n" not in msg
    assert "system" in msg and msg.endswith("use safetensors weights from a source you trust"), msg


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_fineweb_read_only_out_dir_is_one_line(tmp_path, datasets_cache):
    (tmp_path / "doc.txt").write_text("some text")
    out = tmp_path / "shards"
    out.mkdir()
    out.chmod(0o555)
    try:
        with pytest.raises(SystemExit) as e:
            fineweb.main(["--data_files", str(tmp_path / "doc.txt"), "--out_dir", str(out), "--num_proc", "1"])
    finally:
        out.chmod(0o755)
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg and str(out) in msg and "--out_dir" in msg
    assert list(out.iterdir()) == []
