"""train_gpt2.py: schedule, optimizer groups, config handling, exact resume, graceful stop, learning, compile."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import shakespeare

import train_gpt2
from gpt2repro import autobatch, config
from gpt2repro.build import build_model
from gpt2repro.checkpoint import list_checkpoints, load_checkpoint, load_model
from gpt2repro.tokenizer import get_tokenizer
from model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "shakespeare-char", "--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "32",
        "--batch_size", "4", "--total_batch_size", "256", "--eval_interval", "4", "--eval_iters", "2",
        "--dtype", "float32", "--compile", "false", "--device", "cpu", "--sample_interval", "0", "--log_interval",
        "100", "--dropout", "0.1"]  # dropout: resume must restore the RNG too


@pytest.fixture(scope="module")
def small_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "small.txt"
    path.write_text(shakespeare().read_text()[:30000])
    return path


def tiny(text: Path, out: Path, *extra: str) -> list[str]:
    return TINY + ["--text_path", str(text), "--out_dir", str(out), *extra]


def events(out: Path, key: str) -> dict[int, object]:
    """step -> value of `key` in metrics.jsonl (the last line of a step wins, as after a resume)."""
    found = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        e = json.loads(line)
        if key in e:
            found[e["step"]] = e[key]
    return found


@pytest.fixture(scope="module")
def straight_run(small_text, tmp_path_factory) -> Path:
    """8 steps in one go, checkpoints every 4; `--resume auto` on an empty out_dir starts fresh."""
    out = tmp_path_factory.mktemp("straight")
    train_gpt2.main(tiny(small_text, out, "--max_steps", "8", "--ckpt_interval", "4", "--keep_last", "0",
                         "--resume", "auto", "--num_samples", "1", "--sample_tokens", "8"))
    return out


def test_get_lr_warmup_cosine_floor():
    lr = lambda s: train_gpt2.get_lr(s, max_lr=6e-4, min_lr=6e-5, warmup_steps=10, max_steps=100)  # noqa: E731
    assert lr(0) == pytest.approx(6e-4 / 10)
    assert lr(9) == pytest.approx(6e-4)  # last warmup step reaches max_lr
    assert lr(10) == pytest.approx(6e-4)  # cosine starts at the top
    assert lr(55) == pytest.approx(6e-5 + 0.5 * (6e-4 - 6e-5))  # halfway down the cosine
    assert lr(100) == pytest.approx(6e-5)
    assert lr(1000) == pytest.approx(6e-5)
    assert all(lr(s) >= lr(s + 1) for s in range(10, 120))
    assert train_gpt2.get_lr(0, 1e-3, 1e-4, 0, 10) == pytest.approx(1e-3)


def test_weight_decay_groups_by_module_kind():
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32))
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 1e-8, "cpu", verbose=False)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
    plain = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    want_decay, want_plain = set(), set()
    for m in model.modules():  # reference: weights of Linear/Embedding decay; biases and LayerNorm do not
        for name, p in m.named_parameters(recurse=False):
            is_matrix = isinstance(m, (torch.nn.Linear, torch.nn.Embedding)) and name == "weight"
            (want_decay if is_matrix else want_plain).add(id(p))
    assert decayed == want_decay and plain == want_plain
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))  # tied weight once


def test_presets_then_flags(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no edu_fineweb10B here: the embedded default is the CPU demo
    cfg = config.parse_config([])
    assert cfg.preset == "shakespeare-char" and cfg.data == "char" and cfg.out_dir == "out/shakespeare-char"
    cfg = config.parse_config(["--preset", "gpt2-350m", "--max_lr", "1e-4", "--compile", "false"])
    assert (cfg.n_layer, cfg.n_embd, cfg.max_lr, cfg.compile) == (24, 1024, 1e-4, False)
    assert cfg.total_batch_size == 524288 and cfg.min_lr == 3e-5
    cfg = config.parse_config(["--data_dir", "somewhere", "--eval_only", "--init", "gpt2"])
    assert cfg.preset == "gpt2-124m" and cfg.eval_only and cfg.vocab_size == 50304 and cfg.warmup_steps == 715
    # under torchrun the preset's micro-batch shrinks to keep its total; a batch given by hand is kept
    cfg = autobatch.fit_to_world(config.parse_config(["--preset", "shakespeare-char"]), world_size=2)
    assert (cfg.batch_size, autobatch.grad_accum_steps(cfg, 2)) == (16, 1) and cfg.total_batch_size == 2048
    cfg = autobatch.fit_to_world(config.parse_config(["--preset", "shakespeare-char", "--batch_size", "8"]), 2)
    assert cfg.batch_size == 8
    (tmp_path / "edu_fineweb10B").mkdir()
    (tmp_path / "edu_fineweb10B" / "edufineweb_train_000001.npy").touch()
    assert config.parse_config([]).preset == "gpt2-124m"  # what `torchrun ... train_gpt2.py` reproduces


@pytest.mark.parametrize("preset", sorted(config.PRESETS))
def test_every_preset_parses_and_builds_its_model(preset):
    cfg = config.parse_config(["--preset", preset])
    if cfg.init:  # the model is OpenAI's (or the user's), loaded, not built: tested in test_export/test_model
        assert preset == "finetune-shakespeare" and cfg.init == "gpt2"
        return
    kind = {"char": "char", "addition": "addition"}.get(cfg.data, "gpt2")
    tokenizer = get_tokenizer(kind, text=shakespeare().read_text()[:5000],
                              digits=cfg.digits, ops=cfg.ops)
    with torch.device("meta"):  # shapes only: the 1558M preset allocates nothing
        model = build_model(cfg, tokenizer)
    assert model.config.vocab_size >= tokenizer.vocab_size
    gpt2 = {f: getattr(GPTConfig(), f) for f in ("pos", "norm", "mlp", "qk_norm", "tie_embeddings", "logit_softcap",
                                                  "zero_init", "bias")}
    options = {f: getattr(model.config, f) for f in gpt2} if isinstance(model, GPT) else gpt2
    # GPT-2's presets are exactly GPT-2; the ones documented as not GPT-2's architecture differ from it
    assert (options == gpt2) == (preset not in ("gpt2-124m-modern", "shakespeare-char", "lecture-fast")), options


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--n_layr", "2"], "unknown option --n_layr; did you mean --n_layer?"),
        (["--preset", "gpt5"], "unknown preset 'gpt5'"),
        (["--dtype", "fp8"], "--dtype 'fp8' is not one of"),
        (["--compile", "maybe"], "argument --compile: expected true or false, got 'maybe'; see --help"),
        (["--max_steps", "abc"], "argument --max_steps: invalid int value: 'abc'"),
        (["--seed", str(2**32)], "--seed"),
        (["--total_batch_size", "1000"], "is not a multiple of batch_size x block_size x world_size"),
        (["--block_size", "4096", "--batch_size", "1", "--total_batch_size", "4096"], "cannot fill one batch"),
        (["--tensorboard"], "pip install tensorboard"),
        (["--wandb"], "pip install wandb"),
    ],
)
def test_bad_settings_are_one_line_errors(argv, message, small_text, tmp_path, capsys):
    if "--tensorboard" in argv and importlib.util.find_spec("tensorboard"):
        pytest.skip("tensorboard is installed")
    if "--wandb" in argv and importlib.util.find_spec("wandb"):
        pytest.skip("wandb is installed")
    with pytest.raises(SystemExit) as e:
        train_gpt2.main(tiny(small_text, tmp_path, "--max_steps", "1", *argv))
    assert isinstance(e.value.code, str) and e.value.code.startswith("error: ") and "\n" not in e.value.code
    assert message in e.value.code and not capsys.readouterr().err  # no usage text either


def test_run_dir_contract(straight_run):
    cfg = json.loads((straight_run / "config.json").read_text())
    assert cfg["max_steps"] == 8 and cfg["n_layer"] == 2
    kinds = ("train_loss", "val_loss", "hellaswag_acc", "sample")
    lines = [json.loads(s) for s in (straight_run / "metrics.jsonl").read_text().splitlines()]
    for e in lines:
        assert isinstance(e["step"], int) and e["time"] >= 0 and sum(k in e for k in kinds) == 1
        if "train_loss" in e:
            assert {"lr", "grad_norm", "dt_ms", "tok_per_s", "mfu"} <= set(e)
    assert sorted(events(straight_run, "train_loss")) == list(range(8))
    assert sorted(events(straight_run, "val_loss")) == [0, 4, 8]
    assert 8 in events(straight_run, "sample")
    assert [p.name for p in list_checkpoints(straight_run)] == ["ckpt_0000004.pt", "ckpt_0000008.pt"]
    ckpt = load_checkpoint(straight_run / "ckpt_0000008.pt")
    assert ckpt["step"] == 8 and ckpt["world_size"] == 1 and ckpt["train_config"]["max_steps"] == 8
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])
    model, tok = load_model(str(straight_run))  # what sample.py does with a run dir
    assert tok.name == "char" and torch.equal(model.state_dict()["lm_head.weight"], ckpt["model"]["lm_head.weight"])


def test_exact_resume_skips_unreadable_and_temp_files(straight_run, small_text, tmp_path):
    # as if the run had stopped after step 4 while writing a later checkpoint that never completed
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copy(straight_run / "ckpt_0000004.pt", out)
    (out / "ckpt_0000006.pt").write_bytes(b"truncated by a crash")
    (out / "ckpt_0000006.pt.unreadable").write_bytes(b"set aside by an earlier resume")  # kept, not overwritten
    (out / ".ckpt_0000007.pt.x1y2.tmp").write_bytes(b"half a checkpoint")
    train_gpt2.main(tiny(small_text, out, "--max_steps", "8", "--ckpt_interval", "4", "--keep_last", "0",
                         "--resume", "auto"))
    assert not list(out.glob(".ckpt_*.tmp"))
    assert (out / "ckpt_0000006.pt.unreadable").read_bytes() == b"set aside by an earlier resume"
    assert (out / "ckpt_0000006.pt.unreadable.1").read_bytes() == b"truncated by a crash"
    a, b = load_checkpoint(straight_run / "ckpt_0000008.pt"), load_checkpoint(out / "ckpt_0000008.pt")
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    straight, resumed = events(straight_run, "train_loss"), events(out, "train_loss")
    assert sorted(resumed) == [4, 5, 6, 7]
    assert all(resumed[s] == straight[s] for s in resumed)
    assert events(out, "val_loss")[8] == events(straight_run, "val_loss")[8]


def test_resume_with_other_model_flags_says_so(straight_run, small_text, tmp_path):
    out = tmp_path / "other"
    out.mkdir()
    shutil.copy(straight_run / "ckpt_0000004.pt", out)
    with pytest.raises(SystemExit, match="n_layer=2 \\(flags say 3\\)"):
        train_gpt2.main(tiny(small_text, out, "--max_steps", "8", "--resume", "auto", "--n_layer", "3"))


def test_eval_only_matches_the_trainers_val_loss(straight_run, small_text):
    result = train_gpt2.main(tiny(small_text, straight_run / "unused", "--eval_only", "--init",
                                  str(straight_run / "ckpt_0000008.pt")))
    assert result["val_loss"] == pytest.approx(events(straight_run, "val_loss")[8], abs=1e-6)


def test_eval_only_with_batch_size_auto_evaluates_at_the_batch_training_would_pick(straight_run, small_text):
    flags = ["--eval_only", "--init", str(straight_run / "ckpt_0000008.pt"), "--eval_iters", "2"]
    auto = train_gpt2.main(tiny(small_text, straight_run / "unused", *flags, "--batch_size", "auto"))
    # the largest micro-batch that makes the 256-token batch at T=32 in one step, as training would pick on CPU
    explicit = train_gpt2.main(tiny(small_text, straight_run / "unused", *flags, "--batch_size", "8"))
    assert math.isfinite(auto["val_loss"]) and auto["val_loss"] == explicit["val_loss"]


def test_sigterm_checkpoints_at_a_step_boundary_then_resume_is_exact(small_text, tmp_path):
    args = ["--max_steps", "30", "--ckpt_interval", "1000", "--keep_last", "0", "--eval_interval", "10"]
    ref = tmp_path / "ref"
    train_gpt2.main(tiny(small_text, ref, *args))
    out = tmp_path / "stopped"
    cmd = [sys.executable, str(ROOT / "train_gpt2.py"), *tiny(small_text, out, *args, "--resume", "auto")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and len(events(out, "train_loss") if (out / "metrics.jsonl").exists() else {}) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, log
    saved = list_checkpoints(out)
    assert len(saved) == 1 and "SIGTERM" in log, log
    stopped_at = load_checkpoint(saved[0])["step"]
    assert 3 <= stopped_at < 30
    train_gpt2.main(tiny(small_text, out, *args, "--resume", "auto"))
    a, b = load_checkpoint(ref / "ckpt_0000030.pt"), load_checkpoint(out / "ckpt_0000030.pt")
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())
    assert events(out, "train_loss") == events(ref, "train_loss")


def test_bigram_preset_reaches_its_known_loss(tmp_path):
    result = train_gpt2.main(["--preset", "shakespeare-bigram", "--out_dir", str(tmp_path), "--device", "cpu"])
    assert 2.40 < result["val_loss"] < 2.60  # the bigram's floor on tiny Shakespeare is ~2.45-2.5


def test_short_char_run_learns_well_below_the_bigram(tmp_path):
    result = train_gpt2.main(["--preset", "shakespeare-char", "--out_dir", str(tmp_path), "--device", "cpu",
                              "--max_steps", "300", "--eval_interval", "300", "--num_samples", "0"])
    assert result["val_loss"] < 2.2  # ~2.05; the bigram floor is ~2.45


def test_compile_path_with_eval_and_sampling(small_text, tmp_path):
    args = ["--max_steps", "3", "--eval_interval", "2", "--ckpt_interval", "3", "--num_samples", "1",
            "--sample_tokens", "8", "--sample_interval", "2", "--n_layer", "1", "--dropout", "0.0"]
    train_gpt2.main(tiny(small_text, tmp_path / "eager", *args))
    result = train_gpt2.main(tiny(small_text, tmp_path / "compiled", *args, "--compile", "true"))
    assert math.isfinite(result["val_loss"])
    eager, compiled = events(tmp_path / "eager", "train_loss"), events(tmp_path / "compiled", "train_loss")
    assert compiled == pytest.approx(eager, abs=1e-4)
    assert set(events(tmp_path / "compiled", "sample")) == {2, 3}
    ckpt = load_checkpoint(tmp_path / "compiled" / "ckpt_0000003.pt")
    assert not any("_orig_mod" in k for k in ckpt["model"])


def test_hellaswag_is_scored_at_every_eval_when_its_data_is_given(small_text, tmp_path):
    hellaswag = pytest.importorskip("hellaswag")
    rows = [{"ind": i, "ctx": ctx, "label": i % 4, "activity_label": "Talking",
             "endings": ["to the king.", "and then he left.", "with a sword.", "in the garden."]}
            for i, ctx in enumerate(["ROMEO: I will go", "JULIET: Come hither", "KING: Speak now"])]
    jsonl = tmp_path / "hs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    train_gpt2.main(tiny(small_text, out, "--preset", "shakespeare-gpt2", "--max_steps", "2", "--eval_interval", "2",
                         "--ckpt_interval", "2", "--num_samples", "0", "--hellaswag_jsonl", str(jsonl)))
    logged = events(out, "hellaswag_acc_norm")
    assert sorted(logged) == [0, 2]
    model, tok = load_model(str(out))
    ref = hellaswag.evaluate(model, hellaswag.load_examples(jsonl=jsonl), tokenizer=tok)
    assert logged[2] == pytest.approx(ref["acc_norm"])


MODERN = ["--pos", "rope", "--norm", "rmsnorm", "--mlp", "relu2", "--qk_norm", "true", "--tie_embeddings", "false",
          "--logit_softcap", "15", "--zero_init", "true", "--bias", "false", "--optimizer", "muon", "--muon_lr", "0.02"]


def test_modern_options_and_muon_resume_exactly(small_text, tmp_path):
    args = ["--max_steps", "6", "--ckpt_interval", "3", "--keep_last", "0", *MODERN]
    train_gpt2.main(tiny(small_text, tmp_path / "straight", *args))
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copy(tmp_path / "straight" / "ckpt_0000003.pt", out)
    train_gpt2.main(tiny(small_text, out, *args, "--resume", "auto"))
    a, b = load_checkpoint(tmp_path / "straight" / "ckpt_0000006.pt"), load_checkpoint(out / "ckpt_0000006.pt")
    assert a["model_config"]["pos"] == "rope" and a["train_config"]["optimizer"] == "muon"
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    with pytest.raises(SystemExit, match="--optimizer muon"):  # the optimizer state belongs to its optimizer
        train_gpt2.main(tiny(small_text, out, *args[:-4], "--optimizer", "adamw", "--max_steps", "9", "--resume",
                             "auto"))


def test_target_val_loss_records_when_and_stops(small_text, tmp_path):
    first = train_gpt2.main(tiny(small_text, tmp_path / "a", "--max_steps", "12"))
    target = events(tmp_path / "a", "val_loss")[8] + 1e-6  # reached at step 8 at the latest
    out = tmp_path / "b"
    result = train_gpt2.main(tiny(small_text, out, "--max_steps", "12", "--target_val_loss", str(target),
                                  "--stop_at_target", "true"))
    hit = result["target_reached"]
    assert hit is not None and hit["step"] <= 8 and result["step"] == hit["step"] and first["step"] == 12
    assert hit["tokens"] == hit["step"] * 256 and hit["val_loss"] <= target and hit["time"] > 0
    assert events(out, "target_reached")[hit["step"]] == hit
