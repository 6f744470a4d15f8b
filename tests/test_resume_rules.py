"""What `--resume` does with a flag set away from the checkpoint's value (config.ON_RESUME): applied, or refused
in one line; and a resumed run with nothing to train says why.

Each case resumes a real checkpoint of a tiny run and reads back what the resumed run wrote: its checkpoint's
optimizer state, its config.json, or the one-line refusal (with every file in the run directory unchanged).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

import train_gpt2
from gpt2repro.checkpoint import load_checkpoint
from gpt2repro.config import ON_RESUME, RESUME_APPLIED, RESUME_MODEL, RESUME_OPTIMIZER, RESUME_REFUSED, TrainConfig

TEXT = "ROMEO: to be or not to be, that is the question.\nJULIET: hello world, good night!\n" * 60
# shakespeare-char's Muon (blocks' matrices) and AdamW (the rest), so both optimizers' settings are covered
CHAR = ["--preset", "shakespeare-char", "--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--block_size", "16",
        "--batch_size", "2", "--total_batch_size", "32", "--eval_iters", "1", "--eval_interval", "2",
        "--ckpt_interval", "2", "--keep_last", "0", "--num_samples", "0", "--device", "cpu", "--dtype", "float32",
        "--compile", "false", "--log_interval", "1000"]
# the lecture's model (one residual block of 2 heads, no LayerNorm) for its own model flags
LECTURE = ["--preset", "lecture-residual", "--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--batch_size", "2",
           "--total_batch_size", "16", "--eval_iters", "1", "--eval_interval", "2", "--ckpt_interval", "2",
           "--keep_last", "0", "--num_samples", "0", "--device", "cpu", "--log_interval", "1000"]
ADDITION = ["--preset", "addition", "--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--batch_size", "8",
            "--total_batch_size", "96", "--eval_iters", "1", "--eval_interval", "2", "--ckpt_interval", "2",
            "--keep_last", "0", "--device", "cpu", "--log_interval", "1000"]


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, list[str]]:
    """Three finished 2-step runs, char text (GPT and the lecture's model) and addition; each value is the run's
    flags (out_dir included)."""
    root = tmp_path_factory.mktemp("runs")
    (root / "text.txt").write_text(TEXT)
    text = ["--text_path", str(root / "text.txt")]
    flags = {"char": CHAR + text, "lecture": LECTURE + text, "addition": ADDITION}
    for name, argv in flags.items():
        argv += ["--out_dir", str(root / name)]
        train_gpt2.main(argv + ["--max_steps", "2"])
    return flags


def copy_run(runs: dict, name: str, dest: Path) -> list[str]:
    """A copy of a finished run to resume; returns its flags, pointing at the copy."""
    src = Path(runs[name][-1])
    shutil.copytree(src, dest)
    return runs[name][:-1] + [str(dest)]


def test_every_flag_has_a_rule():
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    assert sorted(ON_RESUME) == sorted(names)
    assert set(RESUME_OPTIMIZER) <= set(RESUME_APPLIED)
    assert not (set(RESUME_APPLIED) & set(RESUME_REFUSED) or set(RESUME_APPLIED) & set(RESUME_MODEL)
                or set(RESUME_MODEL) & set(RESUME_REFUSED))


def groups(ckpt: dict) -> tuple[list[dict], list[dict]]:
    """AdamW's and Muon's param groups in a checkpoint of a Muon run."""
    state = ckpt["optimizer"]
    assert state["kinds"] == ["AdamW", "Muon"]
    adamw, muon = state["optimizers"]
    return adamw["param_groups"], muon["param_groups"]


def expect_weight_decay(adamw, muon, v):
    assert [g["weight_decay"] for g in adamw] == [v, 0.0]  # biases and gains are never decayed


def expect_beta1(adamw, muon, v):
    assert all(g["betas"][0] == v for g in adamw)


def expect_beta2(adamw, muon, v):
    assert all(g["betas"][1] == v for g in adamw)


def expect_eps(adamw, muon, v):
    assert all(g["eps"] == v for g in adamw)


def expect_max_lr(adamw, muon, v):
    assert all(g["lr_scale"] == pytest.approx(0.04 / v) for g in muon)  # Muon's peak stays --muon_lr


def expect_muon_lr(adamw, muon, v):
    assert all(g["lr_scale"] == pytest.approx(v / 4e-3) for g in muon)


def expect_muon_momentum(adamw, muon, v):
    assert all(g["momentum"] == v for g in muon)


def expect_muon_weight_decay(adamw, muon, v):
    assert all(g["weight_decay"] == v for g in muon)


# a value away from shakespeare-char's for each, and what the resumed optimizer must then hold
NEW_OPTIMIZER_VALUES = {"weight_decay": 0.05, "beta1": 0.85, "beta2": 0.95, "eps": 1e-6, "max_lr": 2e-3,
                        "muon_lr": 0.02, "muon_momentum": 0.9, "muon_weight_decay": 0.01}


def test_every_optimizer_flag_is_tested():
    assert sorted(NEW_OPTIMIZER_VALUES) == sorted(RESUME_OPTIMIZER)


@pytest.mark.parametrize("flag", sorted(NEW_OPTIMIZER_VALUES))
def test_changed_optimizer_setting_is_applied_on_resume(runs, tmp_path, flag):
    value = NEW_OPTIMIZER_VALUES[flag]
    before = groups(load_checkpoint(Path(runs["char"][-1]) / "ckpt_0000002.pt"))
    with pytest.raises(AssertionError):  # the checkpoint holds another value
        globals()[f"expect_{flag}"](*before, value)
    argv = copy_run(runs, "char", tmp_path / "run")
    train_gpt2.main(argv + ["--max_steps", "3", "--resume", "auto", f"--{flag}", str(value)])
    globals()[f"expect_{flag}"](*groups(load_checkpoint(tmp_path / "run" / "ckpt_0000003.pt")), value)
    assert json.loads((tmp_path / "run" / "config.json").read_text())[flag] == value


# a value away from the run's for each refused flag, and the run it is tried on
REFUSED_VALUES = {"optimizer": ("char", "adamw"), "seed": ("char", "7"), "shuffle": ("char", "false"),
                  "data": ("char", "gpt2-text"), "val_fraction": ("char", "0.2"), "digits": ("addition", "4"),
                  "ops": ("addition", "+-"), "init": ("char", "gpt2"), "fsdp": ("char", "true")}
# a model other than the run's for each model flag (the char run: 1 x 16, 2 heads, context 16, rope)
MODEL_VALUES = {"n_layer": "2", "n_head": "4", "n_embd": "32", "dropout": "0.1", "bias": "false", "pos": "learned",
                "norm": "rmsnorm", "mlp": "relu2", "qk_norm": "true", "tie_embeddings": "false",
                "logit_softcap": "5", "zero_init": "true", "vocab_size": "128", "block_size": "8",
                "model_type": "bigram"}
# the lecture model's own switches, tried on the lecture run
LECTURE_MODEL_VALUES = {"ffwd": "false", "residual": "false", "layernorm": "true"}


def test_every_refused_and_model_flag_is_tested():
    assert sorted(REFUSED_VALUES) == sorted(RESUME_REFUSED)
    assert sorted(MODEL_VALUES | LECTURE_MODEL_VALUES) == sorted(RESUME_MODEL)


@pytest.mark.parametrize("flag", sorted(REFUSED_VALUES) + sorted(MODEL_VALUES) + sorted(LECTURE_MODEL_VALUES))
def test_changed_flag_the_state_depends_on_is_refused(runs, tmp_path, flag, capsys):
    run, value = (REFUSED_VALUES.get(flag) or (flag in LECTURE_MODEL_VALUES and ("lecture", LECTURE_MODEL_VALUES[flag]))
                  or ("char", MODEL_VALUES[flag]))
    argv = copy_run(runs, run, tmp_path / "run")
    before = snapshot(tmp_path / "run")
    with pytest.raises(SystemExit) as e:
        train_gpt2.main(argv + ["--max_steps", "3", "--resume", "auto", f"--{flag}", value])
    msg = str(e.value.code)
    assert msg.startswith("error: --resume") and "\n" not in msg and flag in msg, msg
    assert snapshot(tmp_path / "run") == before


def test_addition_run_keeps_its_digits_when_unchanged(runs, tmp_path):
    """The refusal above is about a change: the same --digits and --ops resume."""
    argv = copy_run(runs, "addition", tmp_path / "run")
    result = train_gpt2.main(argv + ["--max_steps", "3", "--resume", "auto", "--digits", "3", "--ops", "+"])
    assert result["step"] == 3


def test_resume_after_the_target_was_reached_says_so(runs, tmp_path, capsys):
    losses = {e["step"]: e["val_loss"] for e in map(json.loads, (Path(runs["char"][-1]) / "metrics.jsonl")
                                                     .read_text().splitlines()) if "val_loss" in e}
    assert losses[2] < losses[0]
    target = str(losses[2] + 1e-6)  # reached at step 2, not at step 0
    argv = runs["char"][:-1] + [str(tmp_path / "run"), "--max_steps", "6", "--target_val_loss", target,
                                "--stop_at_target", "true"]
    assert train_gpt2.main(argv)["step"] == 2
    capsys.readouterr()
    result = train_gpt2.main(argv + ["--resume", "auto"])
    out = capsys.readouterr().out
    assert result["step"] == 2 and result["target_reached"]["step"] == 2
    assert f"--target_val_loss {target} was reached at step 2" in out and "--stop_at_target" in out
    assert sorted(p.name for p in (tmp_path / "run").glob("ckpt_*.pt")) == ["ckpt_0000002.pt"]
    # a lower target, not reached yet: the run goes on
    lower = str(losses[2] / 10)
    result = train_gpt2.main(argv[:-4] + ["--target_val_loss", lower, "--stop_at_target", "true", "--resume", "auto",
                                          "--max_steps", "3"])
    assert result["step"] == 3 and result["target_reached"] is None
