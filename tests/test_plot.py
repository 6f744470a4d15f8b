"""plot.py: the curves drawn are the logged numbers, baselines follow the run, bad metrics files are clear errors."""

import json
import random

import pytest

import plot


def write_run(run_dir, config: dict, seed: int = 0, steps: int = 60) -> dict:
    """A run directory in train_gpt2.py's format; returns the logged values by metric, for an independent check."""
    rng = random.Random(seed)
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(config), encoding="utf-8")
    logged = {"train_loss": {}, "val_loss": {}, "hellaswag_acc_norm": {}}
    lines = []
    for step in range(steps):
        t = round(0.5 * step, 3)
        if step % 10 == 0:
            logged["val_loss"][step] = 4.0 - step / 30 + rng.random() * 0.1
            lines.append({"step": step, "time": t, "val_loss": logged["val_loss"][step]})
        if step % 20 == 0:
            acc = 0.25 + rng.random() * 0.05
            logged["hellaswag_acc_norm"][step] = acc
            lines.append({"step": step, "time": t, "hellaswag_acc": acc - 0.01, "hellaswag_acc_norm": acc})
        logged["train_loss"][step] = 4.2 - step / 25 + rng.random() * 0.3
        lines.append({"step": step, "time": t, "train_loss": logged["train_loss"][step], "lr": 1e-3,
                      "grad_norm": 1.0, "dt_ms": 10.0, "tok_per_s": 1e4, "mfu": None})
    lines.append({"step": steps - 1, "time": 99.0, "sample": "Hello, I'm a language model, and"})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    return logged


GPT2_124M = {"preset": "gpt2-124m", "data": "shards", "model_type": "gpt", "init": "", "n_layer": 12, "n_head": 12,
             "n_embd": 768}
CHAR = {"preset": "shakespeare-char", "data": "char", "model_type": "gpt", "init": "", "n_layer": 4, "n_head": 4,
        "n_embd": 128}


def line(ax, label: str):
    found = [ln for ln in ax.get_lines() if ln.get_label() == label]
    assert len(found) == 1, [ln.get_label() for ln in ax.get_lines()]
    return found[0]


def test_cli_writes_png_of_the_logged_curves(tmp_path, capsys):
    logged = write_run(tmp_path / "run", GPT2_124M)
    out = tmp_path / "figs" / "loss.png"
    plot.main([str(tmp_path / "run"), "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    # the summary printed is the best of what was logged, found here by a plain loop
    best_val_step = min(logged["val_loss"], key=logged["val_loss"].get)
    best_hs_step = max(logged["hellaswag_acc_norm"], key=logged["hellaswag_acc_norm"].get)
    printed = capsys.readouterr().out
    assert f"min_val_loss {logged['val_loss'][best_val_step]:.4f} (step {best_val_step})" in printed
    assert f"max_hellaswag {logged['hellaswag_acc_norm'][best_hs_step]:.4f} (step {best_hs_step})" in printed

    runs = plot.load_runs([tmp_path / "run"])
    fig = plot.plot_runs(runs, plot.pick_baseline(runs, "auto"))
    ax_loss, ax_hs = fig.axes
    for ax, key, label in ((ax_loss, "train_loss", "train loss"), (ax_loss, "val_loss", "val loss"),
                           (ax_hs, "hellaswag_acc_norm", "HellaSwag (acc_norm)")):
        drawn = line(ax, label)
        assert list(drawn.get_xdata()) == sorted(logged[key])
        assert list(drawn.get_ydata()) == [logged[key][s] for s in sorted(logged[key])]
    assert line(ax_loss, "OpenAI GPT-2 (124M) checkpoint val loss").get_ydata()[0] == 3.2924
    assert line(ax_hs, "OpenAI GPT-2 (124M)").get_ydata()[0] == 0.2945
    assert line(ax_hs, "OpenAI GPT-3 (124M)").get_ydata()[0] == 0.337


def test_several_runs_on_one_figure(tmp_path):
    write_run(tmp_path / "a", CHAR, seed=1)
    write_run(tmp_path / "b", CHAR, seed=2, steps=30)
    out = tmp_path / "both.png"
    plot.main([str(tmp_path / "a"), str(tmp_path / "b" / "metrics.jsonl"), "--out", str(out)])
    assert out.stat().st_size > 10_000
    fig = plot.plot_runs(plot.load_runs([tmp_path / "a", tmp_path / "b"]))
    labels = [ln.get_label() for ln in fig.axes[0].get_lines()]
    assert labels == ["a: train loss", "a: val loss", "b: train loss", "b: val loss"]  # no baseline: not FineWeb


@pytest.mark.parametrize(
    "config, size",
    [(GPT2_124M, "124M"), (GPT2_124M | {"n_layer": 24, "n_head": 16, "n_embd": 1024}, "350M"),
     (GPT2_124M | {"n_layer": 48, "n_head": 25, "n_embd": 1600}, "1558M"), (GPT2_124M | {"init": "gpt2-large"}, "774M"),
     (GPT2_124M | {"n_layer": 6}, None), (CHAR, None), (GPT2_124M | {"data": "gpt2-text"}, None), ({}, None)],
)
def test_baseline_follows_the_run(config, size):
    got = plot.baseline_for(config)
    assert (got.size if got else None) == size


def test_baseline_numbers():
    b = plot.BASELINES
    assert [b[s].gpt2_hellaswag for s in ("124M", "350M", "774M", "1558M")] == [0.2945, 0.3752, 0.4320, 0.4889]
    assert [b[s].gpt3_hellaswag for s in ("124M", "350M", "774M", "1558M")] == [0.337, 0.436, 0.510, 0.547]
    assert b["124M"].gpt2_val_loss == 3.2924


def test_resumed_step_keeps_the_later_value(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 5, "time": 1, "val_loss": 3.0}\n{"step": 5, "time": 9, "val_loss": 2.5}\n\n',
                    encoding="utf-8")
    assert plot.series(plot.read_metrics(path), "val_loss") == ([5], [2.5])


def test_line_being_written_by_a_live_run_is_left_out(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 5, "time": 1, "val_loss": 3.0}\n{"step": 6, "time": 2, "train_lo', encoding="utf-8")
    assert plot.series(plot.read_metrics(path), "val_loss") == ([5], [3.0])


def test_torn_line_the_trainer_wrote_around_is_skipped_with_a_warning(tmp_path, capsys):
    """A crash tears the last line; the resumed trainer ends it with a newline and appends: the rest is kept."""
    run = tmp_path / "run"
    logged = write_run(run, CHAR, steps=30)
    lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    torn = lines[:20] + ['{"step": 17, "time": 8.5, "train_lo\n'] + lines[20:] + ['{"step": 29, "ti\n'] + ["\n"]
    (run / "metrics.jsonl").write_text("".join(torn), encoding="utf-8")
    records = plot.read_metrics(run / "metrics.jsonl")
    for key, values in logged.items():
        assert plot.series(records, key) == (sorted(values), [values[k] for k in sorted(values)])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "warning: " in err and "skipped 2 unparsable lines" in err
    assert f"{run / 'metrics.jsonl'}:21" in err  # the first one, to look at
    plot.main([str(run), "--out", str(tmp_path / "loss.png")])
    assert (tmp_path / "loss.png").stat().st_size > 0


@pytest.mark.parametrize(
    "content, where",
    [("", "metrics.jsonl: no metrics"), ("\n\n", "metrics.jsonl: no metrics"),
     ('{"step": 1, "train_l\n{"step": 2, "ti\n', "metrics.jsonl: no parsable line (2 lines are not valid JSON"),
     ('{"step": 0, "val_loss": 4.1}\n\n[1, 2]\n', "metrics.jsonl:3: expected a JSON object"),
     ('{"time": 0, "val_loss": 4.1}\n', "metrics.jsonl:1: expected a JSON object with an integer 'step'")],
)
def test_bad_metrics_is_a_one_line_error_naming_the_line(tmp_path, content, where):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(content, encoding="utf-8")
    out = tmp_path / "loss.png"
    with pytest.raises(SystemExit) as e:
        plot.main([str(run), "--out", str(out)])
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg and where in msg and str(run) in msg
    assert not out.exists()


def test_missing_run_dir_and_unknown_baseline(tmp_path):
    with pytest.raises(SystemExit, match="error: .*nowhere.*metrics.jsonl: no such file"):
        plot.main([str(tmp_path / "nowhere")])
    write_run(tmp_path / "run", CHAR)
    with pytest.raises(SystemExit, match="error: unknown baseline '2B'"):
        plot.main([str(tmp_path / "run"), "--baseline", "2B", "--out", str(tmp_path / "x.png")])


def test_existing_out_is_kept_unless_overwrite(tmp_path, capsys):
    write_run(tmp_path / "run", CHAR)
    out = tmp_path / "loss.png"
    out.write_bytes(b"an earlier figure")
    with pytest.raises(SystemExit) as e:
        plot.main([str(tmp_path / "run"), "--out", str(out)])
    assert str(e.value.code) == f"error: --out {out}: exists; pass --overwrite to replace it, or choose another --out"
    assert out.read_bytes() == b"an earlier figure"
    plot.main([str(tmp_path / "run"), "--out", str(out), "--overwrite"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("content, reason", [(b"[1, 2]", "holds a JSON list"), (b"\xff\xfe{}", "not UTF-8 text"),
                                             (b'{"preset": ', "not valid JSON")])
def test_bad_config_is_a_one_line_error_naming_the_file(tmp_path, content, reason):
    write_run(tmp_path / "run", CHAR)
    (tmp_path / "run" / "config.json").write_bytes(content)
    with pytest.raises(SystemExit) as e:
        plot.main([str(tmp_path / "run"), "--out", str(tmp_path / "loss.png")])
    assert str(e.value.code).startswith(f"error: {tmp_path / 'run' / 'config.json'}: {reason}"), e.value.code
    assert "\n" not in str(e.value.code) and not (tmp_path / "loss.png").exists()
