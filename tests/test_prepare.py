"""prepare.py: tiny Shakespeare put in place from a local copy, a user's own input.txt kept, --help only helps."""

from pathlib import Path

import pytest
from conftest import shakespeare as verified_copy

import prepare
from gpt2repro.fileio import sha256_of

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def shakespeare(monkeypatch):
    """The tests' verified copy as the $TINYSHAKESPEARE copy; no download is ever tried."""
    source = verified_copy()
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


def test_tests_use_their_own_copy_not_the_users_input_txt(tmp_path, monkeypatch):
    """A user's own input.txt (kept by set-up, trained on by default) is never what the tests read as Shakespeare."""
    import conftest

    verified = verified_copy()
    (tmp_path / "input.txt").write_text("my own corpus\n")
    monkeypatch.setattr(conftest, "ROOT", tmp_path)
    monkeypatch.setattr(conftest, "TEST_DATA", tmp_path / "tests" / ".data")
    monkeypatch.setenv("TINYSHAKESPEARE", str(verified))
    monkeypatch.setattr(prepare, "_download", lambda url, timeout=15.0: None)
    conftest.shakespeare.cache_clear()
    try:
        copy = conftest.shakespeare()
    finally:
        conftest.shakespeare.cache_clear()
    assert copy.parent == tmp_path / "tests" / ".data" and sha256_of(copy) == prepare.SHAKESPEARE_SHA256
    assert (tmp_path / "input.txt").read_text() == "my own corpus\n"
    needles = ("ROOT / " + '"input.txt"', "open(" + '"input.txt"')  # split, so that this file does not match
    readers = [p.name for p in (ROOT / "tests").glob("test_*.py") if any(n in p.read_text() for n in needles)]
    assert readers == [], f"tests reading the repository's input.txt: {readers}"
