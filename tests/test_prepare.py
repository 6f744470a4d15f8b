"""prepare.py: tiny Shakespeare put in place from a local copy, a user's own input.txt kept, --help only helps."""

from pathlib import Path

import pytest

import prepare
from gpt2repro.fileio import sha256_of

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def shakespeare(monkeypatch):
    """The repository's verified input.txt as the $TINYSHAKESPEARE copy; no download is ever tried."""
    source = ROOT / "input.txt"
    if not source.is_file() or sha256_of(source) != prepare.SHAKESPEARE_SHA256:
        pytest.skip("input.txt is not tiny Shakespeare here: run `python prepare.py`")
    monkeypatch.setenv("TINYSHAKESPEARE", str(source))
    monkeypatch.setattr(prepare, "_download", lambda url, timeout=15.0: None)
    return source


def test_fresh_clone_gets_verified_shakespeare(shakespeare, tmp_path, capsys):
    dest = tmp_path / "input.txt"
    assert prepare.ensure_shakespeare(dest) == dest
    assert sha256_of(dest) == prepare.SHAKESPEARE_SHA256
    assert capsys.readouterr().out.startswith("input.txt: 1,115,394 bytes from ")


def test_own_input_txt_is_kept_and_said_so_in_one_line(shakespeare, tmp_path, capsys):
    """As with nanoGPT, people put their own text at input.txt: it is what they train on, never overwritten."""
    dest = tmp_path / "input.txt"
    dest.write_text("my own corpus\n")
    assert prepare.ensure_shakespeare(dest) == dest
    assert dest.read_text() == "my own corpus\n"
    out = capsys.readouterr().out
    assert out.startswith(f"{dest}: kept as it is (14 bytes, not tiny Shakespeare)") and out.count("\n") == 1, out


def test_help_prints_the_docstring_and_does_nothing(monkeypatch, capsys):
    def not_reached(*args, **kwargs):
        raise AssertionError("--help did the work")

    monkeypatch.setattr(prepare, "ensure_shakespeare", not_reached)
    monkeypatch.setattr(prepare, "ensure_gpt2_ranks", not_reached)
    with pytest.raises(SystemExit) as e:
        prepare.main(["--help"])
    assert e.value.code == 0
    assert "Put the offline assets in place" in capsys.readouterr().out
