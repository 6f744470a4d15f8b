"""bench/ablate.py: every option's flags are valid, the table logic on made-up curves (winners, tokens to the
baseline's loss, the combined run's flags), and a tiny real run through the trainer."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
from conftest import shakespeare

from bench import ablate
from bench.ablate import BASELINE, OPTIONS, Budget, Result
from gpt2repro import config
from model import GPTConfig
from plot import load_run

ROOT = Path(__file__).resolve().parents[1]
TINY_SHAPE = ("--n_layer", "1", "--n_head", "2", "--n_embd", "16")


@pytest.mark.parametrize("budget", ablate.budgets(quick=False) + ablate.budgets(quick=True), ids=lambda b: b.name)
@pytest.mark.parametrize("option", [(), *OPTIONS.values()], ids=["baseline", *OPTIONS])
def test_every_run_of_the_table_is_a_valid_config(budget, option):
    argv = [*ablate.budget_flags(budget), *option, "--seed", "1", "--out_dir", "unused"]
    cfg = config.parse_config(argv)
    assert cfg.max_steps == budget.steps and cfg.total_batch_size == budget.tokens_per_step
    assert cfg.device == "cpu" and cfg.dtype == "float32" and not cfg.compile and cfg.dropout == 0.0
    # the option is the only difference from the baseline
    base = config.parse_config([*ablate.budget_flags(budget), "--seed", "1", "--out_dir", "unused"])
    changed = {k for k in vars(cfg) if getattr(cfg, k) != getattr(base, k)}
    assert bool(changed) == bool(option) and changed <= {flag.lstrip("-") for flag in option[::2]}
    # and the baseline is GPT-2 (GPTConfig's defaults) trained by AdamW, whatever the preset turns on
    shape = {"block_size", "vocab_size", "n_layer", "n_head", "n_embd", "dropout"}
    gpt2 = {f.name: f.default for f in dataclasses.fields(GPTConfig) if f.name not in shape}
    assert {name: getattr(base, name) for name in gpt2} == gpt2 and base.optimizer == "adamw"


def test_gpu_budget_is_gpt2_124m_on_cuda(monkeypatch):
    monkeypatch.setattr(ablate.torch.cuda, "get_device_name", lambda i=0: "Some GPU")
    (b,) = ablate.gpu_budgets(quick=False)
    cfg = config.parse_config([*ablate.budget_flags(b), *OPTIONS["rope"], "--out_dir", "unused"])
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size) == (12, 12, 768, 1024) and cfg.pos == "rope"
    assert cfg.device == "cuda" and cfg.dtype == "bfloat16" and not cfg.hellaswag and "Some GPU" in b.name


def test_tokens_to_and_mean_curve():
    a = Result([(0, 4.0), (100, 3.0), (200, 2.0)], 1.0, 2.0)
    b = Result([(0, 4.0), (100, 2.0), (200, 1.0)], 3.0, 6.0)
    assert ablate.mean_curve([a, b]) == [(0, 4.0), (100, 2.5), (200, 1.5)]
    assert ablate.tokens_to(a.curve, 3.0) == 100  # at or below
    assert ablate.tokens_to(a.curve, 2.5) == 200
    assert ablate.tokens_to(a.curve, 1.9) is None


def fake_curve(flags: tuple[str, ...], seed: int, tokens_per_step: int, steps: int) -> Result:
    """Loss falls linearly to 2.0; rmsnorm ends 1.0 lower, qk_norm 0.1 higher, no biases 0.005 lower (less than the
    seed noise of 0.01 per seed); effects add."""
    final = 2.0 - 1.0 * ("rmsnorm" in flags) + 0.1 * ("--qk_norm" in flags) - 0.005 * ("--bias" in flags) + 0.01 * seed
    curve = [(s * tokens_per_step, 4.0 - (4.0 - final) * s / steps) for s in range(0, steps + 1, 2)]
    return Result(curve, 10.0 + seed, 5.0 + seed)


def test_table_picks_winners_and_runs_them_together(monkeypatch, tmp_path):
    options = {"rmsnorm": ("--norm", "rmsnorm"), "qk_norm": ("--qk_norm", "true"), "relu2": ("--mlp", "relu2"),
               "no biases": ("--bias", "false")}
    monkeypatch.setattr(ablate, "OPTIONS", options)
    calls = []

    def fake_train(b: Budget, flags: tuple[str, ...], seed: int, out: Path) -> Result:
        calls.append((flags, seed))
        return fake_curve(flags, seed, b.tokens_per_step, b.steps)

    monkeypatch.setattr(ablate, "train_once", fake_train)
    b = Budget("char", ablate.CHAR, 4, 8, 10, 1, 1e-3, 5, 1)
    rows = ablate.ablate(b, [1, 2, 3], tmp_path)
    # relu2 ties the baseline and no biases is better by less than the seeds' noise: only rmsnorm beats it
    assert calls[-3:] == [(("--norm", "rmsnorm"), s) for s in (1, 2, 3)]
    assert len(calls) == 3 * (1 + len(options) + 1)
    by_case = {r.case: r for r in rows}
    base = by_case[f"char, {BASELINE}: final val loss (mean; 3 seeds 2.010-2.030)"]
    assert base.figure == pytest.approx(2.02) and base.ratio == pytest.approx(1.0)
    assert by_case[f"char, {BASELINE}: tokens to the baseline's 2.020"].figure == 10 * 32  # only the last eval
    winner_tokens = by_case["char, all winners (rmsnorm): tokens to the baseline's 2.020"]
    # the mean curve 4 - 2.98·s/10 first reaches 2.02 at s = 6.6: the eval at step 8
    assert winner_tokens.figure == 8 * 32 and winner_tokens.ratio == pytest.approx(0.8)
    assert winner_tokens.goal == "<= 0.6"
    lost = by_case["char, qk_norm: tokens to the baseline's 2.020 (not reached)"]
    assert math.isnan(lost.figure) and lost.ratio is None
    cpu = by_case["char, rmsnorm: CPU seconds per run (wall 12.0 s)"]
    assert cpu.figure == pytest.approx(7.0) and cpu.ratio == pytest.approx(1.0)


def test_a_single_seed_wins_by_any_margin():
    base, better = fake_curve((), 1, 32, 10), fake_curve(("--bias", "false"), 1, 32, 10)
    assert ablate.beats([better], [base]) and not ablate.beats([base], [base])
    # with three seeds the same margin is inside the noise
    assert not ablate.beats([fake_curve(("--bias", "false"), s, 32, 10) for s in (1, 2, 3)],
                            [fake_curve((), s, 32, 10) for s in (1, 2, 3)])


def test_no_winner_is_said_so(monkeypatch, tmp_path):
    monkeypatch.setattr(ablate, "OPTIONS", {"qk_norm": ("--qk_norm", "true")})
    monkeypatch.setattr(ablate, "train_once", lambda b, flags, seed, out: fake_curve(flags, seed, 32, b.steps))
    rows = ablate.ablate(Budget("char", ablate.CHAR, 4, 8, 10, 1, 1e-3, 5, 1), [1], tmp_path)
    assert rows[-1].case == "char: no option beat the baseline"
    assert not any("all winners" in r.case for r in rows)


@pytest.fixture(scope="module")
def small_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "small.txt"
    path.write_text(shakespeare().read_text()[:20000])
    return path


@pytest.mark.parametrize("flags", [("--preset", "shakespeare-char"), ("--preset", "shakespeare-gpt2")],
                         ids=["char", "gpt2 tokens"])
def test_real_runs_are_seeded_and_evaluated_on_the_budget(flags, small_text, tmp_path):
    b = Budget("tiny", (*flags, *TINY_SHAPE, "--text_path", str(small_text)), 2, 16, 6, 1, 3e-3, 3, 1)
    first = ablate.train_once(b, OPTIONS["rmsnorm"], 1, tmp_path / "a")
    again = ablate.train_once(b, OPTIONS["rmsnorm"], 1, tmp_path / "b")
    other = ablate.train_once(b, OPTIONS["rmsnorm"], 2, tmp_path / "c")
    assert [t for t, _ in first.curve] == [0, 64, 128, 192]  # evals every 2 steps of 32 tokens, and the last
    assert first.curve == again.curve  # the comparison between rows is only fair if a seed fixes the run
    assert other.curve != first.curve
    assert first.final < first.curve[0][1] and first.seconds > 0 and first.cpu_seconds > 0
    ran = load_run(tmp_path / "c").config
    assert ran["norm"] == "rmsnorm" and ran["seed"] == 2 and ran["max_steps"] == 6
